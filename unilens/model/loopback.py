"""The offline loopback server: a stand-in for an NDIF deployment that runs requests the way NDIF does, in this
process, with unilens hidden (no ``unilens`` module importable, no unilens attention function registered) and the
results serialized. The test suite and docs/remote.md run remote mode against it."""

from __future__ import annotations

import contextlib
import copy
import io
import linecache
import sys
import warnings
from typing import Any, Iterator

import torch

from ..arch.loading import load_hf_model

__all__ = ["Loopback"]


# transformers' global registries where unilens installs its attention implementation; the loopback server runs
# with unilens's entries taken out, as on a server where unilens is not installed
def _attention_registries() -> list[dict]:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    return [AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping]


class _BlockUnilens:
    """A meta-path finder that makes ``import unilens...`` fail, as on a server without unilens installed."""

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name == "unilens" or name.startswith("unilens."):
            raise ModuleNotFoundError(f"No module named {name!r} (the loopback server runs without unilens)", name=name)
        return None


@contextlib.contextmanager
def _fresh_class_trackers() -> Iterator[None]:
    """cloudpickle rebuilds a by-value class ONTO the class it was pickled from when that class lives in the same
    process (its class tracker), replacing the live class's methods with the shipped copies (whose globals lack
    ``__name__``, so every relative import in them fails afterwards). An in-process server must get its own copies,
    as a separate process would: while inside, the trackers are empty."""
    import weakref

    from cloudpickle import cloudpickle as cp

    trackers = cp._DYNAMIC_CLASS_TRACKER_BY_CLASS, cp._DYNAMIC_CLASS_TRACKER_BY_ID
    cp._DYNAMIC_CLASS_TRACKER_BY_CLASS = weakref.WeakKeyDictionary()
    cp._DYNAMIC_CLASS_TRACKER_BY_ID = weakref.WeakValueDictionary()
    try:
        yield
    finally:
        cp._DYNAMIC_CLASS_TRACKER_BY_CLASS, cp._DYNAMIC_CLASS_TRACKER_BY_ID = trackers


@contextlib.contextmanager
def _without_unilens() -> Iterator[None]:
    """While inside: no ``unilens`` module importable or imported, no unilens attention function registered, and
    by-value classes rebuilt as the server's own copies."""
    ours = [name for name in sys.modules if name == "unilens" or name.startswith("unilens.")]
    hidden = {name: sys.modules.pop(name) for name in ours}
    blocker = _BlockUnilens()
    sys.meta_path.insert(0, blocker)
    registries = _attention_registries()
    removed = [(r, k, r.pop(k)) for r in registries for k in [k for k in r if k.startswith("unilens")]]
    try:
        with _fresh_class_trackers():
            yield
    finally:
        sys.meta_path.remove(blocker)
        sys.modules.update(hidden)
        for registry, key, value in removed:
            registry[key] = value


class Loopback:
    """An offline stand-in for an NDIF deployment: a plain ``nnsight.LanguageModel`` over its own copy of the weights.

    Requests reach it the way they reach NDIF: the client serializes the traced block
    (``RequestModel.serialize``), the server deserializes it against its own model's persistent objects and runs
    it with no ``unilens`` module importable and no unilens attention function registered, and the saved values
    come back serialized (``torch.save`` / ``torch.load``). ``source``: a loaded ``PreTrainedModel`` (deep-copied:
    the server never shares modules with the client) or anything ``unilens.loading.load_hf_model`` reads.
    ``attn_implementation`` sets the deployment's attention (e.g. ``"eager"``).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> hf, tok = tiny_model("llama")
        >>> server = Loopback(hf, tok)
        >>> model = StandardizedTransformer(hf, tokenizer=tok, remote=server)
        >>> with model.trace("The cat sat"):
        ...     h = model.layers_output[1].save()
        >>> h.shape[-1] == model.hidden_size
        True
    """

    def __init__(self, source: Any, tokenizer: Any = None, attn_implementation: str | None = None, **kwargs: Any):
        from nnsight import LanguageModel
        from transformers import PreTrainedModel

        if isinstance(source, PreTrainedModel):
            installed = [n for n, _ in source.named_modules() if n.endswith("unilens_hooks")]
            if installed or getattr(source.config, "_attn_implementation", None) == "unilens":
                raise ValueError("this model has unilens's hook points installed (a local StandardizedTransformer "
                                 "wraps it), which an NDIF server's model never has: give the loopback a fresh copy "
                                 "of the weights (load it again, or a folder).")
            hf = copy.deepcopy(source)
            hf.eval()
        else:
            hf, loaded_tok = load_hf_model(source, tokenizer, **kwargs)
            tokenizer = tokenizer if tokenizer is not None else loaded_tok
        if attn_implementation is not None:
            hf.set_attn_implementation(attn_implementation)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LanguageModel's deprecation notice: the alias NDIF keys models by
            self.server = LanguageModel(hf, tokenizer=tokenizer)
        self.requests = 0  # requests served
        self.last_payload_bytes = 0

    def __repr__(self) -> str:
        return f"Loopback({type(self.server._module).__name__}, {self.requests} requests served)"

    def run(self, blob: bytes) -> bytes:
        """Serve one serialized request: deserialize, execute against the plain model, return the serialized saves."""
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import _saves, dec, inc

        self.requests += 1
        self.last_payload_bytes = len(blob)
        filename_cache = dict(linecache.cache)  # deserialize registers the block under the client's file name
        try:
            with _without_unilens():
                tracer = RequestModel.deserialize(blob, self.server._remoteable_persistent_objects())
                inc()  # one outermost trace: only .save()d values come back, as on the server
                try:
                    tracer.execute(tracer.info.code)
                    marked = set(_saves())
                    saves = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in marked}
                finally:
                    dec()
                buffer = io.BytesIO()
                torch.save(saves, buffer)
        finally:
            linecache.cache.clear()
            linecache.cache.update(filename_cache)
        return buffer.getvalue()
