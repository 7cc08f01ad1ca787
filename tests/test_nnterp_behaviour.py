"""nnterp 1.3's behaviour beyond its names (issue 25, item 1), each checked against an oracle that is not unilens:
HF's own forward (``output_hidden_states``, logits, torch hooks), HF's module tree, and nnterp's documented
argument conventions. bench/nnterp_suite.py runs nnterp's own test files; these are the fast regressions.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from nnsight import LanguageModel
from transformers import AutoModelForCausalLM

from unilens import StandardizedTransformer
from unilens.compat import nnsight_utils as nu
from unilens.compat.nnterp import RenameConfig, RenamingError, get_rename_dict
from unilens.interventions import TargetPrompt, patchscope_lens
from unilens.model.validation import hf_reference_forward
from unilens.testing import tiny_config, tiny_model

PROMPT = "Hello, world!"


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _plain(model_type: str, renamed: bool):
    hf, tok = tiny_model(model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nnsight 0.8 deprecates LanguageModel (NNsightDeprecationWarning)
        plain = LanguageModel(hf, tokenizer=tok, rename=get_rename_dict() if renamed else None)
    return plain, hf, tok


@pytest.mark.parametrize("model_type,renamed", [("gpt2", True), ("gptj", True), ("llama", False), ("qwen2", True)])
def test_nnsight_utils_on_a_plain_language_model(model_type, renamed):
    """nnterp's functions take any nnsight model: renamed with get_rename_dict() or, for llama-like trees, not."""
    plain, hf, tok = _plain(model_type, renamed)
    ids = tok(PROMPT, return_tensors="pt")
    ref = hf_reference_forward(hf, dict(ids), output_hidden_states=True)
    assert nu.get_num_layers(plain) == hf.config.num_hidden_layers
    stack = hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers
    assert nu.get_layer(plain, 1)._module is stack[1]
    norm = hf.transformer.ln_f if hasattr(hf, "transformer") else hf.model.norm
    assert nu.get_unembed_norm(plain)._module is norm  # ln_final reachable on every renamed plain model
    with torch.no_grad(), plain.trace(dict(ids)):
        first_in = nu.get_layer_input(plain, 0).save()
        out0 = nu.get_layer_output(plain, 0).save()
        projected = nu.project_on_vocab(plain, nu.get_layer_output(plain, nu.get_num_layers(plain) - 1)).save()
        probs = nu.get_next_token_probs(plain).save()
    close(first_in, ref.hidden_states[0])
    close(out0, ref.hidden_states[1])
    close(projected, ref.logits, atol=1e-4)  # the last layer through the final norm and the unembedding
    close(probs, ref.logits[:, -1].softmax(-1), atol=1e-6)
    # set_layer_output replaces the residual: the same as HF run with layer 0's output swapped for layer 1's input
    with torch.no_grad(), plain.trace(dict(ids)):
        nu.set_layer_output(plain, 1, nu.get_layer_input(plain, 1))
        skipped = nu.get_logits(plain).save()
    handle = stack[1].register_forward_hook(
        lambda m, args, out: (args[0], *out[1:]) if isinstance(out, tuple) else args[0])
    try:
        expected = hf_reference_forward(hf, dict(ids)).logits
    finally:
        handle.remove()
    close(skipped, expected, atol=1e-4)
    # batched helpers: each prompt's last real token, as one HF run per prompt gives
    prompts = ["a b c d", "Hello"]
    acts = nu.get_token_activations(plain, prompts, layers=[0])
    next_probs = nu.compute_next_token_probs(plain, prompts)
    for row, p in enumerate(prompts):
        single = hf_reference_forward(hf, dict(tok(p, return_tensors="pt")), output_hidden_states=True)
        close(acts[0, row], single.hidden_states[1][0, -1], atol=1e-4)
        close(next_probs[row], single.logits[0, -1].softmax(-1), atol=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "llama"])
def test_model_model_is_the_backbone_with_nnterps_names(model_type):
    hf, tok = tiny_model(model_type)
    model = StandardizedTransformer(hf, tokenizer=tok)
    backbone = getattr(hf, "transformer", None) or hf.model
    stack = getattr(backbone, "h", None) or backbone.layers
    assert model._model is hf
    assert model.model._module is backbone
    assert model.model.layers[0]._module is stack[0]
    assert model.model.layers[0].self_attn._module is model.attentions[0]._module
    assert model.model.layers[0].mlp._module is model.mlps[0]._module
    assert model.model.ln_final._module is model.ln_final._module
    with torch.no_grad(), model.trace(PROMPT):
        direct = model.model.layers[1].output[0].save()
        accessor = model.layers_output[1].save()
    close(direct if direct.dim() == 3 else direct[None], accessor)


def test_patchscope_lens_takes_duplicate_layers_and_nnterps_latents():
    hf, tok = tiny_model("llama")
    model = StandardizedTransformer(hf, tokenizer=tok)
    sources, target = ["The cat sat", "Paris is"], TargetPrompt("a b ?", -1)
    single = {layer: patchscope_lens(model, sources, target, layers=[layer]) for layer in (0, 1)}
    dup = patchscope_lens(model, sources, target, layers=[0, 1, 1])  # nnterp: [0, n // 2, n - 1] on 2 layers
    assert dup.shape == (2, 3, model.vocab_size)
    for slot, layer in enumerate([0, 1, 1]):
        close(dup[:, slot], single[layer][:, 0])
    # latents in nnterp's layout (layers, n_sources, hidden), as get_token_activations returns them
    latents = nu.get_token_activations(model, sources)  # (all layers, n_sources, hidden)
    close(patchscope_lens(model, target_patch_prompts=target, layers=[1], latents=latents), single[1])
    close(patchscope_lens(model, target_patch_prompts=target, layers=[0, 1], latents=latents),
          torch.cat([single[0], single[1]], dim=1))
    one = latents[1:]  # one row: patched at every layer
    both = patchscope_lens(model, target_patch_prompts=target, layers=[0, 1], latents=one)
    close(both[:, 1], single[1][:, 0])
    with pytest.raises(ValueError, match="not both"):
        patchscope_lens(model, sources, target, layers=[0], latents=latents)
    with pytest.raises(ValueError, match=r"latents must have shape \(layers, n_sources, 64\)"):
        patchscope_lens(model, target_patch_prompts=target, layers=[0], latents=latents[:, :, :3])


@pytest.mark.parametrize("model_type", ["gpt2", "qwen3_moe"])
def test_module_accessor_on_a_meta_device_model(model_type):
    """nnsight's lazy load builds the model on the meta device: nothing can run there (aten::equal, an MoE's
    grouped matmul), so the accessor reads the structure alone."""
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config(model_type))
    acc = nu.ModuleAccessor(meta)
    names = dict(meta.named_modules())
    norm = "transformer.ln_f" if model_type == "gpt2" else "model.norm"
    assert acc.get_unembed_norm() is names[norm]
    assert acc.get_layers() is names["transformer.h" if model_type == "gpt2" else "model.layers"]
    assert acc.nn_model.layers._module is acc.get_layers()  # nnterp's nn_model, renamed
    with pytest.raises(AttributeError, match="is not a module"):
        acc.config  # noqa: B018
    with pytest.raises(AttributeError):
        acc.no_such_module  # noqa: B018


def test_rename_config_naming_no_module_is_ignored_as_in_nnterp():
    hf, tok = tiny_model("gpt2")
    with pytest.warns(UserWarning, match="attn_name='nonexistent_attn'.*Ignored"):
        model = StandardizedTransformer(hf, tokenizer=tok, attn_rename="nonexistent_attn", check_renaming=False)
    assert model.attentions[0]._module is hf.transformer.h[0].attn  # discovery's module kept
    with pytest.raises(RenamingError, match="not a softmax attention"):  # a module that exists but is wrong
        StandardizedTransformer(*tiny_model("gpt2"), rename_config=RenameConfig(attn_name="mlp"))


def test_steer_positions_is_deprecated_for_token_positions():
    hf, tok = tiny_model("llama")
    model = StandardizedTransformer(hf, tokenizer=tok)
    v = torch.randn(model.hidden_size)
    with torch.no_grad(), model.trace(PROMPT):
        model.steer(layers=0, steering_vector=v, token_positions=0)
        expected = model.logits.save()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), model.trace(PROMPT):
            model.steer(layers=0, steering_vector=v, positions=0)
            got = model.logits.save()
    assert [w.category for w in caught] == [DeprecationWarning] and "positions" in str(caught[0].message)
    close(got, expected)
    with pytest.raises(ValueError, match="Cannot specify both"):
        with model.trace(PROMPT):
            model.steer(layers=0, steering_vector=v, positions=0, token_positions=0)


def test_input_size_inside_a_trace_is_this_traces():
    hf, tok = tiny_model("llama")
    model = StandardizedTransformer(hf, tokenizer=tok)
    with torch.no_grad(), model.trace(["a b c d e f g", "x"]):
        pass
    n = len(tok(PROMPT).input_ids)
    with torch.no_grad(), model.trace(PROMPT):
        batch, seq = model.input_size[0].save(), model.input_size[1].save()
        emb = model.token_embeddings.save()
    assert (batch, seq) == (1, n) == tuple(emb.shape[:2])


def test_bfloat16_model_runs_nnterps_calls():
    hf, tok = tiny_model("qwen3_moe")
    model = StandardizedTransformer(hf.to(torch.bfloat16), tokenizer=tok)
    ids = tok(PROMPT, return_tensors="pt")
    with torch.no_grad(), model.trace(dict(ids)):
        h = nu.get_layer_output(model, 0).save()
        logits = model.logits.save()
    close(logits.float(), hf_reference_forward(hf, dict(ids)).logits.float(), atol=0.05)  # bf16 rounding
    assert model.get_topk_closest_tokens(h[0, -1].float(), k=2) and h.dtype == torch.bfloat16
