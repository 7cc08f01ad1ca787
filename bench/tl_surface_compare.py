"""unilens's TransformerLens model surface (``unilens.HookedTransformer``) against TransformerLens 4.3's
``TransformerBridge`` (no compatibility mode): every model-level property and method both have.

Run with the anchors virtualenv's python (TransformerLens 4.3 lives there, never in unilens's own environment):

    bench/.venv-anchors/bin/python bench/tl_surface_compare.py                  # SmolLM2 + llama, gpt2, qwen2, gemma2
    bench/.venv-anchors/bin/python bench/tl_surface_compare.py --types llama    # a subset

As bench/tl_compare.py: unilens runs on its own virtualenv's site-packages (put first on sys.path), the bridge is
booted on a second copy of the same weights. Compared: ``cfg`` fields (equal or both values), the stacked weights
``W_*`` / ``b_*`` and ``W_U`` / ``b_U`` / ``W_E`` / ``W_pos`` (max abs difference, or what a side raises), ``OV`` /
``QK`` (their products on the first and last layer, and every head's singular values), ``loss`` (mean and per
token), logits for each ``return_type``, ``stop_at_layer``, the greedy ``generate`` string, ``accumulated_bias``,
``get_token_position``, ``tokens_to_residual_directions``, ``embed`` / ``unembed``, ``all_head_labels``. Writes the
table into docs/coming-from-transformerlens.md between ``<!-- surface-table -->`` markers and prints JSON.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")] + sorted(glob.glob(str(ROOT / ".venv/lib/python*/site-packages")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

PROMPT = "The capital of France is"
DOC = ROOT / "docs" / "coming-from-transformerlens.md"
TYPES = ["smollm2", "llama", "gpt2", "qwen2", "gemma2"]
CFG_FIELDS = ("n_layers", "d_model", "n_heads", "d_head", "n_key_value_heads", "d_mlp", "d_vocab", "d_vocab_out",
              "n_ctx", "act_fn", "normalization_type", "positional_embedding_type", "eps", "gated_mlp", "final_rms",
              "rotary_dim", "rotary_base", "parallel_attn_mlp", "default_prepend_bos", "tie_word_embeddings",
              "output_logits_soft_cap", "attn_scores_soft_cap", "dtype", "original_architecture")
WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "W_gate", "W_out", "b_in", "b_out",
           "W_U", "b_U", "W_E", "W_pos")


def _load(kind: str):
    """(unilens view, bridge), each on its own copy of the same weights."""
    from tl_compare import _tokenizer_copy
    from transformer_lens.model_bridge import TransformerBridge

    from unilens import HookedTransformer
    from unilens.arch.loading import default_model_path, load_hf_model
    from unilens.testing import tiny_model

    if kind == "smollm2":
        view = HookedTransformer.from_pretrained(default_model_path(), dtype=torch.float32)
        other, tok = load_hf_model(default_model_path(), dtype=torch.float32)
    else:
        hf, tok = tiny_model(kind)
        view = HookedTransformer.from_pretrained(hf, tokenizer=tok)
        other, _ = tiny_model(kind)
    if not getattr(other.config, "architectures", None):
        other.config.architectures = [type(other).__name__]
    bridge = TransformerBridge.boot_transformers(kind if kind != "smollm2" else "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                 hf_model=other.eval(), tokenizer=_tokenizer_copy(tok), device="cpu",
                                                 dtype=torch.float32)
    return view, bridge


def _get(fn):
    """(value, None) or (None, 'ErrorType: first line')."""
    try:
        return fn(), None
    except Exception as err:  # noqa: BLE001 - a side raising is a result
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:90]}" if str(err) else type(err).__name__


def _diff(a, b) -> float | str:
    if a is None or b is None:
        return "None" if a is None and b is None else f"None on {'unilens' if a is None else 'bridge'}"
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    if not a.is_floating_point() and not b.is_floating_point() and a.shape == b.shape:  # token ids
        wrong = int((a != b).sum())
        return True if wrong == 0 else f"{wrong} of {a.numel()} ids differ"
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        return f"shape {list(a.shape)} vs {list(b.shape)}"
    return float((a - b).abs().max()) if a.numel() else 0.0


def _compare(name: str, ours, theirs, row: dict) -> None:
    (a, ea), (b, eb) = _get(ours), _get(theirs)
    if ea or eb:
        row[name] = {"unilens": ea or "ok", "bridge": eb or "ok"}
        if not ea and not eb:
            return
        if ea is None and b is None:  # the bridge raises; record what unilens gives
            shown = f"ok {list(a.shape)}" if isinstance(a, torch.Tensor) else ("None" if a is None else "ok")
            row[name]["unilens"] = shown
        return
    row[name] = _diff(a, b) if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else (a == b or [a, b])
    if row[name] == 0.0 and isinstance(a, torch.Tensor) and torch.equal(a, b):
        row[name] = True  # bitwise equal


def compare(kind: str) -> dict:
    started = time.perf_counter()
    row: dict = {"type": kind}
    try:
        view, bridge = _load(kind)
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:140]}"
        return row
    ids = view.to_tokens(PROMPT)
    row["to_tokens_equal"] = bool(torch.equal(bridge.to_tokens(PROMPT).cpu(), ids.cpu()))
    cfg = {}
    for field in CFG_FIELDS:
        a, b = getattr(view.cfg, field, "<missing>"), getattr(bridge.cfg, field, "<missing>")
        cfg[field] = True if a == b or str(a) == str(b) else [str(a), str(b)]
    row["cfg"] = cfg
    weights: dict = {}
    for name in WEIGHTS:
        _compare(name, lambda: getattr(view, name), lambda: getattr(bridge, name), weights)
    row["weights"] = weights
    circuits: dict = {}
    n = view.cfg.n_layers
    for name in ("OV", "QK"):
        for layer in sorted({0, n - 1}):
            _compare(f"{name}[{layer}].AB", lambda: getattr(view, name)[layer].AB,
                     lambda: getattr(bridge, name)[layer].AB, circuits)
        _compare(f"{name}.S", lambda: getattr(view, name).S, lambda: getattr(bridge, name).S, circuits)
    _compare("OV.norm()", lambda: view.OV.norm(), lambda: bridge.OV.norm(), circuits)
    row["circuits"] = circuits
    params: dict = {}
    ours_params, err = _get(view.tl_parameters)
    theirs_params, err2 = _get(bridge.tl_parameters)
    if err or err2:
        params["tl_parameters()"] = {"unilens": err or "ok", "bridge": err2 or "ok"}
    else:
        common = [k for k in ours_params if k in theirs_params]
        diffs = {k: _diff(ours_params[k], theirs_params[k]) for k in common}
        numeric = [v for v in diffs.values() if isinstance(v, float)]
        params["tl_parameters(): names both have"] = len(common)
        params["tl_parameters(): max abs diff"] = max(numeric) if numeric else "-"
        differing = [k for k, v in diffs.items() if not isinstance(v, float) or v > 1e-6]
        params["tl_parameters(): differing"] = differing[:6] or True
        params["tl_parameters(): only unilens / only bridge"] = [
            len([k for k in ours_params if k not in theirs_params]),
            len([k for k in theirs_params if k not in ours_params])]
    row["circuits"].update(params)
    out: dict = {}
    with torch.no_grad():
        _compare("logits (return_type='logits')", lambda: view(ids), lambda: bridge(ids), out)
        _compare("logits (text input)", lambda: view(PROMPT), lambda: bridge(PROMPT), out)
        _compare("loss", lambda: view(ids, return_type="loss"), lambda: bridge(ids, return_type="loss"), out)
        _compare("loss (loss_per_token)", lambda: view(ids, return_type="loss", loss_per_token=True),
                 lambda: bridge(ids, return_type="loss", loss_per_token=True), out)
        _compare("both[1]", lambda: view(ids, return_type="both")[1], lambda: bridge(ids, return_type="both")[1],
                 out)
        logits = view(ids)
        _compare("loss_fn(logits, tokens)", lambda: view.loss_fn(logits, ids), lambda: bridge.loss_fn(logits, ids),
                 out)
        _compare("stop_at_layer=1", lambda: view(ids, stop_at_layer=1), lambda: bridge(ids, stop_at_layer=1), out)
        _compare("run_with_cache(stop_at_layer=1)[0]", lambda: view.run_with_cache(ids, stop_at_layer=1)[0],
                 lambda: bridge.run_with_cache(ids, stop_at_layer=1)[0], out)
        _compare("run_with_hooks(return_type='loss')", lambda: view.run_with_hooks(ids, return_type="loss"),
                 lambda: bridge.run_with_hooks(ids, return_type="loss"), out)
        resid = torch.randn(1, 3, view.cfg.d_model, generator=torch.Generator().manual_seed(0))
        _compare("unembed(resid)", lambda: view.unembed(resid), lambda: bridge.unembed(resid), out)
        _compare("embed(tokens)", lambda: view.embed(ids), lambda: bridge.embed(ids), out)
        for layer in sorted({1, n - 1}):
            _compare(f"accumulated_bias({layer})", lambda: view.accumulated_bias(layer),
                     lambda: bridge.accumulated_bias(layer), out)
        _compare("accumulated_bias(1, mlp_input=True)", lambda: view.accumulated_bias(1, mlp_input=True),
                 lambda: bridge.accumulated_bias(1, mlp_input=True), out)
        token = int(ids[0, -2])
        _compare("get_token_position", lambda: view.get_token_position(token, ids),
                 lambda: bridge.get_token_position(token, ids), out)
        _compare("tokens_to_residual_directions", lambda: view.tokens_to_residual_directions(ids[0]),
                 lambda: bridge.tokens_to_residual_directions(ids[0]), out)
        _compare("all_head_labels", lambda: list(view.all_head_labels), lambda: list(bridge.all_head_labels), out)
        greedy = dict(max_new_tokens=8, do_sample=False, verbose=False)
        _compare("generate(str, greedy)", lambda: view.generate(PROMPT, **greedy),
                 lambda: bridge.generate(PROMPT, **greedy), out)
        _compare("generate(tokens, greedy)", lambda: view.generate(ids, **greedy),
                 lambda: bridge.generate(ids, **greedy), out)
        _compare("generate(tokens, greedy, use_past_kv_cache=False)",
                 lambda: view.generate(ids, use_past_kv_cache=False, **greedy),
                 lambda: bridge.generate(ids, use_past_kv_cache=False, **greedy), out)
        # the bridge against itself: its key/value-cache loop against its full forward per token
        _compare("bridge: generate with vs without kv cache", lambda: bridge.generate(ids, **greedy),
                 lambda: bridge.generate(ids, use_past_kv_cache=False, **greedy), out)
    row["methods"] = out
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _cell(value) -> str:
    if value is True:
        return "equal"
    if isinstance(value, float):
        return "0" if value == 0 else f"{value:.1e}"
    if isinstance(value, dict):
        return "; ".join(f"{k}: {v}" for k, v in value.items()).replace("|", "/")
    if isinstance(value, list):
        return " vs ".join(str(v) for v in value).replace("|", "/")
    return str(value).replace("|", "/")


def markdown(rows: list[dict], versions: dict) -> str:
    ok = [r for r in rows if "error" not in r]
    kinds = [r["type"] for r in ok]
    lines = [f"Produced by `bench/tl_surface_compare.py` (unilens vs TransformerLens {versions['transformer_lens']}'s "
             "`TransformerBridge`, no compatibility mode, on two copies of the same weights; prompt "
             f"{PROMPT!r}). A number is the max abs difference; \"equal\": same value; \"A vs B\": unilens's, then the "
             "bridge's; where a side raises, what it raises.", ""]
    for r in rows:
        if "error" in r:
            lines.append(f"- {r['type']}: not compared ({r['error']})")
    lines += ["", "| | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for section in ("cfg", "weights", "circuits", "methods"):
        names = list(dict.fromkeys(k for r in ok for k in r[section]))
        lines.append(f"| **{section}** |" + " |" * len(kinds))
        for name in names:
            cells = [_cell(r[section].get(name, "-")) for r in ok]
            lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines.append("| `to_tokens` | " + " | ".join("equal" if r["to_tokens_equal"] else "differ" for r in ok) + " |")
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text()
    start, end = "<!-- surface-table -->", "<!-- /surface-table -->"
    if start not in text or end not in text:
        raise SystemExit(f"{DOC} has no {start} ... {end} markers")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    DOC.write_text(f"{before}{start}\n{table}\n{end}{after}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="*", default=TYPES)
    parser.add_argument("--no-doc", action="store_true", help="print JSON only")
    parser.add_argument("--merge", nargs="*", default=[], help="JSON outputs of earlier runs: their rows join the "
                        "table (this run's rows replace theirs for the same type)")
    args = parser.parse_args()
    import transformer_lens

    import unilens

    torch.manual_seed(0)
    versions = {"transformer_lens": getattr(transformer_lens, "__version__", "4.3"), "unilens": unilens.__version__,
                "torch": torch.__version__}
    rows = []
    for kind in args.types:
        rows.append(compare(kind))
        print(f"{kind}: {rows[-1].get('seconds', rows[-1].get('error'))}", file=sys.stderr)
    merged = {}
    for path in args.merge:
        merged.update({r["type"]: r for r in json.loads(Path(path).read_text())["rows"]})
    merged.update({r["type"]: r for r in rows})
    rows = [merged[t] for t in TYPES if t in merged] + [r for t, r in merged.items() if t not in TYPES]
    if not args.no_doc:
        write_doc(markdown(rows, versions))
    print(json.dumps({"versions": versions, "rows": rows}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
