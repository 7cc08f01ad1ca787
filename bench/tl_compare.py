"""Every TransformerLens hook name of unilens's TL surface against TransformerLens 4.3's TransformerBridge.

Run with the anchors virtualenv's python (TransformerLens 4.3 lives there, never in unilens's own environment):

    bench/.venv-anchors/bin/python bench/tl_compare.py            # SmolLM2 + every ZOO_REQUIRED tiny type
    bench/.venv-anchors/bin/python bench/tl_compare.py --quick    # SmolLM2 + llama, gpt2

The anchors venv carries nnsight 0.7 (for nnterp), unilens needs 0.8.1: this script puts unilens's own
virtualenv's site-packages (/work/main/.venv, same torch / transformers versions) first on sys.path, so unilens
runs on its own lock and TransformerLens (and its extra dependencies) come from the anchors venv.

For each model type: two copies of the same weights (the tiny zoo is seeded; SmolLM2 is loaded twice from the
same safetensors), the bridge booted on one (``boot_transformers(hf_model=...)``: it forces eager attention
and wraps modules, so it does not share unilens's object), unilens on the other; the same token ids; the bridge
with use_attn_result / use_split_qkv_input / use_hook_mlp_in on (and a second run with use_attn_in for
hook_attn_in); unilens's ``run_with_cache`` with every name it has. Every name both have is compared (max abs
diff); names only one side has are listed. Writes docs/tl-parity.md (and prints JSON).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)] + sorted(glob.glob(str(ROOT / ".venv/lib/python*/site-packages")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

TOL = 1e-5
PROMPT = "The capital of France is"


def _tokenizer_copy(tok):
    """The bridge re-reads its tokenizer from ``name_or_path``: hand it a saved copy."""
    from transformers import AutoTokenizer

    folder = tempfile.mkdtemp(prefix="tl_compare_tok_")
    tok.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def _load(kind: str):
    """(unilens model, second HF copy of the same weights, tokenizer)."""
    from unilens import StandardizedTransformer, load_default
    from unilens.arch.loading import default_model_path, load_hf_model
    from unilens.testing import tiny_model

    if kind == "smollm2":
        model = load_default()
        other, tok = load_hf_model(default_model_path(), dtype=torch.float32)
        return model, other.eval(), tok
    hf, tok = tiny_model(kind)
    model = StandardizedTransformer(hf, tokenizer=tok)
    other, _ = tiny_model(kind)
    return model, other.eval(), tok


# run_with_hooks edits compared on both sides (the last block's edits, and block 0's, for each kind of point)
EDIT_NAMES = ("hook_pos_embed",  # learned absolute positions only (GPT-2, OPT): absent elsewhere, skipped
              "blocks.0.hook_resid_pre", "blocks.0.hook_q_input", "blocks.0.hook_k_input", "blocks.0.hook_v_input",
              "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_v", "blocks.0.attn.hook_rot_q",
              "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_z", "blocks.0.attn.hook_result",
              "blocks.0.hook_attn_out", "blocks.0.ln1.hook_scale", "blocks.0.ln1.hook_normalized",
              "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_in", "blocks.0.mlp.hook_pre", "blocks.0.mlp.hook_post",
              "blocks.0.hook_mlp_out", "blocks.0.hook_resid_post", "ln_final.hook_scale",
              "ln_final.hook_normalized")  # fmt: skip


def _half(x, hook):
    return x * 0.5


def _eager_copy(kind: str):
    from unilens.arch.loading import default_model_path, load_hf_model
    from unilens.testing import tiny_model

    if kind == "smollm2":
        return load_hf_model(default_model_path(), dtype=torch.float32, attn_implementation="eager")[0].eval()
    return tiny_model(kind, attn_implementation="eager")[0].eval()


def _bridge_cache(bridge, ids, flags):
    for name, value in flags.items():
        getattr(bridge, name)(value)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
    return logits, {k: v.detach() for k, v in cache.items() if isinstance(v, torch.Tensor)}


def compare(kind: str) -> dict:
    from transformer_lens.model_bridge import TransformerBridge

    from unilens.compat import tl

    row: dict = {"type": kind}
    model, other, tok = _load(kind)
    same = all(torch.equal(a, b) for a, b in zip(model.module_accessor.model.state_dict().values(),
                                                  other.state_dict().values()))
    row["same_weights"] = same
    if not getattr(other.config, "architectures", None):  # a checkpoint's config names its class; from_config's not
        other.config.architectures = [type(other).__name__]
    try:
        bridge = TransformerBridge.boot_transformers(kind, hf_model=other, tokenizer=_tokenizer_copy(tok),
                                                     device="cpu", dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - an unsupported type is a result, not a failure
        row["bridge"] = f"unsupported: {type(err).__name__}: {str(err).splitlines()[0][:140]}"
        return row
    row["bridge"] = "supported"
    baseline = {}  # the bridge's default forward (no flags), to see how much its flags move its own numbers
    ids = model.to_tokens(PROMPT)
    row["to_tokens_equal"] = bool(torch.equal(bridge.to_tokens(PROMPT).cpu(), ids.cpu()))
    row["to_str_tokens_equal"] = bridge.to_str_tokens(PROMPT) == model.to_str_tokens(PROMPT)
    ours_names = tl.hook_names(model)
    # names_filter=None: every name (where the model cannot give two in one forward, the filter leaves one out),
    # attn.hook_result in a run of its own, as the bridge (use_attn_result): reading it makes the attention's output
    # the sum of the per-head results, which rounds differently from the fused output projection
    ours_logits, ours = model.run_with_cache(ids, names_filter=lambda n: not n.endswith("attn.hook_result"))
    result_logits, results = model.run_with_cache(ids, names_filter=lambda n: n.endswith("attn.hook_result"))
    ours = {**dict(ours.items()), **dict(results.items())}
    ours_names = [n for n in tl.hook_names(model) if n in ours]
    theirs: dict = {}
    errors = []
    # the bridge's default forward first: its flags change its own arithmetic (use_split_qkv_input projects per
    # head, use_attn_result splits the output projection), so each name comes from the first run that has it
    for flags in ({}, {"set_use_attn_result": True}, {"set_use_attn_result": False, "set_use_split_qkv_input": True,
                                                       "set_use_hook_mlp_in": True},
                  {"set_use_split_qkv_input": False, "set_use_attn_in": True}):
        try:
            _, cache = _bridge_cache(bridge, ids, flags)
        except Exception as err:  # noqa: BLE001
            errors.append(f"{flags}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
            try:
                _, cache = _bridge_cache(bridge, ids, {k: False for k in flags})
            except Exception:  # noqa: BLE001
                continue
        if not flags:
            baseline = cache
        elif "set_use_split_qkv_input" in flags and flags["set_use_split_qkv_input"]:
            # how far the bridge's own residual stream moves when it projects per head (its rounding, not ours)
            drift = [float((cache[k] - v).abs().max()) for k, v in baseline.items()
                     if k.endswith("hook_resid_post") and k in cache]
            row["bridge_split_qkv_drift"] = max(drift, default=None)
        for k, v in cache.items():
            theirs.setdefault(k, v)
    row["bridge_flag_errors"] = errors
    # a third copy, plain HF eager: which side a difference comes from
    ref = _eager_copy(kind)
    with torch.no_grad():
        hf = ref(input_ids=ids, output_hidden_states=True)
    n = model.num_layers
    ours_resid = torch.stack([ours[f"blocks.{i}.hook_resid_pre"] for i in range(n)])
    theirs_resid = torch.stack([baseline[f"blocks.{i}.hook_resid_pre"] for i in range(n)])
    hf_resid = torch.stack(hf.hidden_states[:n])
    row["vs_hf_eager"] = {
        "unilens_logits": float((ours_logits - hf.logits).abs().max()),
        "unilens_logits_reading_hook_result": float((result_logits - hf.logits).abs().max()),
        "bridge_logits": float((theirs.get("unembed.hook_out", theirs.get("hook_unembed")) - hf.logits).abs().max()),
        "unilens_resid_pre": float((ours_resid - hf_resid).abs().max()),
        "bridge_resid_pre": float((theirs_resid - hf_resid).abs().max()),
    }
    del ref
    diffs: dict[str, float] = {}
    shape_mismatch = {}
    for name in ours_names:
        if name not in theirs:
            continue
        a, b = ours[name].float(), theirs[name].float()
        if a.shape != b.shape:
            shape_mismatch[name] = [list(a.shape), list(b.shape)]
            continue
        # a masked score is -inf on one side and float32's lowest value on the other (HF's GPT-J fills with it):
        # both mean "masked" and give probability 0
        low = torch.finfo(torch.float32).min / 2
        both_masked = (a <= low) & (b <= low)
        d = (a - b).abs().masked_fill(both_masked, 0.0)
        if name.endswith("hook_attn_scores"):  # keys a query may not see: both sides must mask them (any value)
            causal = torch.ones(a.shape[-2:], dtype=torch.bool).tril()
            if not bool((a[..., ~causal] <= low).all()):
                shape_mismatch[name + " (mask)"] = ["unilens's masked entries are not the causal ones", []]
            if bool((b[..., ~causal] > low).any()):
                row.setdefault("bridge_unmasked_scores", []).append(name)
            d = d.masked_fill(~causal, 0.0)
        diffs[name] = float(d.max()) if d.numel() else 0.0
    # edits: the same edit (x -> 0.5 x) through run_with_hooks on both sides, compared on the logits
    row["edits"] = {}
    with torch.no_grad():  # the unedited forwards: unilens keeps sdpa where no attention internal is touched
        row["unedited_diff"] = float((model.run_with_hooks(ids).float() - bridge.run_with_hooks(ids).float()).abs().max())
    for name in EDIT_NAMES:
        if name not in theirs or name not in ours_names:
            continue
        # the bridge's default forward, except the per-head input copies, which need use_split_qkv_input (with it
        # on, the bridge re-applies ln1 per head and drops edits of ln1's own hooks)
        for flag, value in (("set_use_attn_in", False), ("set_use_split_qkv_input", name.endswith("_input")),
                            ("set_use_attn_result", name.endswith("hook_result"))):
            try:
                getattr(bridge, flag)(value)
            except Exception:  # noqa: BLE001 - refused above already (recorded)
                pass
        with torch.no_grad():
            try:
                a = model.run_with_hooks(ids, fwd_hooks=[(name, _half)])
            except Exception as err:  # noqa: BLE001
                row["edits"][name] = {"error": f"unilens: {type(err).__name__}: {str(err).splitlines()[0][:100]}"}
                continue
            try:
                b = bridge.run_with_hooks(ids, fwd_hooks=[(name, _half)])
                plain = bridge.run_with_hooks(ids, fwd_hooks=[])
            except Exception as err:  # noqa: BLE001
                row["edits"][name] = {"error": f"bridge: {type(err).__name__}: {str(err).splitlines()[0][:100]}"}
                continue
        row["edits"][name] = {"diff": float((a.float() - b.float()).abs().max()),
                              "effect": float((b.float() - plain.float()).abs().max())}
    surface = set(tl.BLOCK_ALIASES) | set(tl.MODEL_ALIASES)
    suffix = lambda n: n.split(".", 2)[2] if n.startswith("blocks.") else n  # noqa: E731
    row["compared"] = len(diffs)
    row["max_abs_diff"] = max(diffs.values(), default=None)
    row["worst"] = max(diffs, key=diffs.get) if diffs else None
    row["over_tol"] = {k: v for k, v in diffs.items() if v > TOL}
    row["shape_mismatch"] = shape_mismatch
    row["per_name"] = {}
    for name, v in diffs.items():
        key = suffix(name)
        row["per_name"][key] = max(row["per_name"].get(key, 0.0), v)
    row["only_unilens"] = sorted({suffix(n) for n in ours_names if n not in theirs})
    row["only_bridge"] = sorted({suffix(n) for n in theirs if suffix(n) in surface and n not in ours})
    del bridge, model, other
    return row


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.1e}" if v else "0"


def write_markdown(rows: list[dict], versions: dict, path: Path) -> None:
    lines = [
        "# TransformerLens parity: unilens's TL surface against TransformerLens 4.3's bridge",
        "",
        "Made by `bench/.venv-anchors/bin/python bench/tl_compare.py` "
        f"({', '.join(f'{k} {v}' for k, v in versions.items())}), CPU, float32, prompt {PROMPT!r} with BOS. For each "
        "model type, the bridge (`TransformerBridge.boot_transformers(hf_model=...)`, use_attn_result, "
        "use_split_qkv_input, use_hook_mlp_in, and use_attn_in in a second run) and unilens's `run_with_cache` "
        "run on two copies of the same weights and the same token ids; every TL hook name both have is compared "
        f"(max abs difference, -inf masked entries equal). Target: <= {TOL:g}.",
        "",
        "| type | bridge | names compared | max abs diff | worst name | over 1e-5 | only unilens has | only the bridge has "
        "| logits vs HF eager: unilens / bridge |",
        "|---|---|---:|---:|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("bridge") != "supported":
            lines.append(f"| {r['type']} | {r.get('bridge', r.get('error', '-'))} | - | - | - | - | - | - | - |")
            continue
        over = ", ".join(f"{k} ({v:.1e})" for k, v in sorted(r["over_tol"].items())[:4])
        if len(r["over_tol"]) > 4:
            over += f" and {len(r['over_tol']) - 4} more"
        lines.append(
            f"| {r['type']} | supported | {r['compared']} | {_fmt(r['max_abs_diff'])} | {r['worst'] or '-'} | "
            f"{over or 'none'} | {', '.join(r['only_unilens']) or '-'} | {', '.join(r['only_bridge']) or '-'} | "
            f"{_fmt(r['vs_hf_eager']['unilens_logits'])} / {_fmt(r['vs_hf_eager']['bridge_logits'])} |"
        )
    smol = next((r for r in rows if r["type"] == "smollm2" and r.get("bridge") == "supported"), None)
    if smol is not None:
        lines += ["", "## SmolLM2-135M, per hook name (max over the 30 blocks)", "", "| TL name | max abs diff |",
                  "|---|---:|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in smol["per_name"].items()]
        lines += ["", f"to_tokens equal: {smol['to_tokens_equal']}; to_str_tokens equal: {smol['to_str_tokens_equal']}."]
    lines += ["", "## Edits: `run_with_hooks` with x -> 0.5 x at one name, logits compared", "",
              "The same edit on both sides; `max abs diff` between the edited logits, `effect` how much the edit "
              "moved the bridge's logits (so a zero diff is not a no-op), `unedited` the difference of the two "
              "forwards without an edit (unilens keeps the model's sdpa kernel unless an attention internal is "
              "touched; the bridge always runs eager): the floor of the edits' differences.", "",
              "| type | unedited | names edited | max abs diff | worst name | smallest effect | over 1e-5 | refused (by) |",
              "|---|---:|---:|---:|---|---:|---|---|"]
    for r in rows:
        edits = {k: v for k, v in r.get("edits", {}).items() if "diff" in v}
        if not edits:
            continue
        worst = max(edits, key=lambda k: edits[k]["diff"])
        effect = min(v["effect"] for v in edits.values())
        failed = [f"{k} ({v['error'].split(':')[0]})" for k, v in r["edits"].items() if "error" in v]
        over = [f"{k} ({v['diff']:.1e}, bridge effect {v['effect']:.1e})" for k, v in edits.items() if v["diff"] > TOL]
        lines.append(f"| {r['type']} | {_fmt(r.get('unedited_diff'))} | {len(edits)} | {_fmt(edits[worst]['diff'])} | "
                     f"{worst} | {_fmt(effect)} | "
                     f"{'; '.join(over) or 'none'} | {', '.join(failed) or '-'} |")
    notes = [r for r in rows if r.get("shape_mismatch") or r.get("bridge_flag_errors")
             or r.get("bridge_unmasked_scores") or r.get("bridge_split_qkv_drift")]
    if notes:
        lines += ["", "## Notes", ""]
        for r in notes:
            if r.get("bridge_unmasked_scores"):
                lines.append(f"- {r['type']}: the bridge's hook_attn_scores hold unmasked values at the future keys "
                             f"({len(r['bridge_unmasked_scores'])} blocks; unilens's hold the mask there), so scores "
                             "are compared on the keys each query sees; the patterns agree everywhere.")
            hr = r.get("vs_hf_eager", {}).get("unilens_logits_reading_hook_result")
            if hr and hr > TOL:
                lines.append(f"- {r['type']}: reading attn.hook_result makes unilens's attention output the sum of the "
                             f"per-head results (+ bias), which moves the logits by {hr:.1e} against HF eager "
                             "(float32 rounding of a different summation order); hook_result is therefore compared "
                             "from a run of its own, as the bridge's use_attn_result run.")
            if r.get("bridge_split_qkv_drift"):
                lines.append(f"- {r['type']}: the per-head input names (hook_attn_in, hook_q/k/v_input, "
                             "hook_mlp_in) come from the bridge run with use_split_qkv_input, which projects each "
                             "head separately: the bridge's own hook_resid_post moves by up to "
                             f"{r['bridge_split_qkv_drift']:.1e} against its default run (rounding), which bounds "
                             "those names' differences.")
            if r.get("shape_mismatch"):
                first = next(iter(r["shape_mismatch"].items()))
                lines.append(f"- {r['type']}: {len(r['shape_mismatch'])} names differ in shape, e.g. {first[0]}: "
                             f"unilens {first[1][0]} vs bridge {first[1][1]}")
            for e in r.get("bridge_flag_errors", []):
                lines.append(f"- {r['type']}: the bridge refused {e}")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--types", nargs="*")
    parser.add_argument("--out", default=str(ROOT / "docs" / "tl-parity.md"))
    parser.add_argument("--merge", nargs="*", help="JSON outputs of earlier runs: their rows, except --types re-run")
    args = parser.parse_args()
    from importlib import metadata as md

    from unilens.testing import ZOO_REQUIRED

    kinds = args.types or (["smollm2", "llama", "gpt2"] if args.quick else ["smollm2", *ZOO_REQUIRED])
    rows = []
    previous = {}
    for path in args.merge or []:  # rows of earlier runs (JSON printed by this script), replaced by this run's
        previous.update({r["type"]: r for r in json.loads(Path(path).read_text())["rows"]})
    if previous:
        kinds = [k for k in previous if k not in set(args.types or [])] + list(args.types or [])
    for kind in kinds:
        if kind in previous and kind not in set(args.types or []):
            rows.append(previous[kind])
            continue
        start = time.time()
        try:
            row = compare(kind)
        except Exception as err:  # noqa: BLE001 - one type failing still reports the others
            row = {"type": kind, "bridge": f"error: {type(err).__name__}: {str(err).splitlines()[0][:140]}"}
        row["seconds"] = round(time.time() - start, 1)
        rows.append(row)
        print(f"[tl_compare] {kind}: {row.get('bridge')} compared={row.get('compared')} "
              f"max={row.get('max_abs_diff')} worst={row.get('worst')}", file=sys.stderr, flush=True)
    versions = {p: md.version(p) for p in ("transformer-lens", "torch", "transformers", "nnsight")}
    versions["nnsight"] = __import__("nnsight").__version__
    write_markdown(rows, versions, Path(args.out))
    print(json.dumps({"versions": versions, "rows": rows}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
