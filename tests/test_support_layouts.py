"""Residual streams that do not lie as ``(batch, seq, hidden)`` in one module's output: XLNet's layers run on
``(seq, batch, hidden)`` tensors, ProphetNet's decoder layers carry the main stream and its n-gram prediction streams
concatenated along the sequence, XLM's layers are parallel module lists combined in the model's forward loop.

Each is checked against HF's own ``output_hidden_states`` (a 2-row batch: a transposition bug would not show on
one row), and each edit of ``layers_output`` against a plain torch forward hook making the same edit on the HF model
in the model's own layout (``unilens.core.layouts``).
"""

from __future__ import annotations

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.arch.discovery import ArchitectureError
from unilens.core.layouts import LEADING_STREAM, SEQ_FIRST, ResidualLayout
from unilens.model.validation import validate_model
from unilens.testing import tiny_model

TYPES = ("xlnet", "prophetnet", "xlm")


def _ids(hf, rows: int = 2, seq: int = 6) -> torch.Tensor:
    """``(rows, seq)`` distinct token ids clear of the special ids (no padding: every row has every position)."""
    vocab = hf.get_input_embeddings().weight.shape[0]
    return (torch.arange(rows * seq).reshape(rows, seq) * 7 + 5) % vocab


_LOADED: dict[str, StandardizedTransformer] = {}


def _load(kind: str) -> StandardizedTransformer:
    if kind not in _LOADED:
        hf, tok = tiny_model(kind)
        _LOADED[kind] = StandardizedTransformer(hf, tokenizer=tok, check=False)
    return _LOADED[kind]


@pytest.fixture(scope="module", params=TYPES)
def loaded(request):
    return _load(request.param)


@pytest.fixture(scope="module", params=("xlnet", "prophetnet"))
def one_module_layers(request):
    """The types whose layers are modules (XLM's are parallel lists: its MLPs sit outside the layer-output list)."""
    return _load(request.param)


def test_xlm_has_no_mlp_accessors_and_says_so():
    model = _load("xlm")
    with pytest.raises(Exception, match="has no MLP"), model.trace("hello world"):
        model.mlps_output[0].save()
    with pytest.raises(Exception, match="this layer has no MLP"), model.trace("hello world"):
        model.mlps_post_activation[0].save()


def _hf(model):
    return model.module_accessor.model


def _layer_output_site(model, i: int):
    """The HF module whose output holds layer ``i``'s residual stream, and how to add ``delta`` ``(batch, seq,
    hidden)`` to that output in the model's own layout: written out per type from the transformers source, so the
    test does not reuse the layout code it checks."""
    hf = _hf(model)
    kind = hf.config.model_type
    if kind == "xlnet":  # XLNetLayer returns (output_h, output_g), output_h (seq, batch, hidden)
        return hf.transformer.layer[i], lambda out, delta: (out[0] + delta.transpose(0, 1), *out[1:])
    if kind == "prophetnet":  # the decoder layer returns (hidden (batch, (1 + ngram) * seq, hidden), ...)

        def add(out, delta):
            seq = delta.shape[1]
            main, streams = out[0][:, :seq], out[0][:, seq:]  # the main stream first, then the n-gram streams
            return (torch.cat([main + delta, streams], dim=1), *out[1:])

        return hf.prophetnet.decoder.layers[i], add
    assert kind == "xlm"  # post-norm: layer_norm2[i]'s output is the residual stream after layer i
    return hf.transformer.layer_norm2[i], lambda out, delta: out + delta


def test_validate_model_passes(loaded):
    report = validate_model(loaded, raise_on_error=False)
    assert report.ok, report.errors
    # every layer but the last is compared with HF's hidden states (the last through the logits, where it can be)
    assert sum(k.startswith("layers_output") for k in report.errors) == loaded.num_layers - 1


def test_layouts_found_by_data_flow(loaded):
    config = _hf(loaded).config
    expected = {"xlnet": lambda: ResidualLayout(SEQ_FIRST),
                "prophetnet": lambda: ResidualLayout(LEADING_STREAM, streams=1 + config.ngram),  # main + n-gram streams
                "xlm": lambda: ResidualLayout()}
    assert loaded.architecture.residual_layout == expected[config.model_type]()
    assert (loaded.architecture.layer_input_path == "transformer.attentions") == (loaded.architecture.model_type == "xlm")


def test_residual_equals_hf_hidden_states_on_two_rows(loaded):
    hf, ids = _hf(loaded), _ids(_hf(loaded))
    with torch.no_grad():
        reference = hf(input_ids=ids, output_hidden_states=True).hidden_states
    with loaded.trace(ids):
        first = loaded.layers_input[0].save()
        out = loaded.layers_output[0].save()
        second = loaded.layers_input[1].save()
    assert out.shape == (2, 6, loaded.hidden_size)
    torch.testing.assert_close(first, reference[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out, reference[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(second, reference[1], rtol=0, atol=1e-5)


def test_layer_output_edit_matches_a_torch_hook(loaded):
    hf, ids = _hf(loaded), _ids(_hf(loaded))
    delta = torch.randn(2, 6, loaded.hidden_size, generator=torch.Generator().manual_seed(0))
    delta[1] = 0  # one row left alone: an edit must land on the row it was made for
    module, add = _layer_output_site(loaded, 0)
    handle = module.register_forward_hook(lambda mod, args, out: add(out, delta))
    try:
        with torch.no_grad():
            expected = hf(input_ids=ids, output_hidden_states=True)
    finally:
        handle.remove()
    with torch.no_grad():
        plain = hf(input_ids=ids).logits
    with loaded.trace(ids):
        loaded.layers_output[0] = loaded.layers_output[0] + delta
        seen = loaded.layers_input[1].save()  # what layer 1 reads
        logits = loaded.logits.save()
    torch.testing.assert_close(seen, expected.hidden_states[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=1e-5)
    assert not torch.allclose(logits[0], plain[0], atol=1e-3)  # the edit reached the logits
    torch.testing.assert_close(logits[1], plain[1], rtol=0, atol=1e-5)


def test_tensors_inside_the_layers_share_the_layout(one_module_layers):
    """``mlps_output`` (and every per-layer module tensor) is served as ``(batch, seq, hidden)`` too: XLNet's MLP runs
    on ``(seq, batch, hidden)``, ProphetNet's on all its streams (the main stream's positions first)."""
    loaded = one_module_layers
    hf, ids = _hf(loaded), _ids(_hf(loaded))
    mlp = {"xlnet": lambda: hf.transformer.layer[0].ff, "prophetnet": lambda: hf.prophetnet.decoder.layers[0].feed_forward}
    seen = []
    handle = mlp[hf.config.model_type]().register_forward_hook(lambda mod, args, out: seen.append(out))
    try:
        with torch.no_grad():
            hf(input_ids=ids)
    finally:
        handle.remove()
    # from the transformers source: XLNet (seq, batch, hidden); ProphetNet (batch, (1 + ngram) * seq, hidden)
    expected = seen[0].transpose(0, 1) if hf.config.model_type == "xlnet" else seen[0][:, : ids.shape[1]]
    with loaded.trace(ids):
        ours = loaded.mlps_output[0].save()
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_hook_point_edit_matches_a_torch_hook(one_module_layers):
    """A hook point inside the layer (the MLP's post-activation) is served and written in the standardized layout:
    doubling it equals a torch pre-hook doubling the MLP's down projection input on the residual stream's positions."""
    loaded = one_module_layers
    hf, ids = _hf(loaded), _ids(_hf(loaded))
    if hf.config.model_type == "xlnet":  # XLNetFeedForward: layer_2 reads (seq, batch, 4 * hidden)
        down, double = hf.transformer.layer[0].ff.layer_2, lambda x: x * 2
    else:  # ProphetNetFeedForward: `output` reads (batch, (1 + ngram) * seq, 4 * hidden), the main stream first
        seq = ids.shape[1]
        down = hf.prophetnet.decoder.layers[0].feed_forward.output
        double = lambda x: torch.cat([x[:, :seq] * 2, x[:, seq:]], dim=1)  # noqa: E731
    handle = down.register_forward_pre_hook(lambda mod, args: (double(args[0]), *args[1:]))
    try:
        with torch.no_grad():
            expected = hf(input_ids=ids).logits
    finally:
        handle.remove()
    with loaded.trace(ids):
        loaded.mlps_post_activation[0] = loaded.mlps_post_activation[0] * 2
        logits = loaded.logits.save()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_layer_input_edit_equals_the_previous_output_edit(one_module_layers):
    loaded = one_module_layers
    ids = _ids(_hf(loaded))
    delta = torch.randn(2, 6, loaded.hidden_size, generator=torch.Generator().manual_seed(1))
    with loaded.trace(ids):
        loaded.layers_output[0] = loaded.layers_output[0] + delta
        by_output = loaded.logits.save()
    with loaded.trace(ids):
        loaded.layers_input[1] = loaded.layers_input[1] + delta
        by_input = loaded.logits.save()
    torch.testing.assert_close(by_input, by_output, rtol=0, atol=1e-5)


def test_parallel_lists_refuse_layer_input_edits():
    model = StandardizedTransformer(*tiny_model("xlm"), check=False)
    with pytest.raises(TypeError, match=r"layers_input\[1\] cannot be assigned on this xlm model: its layers are "
                                        r"parallel module lists.*assign layers_output\[i - 1\] instead"):
        with model.trace("The cat sat"):
            model.layers_input[1] = model.layers_input[1] * 2


def test_prophetnet_project_on_vocab_is_refused_with_its_reason():
    model = StandardizedTransformer(*tiny_model("prophetnet"), check=False)
    with pytest.raises(ArchitectureError, match="reads the layers' other streams.*not the residual stream"):
        with model.trace("The cat sat"):
            model.project_on_vocab(model.layers_output[-1]).save()


def test_xlnet_project_on_vocab_is_the_logits():
    model = StandardizedTransformer(*tiny_model("xlnet"), check=False)
    with model.trace(_ids(_hf(model))):
        lens = model.project_on_vocab(model.layers_output[-1]).save()
        logits = model.logits.save()
    torch.testing.assert_close(lens, logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type,why", [
    ("xlnet", r"XLNetRelativeAttention\) projects queries, keys and values with raw weight tensors"),
    ("xlm", r"the attentions are the list transformer.attentions, beside the layer-output list"),
])
def test_attention_out_of_reach_is_refused_with_its_reason(model_type, why):
    model = StandardizedTransformer(*tiny_model(model_type), check=False)
    assert model.architecture.attention_refusal is not None
    with pytest.raises(ArchitectureError, match=rf"layer 0's attention on this {model_type} model is not served: .*{why}"):
        with model.trace("The cat sat"):
            model.attentions_output[0].save()
    with pytest.raises(IndexError, match=rf"layer 0's attention on {model_type}.* is not served: .*{why}"):
        with model.trace("The cat sat"):
            model.attention_probabilities[0].save()
