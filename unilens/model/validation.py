"""Checks at load time: the standardized tensors are the numbers the model computed (oracle: HF's own outputs)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..core.protocol import StandardizedModel
from ..hooks.attention import original_attention

__all__ = ["ValidationError", "ValidationReport", "validate_model", "hf_reference_forward", "residual_pairs", "PROBE_TEXT",
           "hf_positions", "same_random_draws"]

PROBE_TEXT = "The quick brown fox jumps over the lazy dog"


class ValidationError(AssertionError):
    """A standardized tensor differs from what the model computed."""


@torch.no_grad()
def hf_reference_forward(hf_model, encoding, **kwargs):
    """The plain HF forward (the oracle) on a possibly padded batch, with the padding-aware position ids
    that nnsight passes in a trace (``cumsum(mask) - 1``), so both sides see the same positions.

    Example:
        >>> from unilens.testing import tiny_model
        >>> hf, tok = tiny_model("gpt2")
        >>> enc = tok(["a b c", "a"], return_tensors="pt", padding=True)
        >>> hf_reference_forward(hf, enc, output_hidden_states=True).logits.shape[:2]
        torch.Size([2, 3])
    """
    import inspect

    extra = {}
    mask = encoding.get("attention_mask")
    params = inspect.signature(hf_model.forward).parameters
    # nnsight passes them for padded batches even when the forward only takes them through **kwargs (Whisper's
    # causal LM hands them on to its decoder)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if mask is not None and ("position_ids" in params or (takes_kwargs and not bool(mask.all()))):
        extra["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return hf_model(**encoding, **extra, **kwargs)


@contextmanager
def same_random_draws(device: torch.device, seed: int = 0) -> Iterator[None]:
    """Run the block from a fixed random state (the caller's restored afterwards), so that a model drawing random
    numbers in eval mode draws the same ones in the oracle forward and in the trace: Reformer's LSH attention draws
    its hashing rotations every forward unless ``config.hash_seed`` is set.

    Example:
        >>> with same_random_draws(torch.device("cpu")):
        ...     a = torch.rand(2)
        >>> with same_random_draws(torch.device("cpu")):
        ...     b = torch.rand(2)
        >>> torch.equal(a, b)
        True
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        for each in devices:
            with torch.cuda.device(each):
                torch.cuda.manual_seed(seed)
        yield


def _tol(dtype: torch.dtype) -> float:
    # fp32: same kernels, same order -> differences are rounding only (transformers' eager-vs-eager 1e-5);
    # half precisions get torch.testing's bf16 rtol scale.
    return 1e-4 if dtype == torch.float32 else (1e-9 if dtype == torch.float64 else 5e-2)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


@dataclass
class ValidationReport:
    """Per-check maximum absolute errors (relative to the tensor's scale) of one validation run."""

    model_type: str
    errors: dict[str, float] = field(default_factory=dict)
    decomposes: bool | None = None  # layers_input + attention (+ MLP) rebuild layers_output

    @property
    def ok(self) -> bool:
        return all(e <= 1 for e in self.errors.values())


def _scaled(err: float, ref: torch.Tensor, tol: float) -> float:
    """Error in units of the tolerance, relative to the reference's magnitude."""
    return err / (tol * max(1.0, float(ref.float().abs().max())))


def hf_positions(tensor: torch.Tensor | None, prefix_positions: int) -> torch.Tensor | None:
    """``tensor`` ``(batch, positions, ...)`` at the positions HF's outputs keep: all of them, or those after the
    ``prefix_positions`` a model prepends inside its forward (CPM-Ant's learned prompt,
    ``Architecture.prefix_positions``), which HF drops from its hidden states and logits.

    Example:
        >>> hf_positions(torch.arange(5)[None], 2).tolist()
        [[2, 3, 4]]
    """
    return tensor if tensor is None or not prefix_positions else tensor[:, prefix_positions:]


def residual_pairs(hidden_states: Sequence[torch.Tensor], first_input: torch.Tensor, outputs: Sequence[torch.Tensor],
                   embedding_output: torch.Tensor | None, tol: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The residual checks as (standardized tensor, HF's tensor) pairs, under HF's convention for
    ``output_hidden_states`` (used by the local and the remote load check).

    Most families return ``(embeddings, layer 0 output, ..., layer n-2 output, final state)``. The Mamba family and
    RWKV return ``(layer 0 output, ..., layer n-1 output, final normed state)``: no embeddings entry. Which one a
    model uses is read off its first entry: the layer stack's input, or the first layer's output. Under the second,
    every layer's output is paired with its own entry and ``layers_input[0]`` with HF's input-embedding output, so
    both conventions check every layer against the model's own numbers.

    Example:
        >>> x, y = torch.zeros(1, 2, 4), torch.ones(1, 2, 4)
        >>> list(residual_pairs((x, y), x, [y], None, 1e-4))  # standard: embeddings first
        ['layers_input[0] vs hidden_states[0]']
        >>> list(residual_pairs((y, y), x, [y], x, 1e-4))     # Mamba-style: layer outputs first
        ['layers_input[0] vs input embeddings output', 'layers_output[0] vs hidden_states[0]']
    """
    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return _scaled(_max_err(a, b), b, tol) <= 1

    if embedding_output is None or close(first_input, hidden_states[0]) or not close(outputs[0], hidden_states[0]):
        pairs = {"layers_input[0] vs hidden_states[0]": (first_input, hidden_states[0])}
        for i in range(len(outputs) - 1):  # the last HF state may already be normed: checked through the logits
            pairs[f"layers_output[{i}] vs hidden_states[{i + 1}]"] = (outputs[i], hidden_states[i + 1])
        return pairs
    pairs = {"layers_input[0] vs input embeddings output": (first_input, embedding_output)}
    for i in range(len(outputs)):
        pairs[f"layers_output[{i}] vs hidden_states[{i}]"] = (outputs[i], hidden_states[i])
    return pairs


@torch.no_grad()
def validate_model(model: StandardizedModel, text: str = PROBE_TEXT, raise_on_error: bool = True) -> ValidationReport:
    """Compare the standardized residual stream and logits with HF ``output_hidden_states`` on ``text``.

    Checks: ``layers_input[0] == hidden_states[0]``, ``layers_output[i] == hidden_states[i+1]`` (every layer but
    the last, whose HF state may already be normed), ``project_on_vocab(layers_output[-1]) == logits``, and that
    ``logits`` equals the plain HF forward. Raises ``ValidationError`` naming the architecture and the check.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> report = validate_model(model)
        >>> report.ok
        True
    """
    hf = model.module_accessor.model
    arch = model.architecture
    device = model.input_device  # the embedding's execution device (accelerate's, under device_map)
    enc = model.tokenizer(text, return_tensors="pt")
    ids = enc["input_ids"][:, :12].to(device)
    # the oracle runs the model's own attention implementation, not unilens's: a model whose code branches on the
    # implementation's name (sparse-attention masks applied only for "eager" / "sdpa") must compute the same
    embedded: list[torch.Tensor] = []  # HF's own input-embedding output (a plain torch hook: independent of nnsight)
    handle = hf.get_input_embeddings().register_forward_hook(lambda module, args, out: embedded.append(out))
    try:
        with original_attention(hf), same_random_draws(device):  # the trace below draws the same (Reformer's LSH)
            reference = hf(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    hidden_states = reference.hidden_states
    n = model.num_layers
    dtype = reference.logits.dtype
    tol = _tol(dtype)
    report = ValidationReport(arch.model_type)
    if hidden_states is None or len(hidden_states) != n + 1:
        got = None if hidden_states is None else len(hidden_states)
        raise ValidationError(
            f"{arch.model_type}: HF returned {got} hidden states for {n} discovered layers at {arch.layers_path}: the "
            "layer list found by discovery is not the model's decoder stack."
        )
    saved: dict[str, object] = {}  # filled inside the trace (nnsight 0.8 pushes back only saved names)
    outputs: list[torch.Tensor] = []
    with same_random_draws(device), model.trace(ids):
        saved["first_input"] = model.layers_input[0].save()
        for i in range(n):
            outputs.append(model.layers_output[i].save())
        if arch.head_chain is not None:  # else project_on_vocab is refused with a clear error
            saved["lens"] = model.project_on_vocab(outputs[-1]).save()
        saved["logits"] = model.logits.save()
    # the standardized tensors hold every position the layers see; HF keeps the input's only (the last ones where
    # the model prepends positions of its own, CPM-Ant's prompt): compare those
    p = arch.prefix_positions
    first_input, lens = hf_positions(saved["first_input"], p), hf_positions(saved.get("lens"), p)
    logits = saved["logits"]
    outputs = [hf_positions(o, p) for o in outputs]
    for check, (ours, theirs) in residual_pairs(
        hidden_states, first_input, outputs, embedded[0] if embedded else None, tol
    ).items():
        report.errors[check] = _scaled(_max_err(ours, theirs), theirs, tol)
    report.errors["logits vs HF logits"] = _scaled(_max_err(logits, reference.logits), reference.logits, tol)
    if lens is not None:
        report.errors["project_on_vocab(layers_output[-1]) vs logits"] = _scaled(
            _max_err(lens, reference.logits), reference.logits, tol
        )
    bad = {k: v for k, v in report.errors.items() if v > 1}
    if bad and raise_on_error:
        lines = "\n".join(f"  {k}: error {v * tol:.3g} (tolerance {tol:g} x scale)" for k, v in bad.items())
        raise ValidationError(
            f"unilens load check failed for {arch.model_type} ({type(hf).__name__}):\n{lines}\n"
            "The standardized view does not match what the model computes; please report this architecture. "
            "Pass check=False to load anyway (the failing tensors are then not trustworthy)."
        )
    return report
