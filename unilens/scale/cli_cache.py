"""The activation store's command line (``unilens cache ...``, ``python -m unilens.cache ...``): texts read from a
``.jsonl`` / ``.txt`` file (`read_texts`), a model loaded, `cache_activations` run (`main_cache`, `main`).

Also the command lines' error policy (`user_error_message`, `USER_ERRORS`), shared with ``unilens``'s own command
(`unilens.ui.cli`): a user's mistake prints ``error: <one line>`` and exits 2, Ctrl-C prints ``interrupted`` and exits
130, a bug keeps its traceback. Arguments that can be checked without the model (`check_texts_path`, `check_names`,
`check_out_dir`) are checked before it loads."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..arch.discovery import ArchitectureError
from ..arch.offload import OffloadError
from ..core.distributed import init_from_env
from ..core.names import RemoteUnsupportedError
from ..hooks.points import UnsupportedHookPoint
from ..hooks.reads import ReadOrderError
from ..model.transformer import StandardizedTransformer, load_default
from ..model.validation import ValidationError
from .reader import ActivationStore
from .store_format import (
    _DTYPES,
    _LAYER_LEVEL,
    _MODEL_LEVEL,
    _NOT_CACHEABLE,
    CACHEABLE_NAMES,
    CacheCorruptError,
    CacheDiskFullError,
    CacheError,
)
from .writer import cache_activations

__all__ = [
    "USER_ERRORS",
    "check_names",
    "check_out_dir",
    "check_texts_path",
    "main",
    "main_cache",
    "read_texts",
    "user_error_message",
]

# ----------------------------------------------------------------------------------------------------------------
# The command lines' error policy
# ----------------------------------------------------------------------------------------------------------------

# The error classes a command line reports as one line (`user_error_message`), wherever they are raised: unilens's
# own refusals, each raised for a user's input or a model unilens cannot serve, and OSError (the file system or the
# OS refused: a path, a permission, a full disk, a download while offline) -- never a bug in the code's logic.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CacheError, CacheCorruptError, CacheDiskFullError,  # stores: bad arguments, a damaged or foreign out_dir
    ArchitectureError,  # a model whose parts unilens cannot find (RenamingError included)
    UnsupportedHookPoint, RemoteUnsupportedError,  # a name this model / remote mode cannot give
    OffloadError,  # a device_map that cannot be served
    ValidationError,  # the load-time check: unilens's view of this model does not match HF's
    ReadOrderError,  # reads in another order than the forward's
    OSError,
)
# Built-in argument errors: reported as one line only when unilens's own code raised them (its API's checks of bad
# input: "layer 99 out of range", "the input is empty"); raised inside torch, transformers or nnsight they are
# treated as a bug and keep their traceback.
_ARGUMENT_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, IndexError, KeyError)
_PACKAGE = Path(__file__).resolve().parents[1]  # the unilens package folder


def _raised_by_unilens(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback (where it was raised) is unilens's own code."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE)


def user_error_message(err: BaseException, user_errors: tuple[type[BaseException], ...] = USER_ERRORS) -> str | None:
    """The message a command line prints for ``err`` after ``error:``, or None when ``err`` is not a user's mistake
    (a bug: let its traceback show).

    A user's mistake is an instance of ``user_errors`` (default `USER_ERRORS`), or a ValueError / TypeError /
    IndexError / KeyError that unilens's own code raised (its checks of bad input). Lines after the first are
    indented, so ``error:`` starts the only unindented line.

    Example:
        >>> user_error_message(CacheError("names is empty: pass at least one name."))
        'names is empty: pass at least one name.'
        >>> user_error_message(ZeroDivisionError("division by zero")) is None
        True
    """
    if not isinstance(err, user_errors) and not (isinstance(err, _ARGUMENT_ERRORS) and _raised_by_unilens(err)):
        return None
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # str(KeyError) is the repr of its argument, quotes included
    else:
        text = str(err)
    lines = text.strip().splitlines() or [type(err).__name__]
    return "\n".join([lines[0], *("  " + line for line in lines[1:])])


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


# ----------------------------------------------------------------------------------------------------------------
# Checks made before the model loads
# ----------------------------------------------------------------------------------------------------------------


def check_texts_path(texts_path: str | os.PathLike, what: str = "texts") -> Path:
    """``texts_path`` as a Path, or a clear error: it must be an existing, readable ``.jsonl`` or ``.txt`` file.

    ``what`` names the argument in the message (the command line passes ``"--texts"``). Raises FileNotFoundError
    for a missing file, CacheError for a folder or another suffix.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "prompts.txt"
        >>> _ = path.write_text("Hello\\n")
        >>> check_texts_path(path) == path
        True
    """
    path = Path(texts_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{what} file {str(path)!r} does not exist; pass a .jsonl (one {{\"text\": ...}} object per line) or "
            ".txt (one text per line) file."
        )
    if path.is_dir():
        raise CacheError(f"{what} {str(path)!r} is a folder; pass a .jsonl or .txt file.")
    if path.suffix not in (".jsonl", ".txt"):
        raise CacheError(
            f"{what} {str(path)!r}: unsupported texts file; use .jsonl (field \"text\") or .txt (one text per line)."
        )
    return path


def check_names(names: str | Sequence[str], what: str = "names") -> None:
    """Check the spelling of activation names without a model: each a cacheable name (`CACHEABLE_NAMES`), per-layer
    names with ``.<layer>`` or ``.*``; whole-model names without. Layer ranges need the model: `cache_activations`
    checks them once it is loaded, before any forward. Raises CacheError naming the bad name and the fix.

    Example:
        >>> check_names(["layers_output.*", "mlps_output.3", "logits"])
        >>> check_names(["layers_output"])
        Traceback (most recent call last):
        ...
        unilens.scale.store_format.CacheError: names: 'layers_output' needs a layer after a dot: 'layers_output.3' or 'layers_output.*' (every layer).
    """
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise CacheError(f"{what} is empty: pass at least one name, e.g. 'layers_output.*'.")
    valid = ", ".join([*(f"{n}.<layer|*>" for n in _LAYER_LEVEL), *_MODEL_LEVEL])
    for raw in names:
        if not isinstance(raw, str):
            raise CacheError(f"{what} must be strings like 'layers_output.3', got {raw!r}.")
        accessor, dot, index = raw.strip().partition(".")
        if accessor in _NOT_CACHEABLE:
            raise CacheError(f"{what}: {raw!r} cannot be cached: {_NOT_CACHEABLE[accessor]}.")
        if accessor not in CACHEABLE_NAMES:
            raise CacheError(f"{what}: unknown activation name {raw!r}.{_suggest(accessor, CACHEABLE_NAMES)} "
                             f"Valid names: {valid}.")  # fmt: skip
        if accessor in _MODEL_LEVEL and dot:
            raise CacheError(f"{what}: {raw!r}: {accessor} is one tensor for the whole model; drop {dot + index!r}.")
        if accessor in _LAYER_LEVEL and not (index == "*" or re.fullmatch(r"-?\d+", index)):
            raise CacheError(f"{what}: {raw!r} needs a layer after a dot: '{accessor}.3' or '{accessor}.*' (every "
                             "layer).")  # fmt: skip


def check_out_dir(out_dir: str | os.PathLike, what: str = "out_dir") -> Path:
    """``out_dir`` as a Path, or a CacheError when it cannot hold a store: an existing file, or a folder (or the
    nearest existing folder above a new one) this process cannot write to. Whether an existing folder holds a store
    of this very run is checked by `cache_activations`.

    Example:
        >>> import pathlib, tempfile
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "acts"
        >>> check_out_dir(out) == out
        True
    """
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise CacheError(f"{what} {str(path)!r} is an existing file; pass a folder (new, or holding a store to "
                         "resume).")  # fmt: skip
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CacheError(f"{what} {str(path)!r} cannot be created: {str(existing)!r} is a file; pass another folder.")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise CacheError(f"{what} {str(path)!r} is not writable ({err.strerror or err} in {str(existing)!r}); "
                         "pass a folder you can write to.") from err  # fmt: skip
    return path


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
    path = check_texts_path(texts_path)
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CacheError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); pass a UTF-8 .jsonl or "
                         ".txt file.") from err  # fmt: skip
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
    load: Callable[..., StandardizedTransformer] | None = None,
    context_size: int | None = None,
    prepend_bos: bool = True,
    exclude_sinks: bool = False,
) -> ActivationStore:
    """CLI entry: read texts from ``texts_path``, load ``model_source`` (default: the embedded SmolLM2), cache.

    What can be checked without the model is checked before it loads (`check_names`, `check_out_dir`, the texts
    read); layer ranges and the rest right after, by `cache_activations`, before any forward. ``load``: how to load
    the model instead of ``model_source`` (``unilens cache`` passes its loader, which also takes a model type),
    called with ``device_map=`` under torchrun with CUDA (each rank on its own GPU).

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "prompts.txt").write_text("The capital of France is\\n")
        >>> store = main_cache(str(folder / "prompts.txt"), ["layers_output.0"], str(folder / "acts"), progress=False)
        >>> store["layers_output.0"].shape[0] == len(store)
        True
    """
    check_names(names)
    check_out_dir(out_dir)
    texts = read_texts(texts_path)
    started = init_from_env()  # under torchrun: join its process group (gloo on CPU, nccl with CUDA)
    try:
        kwargs: dict[str, Any] = {}
        if started and torch.cuda.is_available():  # each rank on its own GPU
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        if load is not None:
            model = load(**kwargs)
        elif model_source is None:
            model = load_default(**kwargs)
        else:
            model = StandardizedTransformer(model_source, dtype=torch.float32, **kwargs)
        return cache_activations(
            model, texts, names, out_dir, batch_size=batch_size, max_length=max_length, dtype=dtype,
            shard_tokens=shard_tokens, progress=progress, generate_tokens=generate_tokens,
            **({"context_size": context_size, "prepend_bos": prepend_bos, "exclude_sinks": exclude_sinks}
               if context_size is not None else {}),
        )  # fmt: skip
    finally:
        if started:
            torch.distributed.destroy_process_group()


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its errors in the command lines' form: ``error: <message> (see: PROG --help)``, exit 2."""

    def error(self, message: str) -> Any:  # argparse's hook: must not return
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m unilens.cache", description="Cache per-token activations to shards.")
    p.add_argument("texts", help=".jsonl (field 'text') or .txt (one text per line)")
    p.add_argument("out_dir", help="store folder (created; an interrupted run here is resumed)")
    p.add_argument("--names", nargs="+", required=True, help="e.g. layers_output.* attention_probabilities.3")
    p.add_argument("--model", default=None, help="folder, .gguf, or hub id in the local cache (default: SmolLM2)")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--max-length", type=_positive_int, default=None)
    p.add_argument("--shard-tokens", type=_positive_int, default=None)
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--generate-tokens", type=_non_negative_int, default=0, help="also store up to this many "
                   "greedily generated tokens per text, read during generation (KV cache on)")
    p.add_argument("--context-size", type=_positive_int, default=None, help="pack the texts into contexts of this "
                   "many tokens, SAELens's way (BOS first, BOS between texts) and run the model on them")
    p.add_argument("--no-bos", action="store_true", help="with --context-size: no BOS at the start of a context")
    p.add_argument("--exclude-sinks", action="store_true", help="with --context-size: no rows for each context's "
                   "first token and the separators")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m unilens.cache TEXTS OUT_DIR --names ...``: `main_cache` from command-line arguments; prints the
    store (rank 0 only under torchrun) and returns 0; a user's mistake prints ``error: ...`` and returns 2
    (`user_error_message`), Ctrl-C prints ``interrupted`` and returns 130.

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
        check_names(args.names, "--names")  # the command line's own words first, before anything loads
        check_out_dir(args.out_dir, "OUT_DIR")
        check_texts_path(args.texts, "TEXTS")
        store = main_cache(
            args.texts, args.names, args.out_dir, args.model, args.batch_size, args.max_length,
            shard_tokens=args.shard_tokens, dtype=args.dtype, progress=not args.no_progress,
            generate_tokens=args.generate_tokens, context_size=args.context_size, prepend_bos=not args.no_bos,
            exclude_sinks=args.exclude_sinks,
        )  # fmt: skip
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_error_message(err)
        if message is None:  # a bug: its traceback shows
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # one line per job, not per torchrun rank
        print(store)
    return 0
