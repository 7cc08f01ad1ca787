"""The ``unilens`` command: demo, logit lens, attention viewer, patching, support report, conformance, diff, cache."""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Sequence

from ..analysis.lens import logit_lens
from ..analysis.patching import activation_patching
from ..arch.loading import default_model_path, gguf_cache_dir, load_hf_model
from ..conformance.diff import diff_model_implementations
from ..conformance.kernels import ImplementationUnavailable, run_attn_check
from ..conformance.support import write_support_report
from ..model.transformer import StandardizedTransformer, load_default
from ..scale.store import CacheDiskFullError, CacheError, main_cache
from ..testing import all_causal_model_types, tiny_model
from .display import (
    attention_viewer_html,
    plot_logit_lens_heatmap,
    plot_patching_heatmap,
    token_label,
)

EXAMPLES = """\
examples:
  unilens demo                                       # logit lens of the embedded SmolLM2 on a fixed prompt
  unilens lens "The capital of France is"            # top tokens per layer (embedded SmolLM2)
  unilens lens "The capital of France is" --html lens.html --model ./my-model-folder
  unilens attention "The cat sat on the mat" --layer 3 --html attn.html
  unilens patch --clean "The capital of France is" --corrupted "The capital of Italy is" \\
                --target " Paris" --against " Rome" --layers 0,5,10,15,20,25,29
  unilens support --out docs/support.md              # regenerate the architecture support table
  unilens attn-check --impl sdpa --dtype float32     # attention conformance against a float64 reference
  unilens attn-check --level thorough --kernel mypkg.mod:fn   # your kernel, long sequences and decode steps
  unilens diff llama --a eager --b sdpa              # first layer where two implementations diverge
  unilens cache --texts data.jsonl --names layers_output.* --out acts/
  torchrun --nproc-per-node 2 -m unilens cache --texts data.jsonl --names layers_output.* --out acts/
"""

DEMO_PROMPT = "The capital of France is"


def _load(source: str | None, **kwargs):
    import torch

    if source is None:
        if not (gguf_cache_dir(default_model_path()) / "config.json").exists():  # only when it will convert
            print("converting the embedded SmolLM2-135M-Instruct GGUF file once (about a minute; cached after)...",
                  file=sys.stderr)
        return load_default(**kwargs)
    if source in all_causal_model_types():  # a bare model type: its tiny random zoo model (for quick checks)
        hf, tok = tiny_model(source)
        return StandardizedTransformer(hf, tokenizer=tok, **kwargs)
    kwargs.setdefault("dtype", torch.float32)
    return StandardizedTransformer(source, **kwargs)


def _token(tokenizer, token_id: int) -> str:
    return repr(tokenizer.decode([int(token_id)]))


def lens_table(model, prompt: str, k: int = 3) -> str:
    """The logit lens of ``prompt`` as a text table: one row per layer, the top-``k`` next tokens with probabilities."""
    probs = logit_lens(model, [prompt])[0]  # (layers, vocab)
    top = probs.topk(k, dim=-1)
    width = 26
    lines = [f"logit lens: {prompt!r} -> next token, per layer ({model.architecture.model_type}, {model.num_layers} layers)", ""]
    lines.append("layer  " + "".join(f"{'top ' + str(r + 1):<{width}}" for r in range(k)))
    for layer in range(probs.shape[0]):
        cells = [
            f"{_token(model.tokenizer, i)[:16]:<17}{float(p):>6.1%}".ljust(width)
            for p, i in zip(top.values[layer], top.indices[layer])
        ]
        lines.append(f"{layer:>5}  " + "".join(cells))
    return "\n".join(lines)


def cmd_demo(args) -> int:
    model = _load(args.model)
    print(lens_table(model, args.prompt or DEMO_PROMPT, k=args.k))
    with model.trace(args.prompt or DEMO_PROMPT):
        probs = model.next_token_probs.save()
    probs = probs.detach()
    best = int(probs[0].argmax())
    print(f"\nmodel's next token: {_token(model.tokenizer, best)} (p = {float(probs[0, best]):.2f})")
    return 0


def cmd_lens(args) -> int:
    model = _load(args.model)
    print(lens_table(model, args.prompt, k=args.k))
    if args.html:
        probs = logit_lens(model, [args.prompt], all_positions=True)[0]  # (layers, seq, vocab)
        ids = model.tokenizer(args.prompt)["input_ids"]
        plot_logit_lens_heatmap(probs, model.tokenizer, ids, k=args.k, title=args.prompt, file=args.html)
        print(f"wrote {args.html}")
    return 0


def cmd_attention(args) -> int:
    import torch

    model = _load(args.model)
    layers = model.architecture.attention_layers if args.layer is None else [args.layer]
    saved: list[torch.Tensor] = []
    with model.trace(args.prompt):
        for layer in layers:
            saved.append(model.attention_probabilities[layer].save())
    ids = model.tokenizer(args.prompt)["input_ids"]
    tokens = [token_label(model.tokenizer, i) for i in ids]
    attention_viewer_html({layer: p[0] for layer, p in zip(layers, saved)}, tokens, path=args.html, title=args.prompt)
    for layer, p in zip(layers, saved):
        heads = p[0]  # (heads, query, key)
        focus = heads[:, -1].mean(0)
        best = int(focus.argmax())
        print(f"layer {layer}: last token attends most to position {best} ({tokens[best]}, {float(focus[best]):.2f} averaged over heads)")
    print(f"wrote {args.html}")
    return 0


def cmd_patch(args) -> int:
    model = _load(args.model)
    target = model.tokenizer(args.target, add_special_tokens=False)["input_ids"]
    against = model.tokenizer(args.against, add_special_tokens=False)["input_ids"] if args.against else None
    if not target or (args.against and not against):
        raise SystemExit(f"error: the target {args.target!r} (or --against) tokenizes to nothing")
    t, a = target[0], (against[0] if against else None)

    def metric(logits):
        last = logits[:, -1]
        return last[:, t] - (last[:, a] if a is not None else 0)

    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    # the metric reads the last position only: unembed nothing else
    result = activation_patching(model, args.clean, args.corrupted, metric, component=args.component, layers=layers,
                                 metric_positions=-1)  # fmt: skip
    layer_list = layers or list(range(model.num_layers))
    tokens = [model.tokenizer.decode([i]) for i in model.tokenizer(args.clean)["input_ids"]]
    print(f"activation patching ({args.component}): metric = logit({args.target!r})" + (f" - logit({args.against!r})" if a is not None else ""))
    header = "layer " + "".join(f"{tok[:9]!r:>12}" for tok in tokens) if args.component != "head" else "layer  heads..."
    print(header)
    for layer, row in zip(layer_list, result):
        print(f"{layer:>5} " + "".join(f"{float(v):>12.3f}" for v in row))
    if args.html:
        plot_patching_heatmap(result, x_labels=tokens if args.component != "head" else None, title="activation patching").write_html(
            args.html, include_plotlyjs=True
        )
        print(f"wrote {args.html}")
    return 0


def cmd_support(args) -> int:
    types = args.types.split(",") if args.types else None
    summary = write_support_report(args.out, types)
    print(textwrap.indent("\n".join(f"{k}: {v}" for k, v in summary.items()), "  "))
    print(f"wrote {args.out} and {args.out.rsplit('.', 1)[0]}.json")
    return 0


def cmd_attn_check(args) -> int:
    try:
        report = run_attn_check(args.kernel or args.impl, dtypes=args.dtype or ("float32", "bfloat16", "float16"),
                                cases=args.case, seed=args.seed, level=args.level, padded_queries=args.padded_queries)
    except ImplementationUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    if args.json:
        report.to_json(args.json)
    return 0 if report.passed else 1


def cmd_diff(args) -> int:
    import torch

    def factory():
        if args.source in all_causal_model_types():
            return tiny_model(args.source)[0]
        return load_hf_model(args.source, dtype=torch.float32)[0]

    report = diff_model_implementations(factory, a=args.a, b=args.b, dtype=args.dtype)
    print(report)
    # the verdict: a layer whose own error (inputs isolated) exceeds its noise yardstick; propagated divergence
    # alone is rounding growth in half precision
    return 1 if report.faulty else 0


def cmd_cache(args) -> int:
    import os

    try:  # under `torchrun --nproc-per-node N -m unilens cache ...` every rank runs this; main_cache joins the group
        store = main_cache(args.texts, args.names, args.out, args.model, args.batch_size, args.max_length,
                           shard_tokens=args.shard_tokens, dtype=args.dtype, progress=not args.no_progress,
                           generate_tokens=args.generate_tokens)
    except (CacheError, CacheDiskFullError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per job
        print(store)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unilens",
        description="Interpretability on any HuggingFace causal LM: one standardized, verified view.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "hub id (local cache), folder, .gguf file, or a model type for its tiny zoo model (default: embedded SmolLM2)"

    p = sub.add_parser("demo", help="logit lens of the embedded SmolLM2 on a fixed prompt")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--prompt", default=None)
    p.add_argument("-k", type=int, default=3, help="tokens per layer")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("lens", help="logit lens: top next tokens at every layer")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--html", default=None, help="also write a layers x positions heatmap here")
    p.set_defaults(func=cmd_lens)

    p = sub.add_parser("attention", help="write a self-contained HTML attention viewer")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--layer", type=int, default=None, help="one layer (default: every attention layer)")
    p.add_argument("--html", default="attention.html")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("patch", help="activation patching over layers x positions")
    p.add_argument("--clean", required=True)
    p.add_argument("--corrupted", required=True)
    p.add_argument("--target", required=True, help="token whose logit is the metric")
    p.add_argument("--against", default=None, help="subtract this token's logit")
    p.add_argument("--component", default="resid", choices=["resid", "attn", "mlp", "head"])
    p.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--html", default=None)
    p.set_defaults(func=cmd_patch)

    p = sub.add_parser("support", help="regenerate the architecture support report")
    p.add_argument("--out", default="docs/support.md")
    p.add_argument("--types", default=None, help="comma-separated model types (default: all)")
    p.set_defaults(func=cmd_support)

    p = sub.add_parser("attn-check", help="attention conformance against a float64 reference")
    p.add_argument("--impl", default="unilens", help="eager | sdpa | flex | unilens | module:function")
    p.add_argument("--kernel", default=None, help="your kernel as package.module:function (attention-interface "
                   "signature; overrides --impl)")
    p.add_argument("--level", default="default", choices=["default", "thorough"],
                   help="case grid: default (seconds) or thorough (1000+ keys, every feature at every length)")
    p.add_argument("--case", action="append", default=None, help="an extra case by name (repeatable)")
    p.add_argument("--padded-queries", default="any", choices=["any", "zeros"],
                   help="what padded query rows may hold: any finite value (default) or flash_attention_2's zeros")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", action="append", help="float32 / bfloat16 / float16 (repeatable; default all)")
    p.add_argument("--json", default=None, help="also save the report as JSON")
    p.set_defaults(func=cmd_attn_check)

    p = sub.add_parser("diff", help="find the first layer where two attention implementations diverge")
    p.add_argument("source", help="a model type (tiny zoo model), folder, hub id or .gguf file")
    p.add_argument("--a", default="eager")
    p.add_argument("--b", default="sdpa")
    p.add_argument("--dtype", default="float32")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("cache", help="stream activations of many texts to safetensors shards (resumable)")
    p.add_argument("--texts", required=True, help=".jsonl (field 'text') or .txt (one text per line)")
    p.add_argument("--names", required=True, nargs="+", help="standardized names, e.g. layers_output.12 mlps_output.*")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--shard-tokens", type=int, default=None, help="rows per shard (shards are the unit of work "
                   "split over torchrun ranks; default: about 256 MiB per shard)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "float64"],
                   help="stored dtype (default: the model's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--generate-tokens", type=int, default=0, help="also store up to this many greedily generated "
                   "tokens per text, read step by step during generation (KV cache on)")
    p.set_defaults(func=cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unilens`` command."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
