"""Audio-code LMs with per-codebook tables (MusicGen, MusicGen-Melody) and CPM-Ant's prepended prompt, against HF.

MusicGen keeps one embedding and one ``lm_head`` per audio codebook (``nn.ModuleList``s). With one codebook (what
``tiny_model`` builds: plain ``(batch, seq)`` codes in, ``(batch, seq, vocab)`` logits out) that codebook's tables
are the embedding and the unembedding; with several the model is refused at load, with the reason.

CPM-Ant prepends ``prompt_length`` learned positions inside its forward. The standardized tensors keep every
position the layers see (the prompt first: ``architecture.prefix_positions``), so an edit at any position is what the
next layer reads; HF's hidden states, attentions and logits keep the input's positions, the last ones, and the load
check compares exactly those.
"""

from __future__ import annotations

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.arch.discovery import ArchitectureError, discover
from unilens.model.validation import validate_model
from unilens.testing import tiny_config, tiny_model

MUSICGEN = ["musicgen", "musicgen_melody"]
TEXT = "The quick brown fox jumps over the lazy dog"


def _ids(tok) -> torch.Tensor:
    return tok(TEXT, return_tensors="pt")["input_ids"]  # (1, seq)


@torch.no_grad()
def _hf_edited_logits(hf, ids, layer: int, edit) -> torch.Tensor:
    """The plain HF forward with ``edit`` applied to layer ``layer``'s output by a torch forward hook (the oracle)."""
    block = discover(hf)
    module = hf.get_submodule(block.layers_path)[layer]

    def hook(mod, args, out):
        if isinstance(out, tuple):
            return (edit(out[0]), *out[1:])
        return edit(out)

    handle = module.register_forward_hook(hook)
    try:
        return hf(input_ids=ids).logits
    finally:
        handle.remove()


# --- MusicGen: one codebook -------------------------------------------------------------------------------------


def _edit_layer0_output(model, ids, edit):
    """``edit`` applied to ``layers_output[0]`` in a trace: checks that layer 1 reads exactly the edited tensor and
    returns the edited forward's logits."""
    with model.trace(ids):
        edited0 = edit(model.layers_output[0]).save()
        model.layers_output[0] = edited0
        seen = model.layers_input[1].save()
        logits = model.logits.save()
    torch.testing.assert_close(seen, edited0, rtol=0, atol=0)
    return logits


@pytest.mark.parametrize("model_type", MUSICGEN)
def test_musicgen_one_codebook_residual_and_logits_equal_hf(model_type):
    hf, tok = tiny_model(model_type)
    assert hf.config.num_codebooks == 1 and isinstance(hf.lm_heads, torch.nn.ModuleList)
    model = StandardizedTransformer(hf, tokenizer=tok)  # the load check runs: residual and logits = HF
    assert model.architecture.lm_head_path == "lm_heads.0"
    assert model.architecture.embed_path.endswith("embed_tokens.0")
    report = validate_model(model)
    assert report.ok, report.errors
    assert "project_on_vocab(layers_output[-1]) vs logits" in report.errors  # the logit lens is checked, not skipped
    ids = _ids(tok)
    with torch.no_grad():
        reference = hf(input_ids=ids, output_hidden_states=True)
    with model.trace(ids):
        emb = model.token_embeddings.save()
        out0 = model.layers_output[0].save()
        lens = model.project_on_vocab(model.layers_output[-1]).save()
    torch.testing.assert_close(out0, reference.hidden_states[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(lens, reference.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(emb, hf.get_input_embeddings()[0](ids), rtol=0, atol=0)  # one codebook's table
    assert model.vocab_size == hf.config.vocab_size


@pytest.mark.parametrize("model_type", MUSICGEN)
def test_musicgen_edit_of_a_layer_output_reaches_the_next_layer_and_the_logits(model_type):
    hf, tok = tiny_model(model_type)
    model = StandardizedTransformer(hf, tokenizer=tok, check=False)
    ids = _ids(tok)
    delta = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))

    def edit(x):
        x = x.clone()
        x[:, 2] += delta
        return x

    logits = _edit_layer0_output(model, ids, edit)
    expected = _hf_edited_logits(hf, ids, 0, edit)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(logits, hf(input_ids=ids).logits, atol=1e-3)  # the edit changed something


def test_musicgen_several_codebooks_are_refused_with_the_reason():
    config = tiny_config("musicgen")
    config.num_codebooks = 2
    hf_class = type(tiny_model("musicgen")[0])
    hf = hf_class(config).eval()  # two embeddings summed per position, two heads stacked into the batch
    with pytest.raises(ArchitectureError, match=r"has 2 token tables \(one per audio codebook.*num_codebooks=1"):
        discover(hf)


# --- CPM-Ant: the learned prompt ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpmant():
    hf, tok = tiny_model("cpmant")
    return hf, tok, StandardizedTransformer(hf, tokenizer=tok)  # the load check runs


def test_cpmant_prefix_is_found_and_the_kept_positions_equal_hf(cpmant):
    hf, tok, model = cpmant
    p = model.architecture.prefix_positions
    assert p == hf.config.prompt_length > 0
    report = validate_model(model)
    assert report.ok, report.errors
    assert "project_on_vocab(layers_output[-1]) vs logits" in report.errors  # the head is found at the kept positions
    ids = _ids(tok)
    with torch.no_grad():
        reference = hf(input_ids=ids, output_hidden_states=True)
    with model.trace(ids):
        inp0 = model.layers_input[0].save()
        out0 = model.layers_output[0].save()
        lens = model.project_on_vocab(model.layers_output[-1]).save()
    # the layers see the prompt, then the tokens: (batch, prompt_length + seq, hidden)
    assert out0.shape[1] == p + ids.shape[1]
    torch.testing.assert_close(inp0[:, p:], reference.hidden_states[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out0[:, p:], reference.hidden_states[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(lens[:, p:], reference.logits, rtol=0, atol=1e-5)
    # the prompt positions are the model's own: the same whatever the input
    with model.trace(ids.flip(-1)):
        other = model.layers_input[0].save()
    torch.testing.assert_close(other[:, :p], inp0[:, :p], rtol=0, atol=0)


def test_cpmant_edit_at_a_token_position_matches_a_torch_hook(cpmant):
    hf, tok, model = cpmant
    p = model.architecture.prefix_positions
    ids = _ids(tok)
    delta = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(1))

    def edit(x):  # token 3 of the input is position p + 3 of what the layers see
        x = x.clone()
        x[:, p + 3] += delta
        return x

    logits = _edit_layer0_output(model, ids, edit)
    torch.testing.assert_close(logits, _hf_edited_logits(hf, ids, 0, edit), rtol=0, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(logits, hf(input_ids=ids).logits, atol=1e-3)


def test_cpmant_attention_probabilities_keep_the_prompt_and_hf_keeps_the_tokens(cpmant):
    hf, tok, model = cpmant
    p = model.architecture.prefix_positions
    ids = _ids(tok)
    eager, _ = tiny_model("cpmant", attn_implementation="eager")
    with torch.no_grad():
        reference = eager(input_ids=ids, output_attentions=True).attentions
    with model.trace(ids):
        probs = model.attention_probabilities[0].save()
    n = p + ids.shape[1]
    assert probs.shape[-2:] == (n, n)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), rtol=0, atol=1e-5)  # over every key
    torch.testing.assert_close(probs[..., p:, p:], reference[0], rtol=0, atol=1e-5)  # HF's slice of the same map
