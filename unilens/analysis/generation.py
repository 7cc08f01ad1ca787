"""Generation with interventions: steering on every generated token, per-step capture of any standardized tensor,
and the logit lens of each generated token, on the model's own ``generate`` (KV cache and all)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import torch

from ..hooks.reads import _get, forward_order, parse_names
from ..hooks.steering import add_to_residual, check_steering_vector, real_token_mask
from .arguments import _number, _prompt_list

if TYPE_CHECKING:
    from ..model.transformer import StandardizedTransformer

__all__ = ["Generation", "Steering", "generate"]

Where = Literal["all", "prompt", "generated"]


@dataclass
class Steering:
    """Add ``factor * vector`` to ``layers_output`` of ``layers`` while generating.

    ``where``: ``"prompt"`` (the prompt's positions, computed once in the first step), ``"generated"`` (the position
    of each generated token, from the second step on: the token fed back in) or ``"all"`` (both). Padding positions
    are never steered. A vector or factor with NaN / inf is refused before generating (``NonFiniteSteeringError``)
    unless ``allow_nonfinite=True``.

    Example:
        >>> Steering(layers=[3, 4], vector=torch.zeros(8), factor=4.0, where="generated").where
        'generated'
    """

    layers: int | Sequence[int]
    vector: torch.Tensor  # (hidden,)
    factor: float = 1.0
    where: Where = "all"
    allow_nonfinite: bool = False

    def __post_init__(self):
        if self.where not in ("all", "prompt", "generated"):
            raise ValueError(f"Steering.where must be 'all', 'prompt' or 'generated', got {self.where!r}.")
        layers = [self.layers] if isinstance(self.layers, int) else self.layers
        ints = isinstance(layers, (list, tuple, range)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                                for i in layers)
        if isinstance(self.layers, (str, bool)) or not ints or not layers:
            raise TypeError(f"Steering.layers must be an int or a non-empty list of ints, got {self.layers!r:.60}.")
        if not isinstance(self.vector, torch.Tensor):
            raise TypeError(f"Steering.vector must be a torch.Tensor of shape (hidden,), got "
                            f"{type(self.vector).__name__}; e.g. torch.tensor(values).")
        _number(self.factor, "Steering.factor")


@dataclass
class Generation:
    """What ``generate`` returns.

    - ``tokens``: ``(batch, prompt + new)`` ids, as ``model.generate`` returns them, the prompts padded on the LEFT
      whatever the tokenizer's ``padding_side`` (a decoder generates after each row's last token; step 0's captures
      are in the same left-padded layout);
    - ``new_tokens``: ``(batch, new)``, the generated part;
    - ``steps[name]``: one tensor per forward step: step 0 is the prompt forward (every prompt position), step
      ``k > 0`` the forward of the ``k``-th generated token (one position, read against the KV cache; on a
      sliding-window layer the cache holds only the window's keys, so its probabilities cover those keys);
    - ``lens``: ``(batch, new, layers, vocab)`` logit-lens probabilities at the position that predicted each new
      token (``logit_lens=True``), the last layer's row being the model's own distribution.
    """

    tokens: torch.Tensor
    new_tokens: torch.Tensor
    steps: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    lens: torch.Tensor | None = None

    def texts(self, tokenizer: Any) -> list[str]:
        """The generated continuations as text (special tokens dropped)."""
        return tokenizer.batch_decode(self.new_tokens, skip_special_tokens=True)


@contextmanager
def _left_padded(tokenizer: Any) -> Iterator[None]:
    """The tokenizer pads on the left while the block runs (nnsight pads a generation's prompts on its side); its
    own side comes back afterwards."""
    side = getattr(tokenizer, "padding_side", "left")
    if side == "left":
        yield
        return
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def _layers(s: Steering, model: "StandardizedTransformer") -> list[int]:
    return sorted({model.layers_output._index(i) for i in ([s.layers] if isinstance(s.layers, int) else s.layers)})


def _steer(model: "StandardizedTransformer", steering: Sequence[Steering], layer: int, step: int) -> None:
    """Inside a generation step: add the vectors of ``steering`` that apply to ``layer`` at this step."""
    active = [s for s in steering if layer in _layers(s, model)
              and not ((step == 0 and s.where == "generated") or (step > 0 and s.where == "prompt"))]
    if not active:
        return
    # the prompt's positions at step 0, the generated token later; padding positions are never steered. The vectors
    # were checked before generating (finite unless their spec allows otherwise).
    add_to_residual(model, layer, [(s.factor, s.vector) for s in active], real_token_mask,
                    allow_nonfinite=any(s.allow_nonfinite for s in active))


def generate(
    model: "StandardizedTransformer",
    prompts: str | Sequence[str],
    max_new_tokens: int = 20,
    *,
    capture: str | Sequence[str] = (),
    steer: Steering | Sequence[Steering] = (),
    logit_lens: bool = False,
    do_sample: bool = False,
    **generate_kwargs: Any,
) -> Generation:
    """Generate with the model's own ``generate`` (KV cache on), steering and capturing at every step.

    ``capture``: standardized names (``"layers_output.3"``, ``"attention_probabilities.*"``, ``"logits"``...) read
    at every step, in any order. ``steer``: ``Steering`` specs applied at every step they cover. ``logit_lens``:
    the lens at the position predicting each new token. Other kwargs go to ``generate`` (``min_new_tokens``,
    ``temperature``...); greedy by default. When the model stops early (end of sequence), the steps it made are
    returned.

    The prompts are padded on the left for generation, whatever the tokenizer's ``padding_side``: a decoder
    continues each row after its last column, so a right-padded row would continue after its padding (wrong tokens;
    transformers only logs it). Each row generates what its prompt alone generates.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"), check=False)
        >>> out = generate(model, "The capital of France is", max_new_tokens=3, capture=["attention_probabilities.1"],
        ...                steer=Steering(layers=1, vector=torch.ones(model.hidden_size), factor=2.0), logit_lens=True)
        >>> out.new_tokens.shape, [tuple(p.shape) for p in out.steps["attention_probabilities.1"]]
        (torch.Size([1, 3]), [(1, 4, 5, 5), (1, 4, 1, 6), (1, 4, 1, 7)])
        >>> tuple(out.lens.shape) == (1, 3, model.num_layers, model.vocab_size)
        True
    """
    prompts = _prompt_list(prompts)
    if not all(prompts):
        raise ValueError(f"prompts[{prompts.index('')}] is an empty string: a generation needs at least one token "
                         "of prompt.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}.")
    if not isinstance(steer, (Steering, list, tuple)) or not all(
            isinstance(s, Steering) for s in ([steer] if isinstance(steer, Steering) else steer)):
        raise TypeError(f"steer must be a Steering or a list of Steering, got {steer!r:.80}; e.g. "
                        "steer=Steering(layers=3, vector=v, factor=4.0).")
    steering = [steer] if isinstance(steer, Steering) else list(steer)
    for k, s in enumerate(steering):
        check_steering_vector(s.vector, model.hidden_size, f"generate: steer[{k}] (layers {s.layers})", s.factor,
                              s.allow_nonfinite, streams=model.architecture.residual_streams)
    locations = parse_names(model, capture) if capture else []
    order = forward_order(model)
    # Steering writes layers_output; a read of the same layer's output must come after the write, and reads of
    # earlier tensors before it: one ordered list of actions per step.
    steered_layers = sorted({layer for s in steering for layer in _layers(s, model)})
    n_layers = model.num_layers
    prompt_len = model.tokenizer(list(prompts), padding=True, return_tensors="pt")["input_ids"].shape[1]
    # one ordered list of actions per step: reads in forward order, each layer's steering right at its output
    # (a read of that layer's output then sees the steered value)
    actions = sorted([(order.get(loc, -1), 1, loc) for loc in locations]
                     + [(order.get(("layers_output", layer), -1), 0, ("steer", layer)) for layer in steered_layers]
                     + [(order.get(("layers_output", layer), -1), 1, ("lens", layer))
                        for layer in (range(n_layers) if logit_lens else [])],
                     key=lambda a: (a[0], a[1]))
    steps: dict[Any, list[torch.Tensor]] = {loc: [] for loc in locations}  # built outside the trace (nnsight rule)
    lens_steps: list[torch.Tensor] = []
    result: dict[str, torch.Tensor] = {}
    with _left_padded(model.tokenizer), warnings.catch_warnings():
        # a generation that ends early (end of sequence) leaves the loop's last request unserved: nnsight warns,
        # the steps it made are what we return
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with torch.no_grad(), model.generate(max_new_tokens=max_new_tokens, do_sample=do_sample,
                                             **generate_kwargs) as tracer:
            with tracer.invoke(list(prompts)):
                for step in tracer.iter[:max_new_tokens]:
                    last = []  # (batch, hidden) per layer: the residual at the position predicting the next token
                    for _, _, what in actions:
                        if what[0] == "steer":
                            _steer(model, steering, what[1], step)
                        elif what[0] == "lens":
                            last.append(model.layers_output[what[1]][:, -1])
                        else:
                            steps[what].append(_get(model, what).save())
                    if logit_lens:
                        lens_steps.append(torch.stack([model.project_on_vocab(h) for h in last], dim=1)
                                          .softmax(-1).save())  # (batch, layers, vocab)
            with tracer.invoke():
                result["tokens"] = tracer.result.save()
    tokens = result["tokens"]
    out = Generation(tokens=tokens, new_tokens=tokens[:, prompt_len:])
    out.steps = {(a if i is None else f"{a}.{i}"): steps[(a, i)] for a, i in locations}
    if logit_lens:
        out.lens = torch.stack(lens_steps, dim=1)  # (batch, new, layers, vocab)
    return out
