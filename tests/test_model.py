"""The standardized view against independent oracles: HF output_hidden_states, logits and plain torch hooks."""

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.model.validation import hf_reference_forward
from unilens.testing import ZOO_REQUIRED, tiny_model

PROMPTS = ["The capital of France is", "A cat sat on"]

# Branch post-norms (sandwich / OLMo 2 style): the residual receives norm(branch), so the decomposition holds
# "up to the block's own norms". The names come from the modeling files; the test checks them by data flow.
POST_NORMS = {
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
}


def _load(model_type, **kwargs):
    hf, tok = tiny_model(model_type)
    return hf, tok, StandardizedTransformer(hf, tokenizer=tok, **kwargs)


def _collect(model, prompts):
    n = model.num_layers
    s = {k: [] for k in ("li", "lo", "ai", "ao", "mi", "mo")}
    out = {}
    with model.trace(prompts):
        for i in range(n):
            s["li"].append(model.layers_input[i].save())
            s["ao"].append(model.attentions_output[i].save())
            s["mo"].append(model.mlps_output[i].save())
            s["lo"].append(model.layers_output[i].save())
        out["logits"] = model.logits.save()
    return s, out["logits"]


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_residual_stream_and_logits_match_hf(model_type):
    hf, tok, model = _load(model_type)
    enc = model.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ref = hf_reference_forward(hf, enc, output_hidden_states=True)
    s, logits = _collect(model, PROMPTS)
    hs = ref.hidden_states
    torch.testing.assert_close(s["li"][0], hs[0], atol=1e-5, rtol=0)
    for i in range(model.num_layers - 1):
        torch.testing.assert_close(s["lo"][i], hs[i + 1], atol=1e-5, rtol=0, msg=f"layer {i}")
        torch.testing.assert_close(s["li"][i + 1], s["lo"][i], atol=0, rtol=0)
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=0)

    # block decomposition: layers_output = layers_input + attention branch + MLP branch
    for i in range(model.num_layers):
        attn, mlp = s["ao"][i], s["mo"][i]
        if model_type in POST_NORMS:
            layer = model.module_accessor.get_layer(i)
            post_attn, post_mlp = (getattr(layer, n) for n in POST_NORMS[model_type])
            with torch.no_grad():
                attn, mlp = post_attn(attn), post_mlp(mlp)
        rebuilt = s["li"][i] + attn + mlp
        torch.testing.assert_close(rebuilt, s["lo"][i], atol=1e-4, rtol=1e-4, msg=f"{model_type} layer {i} decomposition")


PARALLEL = {"gptj", "phi", "falcon", "cohere", "gpt_neox"}


@pytest.mark.parametrize("model_type", sorted(PARALLEL) + ["llama", "gpt2", "bloom"])
def test_parallel_blocks_found_by_data_flow(model_type):
    hf, tok, model = _load(model_type)
    expected = model_type in PARALLEL
    assert model.architecture.parallel == expected
    s = {"ai": [], "mi": []}
    with model.trace(PROMPTS[0]):
        for i in range(model.num_layers):
            s["ai"].append(model.attentions_input[i].save())
            s["mi"].append(model.mlps_input[i].save())
    for a, m in zip(s["ai"], s["mi"]):
        same = a.shape == m.shape and torch.allclose(a, m)
        if model_type in ("gptj", "phi", "cohere", "falcon"):  # one shared norm feeds both branches
            assert same
        elif not expected:
            assert not same


def test_dbrx_attention_output_excludes_residual():
    hf, tok, model = _load("dbrx")
    assert model.architecture.layers[0].attention == "norm_attn_norm.attn"
    out = {}
    with model.trace(PROMPTS[0]):
        out["li"] = model.layers_input[0].save()
        out["ao"] = model.attentions_output[0].save()
    # the attention branch is not the residual plus something: it is much smaller than the stream
    assert not torch.allclose(out["ao"], out["li"], atol=1e-2)


def test_steering_matches_plain_torch_hook():
    hf, tok, model = _load("llama")
    torch.manual_seed(0)
    vector = torch.randn(model.hidden_size)
    layers = [0, 1]
    out = {}
    with model.trace(PROMPTS[0]):
        model.steer(layers, vector, factor=3.0, positions=-1)
        out["logits"] = model.logits.save()

    # oracle: plain torch forward hooks on the HF layers, no unilens involved
    def add(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        h[:, -1] += 3.0 * vector
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handles = [hf.model.layers[i].register_forward_hook(add) for i in layers]
    try:
        with torch.no_grad():
            ref = hf(**tok(PROMPTS[0], return_tensors="pt")).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out["logits"], ref, atol=1e-5, rtol=0)
    with torch.no_grad():
        plain = hf(**tok(PROMPTS[0], return_tensors="pt")).logits
    assert (out["logits"] - plain).abs().max() > 1e-3  # the steering did change the logits


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_skip_layer_passes_the_residual_through(model_type):
    hf, tok, model = _load(model_type)
    out = {}
    with model.trace(PROMPTS[0]):
        out["li"] = model.layers_input[1].save()
        model.skip_layer(1)
        out["lo"] = model.layers_output[1].save()
    torch.testing.assert_close(out["lo"], out["li"], atol=0, rtol=0)


def test_next_token_probs_right_padding_reads_last_real_token():
    hf, tok, model = _load("llama", tokenizer_kwargs={"padding_side": "right"})
    assert model.tokenizer.padding_side == "right"
    out = {}
    with model.trace(PROMPTS):
        out["p"] = model.next_token_probs.save()
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            alone = torch.softmax(hf(**tok(prompt, return_tensors="pt")).logits[0, -1], -1)
        torch.testing.assert_close(out["p"][row], alone, atol=1e-5, rtol=0)


def test_project_on_vocab_of_last_layer_is_logits():
    hf, tok, model = _load("gemma2")  # final logit softcapping must be applied
    out = {}
    with model.trace(PROMPTS[0]):
        out["lens"] = model.project_on_vocab(model.layers_output[model.num_layers - 1]).save()
        out["logits"] = model.logits.save()
    torch.testing.assert_close(out["lens"], out["logits"], atol=1e-5, rtol=0)


def test_facts():
    hf, tok, model = _load("llama")
    cfg = hf.config
    assert model.num_layers == cfg.num_hidden_layers
    assert model.num_heads == cfg.num_attention_heads
    assert model.num_kv_heads == cfg.num_key_value_heads
    assert model.hidden_size == cfg.hidden_size
    assert model.vocab_size == cfg.vocab_size
    assert model.head_dim == cfg.hidden_size // cfg.num_attention_heads


def test_user_tokenizer_is_not_mutated():
    hf, tok = tiny_model("llama")
    tok.padding_side = "right"
    StandardizedTransformer(hf, tokenizer=tok)
    assert tok.padding_side == "right"


# --- bad input --------------------------------------------------------------------------------------


def test_missing_path_raises_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StandardizedTransformer(str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StandardizedTransformer(str(tmp_path / "missing" / "folder"))


def test_unknown_hub_id_offline_raises_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="local HuggingFace cache"):
        StandardizedTransformer("no-such-org/no-such-model-xyz")


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])  # learned positions (would crash) / rotary (would degrade)
def test_prompt_longer_than_context_raises(model_type):
    hf, tok = tiny_model(model_type)
    model = StandardizedTransformer(hf, tokenizer=tok, check=False)
    limit = hf.config.max_position_embeddings  # gpt2 maps it to n_positions
    with model.trace(torch.zeros(1, limit, dtype=torch.long)):  # exactly the context: fine
        logits = model.logits.save()
    assert logits.shape[1] == limit
    with pytest.raises(ValueError, match=f"{limit + 1} tokens but this {model_type} model's context is {limit}"):
        with model.trace(torch.zeros(1, limit + 1, dtype=torch.long)):
            model.logits.save()


def test_model_without_tokenizer_raises():
    hf, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="tokenizer"):
        StandardizedTransformer(hf)


def test_non_causal_lm_refused():
    from transformers import AutoConfig, AutoModel

    from unilens.arch.discovery import ArchitectureError

    encoder = AutoModel.from_config(AutoConfig.for_model("bert", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    with pytest.raises((ArchitectureError, ValueError), match="causal"):
        StandardizedTransformer(encoder, tokenizer=tiny_model("llama")[1])


def test_layer_index_out_of_range():
    hf, tok, model = _load("llama")
    with pytest.raises(IndexError, match="out of range"):
        with model.trace(PROMPTS[0]):
            model.layers_output[model.num_layers].save()


def test_wrong_shape_assignment():
    hf, tok, model = _load("llama")
    with pytest.raises(ValueError, match="shape"):
        with model.trace(PROMPTS[0]):
            model.layers_output[0] = torch.zeros(1, 2, 3)
