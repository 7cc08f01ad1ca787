"""TransformerLens 4.3's ActivationCache methods: unilens's cache against TransformerBridge's, method by method.

Run with the anchors virtualenv's python (TransformerLens lives there, never in unilens's own environment):

    bench/.venv-anchors/bin/python bench/tl_cache_compare.py                  # SmolLM2 + llama, gpt2, qwen3
    bench/.venv-anchors/bin/python bench/tl_cache_compare.py --types llama    # some types only
    bench/.venv-anchors/bin/python bench/tl_cache_compare.py --markdown bench/TL_CACHE_PARITY.md  # the table

The same weights on both sides (bench/tl_compare.py's loading: two copies, the bridge booted on one with
``boot_transformers(hf_model=...)``, no compatibility mode, no weight processing), the same token ids (two rows of
the same length, BOS first), each side's ``run_with_cache`` with every name; then every method both caches have,
called the same way, and the max abs difference of the results (absolute, and relative to the bridge's largest
value; labels compared too): ``own_forward`` (each side's own cache: includes the two forwards' rounding, unilens
keeping sdpa where the bridge runs eager) and ``same_cache`` (unilens's method on the bridge's cached tensors: the
methods alone). Prints JSON; ``--out`` writes it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from tl_compare import PROMPT, _load, _tokenizer_copy  # noqa: E402  (sets sys.path to unilens's venv first)

DEFAULT_TYPES = ["smollm2", "llama", "gpt2", "qwen3"]


def _ids(model) -> torch.Tensor:
    """Two rows of equal length: the prompt, and its tokens after BOS reversed."""
    ids = model.to_tokens(PROMPT)
    return torch.cat([ids, torch.cat([ids[:, :1], ids[:, 1:].flip(-1)], dim=-1)])


def _diff(a, b) -> list | str:
    """[max abs difference, that relative to the bridge's largest value] (or why they cannot be compared)."""
    if isinstance(a, tuple):  # (tensor, labels)
        if a[1] != b[1]:
            first = next((i for i, (x, y) in enumerate(zip(a[1], b[1])) if x != y), min(len(a[1]), len(b[1])))
            return f"labels differ at {first}: {a[1][first:first + 2]} vs {b[1][first:first + 2]}"
        a, b = a[0], b[0]
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not a.numel():
        return [0.0, 0.0]
    d = float((a - b).abs().max())
    return [d, d / max(float(b.abs().max()), 1e-30)]


def _calls(model, n: int, d_model: int) -> dict:
    """method label -> f(cache): the same call on either side."""
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(0))
    last = n - 1
    return {
        "compute_head_results (blocks.*.attn.hook_result)": lambda c: (
            c.compute_head_results(), torch.stack([c["result", l] for l in range(n)]))[1],
        "stack_head_results(-1, incl_remainder)": lambda c: c.stack_head_results(-1, return_labels=True,
                                                                                incl_remainder=True),
        "get_neuron_results(n - 1)": lambda c: c.get_neuron_results(last),
        "get_neuron_results(0, neuron_slice=[1, 5], pos_slice=-1)": lambda c: c.get_neuron_results(
            0, neuron_slice=[1, 5], pos_slice=-1),
        "get_neuron_results(0, project_output_onto=d)": lambda c: c.get_neuron_results(
            0, project_output_onto=direction),
        "stack_neuron_results(-1, pos_slice=-1)": lambda c: c.stack_neuron_results(
            -1, pos_slice=-1, return_labels=True),
        "stack_neuron_results(n - 1, incl_remainder, mlp_input)": lambda c: c.stack_neuron_results(
            last, return_labels=True, incl_remainder=True, mlp_input=True),
        "stack_neuron_results(-1, apply_ln, project_output_onto=d)": lambda c: c.stack_neuron_results(
            -1, apply_ln=True, project_output_onto=direction, return_labels=True),
        "get_full_resid_decomposition(pos_slice=-1)": lambda c: c.get_full_resid_decomposition(
            pos_slice=-1, return_labels=True),
        "get_full_resid_decomposition(apply_ln, pos_slice=-1)": lambda c: c.get_full_resid_decomposition(
            apply_ln=True, pos_slice=-1, return_labels=True),
        "get_full_resid_decomposition(expand_neurons=False)": lambda c: c.get_full_resid_decomposition(
            expand_neurons=False, return_labels=True),
        "get_full_resid_decomposition(1, mlp_input)": lambda c: c.get_full_resid_decomposition(
            1, mlp_input=True, return_labels=True),
        "get_full_resid_decomposition(apply_ln, project_output_onto=d)": lambda c: c.get_full_resid_decomposition(
            apply_ln=True, project_output_onto=direction, return_labels=True),
        'stack_activation("pattern")': lambda c: c.stack_activation("pattern"),
        'stack_activation("resid_post", n - 1)': lambda c: c.stack_activation("resid_post", last),
        'logit_lens(targets=" Paris")': lambda c: c.logit_lens(targets=" Paris").values,
        'logit_lens(targets=" Paris") ranks': lambda c: c.logit_lens(targets=" Paris").rank_trajectory(" Paris"),
        "logit_lens(top_k=5, positions=None) ids": lambda c: c.logit_lens(top_k=5, positions=None).readout.top_ids,
        'logit_lens(return_type="log_probs", incl_mid, batch_slice=1)': lambda c: c.logit_lens(
            return_type="log_probs", incl_mid=True, batch_slice=1).values,
        "apply_slice_to_batch_dim(1)[resid_post, -1]": lambda c: c.apply_slice_to_batch_dim(1)["resid_post", -1],
        "apply_slice_to_batch_dim([0]).remove_batch_dim()[pattern, 0]": lambda c: c.apply_slice_to_batch_dim(
            [0]).remove_batch_dim()["pattern", 0],
        "accumulated_bias(n)": lambda c: (c.accumulated_bias if hasattr(type(c), "accumulated_bias")
                                          else c.model.accumulated_bias)(n),  # unilens's cache / TL's model
    }


def compare(kind: str) -> dict:
    from transformer_lens.model_bridge import TransformerBridge

    row: dict = {"type": kind}
    model, other, tok = _load(kind)
    if not getattr(other.config, "architectures", None):
        other.config.architectures = [type(other).__name__]
    bridge = TransformerBridge.boot_transformers(kind, hf_model=other, tokenizer=_tokenizer_copy(tok),
                                                 device="cpu", dtype=torch.float32)
    from unilens.compat.tl import hook_names
    from unilens.compat.tl_cache import ActivationCache

    ids = _ids(model)
    with torch.no_grad():
        _, ours = model.run_with_cache(ids)
        _, theirs = bridge.run_with_cache(ids)
    # unilens's methods on the bridge's own cached tensors: the methods' semantics, without the two forwards'
    # rounding (unilens keeps sdpa, the bridge runs eager); hook_result left out (computed from hook_z, as TL does)
    known = set(hook_names(model))
    same = ActivationCache({k: v for k, v in theirs.items() if k in known and not k.endswith("attn.hook_result")},
                           model)
    row["methods"] = {}
    for label, call in _calls(model, model.num_layers, model.hidden_size).items():
        results = []
        for side, cache in (("unilens", ours), ("bridge", theirs), ("unilens on the bridge's cache", same)):
            try:
                with torch.no_grad():
                    results.append(call(cache))
            except Exception as err:  # noqa: BLE001 - a failing method is a result
                results.append(f"{side}: {type(err).__name__}: {str(err).splitlines()[0][:140]}")
        errors = [r for r in results if isinstance(r, str)]
        row["methods"][label] = ("; ".join(errors) if errors else
                                 {"own_forward": _diff(results[0], results[1]),
                                  "same_cache": _diff(results[2], results[1])})
    del model, other, bridge
    return row


def markdown(rows: list[dict]) -> str:
    """One table: a row per method, a column per model type, ``same-cache / own-forward`` max abs differences."""
    kinds = [r["type"] for r in rows if "methods" in r]
    methods = list(next((r["methods"] for r in rows if "methods" in r), {}))
    fmt = lambda v: "0" if v == 0 else f"{v:.0e}"  # noqa: E731
    lines = [
        "# unilens's ActivationCache methods against TransformerLens 4.3's bridge",
        "",
        "Generated by `bench/.venv-anchors/bin/python bench/tl_cache_compare.py --markdown <this file>` (CPU,",
        f"float32, prompt {PROMPT!r} and its tokens reversed, BOS first). Each cell: max abs difference of the",
        "result **on the bridge's own cached tensors** / **each side on its own forward** (the latter adds the two",
        "forwards' rounding: unilens keeps sdpa where the bridge runs eager; SmolLM2's residual reaches 2.5e4).",
        "`d` is a random direction. Errors are listed below the table.",
        "",
        "| method | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    notes = []
    for m in methods:
        cells = []
        for r in rows:
            if "methods" not in r:
                continue
            v = r["methods"].get(m)
            if isinstance(v, dict) and isinstance(v["same_cache"], list) and isinstance(v["own_forward"], list):
                cells.append(f"{fmt(v['same_cache'][0])} / {fmt(v['own_forward'][0])}")
            else:
                cells.append("error")
                notes.append(f"- {r['type']}, `{m}`: {v}")
        lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    notes += [f"- {r['type']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="*", default=DEFAULT_TYPES)
    parser.add_argument("--out", help="write the rows as JSON")
    parser.add_argument("--markdown", help="write the table as markdown")
    parser.add_argument("--from-json", help="make --markdown from an earlier --out instead of running")
    args = parser.parse_args()
    rows = json.loads(Path(args.from_json).read_text()) if args.from_json else []
    for kind in [] if args.from_json else args.types:
        try:
            rows.append(compare(kind))
        except Exception as err:  # noqa: BLE001
            rows.append({"type": kind, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
        print(json.dumps(rows[-1], indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
