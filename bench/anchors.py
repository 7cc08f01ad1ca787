"""Times nnterp and TransformerLens on the bench workloads; runs in bench/.venv-anchors, never imports unilens.

``python bench/anchors.py MODEL_FOLDER PROMPTS_JSON [--quick]`` prints one JSON line:
``{"versions": {...}, "rows": [{"workload", "size", "tool", "median_ms", "ratio", "baseline"}, ...]}``.
Every ratio is to a baseline timed in this same process, interleaved with the tool (same scheme as run.py):
a plain HF sdpa forward, HF eager with ``output_attentions=True``, or the by-hand logit lens.
``PROMPTS_JSON`` maps a size label to the exact prompts run.py used, so both processes see the same inputs.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata as md
import json
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch

warnings.filterwarnings("ignore")


def interleaved(variants: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """One warm-up call each, then ``reps`` rounds running every variant once from a rotating start; medians in ms."""
    names = list(variants)
    for name in names:
        variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for k in range(len(names)):
            name = names[(rep + k) % len(names)]
            gc.collect()
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def run_tool(tool: str, folder: str, prompts_by_size: dict[str, list[str]], reps: int) -> list[dict]:
    """Time one tool's workloads next to their baselines; an unsupported workload becomes a row with an error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf_sdpa = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    hf_eager = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    n_layers = hf_sdpa.config.num_hidden_layers

    if tool == "nnterp":
        from nnterp import StandardizedTransformer
        from nnterp.interventions import logit_lens

        model = StandardizedTransformer(folder, device_map="cpu", dtype=torch.float32)
        model_attn = StandardizedTransformer(folder, device_map="cpu", dtype=torch.float32, enable_attention_probs=True)
    else:
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(folder, device="cpu", dtype=torch.float32, tokenizer=tokenizer)

    rows: list[dict] = []
    for size, prompts in prompts_by_size.items():
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

        def plain():
            with torch.no_grad():
                return hf_sdpa(**batch).logits

        def eager_attn():
            with torch.no_grad():
                return hf_eager(**batch, output_attentions=True).attentions

        def lens_by_hand():
            last: list[torch.Tensor] = []
            hooks = [
                layer.register_forward_hook(lambda _m, _a, out: last.append((out[0] if isinstance(out, tuple) else out)[:, -1]))
                for layer in hf_sdpa.model.layers
            ]
            try:
                with torch.no_grad():
                    hf_sdpa(**batch)
                    stacked = torch.stack(last, dim=1)  # (batch, layers, hidden)
                    return torch.softmax(hf_sdpa.lm_head(hf_sdpa.model.norm(stacked)).float(), dim=-1)
            finally:
                for h in hooks:
                    h.remove()

        workloads: dict[str, tuple[str, Callable[[], Any], Callable[[], Any]]] = {}
        if tool == "nnterp":

            def save_all():
                out = []
                with torch.no_grad(), model.trace(batch):
                    for i in range(n_layers):
                        out.append(model.layers_output[i].save())
                return out

            def probs():
                out = []
                with torch.no_grad(), model_attn.trace(batch):
                    for i in range(n_layers):
                        out.append(model_attn.attention_probabilities[i].save())
                return out

            workloads["trace saving every layers_output"] = ("HF forward (sdpa)", plain, save_all)
            workloads["every attention_probabilities"] = ("HF eager, output_attentions=True", eager_attn, probs)
            workloads["logit lens"] = ("forward + stacked norm/unembed by hand", lens_by_hand,
                                       lambda: logit_lens(model, prompts))
        else:
            tokens = batch["input_ids"]

            def cache_all():
                with torch.no_grad():
                    return bridge.run_with_cache(tokens, attention_mask=batch["attention_mask"])

            def cache_resid():
                with torch.no_grad():
                    return bridge.run_with_cache(tokens, attention_mask=batch["attention_mask"],
                                                 names_filter=lambda name: name.endswith("hook_resid_post"))

            def cache_patterns():
                with torch.no_grad():
                    return bridge.run_with_cache(tokens, attention_mask=batch["attention_mask"],
                                                 names_filter=lambda name: name.endswith("hook_pattern"))

            workloads["run_with_cache, everything"] = ("HF forward (sdpa)", plain, cache_all)
            workloads["trace saving every layers_output"] = ("HF forward (sdpa)", plain, cache_resid)
            workloads["every attention_probabilities"] = ("HF eager, output_attentions=True", eager_attn, cache_patterns)

        for workload, (baseline_name, baseline, variant) in workloads.items():
            try:
                medians = interleaved({"baseline": baseline, "tool": variant}, reps)
            except Exception as err:  # noqa: BLE001 - report, do not stop the other rows
                rows.append({"workload": workload, "size": size, "tool": tool, "baseline": baseline_name,
                             "error": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"})
                continue
            rows.append({"workload": workload, "size": size, "tool": tool, "baseline": baseline_name,
                         "median_ms": medians["tool"], "baseline_ms": medians["baseline"],
                         "ratio": medians["tool"] / medians["baseline"]})
            print(f"[anchors] {tool} {workload} {size}: {rows[-1]['ratio']:.3f}x", file=sys.stderr, flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("prompts_json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.prompts_json) as f:
        prompts_by_size = json.load(f)
    reps = 2 if args.quick else 7
    rows: list[dict] = []
    for tool in ("nnterp", "transformer_lens"):
        try:
            rows += run_tool(tool, args.folder, prompts_by_size, reps)
        except Exception as err:  # noqa: BLE001 - one tool failing to load still reports the other
            rows.append({"workload": "load", "size": "-", "tool": tool, "baseline": "-",
                         "error": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"})
    versions = {p: md.version(p) for p in ("torch", "transformers", "nnsight", "nnterp", "transformer-lens")}
    print(json.dumps({"versions": versions, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
