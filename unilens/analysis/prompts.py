"""Prompts with tracked target tokens: `Prompt`, `get_first_tokens`, `run_prompts`, `prompts_to_df` (nnterp's
`prompt_utils`, same names, arguments and results)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm as _tqdm

from ..compat.nnsight_utils import compute_next_token_probs
from .arguments import _positive_int

__all__ = [
    "GetProbsFunc",
    "Prompt",
    "TokenizationError",
    "get_first_tokens",
    "next_token_probs_of",
    "next_token_probs_unsqueeze",
    "prompts_to_df",
    "run_prompts",
]

# A function `(model, list_of_prompt_strings) -> probs (batch, ..., vocab)`; nnterp's also take `remote=`.
GetProbsFunc = Callable[[Any, list[str]], torch.Tensor]

# Category name used when `Prompt.from_strings` gets a bare string or list instead of a dict.
DEFAULT_CATEGORY = "target"

# A character no tokenizer merges with what follows: tokenizing PEAR + word gives word's first token without the
# space some tokenizers add in front of a text (use_hacky_implementation)
PEAR = "\U0001f350"


class TokenizationError(Exception):
    """A word's first token cannot be told apart from its with-space variant with this tokenizer."""


def _tokenizer_of(llm_or_tokenizer: Any):
    """The tokenizer to read first tokens with: a StandardizedTransformer's add-prefix-free one, a model's, or it."""
    if hasattr(llm_or_tokenizer, "add_prefix_false_tokenizer"):
        return llm_or_tokenizer.add_prefix_false_tokenizer
    return getattr(llm_or_tokenizer, "tokenizer", llm_or_tokenizer)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _first_after_pear(tokenizer, word: str) -> int | None:
    """The first token of ``word`` as tokenized after ``PEAR`` (no leading space added); None when it has none."""
    pear = _ids(tokenizer, PEAR)
    tokens = _ids(tokenizer, PEAR + word)
    if tokens[: len(pear)] != pear:
        raise TokenizationError(
            f"{type(tokenizer).__name__} merges {PEAR!r} with {word!r}, so the word's first token cannot be isolated; "
            "load the tokenizer with add_prefix_space=False."
        )
    return int(tokens[len(pear)]) if len(tokens) > len(pear) else None


def get_first_tokens(words: str | list[str], llm_or_tokenizer: Any, use_hacky_implementation: bool = False) -> list[int]:
    """First token id of `"word"` and of `" word"` for each word (nnterp's rule), deduplicated, order kept.

    `llm_or_tokenizer`: a tokenizer, or a model (a StandardizedTransformer's `add_prefix_false_tokenizer` is used).
    The `" word"` token is skipped when it is the lone space token (`" Paris"` -> `"  Paris"` starts with a space).
    When the tokenizer puts a space in front of every text (so both give the same token), the no-space token is
    read after a neutral character instead (`use_hacky_implementation=True` does that for every word, and then
    gives the no-space token only).

    Raises:
        ValueError: a word is empty or blank, or tokenises to nothing. TokenizationError: the no-space token
        cannot be isolated.

    Example:
        >>> from unilens.testing import make_tokenizer
        >>> tok = make_tokenizer()
        >>> tok.convert_ids_to_tokens(get_first_tokens(["Paris", "London"], tok))
        ['Paris', 'ĠParis', 'Lon', 'ĠLondon']
    """
    if isinstance(words, str):
        words = [words]
    tokenizer = _tokenizer_of(llm_or_tokenizer)
    space = _ids(tokenizer, " ")
    space_token = space[0] if space else None
    token_ids: list[int] = []
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"target {word!r} is a {type(word).__name__}; targets must be strings")
        if not word.strip():
            raise ValueError(f"target {word!r} is empty or blank; give a non-empty target string")
        if use_hacky_implementation:
            first = _first_after_pear(tokenizer, word)
            if first is not None:
                token_ids.append(first)
            continue
        plain, spaced = _ids(tokenizer, word), _ids(tokenizer, " " + word)
        if not plain or not spaced:
            raise ValueError(
                f"target {word!r} tokenises to nothing with {type(tokenizer).__name__}; "
                "use a target made of characters the tokenizer knows"
            )
        first = plain[0]
        if first == spaced[0] and not word[0].isspace():
            # the tokenizer adds a prefix space (or ignores spaces): read the no-space token after a neutral char.
            # (nnterp computes this too, then discards it and keeps the prefixed token: a bug not reproduced)
            first = _first_after_pear(tokenizer, word)
            if first is None:
                raise TokenizationError(f"{word!r} has no token of its own after {PEAR!r} with "
                                        f"{type(tokenizer).__name__}; load it with add_prefix_space=False.")
        token_ids.append(int(first))
        if spaced[0] != space_token:
            token_ids.append(int(spaced[0]))
    return list(dict.fromkeys(token_ids))


def next_token_probs_of(model, prompts: list[str]) -> torch.Tensor:
    """Default `get_probs_func`: next-token probabilities at the last real token of each prompt.

    Needs a `StandardizedTransformer` (or any nnsight model exposing `next_token_probs` inside a
    trace), which reads the attention mask, so left and right padding give the same result.

    Returns:
        probs `(batch, vocab)`.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> next_token_probs_of(model, ["The capital of France is", "One, two,"]).shape
        torch.Size([2, 512])
    """
    hint = (
        "the default get_probs_func needs a unilens StandardizedTransformer (with `trace` and "
        f"`next_token_probs`), got {type(model).__name__}; wrap your model with "
        "`StandardizedTransformer(hf_model, tokenizer=tok)` or pass `get_probs_func=`"
    )
    if not hasattr(model, "trace"):
        raise TypeError(hint)
    try:
        with torch.no_grad(), model.trace([prompts] if isinstance(prompts, str) else list(prompts)):
            probs = model.next_token_probs.save()  # (batch, vocab)
    except AttributeError as error:
        if "next_token_probs" in str(error):
            raise TypeError(hint) from error
        raise
    return probs


def next_token_probs_unsqueeze(nn_model, prompt: str | list[str], remote: bool = False, **_kwargs: Any) -> torch.Tensor:
    """nnterp's default `get_probs_func`: next-token probabilities `(batch, 1, vocab)` (a one-layer axis) at each
    prompt's last real token, on the CPU.

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> next_token_probs_unsqueeze(model, ["The capital of France is", "Hi"]).shape
        torch.Size([2, 1, 512])
    """
    return compute_next_token_probs(nn_model, prompt, remote=remote).unsqueeze(1)


@dataclass
class Prompt:
    """A prompt and, per category, the target strings (as given) and the token ids whose probability is tracked.

    Example:
        >>> from unilens.testing import make_tokenizer
        >>> tok = make_tokenizer()
        >>> prompt = Prompt.from_strings(
        ...     "The capital of France (not England or Spain) is",
        ...     {"correct": "Paris", "traps": ["London", "Madrid"]},
        ...     tok,
        ... )
        >>> tok.convert_ids_to_tokens(prompt.target_tokens["traps"])  # London, " London", Madrid, " Madrid"
        ['Lon', 'ĠLondon', 'M', 'ĠM']
        >>> prompt.has_no_collisions()
        True
    """

    prompt: str
    target_tokens: dict[str, list[int]]
    target_strings: dict[str, str | list[str]] | None = None

    @classmethod
    def from_strings(
        cls,
        prompt: str,
        target_strings: dict[str, str | list[str]] | str | list[str],
        tokenizer,
    ) -> "Prompt":
        """Build a prompt from target strings; a bare string / list becomes the category `"target"`. `tokenizer`:
        a tokenizer or a model (as in `get_first_tokens`)."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if isinstance(target_strings, (str, list, tuple)):
            target_strings = {DEFAULT_CATEGORY: target_strings}
        if not isinstance(target_strings, dict) or not target_strings:
            raise ValueError(f"targets must be a non-empty dict of category -> str | list[str], got {target_strings!r}")
        target_tokens: dict[str, list[int]] = {}
        for category, strings in target_strings.items():
            if not isinstance(strings, str) and not list(strings):
                raise ValueError(f"category {category!r} has no target strings")
            target_tokens[category] = get_first_tokens(strings if isinstance(strings, str) else list(strings), tokenizer)
        return cls(prompt=prompt, target_tokens=target_tokens, target_strings=dict(target_strings))

    def get_target_probs(self, probs: torch.Tensor, layer: int | None = None) -> dict[str, torch.Tensor]:
        """Sum of the tracked tokens' probabilities per category, on the CPU.

        Args:
            probs: `(..., vocab)` probabilities, e.g. `(batch, layers, vocab)` -> `{category: (batch, layers)}`.
            layer: keep only this index of dimension 1 (the layer axis of `(batch, layers, vocab)`).

        Returns:
            `{category: tensor (...)}`.
        """
        vocab = probs.shape[-1]
        out = {}
        for category, ids in self.target_tokens.items():
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ValueError(
                    f"category {category!r} tracks token ids {bad} outside the vocabulary of size {vocab}; "
                    "build the Prompt with the model's own tokenizer"
                )
            value = probs[..., ids].sum(-1).cpu()
            out[category] = value if layer is None else value[:, layer]
        return out

    def collisions(self, ignore_categories: Iterable[str] | None = None) -> dict[int, list[str]]:
        """Token ids tracked by more than one category: `{token_id: [categories]}`."""
        ignore = {ignore_categories} if isinstance(ignore_categories, str) else set(ignore_categories or ())
        owners: dict[int, list[str]] = {}
        for category, ids in self.target_tokens.items():
            if category in ignore:
                continue
            for i in set(ids):
                owners.setdefault(i, []).append(category)
        return {i: cats for i, cats in owners.items() if len(cats) > 1}

    def has_no_collisions(self, ignore_targets: str | list[str] | None = None,
                          ignore_categories: Iterable[str] | None = None) -> bool:
        """True when no token id is tracked by two categories (categories in `ignore_targets` skipped; nnterp's
        name, `ignore_categories` is the same)."""
        ignore = [ignore_targets] if isinstance(ignore_targets, str) else list(ignore_targets or [])
        return not self.collisions(ignore + list(ignore_categories or []))

    @torch.no_grad()
    def run(self, nn_model, get_probs: Callable | None = None, get_probs_func: Callable | None = None
            ) -> dict[str, torch.Tensor]:
        """Run this prompt: `get_target_probs(get_probs(nn_model, self.prompt))`, e.g. `{category: (1, layers)}`
        (default `get_probs`: `next_token_probs_unsqueeze`, `{category: (1, 1)}`)."""
        func = get_probs or get_probs_func or next_token_probs_unsqueeze
        return self.get_target_probs(func(nn_model, self.prompt))


def _accepts(func: Callable, name: str) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _default_tqdm(*args: Any, **kwargs: Any):
    return _tqdm(*args, **kwargs)


@torch.no_grad()
def run_prompts(
    nn_model,
    prompts: list[Prompt],
    batch_size: int = 32,
    get_probs_func: GetProbsFunc | None = None,
    func_kwargs: dict | None = None,
    remote: bool = False,
    tqdm: Callable | None = _default_tqdm,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Run prompts in batches and collect the tracked target probabilities (nnterp's contract).

    `get_probs_func(nn_model, list_of_strings, remote=remote, **func_kwargs)` is the only thing that touches the
    model (`remote=` only when it takes it); it returns probabilities `(batch, layers, vocab)` (default:
    `next_token_probs_unsqueeze`, `(batch, 1, vocab)`; e.g. `logit_lens` gives `(batch, layers, vocab)`). All
    prompts must track the same categories. `tqdm=None` or `progress=False`: no progress bar.

    Returns:
        `{category: tensor (n_prompts, layers)}` on CPU, in prompt order (`{}` for no prompts).

    Example:
        >>> from unilens import StandardizedTransformer
        >>> from unilens.testing import tiny_model
        >>> model = StandardizedTransformer(*tiny_model("llama"))
        >>> prompts = [
        ...     Prompt.from_strings("The capital of France is", {"correct": "Paris", "traps": "London"}, model.tokenizer),
        ...     Prompt.from_strings("The capital of England is", {"correct": "London", "traps": "Paris"}, model.tokenizer),
        ... ]
        >>> results = run_prompts(model, prompts, batch_size=16)
        >>> results["correct"].shape
        torch.Size([2, 1])
    """
    if isinstance(prompts, (str, Prompt)) or not isinstance(prompts, Iterable):
        raise TypeError(f"run_prompts takes a list of Prompt, got {type(prompts).__name__} {prompts!r:.60}; e.g. "
                        "[Prompt.from_strings(text, {'correct': 'Paris'}, model.tokenizer)].")
    prompts = list(prompts)
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, Prompt):
            raise TypeError(f"run_prompts takes a list of Prompt; prompts[{index}] is {type(prompt).__name__} "
                            f"{prompt!r:.60}: wrap it, Prompt.from_strings(text, targets, model.tokenizer).")
    _positive_int(batch_size, "batch_size")
    if not prompts:
        return {}
    categories = list(prompts[0].target_tokens)
    for index, prompt in enumerate(prompts):
        if set(prompt.target_tokens) != set(categories):
            raise ValueError(
                f"prompt {index} tracks categories {sorted(prompt.target_tokens)} but prompt 0 tracks "
                f"{sorted(categories)}; all prompts in one run_prompts call must share categories"
            )
    if get_probs_func is None:
        get_probs_func = next_token_probs_unsqueeze
    kwargs = dict(func_kwargs or {})
    if _accepts(get_probs_func, "remote"):
        kwargs["remote"] = remote
    elif remote:
        raise ValueError("run_prompts(remote=True): get_probs_func takes no remote= argument.")

    batches = [prompts[start : start + batch_size] for start in range(0, len(prompts), batch_size)]
    iterator: Iterable[list[Prompt]] = batches
    if progress and tqdm is not None and len(batches) > 1:
        iterator = tqdm(batches, desc="run_prompts", unit="batch")

    collected: dict[str, list[torch.Tensor]] = {category: [] for category in categories}
    for batch in iterator:
        probs = get_probs_func(nn_model, [p.prompt for p in batch], **kwargs)  # (batch, ..., vocab)
        if not isinstance(probs, torch.Tensor) or probs.ndim < 2 or probs.shape[0] != len(batch):
            shape = tuple(probs.shape) if isinstance(probs, torch.Tensor) else type(probs).__name__
            raise ValueError(
                f"get_probs_func returned {shape} for a batch of {len(batch)} prompts; "
                "it must return probabilities (batch, ..., vocab)"
            )
        for row, prompt in enumerate(batch):
            for category, value in prompt.get_target_probs(probs[row]).items():  # (...)
                collected[category].append(value.detach().cpu())
    return {category: torch.stack(values) for category, values in collected.items()}


def prompts_to_df(prompts: list[Prompt], tokenizer=None):
    """A pandas DataFrame (nnterp's layout), one column per prompt index: rows `prompt`, and per category
    `<category>_string` (the target strings as given) and, with a tokenizer, `<category>_tokens` (the tracked
    tokens as the tokenizer names them).

    Example:
        >>> from unilens.testing import make_tokenizer
        >>> tok = make_tokenizer()
        >>> df = prompts_to_df([Prompt.from_strings("The capital of France is", {"correct": "Paris"}, tok)], tok)
        >>> df.index.tolist(), df[0]["correct_tokens"]
        (['prompt', 'correct_string', 'correct_tokens'], ['Paris', 'ĠParis'])
    """
    try:
        import pandas as pd
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("prompts_to_df needs pandas: pip install 'unilens[display]'") from error
    table: dict[int, dict[str, Any]] = {}
    for i, prompt in enumerate(prompts):
        row: dict[str, Any] = {"prompt": prompt.prompt}
        for category, strings in (prompt.target_strings or {}).items():
            row[f"{category}_string"] = strings
        if tokenizer is not None:
            for category, ids in prompt.target_tokens.items():
                row[f"{category}_tokens"] = tokenizer.convert_ids_to_tokens(list(ids))
        table[i] = row
    return pd.DataFrame.from_dict(table)
