"""The activation store's command line (``unilens cache ...``, ``python -m unilens.cache ...``): texts read from a
``.jsonl`` / ``.txt`` file (`read_texts`), a model loaded, `cache_activations` run (`main_cache`, `main`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core.distributed import init_from_env
from ..model.transformer import StandardizedTransformer, load_default
from .reader import ActivationStore
from .store_format import _DTYPES, CacheDiskFullError, CacheError
from .writer import cache_activations

__all__ = ["main", "main_cache", "read_texts"]


def read_texts(texts_path: str | os.PathLike) -> list[str]:
    """Texts from a ``.jsonl`` file (one JSON object per line with a ``"text"`` field; blank lines ignored) or a
    ``.txt`` file (one text per line; line ``i`` is text ``i``, an empty line an empty text).

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "prompts.txt"
        >>> _ = path.write_text("The cat sat\\nHello\\n")
        >>> read_texts(path)
        ['The cat sat', 'Hello']
    """
    path = Path(texts_path)
    if not path.is_file():
        raise FileNotFoundError(f"texts file {str(path)!r} does not exist.")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CacheError(f"{path}:{n} is not valid JSON ({err}).") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise CacheError(f'{path}:{n}: each line must be a JSON object with a string "text" field.')
            texts.append(record["text"])
        return texts
    if path.suffix == ".txt":
        return raw.split("\n")[:-1] if raw.endswith("\n") else raw.split("\n")
    raise CacheError(f"{path}: unsupported texts file; use .jsonl (field \"text\") or .txt (one text per line).")


def main_cache(
    texts_path: str,
    names: list[str],
    out_dir: str,
    model_source: str | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    *,
    shard_tokens: int | None = None,
    dtype: str | None = None,
    progress: bool = True,
    generate_tokens: int = 0,
) -> ActivationStore:
    """CLI entry: read texts from ``texts_path``, load ``model_source`` (default: the embedded SmolLM2), cache.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "prompts.txt").write_text("The capital of France is\\n")
        >>> store = main_cache(str(folder / "prompts.txt"), ["layers_output.0"], str(folder / "acts"), progress=False)
        >>> store["layers_output.0"].shape[0] == len(store)
        True
    """
    started = init_from_env()  # under torchrun: join its process group (gloo on CPU, nccl with CUDA)
    try:
        texts = read_texts(texts_path)
        kwargs: dict[str, Any] = {}
        if started and torch.cuda.is_available():  # each rank on its own GPU
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        if model_source is None:
            model = load_default(**kwargs)
        else:
            model = StandardizedTransformer(model_source, dtype=torch.float32, **kwargs)
        return cache_activations(
            model, texts, names, out_dir, batch_size=batch_size, max_length=max_length, dtype=dtype,
            shard_tokens=shard_tokens, progress=progress, generate_tokens=generate_tokens,
        )  # fmt: skip
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unilens.cache", description="Cache per-token activations to shards.")
    p.add_argument("texts", help=".jsonl (field 'text') or .txt (one text per line)")
    p.add_argument("out_dir", help="store folder (created; an interrupted run here is resumed)")
    p.add_argument("--names", nargs="+", required=True, help="e.g. layers_output.* attention_probabilities.3")
    p.add_argument("--model", default=None, help="folder, .gguf, or hub id in the local cache (default: SmolLM2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--shard-tokens", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--generate-tokens", type=int, default=0, help="also store up to this many greedily generated "
                   "tokens per text, read during generation (KV cache on)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unilens.cache TEXTS OUT_DIR --names ...``: `main_cache` from command-line arguments; prints the
    store (rank 0 only under torchrun) and returns 0, or prints the error and returns 2.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "prompts.txt").write_text("The capital of France is\\n")
        >>> main([str(folder / "prompts.txt"), str(folder / "acts"), "--names", "layers_output.0", "--no-progress"])
        ... # doctest: +ELLIPSIS
        ActivationStore(...)
        0
    """
    args = _parser().parse_args(argv)
    try:
        store = main_cache(
            args.texts, args.names, args.out_dir, args.model, args.batch_size, args.max_length,
            shard_tokens=args.shard_tokens, dtype=args.dtype, progress=not args.no_progress,
            generate_tokens=args.generate_tokens,
        )  # fmt: skip
    except (CacheError, CacheDiskFullError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # one line per job, not per torchrun rank
        print(store)
    return 0
