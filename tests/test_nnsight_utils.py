"""unilens.nnsight_utils (nnterp's function names) against oracles: HF's own output_hidden_states and logits, and
plain torch hooks on the HF modules."""

from __future__ import annotations

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.arch.discovery import ModuleMap
from unilens.compat import nnsight_utils as nu
from unilens.model.validation import hf_reference_forward
from unilens.testing import tiny_model

PROMPTS = ["The capital of France is", "A cat", "When Mary and John went to the store"]


def _model(side: str = "left", model_type: str = "llama"):
    hf, tok = tiny_model(model_type)
    model = StandardizedTransformer(hf, tokenizer=tok, check=False, tokenizer_kwargs={"padding_side": side})
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side=side)
    return model, hf, enc


def _last_real(enc):
    return enc["attention_mask"].cumsum(-1).argmax(-1)  # (batch,)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_token_activations_equal_hf_hidden_states(side, model_type):
    model, hf, enc = _model(side, model_type)
    hidden = hf_reference_forward(hf, dict(enc), output_hidden_states=True).hidden_states
    rows = torch.arange(len(PROMPTS))
    last = _last_real(enc)
    layers = [1, 0]  # any order
    acts = nu.get_token_activations(model, PROMPTS, layers=layers)
    assert acts.shape == (2, len(PROMPTS), model.hidden_size)
    for k, layer in enumerate(layers):
        if layer == model.num_layers - 1:
            continue  # HF's last hidden state is after the final norm
        torch.testing.assert_close(acts[k], hidden[layer + 1][rows, last], atol=1e-5, rtol=0)
    batched = nu.collect_token_activations_batched(model, PROMPTS, batch_size=2, layers=layers)
    torch.testing.assert_close(batched, acts, atol=1e-5, rtol=0)
    first = nu.get_token_activations(model, PROMPTS, layers=[0], idx=0 if side == "right" else -1)
    expected = hidden[1][rows, 0] if side == "right" else hidden[1][rows, last]
    torch.testing.assert_close(first[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_next_token_probs_read_the_last_real_token(side):
    model, hf, enc = _model(side)
    logits = hf_reference_forward(hf, dict(enc)).logits
    expected = logits[torch.arange(len(PROMPTS)), _last_real(enc)].softmax(-1)
    torch.testing.assert_close(nu.compute_next_token_probs(model, PROMPTS), expected, atol=1e-6, rtol=0)
    with model.trace(PROMPTS):
        probs = nu.get_next_token_probs(model).save()
        logits_traced = nu.get_logits(model).save()
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    real = enc["attention_mask"].bool()  # padded positions carry no meaning (their position ids differ)
    torch.testing.assert_close(logits_traced[real], logits[real], atol=1e-5, rtol=0)


def test_module_outputs_and_set_layer_output_match_torch_hooks():
    model, hf, enc = _model()
    acc = ModuleMap(hf)
    seen = {}
    handles = [acc.get_attention(1).register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0])),
               acc.get_mlp(1).register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o))]
    try:
        hf_reference_forward(hf, dict(enc))
    finally:
        for h in handles:
            h.remove()
    with model.trace(PROMPTS):
        attn = nu.get_attention_output(model, 1).save()
        mlp = nu.get_mlp_output(model, 1).save()
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(attn[real], seen["attn"][real], atol=1e-5, rtol=0)
    torch.testing.assert_close(mlp[real], seen["mlp"][real], atol=1e-5, rtol=0)
    # set_layer_output == a torch hook that replaces layer 0's output with zeros
    with model.trace(PROMPTS):
        nu.set_layer_output(model, 0, torch.zeros_like(nu.get_layer_output(model, 0)))
        edited = nu.get_logits(model).save()
    layer0 = acc.get_layers()[0]
    handle = layer0.register_forward_hook(lambda m, a, o: (torch.zeros_like(o[0]), *o[1:]) if isinstance(o, tuple)
                                          else torch.zeros_like(o))
    try:
        expected = hf_reference_forward(hf, dict(enc)).logits
    finally:
        handle.remove()
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=0)


def test_structure_functions_and_errors():
    model, hf, _ = _model()
    assert nu.get_num_layers(model) == len(ModuleMap(hf).get_layers()) == model.num_layers
    assert nu.get_layer(model, 0) is nu.get_layers(model)[0]
    assert nu.get_unembed(model) is model.lm_head and nu.get_unembed_norm(model) is model.ln_final
    assert nu.get_embed_tokens(model) is model.embed_tokens
    with pytest.raises(TypeError, match="StandardizedTransformer"):
        nu.get_num_layers(hf)
    with pytest.raises(ValueError, match="pass prompts"):
        nu.get_token_activations(model)
    with pytest.raises(NotImplementedError, match="remote"):
        nu.get_token_activations(model, PROMPTS, remote=True)
