"""What transformers 5.25 changed, absorbed: hub kernels off unless asked for, KV-sharing layers (Kolibri 1.1, Gemma 3n)
named in the weight views and hook points, MiniCPM5-MoE's gated attention output, Falcon through the attention
interface, and the support report's reason for every row it does not fully support.

Every test runs on the lock and on the previous transformers too: the 5.25-only families are skipped where the
installed transformers does not have them.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import CONFIG_MAPPING

from unilens import StandardizedTransformer
from unilens.arch.loading import hub_kernels, kernels_choice, load_hf_model
from unilens.arch.structure import kv_source_layer, uses_attention_interface
from unilens.conformance.support import KNOWN_LIMITATIONS, SupportRow, fully_supported, with_reason
from unilens.testing import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _needs(model_type: str) -> None:
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"{model_type} is not in this transformers")


# --- hub kernels ------------------------------------------------------------------------------------------------


def test_kernels_choice_is_off_unless_asked():
    assert kernels_choice({}) is False
    assert kernels_choice({"use_kernels": None}) is False  # None: not given (transformers 5.25 would say True)
    assert kernels_choice({"use_kernels": True}) is True
    assert kernels_choice({"use_kernels": False}) is False
    with pytest.raises(TypeError, match="use_kernels='yes'"):
        kernels_choice({"use_kernels": "yes"})


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    hf, tok = tiny_model("llama")
    folder = tmp_path_factory.mktemp("llama")
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_load_passes_use_kernels_false_by_default(saved_llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = {}
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model, _ = load_hf_model(saved_llama)
    assert seen["use_kernels"] is False  # whatever transformers' own default (True from 5.25 on)
    assert getattr(model, "use_kernels", False) is False
    assert hub_kernels(model) == {}


def test_use_kernels_true_on_cpu_runs_the_torch_code(saved_llama):
    pytest.importorskip("kernels")  # transformers 5.25's hard dependency; absent on earlier locks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hub kernel on CPU: no warning either
        model, _ = load_hf_model(saved_llama, use_kernels=True)
    assert model.use_kernels is True
    assert hub_kernels(model) == {}  # kernelize fell back to the torch forward of every layer on CPU


def test_a_kernelized_module_is_named_at_load():
    hf, tok = tiny_model("llama")
    norm = hf.model.norm
    # what kernels' kernelize leaves on a layer it swapped (its `_replace_forward`)
    norm.__dict__["_kernel_repo"] = SimpleNamespace(repo_id="kernels-community/liger_kernels")
    assert hub_kernels(hf) == {"model.norm": "kernels-community/liger_kernels"}
    with pytest.warns(UserWarning, match=r"run hub kernels instead of transformers' torch code \(model\.norm "):
        load_hf_model(hf, tok)


# --- KV sharing ---------------------------------------------------------------------------------------------------


def test_kolibri_shared_kv_layer_is_named_and_refused_in_weights():
    _needs("kolibri1_1")
    model = StandardizedTransformer(*tiny_model("kolibri1_1"))  # the load-time check passes
    assert model.config.kv_sharing_modes == [None, "store", "reuse"]  # the zoo's layout: it must exercise sharing
    modules = model._attention_modules
    assert [kv_source_layer(modules, i) for i in range(3)] == [None, None, 1]
    assert model.weights[2].W_Q.shape == (model.num_heads, model.hidden_size, model.head_dim)
    with pytest.raises(NotImplementedError, match=r"layer 2: .* keys and values of layer 1 .*model\.weights\[1\]\.W_K"):
        model.weights[2].W_K
    with pytest.raises(NotImplementedError, match=r"model\.weights\[1\]\.b_V"):
        model.weights[2].b_V
    batch = model.tokenizer(["The capital of France is Paris and the capital of Italy"], return_tensors="pt")
    out = model.read(dict(batch), names=["attention_keys.1", "attention_keys.2", "attention_probabilities.1"])
    assert torch.equal(out["attention_keys.2"], out["attention_keys.1"])  # layer 2 attends to layer 1's keys
    # the indexer's selection binds on this prompt: the last query skips keys a dense causal layer would see
    assert int((out["attention_probabilities.1"][0, :, -1] == 0).sum()) > 0


def test_kolibri_keys_print_source_names_the_source_layer(capsys):
    _needs("kolibri1_1")
    model = StandardizedTransformer(*tiny_model("kolibri1_1"), check=False)
    model.attention_values.print_source(2)
    assert "these are the values of layer 1 (KV sharing)" in capsys.readouterr().out


def test_gemma3n_shared_kv_layers_name_their_source():
    model = StandardizedTransformer(*tiny_model("gemma3n_text"), check=False)
    modules = model._attention_modules
    sources = [kv_source_layer(modules, i) for i in range(len(modules))]
    # zoo: 4 layers (full, sliding, full, sliding), the last 2 reuse the last earlier layer of their type
    assert sources == [None, None, 0, 1]
    with pytest.raises(NotImplementedError, match=r"keys and values of layer 1 .*model\.weights\[1\]\.W_V"):
        model.weights[3].W_V


# --- MiniCPM5-MoE: the attention output gated before o_proj -------------------------------------------------------


def test_minicpm5_moe_gated_z_and_head_results():
    _needs("minicpm5_moe")
    model = StandardizedTransformer(*tiny_model("minicpm5_moe"))
    attn = model._attention_modules[0]
    batch = model.tokenizer(["The capital of France is"], return_tensors="pt")
    names = ["attentions_input.0", "attention_probabilities.0", "attention_values.0", "attention_heads.0",
             "attention_head_results.0", "attentions_output.0"]
    out = model.read(dict(batch), names=names)
    x, probs, v = out["attentions_input.0"], out["attention_probabilities.0"], out["attention_values.0"]
    heads = probs.shape[1]
    v = v.repeat_interleave(heads // v.shape[1], dim=1)  # (batch, heads, key, head_dim)
    mixed = (probs @ v).transpose(1, 2)  # (batch, seq, heads, head_dim)
    gate = attn.q_gate_proj(x).view(*x.shape[:2], heads, -1).chunk(2, dim=-1)[1]  # (batch, seq, heads, head_dim)
    # z is o_proj's input: the mixed values times sigmoid(gate), per head
    torch.testing.assert_close(out["attention_heads.0"], mixed * gate.sigmoid(), rtol=1e-5, atol=1e-6)
    # per-head results are z_h @ W_O[h]; with b_O they sum to the attention output
    summed = out["attention_head_results.0"].sum(dim=2) + model.weights[0].b_O
    torch.testing.assert_close(summed, out["attentions_output.0"], rtol=1e-5, atol=1e-6)


# --- Falcon -------------------------------------------------------------------------------------------------------


def test_falcon_keeps_its_fast_path_when_it_calls_the_attention_interface():
    model = StandardizedTransformer(*tiny_model("falcon"))
    hooks = model._attention_modules[0].unilens_hooks
    if uses_attention_interface(model._attention_modules[0]):  # transformers >= 5.25
        assert hooks.route == "interface" and hooks.original_implementation == "sdpa"
        batch = model.tokenizer(["The capital of France is"], return_tensors="pt")
        keys = model.read(dict(batch), names=["attention_keys.0"])["attention_keys.0"]
        assert keys.shape[-2] == batch["input_ids"].shape[1]
    else:  # its inline sdpa branch bypasses the softmax: switched to eager
        assert hooks.original_implementation == "eager"


# --- the support report's reasons ---------------------------------------------------------------------------------


def test_with_reason():
    ok = SupportRow("llama", builds=True, loads=True, residual_matches=True, attention_probs="match")
    assert fully_supported(ok) and with_reason(ok).reason == ""
    known = SupportRow("blt", builds=True, loads=True, note="validate: ValidationError: ...")
    assert with_reason(known).reason == KNOWN_LIMITATIONS["blt"]
    other = SupportRow("mamba", builds=True, loads=True, note="residual:  layers_input[0] vs\nhidden_states[0]")
    assert with_reason(other).reason == "residual: layers_input[0] vs hidden_states[0]"


def test_report_gives_every_failing_row_a_reason_and_no_stale_one():
    data = json.loads((ROOT / "docs" / "support.json").read_text())
    rows = {r["model_type"]: r for r in data["rows"]}
    if any("reason" not in r for r in rows.values()):
        pytest.fail("docs/support.json has no reason column: regenerate it (`make support`)")
    for model_type, row in rows.items():
        failing = not fully_supported(SupportRow(**row))
        assert bool(row["reason"]) == failing, model_type
    stale = sorted(t for t in KNOWN_LIMITATIONS if t in rows and fully_supported(SupportRow(**rows[t])))
    assert not stale, f"KNOWN_LIMITATIONS entries for types the report supports: {stale}"


# --- rows of the report fixed by discovery ------------------------------------------------------------------------


def test_git_text_stack_and_an_unembedding_named_output():
    """GIT: the text stack is `git.encoder.layer` (an encoder-named stack beats the vision tower's), and its unembedding
    is a module named `output`, which nnsight mounts as `E_output`: the rename must name that path."""
    hf, tok = tiny_model("git")
    model = StandardizedTransformer(hf, tokenizer=tok)  # the load-time check: residual and logits = HF
    assert model.architecture.layers_path == "git.encoder.layer"
    assert type(model.lm_head._module).__name__ == "Linear"
    batch = tok(["The capital of France is"], return_tensors="pt")
    with torch.no_grad():
        expected = hf(**batch).logits
    torch.testing.assert_close(model.read(dict(batch), names=["logits"])["logits"], expected)
