"""Tests for unilens.prompt_utils: target tokens, collisions, batching and padding of run_prompts.

Oracles: direct tokenizer calls for target tokens, and plain HF forwards (one unpadded forward per
prompt) for probabilities.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from unilens.analysis.prompts import (
    Prompt,
    get_first_tokens,
    prompts_to_df,
    run_prompts,
)
from unilens.testing import tiny_model

PROMPTS = [
    "The capital of France is",
    "One, two, three,",
    "The cat",
    "When Mary and John went to the store, John gave a drink to",
    "Paris is a city in",
]
TARGETS = {"correct": "Paris", "traps": ["London", "Madrid"], "long": "the country of France"}


class TinyLM:
    """Stand-in for a model: a plain HF causal LM and its tokenizer."""

    def __init__(self, hf_model, tokenizer):
        self.hf = hf_model
        self.tokenizer = tokenizer


@pytest.fixture(scope="module")
def lm() -> TinyLM:
    hf_model, tok = tiny_model("llama", seed=0, attn_implementation="eager")
    return TinyLM(hf_model, tok)


@pytest.fixture(scope="module")
def prompts(lm) -> list[Prompt]:
    return [Prompt.from_strings(p, TARGETS, lm.tokenizer) for p in PROMPTS]


def first_id(tokenizer, text: str) -> int:
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


# ------------------------------------------------------------------------------------------
# Oracles: plain HF forwards
# ------------------------------------------------------------------------------------------


def single_prompt_probs(lm: TinyLM, prompt: str) -> torch.Tensor:
    """Next-token probabilities `(vocab,)` of one unpadded prompt."""
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = lm.hf(input_ids=ids).logits  # (1, seq, vocab)
    return logits[0, -1].float().softmax(-1)


def padded_probs_func(padding_side: str, per_layer: bool = False):
    """A get_probs_func doing a padded HF forward; `per_layer` adds a (layers + 1) logit-lens axis."""

    def get_probs(model: TinyLM, prompts: list[str]) -> torch.Tensor:
        enc = model.tokenizer(prompts, padding=True, return_tensors="pt", padding_side=padding_side)
        mask = enc["attention_mask"]  # (batch, seq)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # positions of real tokens start at 0
        with torch.no_grad():
            out = model.hf(
                input_ids=enc["input_ids"], attention_mask=mask, position_ids=position_ids, output_hidden_states=True
            )
        if padding_side == "right":
            last = mask.sum(-1) - 1  # (batch,)
        else:
            last = torch.full((len(prompts),), mask.shape[1] - 1)
        rows = torch.arange(len(prompts))
        if not per_layer:
            return out.logits[rows, last].softmax(-1)  # (batch, vocab)
        # hidden_states[-1] already has the final norm applied in HF llama; the others do not.
        states = [h[rows, last] for h in out.hidden_states[:-1]]
        states = [model.hf.model.norm(h) for h in states] + [out.hidden_states[-1][rows, last]]
        logits = torch.stack([model.hf.lm_head(h) for h in states], dim=1)  # (batch, layers + 1, vocab)
        return logits.softmax(-1)

    return get_probs


# ------------------------------------------------------------------------------------------
# Target tokens
# ------------------------------------------------------------------------------------------


def test_first_tokens_of_word_and_space_word(lm):
    tok = lm.tokenizer
    # The tokenizer must tell "Paris" and " Paris" apart for this test to mean anything.
    assert first_id(tok, "Paris") != first_id(tok, " Paris")
    expected = [first_id(tok, "Paris"), first_id(tok, " Paris")]
    assert get_first_tokens("Paris", tok) == expected
    # nnterp's rule: no stripping; the " word" variant is dropped when it starts with the lone space token
    space = first_id(tok, " ")
    for word in (" Paris", "   Paris"):
        rule = [first_id(tok, word)] + [first_id(tok, " " + word)] * (first_id(tok, " " + word) != space)
        assert get_first_tokens(word, tok) == list(dict.fromkeys(rule))
    assert get_first_tokens(" Paris", tok) == [first_id(tok, " Paris")]
    assert get_first_tokens(["Paris", " Paris"], tok) == expected  # deduplicated

    # "Madrid" and "Mxq" share their first tokens ("M", " M"): each id appears once, order kept.
    assert first_id(tok, "Madrid") == first_id(tok, "Mxq")
    assert get_first_tokens(["Madrid", "Mxq"], tok) == [first_id(tok, "Madrid"), first_id(tok, " Madrid")]

    # Only the first token of a multi-token target counts.
    assert get_first_tokens("the country of France", tok) == [first_id(tok, "the"), first_id(tok, " the")]


def test_from_strings_categories(lm):
    tok = lm.tokenizer
    prompt = Prompt.from_strings("The capital of France is", TARGETS, tok)
    assert prompt.target_strings == TARGETS  # as given (nnterp)
    traps = []
    for word in ["London", "Madrid"]:
        for variant in [word, " " + word]:
            if first_id(tok, variant) not in traps:
                traps.append(first_id(tok, variant))
    assert prompt.target_tokens["traps"] == traps
    assert prompt.target_tokens["correct"] == [first_id(tok, "Paris"), first_id(tok, " Paris")]
    # A bare string or list becomes the single category "target".
    assert Prompt.from_strings("x", "Paris", tok).target_tokens == {"target": prompt.target_tokens["correct"]}
    assert Prompt.from_strings("x", ["London", "Madrid"], tok).target_tokens == {"target": traps}


def test_empty_targets_raise(lm):
    for bad in ["", "   "]:
        with pytest.raises(ValueError, match="empty"):
            get_first_tokens(["Paris", bad], lm.tokenizer)
        with pytest.raises(ValueError, match="empty"):
            Prompt.from_strings("The capital of France is", {"correct": bad}, lm.tokenizer)
    with pytest.raises(ValueError, match="no target strings"):
        Prompt.from_strings("x", {"correct": []}, lm.tokenizer)

    # A tokenizer without byte fallback or unk token drops characters it does not know.
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(["abc abc ab"], trainers.BpeTrainer(vocab_size=20, special_tokens=["<pad>"], show_progress=False))
    dropping = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>")
    assert dropping("€", add_special_tokens=False)["input_ids"] == []  # precondition
    assert get_first_tokens("abc", dropping) == [dropping("abc", add_special_tokens=False)["input_ids"][0]]
    with pytest.raises(ValueError, match="'€'"):
        get_first_tokens(["abc", "€"], dropping)


def test_collisions(lm):
    tok = lm.tokenizer
    clean = Prompt.from_strings("x", {"a": "Paris", "b": "London"}, tok)
    ids_a, ids_b = set(clean.target_tokens["a"]), set(clean.target_tokens["b"])
    assert ids_a.isdisjoint(ids_b)  # oracle: plain set intersection
    assert clean.has_no_collisions()

    clashing = Prompt.from_strings("x", {"a": "Paris", "b": "Madrid", "c": "Mxq"}, tok)
    shared = set(clashing.target_tokens["b"]) & set(clashing.target_tokens["c"])
    assert shared == {first_id(tok, "M"), first_id(tok, " M")}
    assert not clashing.has_no_collisions()
    assert clashing.collisions() == {i: ["b", "c"] for i in shared}
    assert clashing.has_no_collisions(ignore_categories=["c"])
    assert not clashing.has_no_collisions(ignore_categories=["a"])


def test_get_target_probs_sums_tracked_tokens(prompts):
    torch.manual_seed(0)
    prompt = prompts[0]
    probs = torch.rand(3, 4, 512).softmax(-1)  # (batch, layers, vocab)
    out = prompt.get_target_probs(probs)
    for category, ids in prompt.target_tokens.items():
        expected = torch.zeros(3, 4)
        for i in ids:
            expected += probs[:, :, i]
        torch.testing.assert_close(out[category], expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        prompt.get_target_probs(torch.rand(10))


# ------------------------------------------------------------------------------------------
# run_prompts
# ------------------------------------------------------------------------------------------


def expected_results(lm: TinyLM, prompts: list[Prompt]) -> dict[str, torch.Tensor]:
    out: dict[str, list[float]] = {}
    for prompt in prompts:
        probs = single_prompt_probs(lm, prompt.prompt)
        for category, ids in prompt.target_tokens.items():
            out.setdefault(category, []).append(sum(probs[i].item() for i in ids))
    return {category: torch.tensor(values) for category, values in out.items()}


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_run_prompts_matches_single_unpadded_runs(lm, prompts, padding_side, batch_size):
    expected = expected_results(lm, prompts)
    results = run_prompts(lm, prompts, batch_size=batch_size, get_probs_func=padded_probs_func(padding_side))
    assert set(results) == set(TARGETS)
    for category in TARGETS:
        assert results[category].shape == (len(PROMPTS),)
        torch.testing.assert_close(results[category], expected[category], atol=1e-5, rtol=0)
    # The values are not trivially 0: the tiny random model spreads mass over ~450 tokens.
    assert results["traps"].min() > 0


def test_run_prompts_extra_dims_and_prompt_run(lm, prompts):
    left = run_prompts(lm, prompts, batch_size=2, get_probs_func=padded_probs_func("left", per_layer=True))
    right = run_prompts(lm, prompts, batch_size=5, get_probs_func=padded_probs_func("right", per_layer=True))
    n_layers = lm.hf.config.num_hidden_layers
    expected_last = expected_results(lm, prompts)
    for category in TARGETS:
        assert left[category].shape == (len(PROMPTS), n_layers + 1)
        torch.testing.assert_close(left[category], right[category], atol=1e-5, rtol=0)
        # The last "layer" of the lens is the model's own output.
        torch.testing.assert_close(left[category][:, -1], expected_last[category], atol=1e-5, rtol=0)
    per_layer = padded_probs_func("right", per_layer=True)
    single = prompts[3].run(lm, lambda m, text: per_layer(m, [text]))  # nnterp: get_probs(model, prompt string)
    for category in TARGETS:
        assert single[category].shape == (1, n_layers + 1)  # the batch axis is kept (nnterp)
        torch.testing.assert_close(single[category][0], left[category][3], atol=1e-5, rtol=0)


def test_run_prompts_progress_bar_only_for_several_batches(lm, prompts, capsys):
    run_prompts(lm, prompts, batch_size=2, get_probs_func=padded_probs_func("left"))
    assert "run_prompts" in capsys.readouterr().err
    run_prompts(lm, prompts, batch_size=8, get_probs_func=padded_probs_func("left"))
    assert "run_prompts" not in capsys.readouterr().err
    run_prompts(lm, prompts, batch_size=2, get_probs_func=padded_probs_func("left"), progress=False)
    assert "run_prompts" not in capsys.readouterr().err


def test_run_prompts_errors(lm, prompts):
    other = Prompt.from_strings("x", {"something_else": "Paris"}, lm.tokenizer)
    with pytest.raises(ValueError, match="share categories"):
        run_prompts(lm, prompts + [other], get_probs_func=padded_probs_func("left"))
    with pytest.raises(ValueError, match="batch of 2 prompts"):
        run_prompts(lm, prompts[:2], get_probs_func=lambda model, batch: torch.rand(1, 512))
    assert run_prompts(lm, [], get_probs_func=padded_probs_func("left")) == {}  # nnterp: nothing to run
    # The default get_probs_func needs a StandardizedTransformer and says so.
    with pytest.raises(TypeError, match="StandardizedTransformer"):
        run_prompts(lm, prompts)


def test_prompts_to_df(lm, prompts):
    df = prompts_to_df(prompts, lm.tokenizer)  # nnterp's layout: one column per prompt
    assert list(df.index) == ["prompt", "correct_string", "traps_string", "long_string", "correct_tokens",
                              "traps_tokens", "long_tokens"]
    assert list(df.columns) == list(range(len(PROMPTS)))
    assert df.loc["prompt"].tolist() == PROMPTS
    assert df[0]["traps_string"] == ["London", "Madrid"]
    tok = lm.tokenizer
    assert df[0]["correct_tokens"] == [tok.convert_ids_to_tokens(first_id(tok, "Paris")),
                                       tok.convert_ids_to_tokens(first_id(tok, " Paris"))]  # fmt: skip
    assert df[0]["correct_tokens"] == ["Paris", "ĠParis"]
    assert "correct_tokens" not in prompts_to_df(prompts).index  # no tokenizer: strings only


# ------------------------------------------------------------------------------------------
# With the real StandardizedTransformer (default get_probs_func)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_run_prompts_default_with_standardized_transformer(lm, prompts, padding_side):
    from unilens import StandardizedTransformer

    hf_model, tok = tiny_model("llama", seed=0, attn_implementation="eager")  # same weights as `lm.hf`
    model = StandardizedTransformer(hf_model, tokenizer=tok, tokenizer_kwargs={"padding_side": padding_side})
    assert model.tokenizer.padding_side == padding_side
    expected = expected_results(lm, prompts)  # oracle: one unpadded plain HF forward per prompt
    for batch_size in (1, 3):
        results = run_prompts(model, prompts, batch_size=batch_size, progress=False)
        for category in TARGETS:
            assert results[category].shape == (len(PROMPTS), 1)  # nnterp's default: a one-layer axis
            torch.testing.assert_close(results[category][:, 0], expected[category], atol=1e-5, rtol=0)
    single = prompts[2].run(model)
    assert single["correct"].shape == (1, 1)
    torch.testing.assert_close(single["correct"][0, 0], expected["correct"][2], atol=1e-5, rtol=0)
