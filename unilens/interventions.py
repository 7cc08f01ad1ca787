"""Interventions on a StandardizedTransformer: logit lens, patchscope, activation / attribution patching, DLA, steer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .discovery import LOGIT_POSTPROCESSING
from .model import last_real_positions
from .offload import detached_copy, module_device
from .patching import Sweep, check_metric, run_sweep

__all__ = [
    "logit_lens",
    "TargetPrompt",
    "TargetPromptBatch",
    "repeat_prompt",
    "patchscope_lens",
    "patchscope_generate",
    "patch_object_attn_lens",
    "it_repeat_prompt",
    "activation_patching",
    "attribution_patching",
    "direct_logit_attribution",
    "steer_all",
    "mean_difference_vector",
]

Prompts = str | Sequence[str]
Metric = Callable[[torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------
# Plumbing
# ------------------------------------------------------------------------------------------------


def _encode(model, prompts: Prompts) -> dict[str, torch.Tensor]:
    """Tokenize ``prompts`` with the model's tokenizer (its padding side), as the dict a trace takes.

    Passing ``input_ids`` and ``attention_mask`` explicitly makes every function here see exactly the
    tokens the model sees (nnsight adds padding-aware ``position_ids`` from the mask).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a string or a non-empty list of strings.")
    enc = model.tokenizer(prompts, padding=True, return_tensors="pt")
    device = model.input_device
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def _checked_indices(values: int | Sequence[int] | None, n: int, what: str, unit: str) -> list[int]:
    """Normalized (non-negative), range-checked indices in the order given; ``None`` means all ``n``."""
    if values is None:
        return list(range(n))
    if isinstance(values, int):
        values = [values]
    out = []
    for v in values:
        if not isinstance(v, int) or not -n <= v < n:
            raise IndexError(f"{what} {v!r} out of range: {unit.format(n=n)} (0..{n - 1}).")
        out.append(v % n)
    return out


def _layer_list(model, layers: int | Sequence[int] | None) -> list[int]:
    """Checked layer indices, in the order given, without duplicates."""
    out = _checked_indices(layers, model.num_layers, "layer", "the model has {n} layers")
    if len(set(out)) != len(out):
        raise ValueError(f"layers contains duplicates: {list(layers)}.")
    return out


def _unembed(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + unembedding + logit post-processing on plain modules (no trace): ``(..., hidden)`` -> logits."""
    device = module_device(model.module_accessor.get_unembed())  # accelerate's execution device when dispatched
    with torch.no_grad():
        return model.module_accessor.project_on_vocab(hidden.to(device))


# ------------------------------------------------------------------------------------------------
# Logit lens
# ------------------------------------------------------------------------------------------------


def logit_lens(
    nn_model,
    prompts: Prompts,
    remote: bool = False,
    return_inv_logits: bool = False,
    all_positions: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Next-token probabilities read from every layer's residual stream (final norm + unembedding applied to it).

    Returns ``(batch, layers, vocab)`` probabilities at each prompt's last REAL token (left or right padding),
    or ``(batch, layers, seq, vocab)`` with ``all_positions=True``. The last layer equals
    ``model.next_token_probs``. With ``return_inv_logits=True`` also returns ``softmax(-logits)`` (same shape).

    One forward saves every ``layers_output``; the norm and unembedding then run once on the stacked
    ``(batch, layers, hidden)`` tensor (only the last position unless ``all_positions``).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> probs = logit_lens(model, ["The capital of France is", "Hi"])
        >>> probs.shape == (2, model.num_layers, model.vocab_size)
        True
    """
    model = nn_model  # nnterp's argument name
    batch = _encode(model, prompts)
    if model.__dict__.get("_remote_mode"):  # the unembedding's weights are on the server: it runs there
        from .remote import remote_logit_lens

        logits = remote_logit_lens(model, batch, all_positions)
        probs = torch.softmax(logits, dim=-1)
        return (probs, torch.softmax(-logits, dim=-1)) if return_inv_logits else probs
    saved: list[torch.Tensor] = []
    trace_kwargs = {"remote": True} if remote else {}
    with torch.no_grad(), model.trace(batch, **trace_kwargs, **model._keep_last_logits_kwargs()):
        for i in range(model.num_layers):
            saved.append(model.layers_output[i].save())  # (batch, seq, hidden)
    stacked = torch.stack(saved, dim=1)  # (batch, layers, seq, hidden)
    if not all_positions:
        last = last_real_positions(batch["attention_mask"]).to(stacked.device)
        stacked = stacked[torch.arange(stacked.shape[0], device=stacked.device), :, last]  # (batch, layers, hidden)
    logits = _unembed(model, stacked).float()
    probs = torch.softmax(logits, dim=-1)
    if return_inv_logits:
        return probs, torch.softmax(-logits, dim=-1)
    return probs


# ------------------------------------------------------------------------------------------------
# Patchscope
# ------------------------------------------------------------------------------------------------


@dataclass
class TargetPrompt:
    """A target prompt for patchscope and the token index (of its own tokens, negative allowed) to patch."""

    prompt: str
    index_to_patch: int


@dataclass
class TargetPromptBatch:
    """Several target prompts, one per source prompt: ``prompts`` and ``index_to_patch`` (a ``(n,)`` long tensor,
    as in nnterp). Indexing gives a ``TargetPrompt``; iterating gives them all.

    Example:
        >>> batch = TargetPromptBatch.from_target_prompts([repeat_prompt(), repeat_prompt(["cat", "dog"])])
        >>> len(batch), batch[1].prompt, [t.index_to_patch for t in batch]
        (2, 'cat cat\\ndog dog\\n?', [-1, -1])
    """

    prompts: list[str]
    index_to_patch: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.index_to_patch, torch.Tensor):
            self.index_to_patch = torch.tensor(list(self.index_to_patch), dtype=torch.long)
        if self.index_to_patch.dim() != 1 or len(self.index_to_patch) != len(self.prompts):
            raise ValueError(f"TargetPromptBatch: {len(self.prompts)} prompts but index_to_patch has shape "
                             f"{tuple(self.index_to_patch.shape)}; give one index per prompt.")

    @classmethod
    def from_target_prompts(cls, prompts_: Sequence[TargetPrompt]) -> "TargetPromptBatch":
        """One batch from a list of TargetPrompt."""
        prompts_ = list(prompts_)
        if not all(isinstance(t, TargetPrompt) for t in prompts_):
            raise TypeError("from_target_prompts takes a list of TargetPrompt.")
        return cls([t.prompt for t in prompts_], [int(t.index_to_patch) for t in prompts_])

    @classmethod
    def from_target_prompt(cls, prompt: TargetPrompt, batch_size: int) -> "TargetPromptBatch":
        """``prompt`` repeated ``batch_size`` times."""
        return cls([prompt.prompt] * batch_size, [int(prompt.index_to_patch)] * batch_size)

    @classmethod
    def from_prompts(cls, prompts: str | list[str], index_to_patch: int | list[int] | torch.Tensor) -> "TargetPromptBatch":
        """Prompt strings and one index (shared) or one per prompt.

        Example:
            >>> TargetPromptBatch.from_prompts(["a b ?", "c ?"], -1).index_to_patch.tolist()
            [-1, -1]
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if isinstance(index_to_patch, bool) or not isinstance(index_to_patch, (int, list, tuple, torch.Tensor)):
            raise ValueError(f"index_to_patch must be an int, a list of ints or a tensor, got {type(index_to_patch)}")
        if isinstance(index_to_patch, int):
            index_to_patch = [index_to_patch] * len(prompts)
        return cls(prompts, index_to_patch)

    @staticmethod
    def auto(
        target_prompt: "TargetPrompt | Sequence[TargetPrompt] | TargetPromptBatch", batch_size: int
    ) -> "TargetPromptBatch":
        """A TargetPromptBatch from a TargetPrompt (repeated ``batch_size`` times), a list of them, or a batch."""
        if isinstance(target_prompt, TargetPrompt):
            return TargetPromptBatch.from_target_prompt(target_prompt, batch_size)
        if isinstance(target_prompt, TargetPromptBatch):
            return target_prompt
        if isinstance(target_prompt, list):
            return TargetPromptBatch.from_target_prompts(target_prompt)
        raise ValueError(
            "target prompts must be a TargetPrompt, a list of TargetPrompt or a TargetPromptBatch, got "
            f"{type(target_prompt).__name__} (a string: wrap it, TargetPrompt(text, index_to_patch))."
        )

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, idx: int) -> TargetPrompt:
        return TargetPrompt(self.prompts[idx], int(self.index_to_patch[idx]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


# nnterp's default words for repeat_prompt (from the patchscopes paper's next-token notebook)
REPEAT_PROMPT_WORDS = ["king", "1135", "hello"]


def repeat_prompt(
    words: Sequence[str] | None = None, rel: str = " ", sep: str = "\n", placeholder: str = "?",
    index_to_patch: int = -1,
) -> TargetPrompt:
    """The identity target prompt: ``"w1 w1\\nw2 w2\\n...\\n?"``, patched at ``index_to_patch`` (default the
    placeholder, its last token). Default words: nnterp's ``["king", "1135", "hello"]``.

    The model learns from the examples to repeat the word it is given, so patching a hidden state at the
    placeholder makes it say what that state encodes.

    Example:
        >>> repeat_prompt()
        TargetPrompt(prompt='king king\\n1135 1135\\nhello hello\\n?', index_to_patch=-1)
    """
    if words is None:
        words = REPEAT_PROMPT_WORDS
    if isinstance(words, str):
        raise TypeError("repeat_prompt takes a list of words, got one string; e.g. repeat_prompt([word]).")
    prompt = sep.join(f"{w}{rel}{w}" for w in words) + sep + placeholder
    return TargetPrompt(prompt, index_to_patch)


# nnterp's instruction texts for it_repeat_prompt (the model is asked to continue a sentence with its next word)
_IT_INSTRUCTION = ("I will provide you with a series of sentences. Your task is to guess the next word in the "
                   "sentence. You must answer with the next word only.")
_IT_SYSTEM_INSTRUCTION = ("The user will provide you with a sentence. Your task is to guess the next word in the "
                          "sentence. You must answer with the next word only.")
_IT_INLINE_INSTRUCTION = "Guess the next word in the following sentence (answer only the next word): "


def it_repeat_prompt(
    tokenizer,
    words: Sequence[str] | None = None,
    rel: str = " ",
    sep: str = "\n",
    placeholder: str = "?",
    complete_prompt: bool = True,
    add_user_instr: bool = True,
    use_system_prompt: bool = True,
) -> TargetPrompt:
    """``repeat_prompt`` in the tokenizer's chat template, for instruction-tuned models (index -1).

    The chat: [system "You are a helpful assistant." if ``use_system_prompt``], the instruction as the user, "Ok."
    from the assistant, the repeat prompt as the user, and the assistant's turn continued with the repeat prompt
    (``complete_prompt``) or empty. ``add_user_instr=False``: the instruction goes in the system message (or,
    without one, before the prompt in the user turn). Rendered with ``continue_final_message=True``.

    Example:
        >>> from unilens.testing import make_tokenizer
        >>> tok = make_tokenizer()
        >>> tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        >>> it_repeat_prompt(tok, words=["cat"], add_user_instr=False, use_system_prompt=False).prompt
        '<user>Guess the next word in the following sentence (answer only the next word): cat cat\\n?<assistant>cat cat\\n?'
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"it_repeat_prompt needs a tokenizer with a chat template; {type(tokenizer).__name__} has "
                         "none. Use repeat_prompt() for a base model.")
    prompt = repeat_prompt(words, rel, sep, placeholder).prompt
    answer = {"role": "assistant", "content": prompt if complete_prompt else ""}
    if add_user_instr:
        chat = [{"role": "system", "content": "You are a helpful assistant."}] if use_system_prompt else []
        chat += [{"role": "user", "content": _IT_INSTRUCTION}, {"role": "assistant", "content": "Ok."},
                 {"role": "user", "content": prompt}, answer]
    elif use_system_prompt:
        chat = [{"role": "system", "content": _IT_SYSTEM_INSTRUCTION}, {"role": "user", "content": prompt}, answer]
    else:
        chat = [{"role": "user", "content": _IT_INLINE_INSTRUCTION + prompt}, answer]
    text = tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True, add_special_tokens=False)
    return TargetPrompt(text, -1)


def _as_target_batch(
    targets: TargetPrompt | TargetPromptBatch | Sequence[TargetPrompt] | None, n_sources: int
) -> TargetPromptBatch:
    if targets is None:
        targets = repeat_prompt()
    if isinstance(targets, TargetPrompt):
        return TargetPromptBatch.from_target_prompt(targets, n_sources)
    if not isinstance(targets, TargetPromptBatch):
        targets = list(targets)
        if not all(isinstance(t, TargetPrompt) for t in targets):
            raise TypeError(
                "target_patch_prompts must be a TargetPrompt, a TargetPromptBatch or a list of TargetPrompt."
            )
        targets = TargetPromptBatch.from_target_prompts(targets)
    if len(targets) == 1 and n_sources > 1:
        targets = TargetPromptBatch(targets.prompts * n_sources, targets.index_to_patch.repeat(n_sources))
    if len(targets) != n_sources:
        raise ValueError(
            f"patchscope_lens: {len(targets)} target prompts for {n_sources} sources; give one target prompt "
            "(shared) or one per source."
        )
    return targets


def patchscope_lens(
    nn_model,
    source_prompts: Prompts | None = None,
    target_patch_prompts: TargetPrompt | TargetPromptBatch | Sequence[TargetPrompt] | None = None,
    layers: int | Sequence[int] | None = None,
    latents: torch.Tensor | None = None,
    remote: bool = False,
) -> torch.Tensor:
    """Patchscope: patch each source's last-token residual at layer L into a target prompt at layer L.

    For each source prompt and each layer L of ``layers`` (default: all), the residual ``layers_output[L]``
    at the source's last real token replaces ``layers_output[L]`` of the target prompt at its
    ``index_to_patch``; returns the target's next-token probabilities ``(n_sources, len(layers), vocab)``.
    ``latents`` ``(n_sources, len(layers), hidden)`` replaces the source run. Default target: ``repeat_prompt()``.
    All ``n_sources * len(layers)`` patched runs go through ONE forward.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> probs = patchscope_lens(model, ["Paris is", "The cat"], layers=[0, 1])
        >>> probs.shape == (2, 2, model.vocab_size)
        True
    """
    model = nn_model  # nnterp's argument name
    layer_list = _layer_list(model, layers)
    trace_kwargs = {"remote": True} if remote else {}
    if latents is None:
        if source_prompts is None:
            raise ValueError("patchscope_lens needs source_prompts or latents.")
        source = _encode(model, source_prompts)
        saved: list[torch.Tensor] = []
        with torch.no_grad(), model.trace(source, **trace_kwargs):
            for layer in sorted(layer_list):
                saved.append(model._last_positions(model.layers_output[layer]).save())  # (n_sources, hidden)
        by_layer = dict(zip(sorted(layer_list), saved))
        latents = torch.stack([by_layer[layer] for layer in layer_list], dim=1)  # (n_sources, layers, hidden)
    if latents.dim() != 3 or latents.shape[1] != len(layer_list) or latents.shape[2] != model.hidden_size:
        raise ValueError(
            f"latents must have shape (n_sources, {len(layer_list)} layers, {model.hidden_size}), got "
            f"{tuple(latents.shape)}."
        )
    n_src, n_layers = latents.shape[0], len(layer_list)
    targets = _as_target_batch(target_patch_prompts, n_src)
    # rows are layer-major: row = layer_slot * n_src + source
    target = _encode(model, targets.prompts * n_layers)
    mask = target["attention_mask"]
    lengths = mask.sum(dim=1)
    positions = []
    for row in range(n_src * n_layers):
        index = int(targets.index_to_patch[row % n_src])
        n_real = int(lengths[row])
        if not -n_real <= index < n_real:
            raise IndexError(
                f"index_to_patch={index} is out of range for target prompt {targets.prompts[row % n_src]!r} "
                f"({n_real} tokens)."
            )
        real = torch.nonzero(mask[row], as_tuple=False).flatten()
        positions.append(int(real[index]))
    seq = mask.shape[1]
    values = latents.transpose(0, 1).reshape(n_src * n_layers, -1)  # (rows, hidden), layer-major
    patches = {}
    for slot, layer in enumerate(layer_list):
        cell = torch.zeros(n_src * n_layers, seq, 1, dtype=torch.bool, device=mask.device)
        for row in range(slot * n_src, (slot + 1) * n_src):
            cell[row, positions[row]] = True
        patches[layer] = cell
    with torch.no_grad(), model.trace(target, **trace_kwargs):
        for layer in sorted(layer_list):
            out = model.layers_output[layer]  # (rows, seq, hidden)
            new = values.to(out.device, out.dtype)[:, None, :].expand_as(out)
            model.layers_output[layer] = torch.where(patches[layer].to(out.device), new, out)
        probs = model.next_token_probs.save()  # (rows, vocab)
    return probs.reshape(n_layers, n_src, -1).transpose(0, 1)


def _real_positions(mask: torch.Tensor, index: int, prompts: Sequence[str]) -> list[int]:
    """Per row of a padded batch: the column of its ``index``-th own token (negative: from its last real token)."""
    out = []
    for row in range(mask.shape[0]):
        real = torch.nonzero(mask[row], as_tuple=False).flatten()
        if not -len(real) <= index < len(real):
            raise IndexError(f"index {index} is out of range for prompt {prompts[row]!r} ({len(real)} tokens).")
        out.append(int(real[index]))
    return out


def patchscope_generate(
    nn_model,
    prompts: Prompts,
    target_patch_prompt: TargetPrompt,
    max_length: int = 50,
    layers: int | Sequence[int] | None = None,
    remote: bool = False,
    max_batch_size: int = 32,
) -> dict[int, torch.Tensor]:
    """Patchscope with generation: for each layer L of ``layers`` (default all), the last-token residual of each
    prompt at L replaces the target prompt's residual at L at ``target_patch_prompt.index_to_patch``, and the model
    generates up to ``max_length`` new tokens from there (the patch is made on the prompt's forward; the cache
    carries it). Returns ``{layer: token ids (n_prompts, prompt_len + new)}`` on the CPU.

    Up to ``max_batch_size`` rows (prompts x layers) go through one generation. nnterp indexes the collected
    states by layer number (an IndexError, or the wrong layer, when ``layers`` is not all of them); here each layer
    gets its own state.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> out = patchscope_generate(model, ["Paris is"], repeat_prompt(), max_length=3, layers=[1])
        >>> list(out), out[1].shape[0]
        ([1], 1)
    """
    model = nn_model  # nnterp's argument name
    if remote:
        raise NotImplementedError("patchscope_generate(remote=True): run it on a local model (see the README).")
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not isinstance(target_patch_prompt, TargetPrompt):
        raise TypeError(f"target_patch_prompt must be a TargetPrompt, got {type(target_patch_prompt).__name__}.")
    if max_batch_size < 1 or max_length < 1:
        raise ValueError(f"max_batch_size and max_length must be >= 1, got {max_batch_size}, {max_length}.")
    layer_list = _layer_list(model, layers)
    source = _encode(model, prompts)
    saved: dict[int, torch.Tensor] = {}
    with torch.no_grad(), model.trace(source):
        for layer in sorted(layer_list):
            saved[layer] = model._last_positions(model.layers_output[layer]).save()  # (n_prompts, hidden)
    n = len(prompts)
    per_run = max(max_batch_size // n, 1)  # layers per generation
    generations: dict[int, torch.Tensor] = {}
    for start in range(0, len(layer_list), per_run):
        chunk = layer_list[start:start + per_run]
        batch = _encode(model, [target_patch_prompt.prompt] * (n * len(chunk)))  # rows: layer-major
        mask = batch["attention_mask"]
        pos = _real_positions(mask, int(target_patch_prompt.index_to_patch), [target_patch_prompt.prompt] * len(mask))
        cells, values = {}, {}
        for slot, layer in enumerate(chunk):
            cell = torch.zeros(mask.shape[0], mask.shape[1], 1, dtype=torch.bool)
            value = torch.zeros(mask.shape[0], saved[layer].shape[-1], dtype=saved[layer].dtype)
            for k in range(n):
                row = slot * n + k
                cell[row, pos[row]] = True
                value[row] = saved[layer][k].cpu()
            cells[layer], values[layer] = cell, value
        result: dict[str, torch.Tensor] = {}
        with torch.no_grad(), model.generate(max_new_tokens=max_length) as tracer:
            with tracer.invoke(batch):
                for layer in sorted(chunk):  # the prompt's forward (the first step) only
                    out = model.layers_output[layer]  # (rows, seq, hidden)
                    new = values[layer].to(out.device, out.dtype)[:, None, :].expand_as(out)
                    model.layers_output[layer] = torch.where(cells[layer].to(out.device), new, out)
            with tracer.invoke():
                result["tokens"] = tracer.result.save()
        tokens = result["tokens"].cpu()
        for slot, layer in enumerate(chunk):
            generations[layer] = tokens[slot * n:(slot + 1) * n]
    return generations


def patch_object_attn_lens(
    nn_model,
    source_prompts: Prompts,
    target_prompts: Prompts,
    attn_idx_patch: int,
    num_patches: int = 5,
) -> torch.Tensor:
    """For each layer L: the attention *inputs* of the target prompts at token ``attn_idx_patch`` (of each target's
    own tokens; negative counts from its last token) are replaced, at layers ``L .. L + num_patches - 1``, by the
    source prompts' attention inputs at their last token at those layers; returns the targets' next-token
    probabilities ``(n_targets, n_layers, vocab)``. Sources: one per target, or one for all.

    Only what attention reads changes (the residual stream keeps the target token), so the model attends to the
    source's object in place of the target's. All ``n_layers * n_targets`` runs go through one forward.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> probs = patch_object_attn_lens(model, "The apple", "The pear is red", attn_idx_patch=1, num_patches=1)
        >>> probs.shape == (1, model.num_layers, model.vocab_size)
        True
    """
    model = nn_model  # nnterp's argument name
    sources = [source_prompts] if isinstance(source_prompts, str) else list(source_prompts)
    targets = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts)
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}.")
    if len(sources) not in (1, len(targets)):
        raise ValueError(f"patch_object_attn_lens: {len(sources)} source prompts for {len(targets)} targets; give one "
                         "source per target, or one for all.")
    n_layers = model.num_layers
    missing = [i for i, p in enumerate(model.architecture.layers) if p.attention is None]
    if missing:
        raise ValueError(f"patch_object_attn_lens patches every layer's attention input; layers {missing} of this "
                         f"{model.architecture.model_type} model have no attention.")
    saved: dict[int, torch.Tensor] = {}
    with torch.no_grad(), model.trace(_encode(model, sources)):
        for layer in range(n_layers):
            saved[layer] = model._last_positions(model.attentions_input[layer]).save()  # (n_sources, hidden)
    n_tgt = len(targets)
    batch = _encode(model, targets * n_layers)  # rows: row = L * n_tgt + target
    mask = batch["attention_mask"]
    pos = _real_positions(mask, attn_idx_patch, targets * n_layers)
    cells, values = {}, {}
    for layer in range(n_layers):
        cell = torch.zeros(mask.shape[0], mask.shape[1], 1, dtype=torch.bool)
        value = torch.zeros(mask.shape[0], saved[layer].shape[-1], dtype=saved[layer].dtype)
        for first in range(max(0, layer - num_patches + 1), layer + 1):  # runs whose window covers this layer
            for t in range(n_tgt):
                row = first * n_tgt + t
                cell[row, pos[row]] = True
                value[row] = saved[layer][t if len(sources) > 1 else 0].cpu()
        cells[layer], values[layer] = cell, value
    with torch.no_grad(), model.trace(batch):
        for layer in range(n_layers):
            x = model.attentions_input[layer]  # (rows, seq, hidden)
            new = values[layer].to(x.device, x.dtype)[:, None, :].expand_as(x)
            model.attentions_input[layer] = torch.where(cells[layer].to(x.device), new, x)
        probs = model.next_token_probs.save()  # (rows, vocab)
    return probs.cpu().reshape(n_layers, n_tgt, -1).transpose(0, 1)


# ------------------------------------------------------------------------------------------------
# Activation and attribution patching
# ------------------------------------------------------------------------------------------------

_COMPONENTS = {"resid": "layers_output", "attn": "attentions_output", "mlp": "mlps_output", "head": "attention_heads"}


def _accessor(model, component: str):
    if component not in _COMPONENTS:
        raise ValueError(f"component must be one of {sorted(_COMPONENTS)}, got {component!r}.")
    return getattr(model, _COMPONENTS[component])


def _encode_pairs(
    model, clean: str | Sequence[str], corrupted: str | Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Clean and corrupted prompts, one pair or lists of pairs, as two unpadded batches ``(pairs, seq)``."""
    one = isinstance(clean, str) and isinstance(corrupted, str)
    cleans, corrupteds = ([clean], [corrupted]) if one else (clean, corrupted)
    if isinstance(cleans, str) or isinstance(corrupteds, str) or not all(
        isinstance(p, str) for p in [*cleans, *corrupteds]
    ):
        raise TypeError("clean and corrupted must each be one prompt string, or each a list of prompt strings.")
    cleans, corrupteds = list(cleans), list(corrupteds)
    if not cleans or len(cleans) != len(corrupteds):
        raise ValueError(f"clean and corrupted must be as many prompts (one pair each), got {len(cleans)} clean "
                         f"and {len(corrupteds)} corrupted.")  # fmt: skip
    labelled = [("clean", p) for p in cleans] + [("corrupted", p) for p in corrupteds]
    lengths = [len(model.tokenizer(p).input_ids) for _, p in labelled]
    if len(set(lengths)) > 1:
        k = next(i for i, n in enumerate(lengths) if n != lengths[0])
        raise ValueError(
            f"clean and corrupted prompts must tokenize to the same length (patching swaps activations "
            f"position by position, and pairs share batches): clean {cleans[0]!r} has {lengths[0]} tokens, "
            f"{labelled[k][0]} {labelled[k][1]!r} has {lengths[k]}. Reword one of them."
        )
    return _encode(model, cleans), _encode(model, corrupteds)


def _position_list(positions: int | Sequence[int] | None, seq: int) -> list[int]:
    return _checked_indices(positions, seq, "position", "the prompts have {n} tokens")


def _clean_activations(model, accessor, batch: dict[str, torch.Tensor], layers: Sequence[int]) -> dict:
    """``accessor[layer]`` of every layer in ``layers`` on ``batch``, one no-grad trace: ``{layer: (n, seq, ...)}``."""
    acts: dict[int, torch.Tensor] = {}  # built before the trace: nnsight pushes back only saved names
    with torch.no_grad(), model.trace(batch):
        for layer in sorted(layers):
            acts[layer] = accessor[layer].save()  # (n, seq, hidden) or (n, seq, heads, head_dim)
        acts = _save(acts)  # a remote request returns saved names only: the dict itself
    return acts


def _save(value: Any) -> Any:
    """``nnsight.save``: marks a container built outside a trace to come back from a remote request too."""
    from nnsight import save

    return save(value)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Detached, on CPU, float32 or wider (half-precision models give float32 scores, float64 models float64)."""
    return x.detach().to(torch.promote_types(x.dtype, torch.float32)).cpu()


def activation_patching(
    model,
    clean: str | Sequence[str],
    corrupted: str | Sequence[str],
    metric: Metric,
    component: str = "resid",
    layers: int | Sequence[int] | None = None,
    positions: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    reuse_prefix: bool = True,
    stagger: bool = True,
    metric_positions: int | Sequence[int] | None = None,
    distribute: bool = True,
) -> torch.Tensor:
    """Activation patching: the corrupted run with ONE cell's activation replaced by the clean run's, per cell.

    ``component``: ``"resid"`` (``layers_output``), ``"attn"`` (``attentions_output``), ``"mlp"``
    (``mlps_output``), cells ``(layer, position)`` -> returns ``(len(layers), len(positions))``; or
    ``"head"`` (per-head attention output z before the output projection, ``attention_heads``, patched at
    all ``positions`` together), cells ``(layer, head)`` -> returns ``(len(layers), num_heads)``.
    ``metric(logits (n, seq, vocab)) -> (n,)`` is evaluated on the patched runs' logits, row by row.

    ``clean`` and ``corrupted`` may be lists of n prompt pairs (every prompt the same number of tokens): each
    cell is patched in every pair (pair i's clean activation into pair i's corrupted run), the metric is
    called per cell on the n runs in pair order (as on one batched forward of the n corrupted prompts),
    and the result gains a leading pair dimension, ``(n, len(layers), ...)``.

    With ``metric_positions`` (e.g. ``-1``), the metric gets those positions' logits only, in that order,
    ``(n, len(metric_positions), vocab)``, and the unembedding skips the others (most of a small model's
    patching work when the metric reads the last position): ``lambda logits: logits[:, -1, token]`` works
    unchanged with ``metric_positions=-1``.

    Many patched runs share one forward, a row each (at most ``batch_size`` rows; default: as many as keep
    ~256 MB of logits). What a patch cannot change is not recomputed, after a run-time check that the model
    allows it (else a warning, and the same result computed the plain way):

    - ``reuse_prefix``: a run patching position p starts at p; tokens before p are the corrupted run's
      (causal attention), from its key/value cache and logits (not for ``"head"`` over every position);
    - ``stagger``: a row joins the batch at its patched layer; layers below are the corrupted run's, so a
      forward starts with the rows of its lowest layer and grows, and the layers below it are skipped.

    Data parallel: under an initialized ``torch.distributed`` process group of several ranks (``torchrun``), lists
    of pairs are split across ranks (contiguous blocks, `unilens.distributed.split_range`) and every rank returns
    the whole ``(n, ...)`` result, gathered in pair order; only rank 0 shows a progress bar. Every rank must make
    the same call. ``distribute=False``: every rank computes all pairs itself.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> paris = model.tokenizer(" Paris").input_ids[0]
        >>> effect = activation_patching(model, "The capital of France is", "The capital of Italy is",
        ...                              lambda logits: logits[:, -1, paris], progress=False)
        >>> effect.shape[0] == model.num_layers
        True
    """
    from .distributed import distributed_pairs, is_distributed, rank_world

    if distribute and not isinstance(clean, str) and not isinstance(corrupted, str) and is_distributed():
        _encode_pairs(model, clean, corrupted)  # every rank checks every pair (same lengths) before the split
        return distributed_pairs(
            activation_patching, clean, corrupted, model=model, metric=metric, component=component, layers=layers,
            positions=positions, batch_size=batch_size, progress=progress and rank_world()[0] == 0,
            reuse_prefix=reuse_prefix, stagger=stagger, metric_positions=metric_positions, distribute=False,
        )  # fmt: skip
    accessor = _accessor(model, component)
    clean_batch, corrupted_batch = _encode_pairs(model, clean, corrupted)
    pairs, seq = clean_batch["input_ids"].shape
    layer_list = _layer_list(model, layers)
    position_list = _position_list(positions, seq)
    if metric_positions is not None:
        metric_positions = _checked_indices(metric_positions, seq, "metric position", "the prompts have {n} tokens")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")

    if model.__dict__.get("_remote_mode"):  # one request per forward: no key/value cache or layer outputs travel
        reuse_prefix = stagger = False  # between requests, so every patched run is a plain batched row
    clean_acts = _clean_activations(model, accessor, clean_batch, layer_list)  # (pairs, seq, ...) per layer

    # A row is one patched run: (layer, position) or (layer, head, patched at every listed position), in a pair.
    columns = list(range(model.num_heads)) if component == "head" else position_list
    rows = [(layer, j, pair) for layer in layer_list for j in dict.fromkeys(columns) for pair in range(pairs)]
    sweep = Sweep(model, component, accessor, clean_acts, clean_batch["input_ids"], corrupted_batch, metric,
                  metric_positions, sorted(set(position_list)), per_cell=not isinstance(clean, str))
    values = run_sweep(sweep, rows, batch_size, resume=reuse_prefix, stagger=stagger, progress=progress)
    values = {row: _at_least_float32(v) for row, v in values.items()}
    result = torch.stack([
        torch.stack([torch.stack([values[(layer, j, pair)] for j in columns]) for layer in layer_list])
        for pair in range(pairs)
    ])  # (pairs, layers, columns)
    return result[0] if isinstance(clean, str) else result


def attribution_patching(
    model,
    clean: str,
    corrupted: str,
    metric: Metric,
    component: str = "resid",
    layers: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Attribution patching: the first-order estimate of activation patching, ``(len(layers), seq)``.

    For each (layer, position): ``(clean_act - corrupted_act) . d metric / d act`` with the gradient taken
    at the corrupted run (``metric`` is summed over its ``(n,)`` output). One clean forward, then ONE
    corrupted forward and ONE backward for all cells. ``component``: ``"resid"``, ``"attn"`` or ``"mlp"``.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> paris = model.tokenizer(" Paris").input_ids[0]
        >>> est = attribution_patching(model, "The capital of France is", "The capital of Italy is",
        ...                            lambda logits: logits[:, -1, paris])
        >>> est.shape[0] == model.num_layers
        True
    """
    if component == "head":
        raise ValueError("attribution_patching supports component 'resid', 'attn' or 'mlp'; use activation_patching "
                         "for heads.")
    accessor = _accessor(model, component)
    if not isinstance(clean, str) or not isinstance(corrupted, str):
        raise TypeError("attribution_patching takes one clean and one corrupted prompt string.")
    clean_batch, corrupted_batch = _encode_pairs(model, clean, corrupted)
    layer_list = sorted(_layer_list(model, layers))
    clean_acts = _clean_activations(model, accessor, clean_batch, layer_list)
    # A zero "probe" added to each activation: d metric / d probe = d metric / d activation, whatever
    # the module does with its own output tensor; autograd.grad leaves the parameters' .grad untouched.
    probes = {layer: torch.zeros_like(act, requires_grad=True) for layer, act in clean_acts.items()}
    corrupted_acts: dict[int, torch.Tensor] = {}
    with torch.enable_grad():
        with model.trace(corrupted_batch):
            for layer in layer_list:
                out = accessor[layer]
                corrupted_acts[layer] = out.detach().save()
                accessor[layer] = out + probes[layer].to(out.device, out.dtype)
            logits = model.logits.save()
        value = check_metric(metric(logits), 1).sum()
        grads = torch.autograd.grad(value, [probes[layer] for layer in layer_list], allow_unused=True)
    rows = []
    for layer, grad in zip(layer_list, grads):
        if grad is None:
            grad = torch.zeros_like(probes[layer])  # the metric does not depend on this activation
        delta = (clean_acts[layer] - corrupted_acts[layer]).to(grad.dtype)
        rows.append((delta * grad).sum(dim=-1)[0])  # (seq,)
    order = _layer_list(model, layers)
    by_layer = dict(zip(layer_list, rows))
    return _at_least_float32(torch.stack([by_layer[layer] for layer in order]))


# ------------------------------------------------------------------------------------------------
# Direct logit attribution
# ------------------------------------------------------------------------------------------------


def _norm_eps(norm: nn.Module) -> float:
    for name in ("eps", "variance_epsilon", "epsilon", "layer_norm_eps", "norm_eps"):
        value = getattr(norm, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    raise ValueError(
        f"direct_logit_attribution: cannot find the epsilon of the final norm {type(norm).__name__} "
        "(looked for eps / variance_epsilon / epsilon)."
    )


def _frozen_norm(norm: nn.Module | None, x: torch.Tensor):
    """The final norm at ``x`` ``(hidden,)`` as an affine map with its scale frozen: ``y = gain * P(c) / scale + bias``.

    ``P`` subtracts the mean (LayerNorm-like) or is the identity (RMSNorm-like). The gain, bias and
    centering are read by probing the module (so ``1 + weight`` norms and weightless norms work) and the
    map is checked against the module at ``x``. Returns ``(gain, bias, center, scale)`` in float64.
    """
    hidden = x.shape[-1]
    x64 = x.double()
    if norm is None:
        return torch.ones_like(x64), torch.zeros_like(x64), False, 1.0
    device = module_device(norm) if next(norm.parameters(), None) is not None else x.device
    # probed in float64 (a copy without accelerate's hooks, offloaded weights loaded): a bfloat16 norm's own
    # rounding (~4e-3 relative) would otherwise hide its shape
    norm = detached_copy(norm).to(device, torch.float64)

    def run(v: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return norm(v.to(device, torch.float64)[None]).double()[0].to(x.device)

    eps = _norm_eps(norm)
    bias = run(torch.zeros(hidden, dtype=torch.float64, device=x.device))
    probe = torch.randn(hidden, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(x.device)
    center = bool(torch.allclose(run(probe + 3.0) - bias, run(probe) - bias, rtol=1e-3, atol=1e-4))
    if center:  # LayerNorm: a +-1 probe has mean 0 (even hidden) and variance 1
        signs = torch.ones(hidden, dtype=torch.float64, device=x.device)
        signs[1::2] = -1.0
        signs -= signs.mean()
        var = signs.pow(2).mean()
        gain = (run(signs) - bias) * torch.sqrt(var + eps) / signs
        scale = math.sqrt(float(x64.var(unbiased=False)) + eps)
        centered = x64 - x64.mean()
    else:  # RMSNorm: ones have rms 1
        gain = (run(torch.ones(hidden, dtype=torch.float64, device=x.device)) - bias) * math.sqrt(1.0 + eps)
        scale = math.sqrt(float(x64.pow(2).mean()) + eps)
        centered = x64
    rebuilt = gain * centered / scale + bias
    actual = run(x64)
    if not torch.allclose(rebuilt, actual, rtol=1e-3, atol=1e-3 * float(actual.abs().max())):
        raise ValueError(
            f"direct_logit_attribution: the final norm {type(norm).__name__} is neither RMSNorm- nor "
            f"LayerNorm-like (max error {float((rebuilt - actual).abs().max()):.3g} rebuilding it), so its "
            "contributions cannot be split linearly."
        )
    return gain, bias, center, scale


def direct_logit_attribution(
    model, prompt: str, token: int | str, position: int = -1, heads: bool = True
) -> dict[str, torch.Tensor | list[str] | float]:
    """Direct logit attribution: each component's direct contribution to ``token``'s logit at ``position``.

    The final residual is a sum: ``embed`` (``layers_input[0]``) + each layer's attention and MLP output.
    Each part goes straight through the final norm with its scale FROZEN at the value of the full forward
    (``scale = rms(x)`` for RMSNorm, ``std(x)`` for LayerNorm, whose mean-centering is linear and applied per
    part), then through ``W_U[:, token]``: ``contribution(c) = (W_U[:, token] * gain) . P(c) / scale``.
    ``bias`` holds the norm's bias and the unembedding bias terms, so
    ``embed + layers.sum() + bias == logit``. Linear logit scaling is applied to every term; with a
    soft-cap (Gemma 2) the terms add up to the logit BEFORE the soft-cap.

    Returns a dict: ``layers`` ``(2 * n_layers,)`` = [attn 0, mlp 0, attn 1, ...] with ``labels``;
    ``attn``, ``mlp`` ``(n_layers,)``; ``heads`` ``(n_layers, n_heads)`` (per-head output ``z_h @ W_O[h]``)
    and ``head_bias`` ``(n_layers,)`` (the attention output bias, ``heads.sum(-1) + head_bias == attn``);
    ``embed``, ``bias``, ``logit`` (scalars, float64 tensors).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> dla = direct_logit_attribution(model, "The capital of France is", " Paris")
        >>> total = dla["embed"] + dla["layers"].sum() + dla["bias"]
        >>> bool(torch.isclose(total, dla["logit"], atol=1e-4))
        True
    """
    if isinstance(token, str):
        ids = model.tokenizer(token, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"token {token!r} is {len(ids)} tokens {ids}; pass one token (its id or string).")
        token = ids[0]
    if not 0 <= int(token) < model.vocab_size:
        raise IndexError(f"token id {token} out of range (vocab size {model.vocab_size}).")
    batch = _encode(model, prompt)
    seq = batch["input_ids"].shape[1]
    (position,) = _position_list(position, seq)
    n = model.num_layers
    attn_out, mlp_out, z = [], [], []
    with torch.no_grad(), model.trace(batch):
        embed = model.layers_input[0][0, position].save()
        for i in range(n):
            if heads:
                z.append(model.attention_heads[i][0, position].save())  # (heads, head_dim)
            attn_out.append(model.attentions_output[i][0, position].save())  # (hidden,)
            mlp_out.append(model.mlps_output[i][0, position].save())
        final = model.layers_output[n - 1][0, position].save()
        logits = model.logits[0, position].save()
    parts = torch.stack([embed] + [v for pair in zip(attn_out, mlp_out) for v in pair]).double()  # (1+2n, hidden)
    final64 = final.double()
    residual_error = float((parts.sum(0) - final64).abs().max())
    # The model adds its branches to the residual in its own dtype, rounding after every addition; replaying those
    # additions in that dtype reproduces its rounding. Accept either the float32-era rule (1e-3 of the scale) or a
    # replay within 2 units of the dtype's rounding at the residual's scale: bfloat16's spacing at |x| ~ 400 is 2,
    # far above 1e-3 * 400, while a residual scaling or a missed branch is off by a sizeable fraction of |x|.
    replay = parts[0].to(final.dtype)
    for part in parts[1:]:
        replay = replay + part.to(final.dtype)
    scale = float(final64.abs().max())
    replay_error = float((replay.double() - final64).abs().max())
    if residual_error > 1e-3 * scale + 1e-5 and replay_error > 2 * torch.finfo(final.dtype).eps * scale:
        raise ValueError(
            f"direct_logit_attribution: this {model.architecture.model_type} model's final residual is not the sum "
            f"of the embedding and the attention / MLP outputs (max error {residual_error:.3g}); DLA needs a "
            "pre-norm residual stream without residual scaling."
        )
    arch = model.architecture
    if arch.head_chain is None or len(arch.head_chain) > 1 or (arch.head_chain and arch.head_chain[0] != arch.final_norm_path):
        raise ValueError(
            f"direct_logit_attribution: this {arch.model_type} model maps the residual to logits through "
            f"{arch.head_chain or arch.head_error}, not a single final norm; DLA through it is not linearizable here."
        )
    norm = model.module_accessor.get_unembed_norm() if arch.final_norm_path is not None else None
    gain, norm_bias, center, scale = _frozen_norm(norm, final.to(parts.device))
    head = model.module_accessor.get_unembed()
    w_u = model.weights.W_U[:, token].detach().double().to(parts.device)  # (hidden,)
    head_bias = getattr(head, "bias", None)
    direction = w_u * gain / scale  # (hidden,)

    post = model.architecture.logit_postprocessing
    factor = 1.0
    for key, value in post.items():
        how = LOGIT_POSTPROCESSING[key]
        factor = factor * value if how == "multiply" else factor / value if how == "divide" else factor

    def project(c: torch.Tensor) -> torch.Tensor:  # (..., hidden) -> (...)
        c = c.double().to(direction.device)
        if center:
            c = c - c.mean(dim=-1, keepdim=True)
        return factor * (c @ direction)

    contributions = project(parts)  # (1 + 2n,)
    bias = factor * (w_u @ norm_bias)
    if head_bias is not None:
        bias = bias + factor * float(head_bias[token])
    logit = logits[token].double()
    if any(LOGIT_POSTPROCESSING[key] == "softcap" for key in post):
        cap = next(v for k, v in post.items() if LOGIT_POSTPROCESSING[k] == "softcap")
        logit = cap * torch.atanh((logit / cap).clamp(-1 + 1e-12, 1 - 1e-12))
    result: dict[str, torch.Tensor | list[str] | float] = {
        "embed": contributions[0],
        "layers": contributions[1:],
        "labels": [f"L{i} {kind}" for i in range(n) for kind in ("attn", "mlp")],
        "attn": contributions[1::2],
        "mlp": contributions[2::2],
        "bias": bias,
        "logit": logit,
    }
    if heads:
        per_head, b_o = [], []
        for i in range(n):
            w_o = model.weights[i].W_O.detach().double().to(direction.device)  # (heads, head_dim, hidden)
            vectors = torch.einsum("hd,hdm->hm", z[i].double().to(direction.device), w_o)  # (heads, hidden)
            bias_o = model.weights[i].b_O
            bias_o = torch.zeros_like(vectors[0]) if bias_o is None else bias_o.detach().double().to(vectors.device)
            error = float((vectors.sum(0) + bias_o - attn_out[i].double().to(vectors.device)).abs().max())
            # the projection's output is rounded once to the model's dtype: 1e-3 of the scale in float32, two
            # units of rounding in half precision (bfloat16: 2 * 2**-7 = 1.6 %)
            rtol = max(1e-3, 2 * torch.finfo(attn_out[i].dtype).eps)
            if error > rtol * float(attn_out[i].abs().max()) + 1e-5:
                raise ValueError(
                    f"direct_logit_attribution: layer {i}'s heads (z @ W_O + b_O) do not add up to its attention "
                    f"output (max error {error:.3g}); pass heads=False for layer-level attribution."
                )
            per_head.append(project(vectors))
            b_o.append(project(bias_o))
        result["heads"] = torch.stack(per_head)
        result["head_bias"] = torch.stack(b_o)
    return result


# ------------------------------------------------------------------------------------------------
# Steering
# ------------------------------------------------------------------------------------------------


def steer_all(
    model,
    prompts: Prompts,
    vectors: dict[int, torch.Tensor],
    factor: float = 1.0,
    positions: int | Sequence[int] | slice | None = None,
    batch_rows: int | Sequence[int] | slice | None = None,
) -> torch.Tensor:
    """Run ``prompts`` with ``factor * vectors[layer]`` added to ``layers_output[layer]`` for every layer given.

    ``positions`` / ``batch_rows`` restrict where the vectors are added (positions index the padded batch;
    with the default left padding, negative positions are the same tokens in every row). Returns the
    logits ``(batch, seq, vocab)``.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> v = torch.randn(model.hidden_size)
        >>> logits = steer_all(model, ["Hello there", "Hi"], {0: v, 1: -v}, factor=2.0)
        >>> logits.shape[0], logits.shape[-1] == model.vocab_size
        (2, True)
    """
    layers = _layer_list(model, list(vectors))
    by_layer = dict(zip(layers, vectors.values()))
    batch = _encode(model, prompts)
    with torch.no_grad(), model.trace(batch):
        for layer in sorted(by_layer):
            model.steer(layer, by_layer[layer], factor=factor, positions=positions, batch_index=batch_rows)
        logits = model.logits.save()
    return logits


def mean_difference_vector(model, positive_prompts: Prompts, negative_prompts: Prompts, layer: int) -> torch.Tensor:
    """Steering vector ``(hidden,)``: mean last-token ``layers_output[layer]`` of positive minus negative prompts.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> v = mean_difference_vector(model, ["I love it", "Great"], ["I hate it", "Awful"], layer=1)
        >>> v.shape == (model.hidden_size,)
        True
    """
    (layer,) = _layer_list(model, layer)

    def mean_last(prompts: Prompts) -> torch.Tensor:
        with torch.no_grad(), model.trace(_encode(model, prompts)):
            last = model._last_positions(model.layers_output[layer]).save()  # (batch, hidden)
        return last.mean(dim=0)

    return mean_last(positive_prompts) - mean_last(negative_prompts)
