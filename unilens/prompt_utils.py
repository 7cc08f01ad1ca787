"""Prompts with tracked target tokens: `Prompt`, `get_first_tokens`, `run_prompts`, `prompts_to_df`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

# A function `(model, list_of_prompt_strings) -> probs (batch, ..., vocab)`.
GetProbsFunc = Callable[[Any, list[str]], torch.Tensor]

# Category name used when `Prompt.from_strings` gets a bare string or list instead of a dict.
DEFAULT_CATEGORY = "target"


def get_first_tokens(words: str | list[str], tokenizer) -> list[int]:
    """First token id of `"word"` and of `" word"` for each word, deduplicated, order kept.

    Leading spaces of each word are stripped first, so `"Paris"` and `" Paris"` track the same tokens.
    Only the first token counts: `"the country of France"` tracks the first token of `"the"` / `" the"`.

    Raises:
        ValueError: a word is empty (after stripping leading spaces) or tokenises to nothing.

    Example:
        >>> from unilens.testing import make_tokenizer
        >>> tok = make_tokenizer()
        >>> tok.convert_ids_to_tokens(get_first_tokens(["Paris", " Paris", "London"], tok))
        ['Paris', 'ĠParis', 'Lon', 'ĠLondon']
    """
    if isinstance(words, str):
        words = [words]
    token_ids: list[int] = []
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"target {word!r} is a {type(word).__name__}; targets must be strings")
        stripped = word.lstrip(" ")
        if not stripped:
            raise ValueError(
                f"target {word!r} is empty after stripping leading spaces; give a non-empty target string"
            )
        for variant in (stripped, " " + stripped):
            ids = tokenizer(variant, add_special_tokens=False)["input_ids"]
            if len(ids) == 0:
                raise ValueError(
                    f"target {word!r} (as {variant!r}) tokenises to nothing with {type(tokenizer).__name__}; "
                    "use a target made of characters the tokenizer knows"
                )
            if ids[0] not in token_ids:
                token_ids.append(int(ids[0]))
    return token_ids


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
        with torch.no_grad(), model.trace(list(prompts)):
            probs = model.next_token_probs.save()  # (batch, vocab)
    except AttributeError as error:
        if "next_token_probs" in str(error):
            raise TypeError(hint) from error
        raise
    return probs


@dataclass
class Prompt:
    """A prompt and, per category, the target strings and the token ids whose probability is tracked.

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
    target_strings: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_strings(
        cls,
        prompt: str,
        targets: dict[str, str | list[str]] | str | list[str],
        tokenizer,
    ) -> "Prompt":
        """Build a prompt from target strings; a bare string / list becomes the category `"target"`."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if isinstance(targets, (str, list, tuple)):
            targets = {DEFAULT_CATEGORY: targets}
        if not isinstance(targets, dict) or not targets:
            raise ValueError(f"targets must be a non-empty dict of category -> str | list[str], got {targets!r}")
        target_strings: dict[str, list[str]] = {}
        target_tokens: dict[str, list[int]] = {}
        for category, strings in targets.items():
            strings = [strings] if isinstance(strings, str) else list(strings)
            if not strings:
                raise ValueError(f"category {category!r} has no target strings")
            target_strings[category] = strings
            target_tokens[category] = get_first_tokens(strings, tokenizer)
        return cls(prompt=prompt, target_tokens=target_tokens, target_strings=target_strings)

    def get_target_probs(self, probs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sum of the tracked tokens' probabilities per category.

        Args:
            probs: `(..., vocab)` probabilities for this prompt.

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
            out[category] = probs[..., ids].sum(-1)
        return out

    def collisions(self, ignore_categories: Iterable[str] | None = None) -> dict[int, list[str]]:
        """Token ids tracked by more than one category: `{token_id: [categories]}`."""
        ignore = set(ignore_categories or ())
        owners: dict[int, list[str]] = {}
        for category, ids in self.target_tokens.items():
            if category in ignore:
                continue
            for i in set(ids):
                owners.setdefault(i, []).append(category)
        return {i: cats for i, cats in owners.items() if len(cats) > 1}

    def has_no_collisions(self, ignore_categories: Iterable[str] | None = None) -> bool:
        """True when no token id is tracked by two categories (categories in `ignore_categories` skipped)."""
        return not self.collisions(ignore_categories)

    def run(self, model, get_probs_func: GetProbsFunc | None = None) -> dict[str, torch.Tensor]:
        """Run this single prompt: `{category: tensor (...)}` (no batch dimension)."""
        results = run_prompts(model, [self], batch_size=1, get_probs_func=get_probs_func, progress=False)
        return {category: values[0] for category, values in results.items()}


def run_prompts(
    model,
    prompts: list[Prompt],
    batch_size: int = 32,
    get_probs_func: GetProbsFunc | None = None,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Run prompts in batches and collect the tracked target probabilities.

    `get_probs_func(model, list_of_strings)` is the only thing that touches the model; it returns
    probabilities `(batch, ..., vocab)` (default: `next_token_probs_of`, `(batch, vocab)`; e.g.
    `logit_lens` gives `(batch, layers, vocab)`). All prompts must track the same categories.

    Returns:
        `{category: tensor (n_prompts, ...)}` on CPU, in prompt order.

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
        torch.Size([2])
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("run_prompts got no prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    categories = list(prompts[0].target_tokens)
    for index, prompt in enumerate(prompts):
        if set(prompt.target_tokens) != set(categories):
            raise ValueError(
                f"prompt {index} tracks categories {sorted(prompt.target_tokens)} but prompt 0 tracks "
                f"{sorted(categories)}; all prompts in one run_prompts call must share categories"
            )
    if get_probs_func is None:
        get_probs_func = next_token_probs_of

    batches = [prompts[start : start + batch_size] for start in range(0, len(prompts), batch_size)]
    iterator: Iterable[list[Prompt]] = batches
    if progress and len(batches) > 1:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="run_prompts", unit="batch")

    collected: dict[str, list[torch.Tensor]] = {category: [] for category in categories}
    for batch in iterator:
        probs = get_probs_func(model, [p.prompt for p in batch])  # (batch, ..., vocab)
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


def prompts_to_df(prompts: list[Prompt], tokenizer):
    """A pandas DataFrame with one row per prompt: the prompt, and per category the target strings
    (`<category>`) and the tracked tokens as the tokenizer names them (`<category>_tokens`).

    Example:
        >>> from unilens.testing import make_tokenizer
        >>> tok = make_tokenizer()
        >>> df = prompts_to_df([Prompt.from_strings("The capital of France is", {"correct": "Paris"}, tok)], tok)
        >>> df.columns.tolist(), df["correct_tokens"][0]
        (['prompt', 'correct', 'correct_tokens'], ['Paris', 'ĠParis'])
    """
    try:
        import pandas as pd
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("prompts_to_df needs pandas: pip install 'unilens[display]'") from error
    rows = []
    for prompt in prompts:
        row: dict[str, Any] = {"prompt": prompt.prompt}
        for category, ids in prompt.target_tokens.items():
            row[category] = list(prompt.target_strings.get(category, []))
            row[f"{category}_tokens"] = tokenizer.convert_ids_to_tokens(list(ids))
        rows.append(row)
    return pd.DataFrame(rows)
