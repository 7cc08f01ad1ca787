"""Lenses: the logit lens, patchscope (prompts, generation, attention-patched object lens) and their target prompts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..arch.offload import module_device
from ..core.protocol import StandardizedModel
from ..core.tensors import last_real_positions
from .arguments import Prompts, _as_index, _encode, _layer_list, _positive_int, _prompt_list

__all__ = [
    "TargetPrompt",
    "TargetPromptBatch",
    "it_repeat_prompt",
    "logit_lens",
    "patch_object_attn_lens",
    "patchscope_generate",
    "patchscope_lens",
    "repeat_prompt",
]


def _unembed(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + unembedding + logit post-processing on plain modules (no trace): ``(..., hidden)`` -> logits."""
    device = module_device(model.module_accessor.get_unembed())  # accelerate's execution device when dispatched
    with torch.no_grad():
        return model.module_accessor.project_on_vocab(hidden.to(device))


def remote_logit_lens(model: StandardizedModel, batch: dict[str, torch.Tensor], all_positions: bool = False) -> torch.Tensor:
    """``logit_lens``'s logits computed on the server (one request): every layer's residual stream, stacked
    ``(batch, layers, [seq,] hidden)``, through the final norm and unembedding there; float32."""
    n = model.num_layers
    with torch.no_grad(), model.trace(batch, **model._keep_last_logits_kwargs()):
        stacked = torch.stack([model.layers_output[i] for i in range(n)], dim=1)  # (batch, layers, seq, hidden)
        if not all_positions:
            last = last_real_positions(batch["attention_mask"]).to(stacked.device)
            stacked = stacked[torch.arange(stacked.shape[0], device=stacked.device), :, last]  # (batch, layers, hidden)
        logits = model.project_on_vocab(stacked).float().save()
    return logits


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


def _last_token_residuals(
    model, batch: dict[str, torch.Tensor], layers: Sequence[int], trace_kwargs: dict
) -> dict[int, torch.Tensor]:
    """``layers_output[layer]`` at each prompt's last real token, for every layer of ``layers``, in one no-grad
    trace: ``{layer: (batch, hidden)}``."""
    saved: list[torch.Tensor] = []
    with torch.no_grad(), model.trace(batch, **trace_kwargs):
        for layer in sorted(set(layers)):
            saved.append(model._last_positions(model.layers_output[layer]).save())  # (batch, hidden)
    return dict(zip(sorted(set(layers)), saved))


def _patched_cells(mask: torch.Tensor, targets: TargetPromptBatch, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Where patchscope patches, per layer: a boolean ``(rows, seq, 1)`` marking each row's ``index_to_patch`` (of
    its target prompt's own tokens) in the layer's block of rows. Rows are layer-major: ``slot * n_targets + t``."""
    n_src, rows = len(targets), mask.shape[0]
    lengths = mask.sum(dim=1)
    positions = []
    for row in range(rows):
        index = int(targets.index_to_patch[row % n_src])
        n_real = int(lengths[row])
        if not -n_real <= index < n_real:
            raise IndexError(
                f"index_to_patch={index} is out of range for target prompt {targets.prompts[row % n_src]!r} "
                f"({n_real} tokens)."
            )
        real = torch.nonzero(mask[row], as_tuple=False).flatten()
        positions.append(int(real[index]))
    patches: dict[int, torch.Tensor] = {}
    for slot, layer in enumerate(layers):  # a layer listed twice: both slots' rows patched at it
        cell = patches.get(layer)
        if cell is None:
            cell = torch.zeros(rows, mask.shape[1], 1, dtype=torch.bool, device=mask.device)
        for row in range(slot * n_src, (slot + 1) * n_src):
            cell[row, positions[row]] = True
        patches[layer] = cell
    return patches


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
    ``latents`` replaces the source run, in nnterp's layout ``(layers, n_sources, hidden)`` as
    ``get_token_activations`` returns it: one row per entry of ``layers``, or per model layer (row L is patched at
    layer L), or a single row patched at every layer. ``layers`` may repeat a layer (each entry is one patched run).
    Default target: ``repeat_prompt()``. All ``n_sources * len(layers)`` patched runs go through ONE forward.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> probs = patchscope_lens(model, ["Paris is", "The cat"], layers=[0, 1])
        >>> probs.shape == (2, 2, model.vocab_size)
        True
    """
    model = nn_model  # nnterp's argument name
    layer_list = _layer_list(model, layers, allow_duplicates=True)
    trace_kwargs = {"remote": True} if remote else {}
    if latents is None:
        if source_prompts is None:
            raise ValueError("patchscope_lens needs source_prompts or latents.")
        by_layer = _last_token_residuals(model, _encode(model, source_prompts, "source_prompts"), layer_list,
                                         trace_kwargs)
        latents = torch.stack([by_layer[layer] for layer in layer_list], dim=1)  # (n_sources, layers, hidden)
    elif source_prompts is not None:
        raise ValueError("patchscope_lens: pass source_prompts or latents, not both (latents replace the source run).")
    else:
        latents = _latents_per_layer(model, latents, layer_list).transpose(0, 1)  # (n_sources, layers, hidden)
    n_src, n_layers = latents.shape[0], len(layer_list)
    targets = _as_target_batch(target_patch_prompts, n_src)
    # rows are layer-major: row = layer_slot * n_src + source
    target = _encode(model, targets.prompts * n_layers)
    patches = _patched_cells(target["attention_mask"], targets, layer_list)  # {layer: (rows, seq, 1)}
    values = latents.transpose(0, 1).reshape(n_src * n_layers, -1)  # (rows, hidden), layer-major
    with torch.no_grad(), model.trace(target, **trace_kwargs):
        for layer in sorted(set(layer_list)):
            out = model.layers_output[layer]  # (rows, seq, hidden)
            new = values.to(out.device, out.dtype)[:, None, :].expand_as(out)
            model.layers_output[layer] = torch.where(patches[layer].to(out.device), new, out)
        probs = model.next_token_probs.save()  # (rows, vocab)
    return probs.reshape(n_layers, n_src, -1).transpose(0, 1)


def _latents_per_layer(model, latents: object, layer_list: Sequence[int]) -> torch.Tensor:
    """nnterp's ``latents`` ``(layers, n_sources, hidden)`` as one row per entry of ``layer_list``: given per entry,
    per model layer (indexed by layer), or one row for every layer."""
    n, hidden = len(layer_list), model.hidden_size
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a tensor ({n} layers, n_sources, {hidden}), got {type(latents).__name__}.")
    if latents.dim() != 3 or latents.shape[2] != hidden or latents.shape[0] not in (n, model.num_layers, 1):
        raise ValueError(
            f"latents must have shape (layers, n_sources, {hidden}) with one row per layer of `layers` ({n}), per "
            f"model layer ({model.num_layers}) or one for all, as get_token_activations returns; got "
            f"{tuple(latents.shape)}."
        )
    if latents.shape[0] == n:
        return latents
    if latents.shape[0] == 1:
        return latents.expand(n, -1, -1)
    return latents[list(layer_list)]


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
    prompts = _prompt_list(prompts)
    if not isinstance(target_patch_prompt, TargetPrompt):
        raise TypeError(f"target_patch_prompt must be a TargetPrompt, got {type(target_patch_prompt).__name__}.")
    _positive_int(max_length, "max_length")
    _positive_int(max_batch_size, "max_batch_size")
    layer_list = list(dict.fromkeys(_layer_list(model, layers, allow_duplicates=True)))  # {layer: tokens}: once each
    saved = _last_token_residuals(model, _encode(model, prompts), layer_list, {})  # {layer: (n_prompts, hidden)}
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
    sources = _prompt_list(source_prompts, "source_prompts")
    targets = _prompt_list(target_prompts, "target_prompts")
    _positive_int(num_patches, "num_patches")
    attn_idx_patch = _as_index(attn_idx_patch, "attn_idx_patch")
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

