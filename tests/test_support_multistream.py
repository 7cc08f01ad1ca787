"""Layers that carry several residual streams: Qwen4-Exp's hyper-connections (every layer runs on ``hc_count``
hidden-wide streams side by side, ``(batch, seq, hc_count * hidden)``, merged by ``model.hyper_connection_mixer``
before the unembedding) and Reformer's reversible layers (two streams, returned as separate fields of the layer's
output and passed to the next layer as two arguments, the other stream first).

The standardized residual stream is what HF's ``output_hidden_states`` reports: Qwen4-Exp's whole
``(batch, seq, hc_count * hidden)`` tensor, Reformer's ``hidden_states`` stream. Each is checked against HF's own
hidden states (a 2-row batch), each edit of ``layers_output`` against a plain torch forward hook making the same edit
on the HF model, and ``project_on_vocab`` is the model's own head (Qwen4-Exp: the mixer, then lm_head) or refused
with the reason (Reformer: its head reads both streams).
"""

from __future__ import annotations

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.arch.discovery import ArchitectureError
from unilens.model.validation import validate_model
from unilens.testing import tiny_model

TYPES = ("qwen4_exp_text", "qwen4_exp", "reformer")
SEQ = 8  # a multiple of Reformer's 4-token chunks: no padding inside its forward


def _ids(hf, rows: int = 2, seq: int = SEQ) -> torch.Tensor:
    """``(rows, seq)`` distinct token ids clear of the special ids (no padding: every row has every position)."""
    vocab = hf.get_input_embeddings().weight.shape[0]
    return (torch.arange(rows * seq).reshape(rows, seq) * 7 + 5) % vocab


@pytest.fixture(scope="module", params=TYPES)
def loaded(request):
    hf, tok = tiny_model(request.param)
    return StandardizedTransformer(hf, tokenizer=tok, check=False)


def _hf(model):
    return model.module_accessor.model


def _layer_site(model, i: int):
    """The HF decoder layer ``i``, how to add ``delta`` to the residual stream in its output, and which of its inputs
    is the residual stream: written out per type from the transformers source (not with the code under test)."""
    hf = _hf(model)
    kind = hf.config.model_type
    if kind == "reformer":  # ReformerLayer returns ReformerOutput(hidden_states, attn_output, ...), read by name, and
        # is called as layer(prev_attn_output=..., hidden_states=...)
        return (hf.reformer.encoder.layers[i], lambda out, delta: out._replace(hidden_states=out.hidden_states + delta),
                lambda args, kwargs: kwargs["hidden_states"])
    # Qwen4ExpTextDecoderLayer returns the (batch, seq, hc_count * hidden) tensor of all its streams, its first input
    layers = hf.model.layers if kind == "qwen4_exp_text" else hf.model.language_model.layers
    return layers[i], lambda out, delta: out + delta, lambda args, kwargs: args[0]


def _same_draws() -> None:
    """Reformer's LSH attention draws its hashing rotations every forward (no config.hash_seed): each forward compared
    here starts from the same random state."""
    torch.manual_seed(0)


def test_validate_model_passes(loaded):
    report = validate_model(loaded, raise_on_error=False)
    assert report.ok, report.errors
    assert sum(k.startswith("layers_output") for k in report.errors) == loaded.num_layers - 1
    # Qwen4-Exp: project_on_vocab (the mixer, then lm_head) is checked against the logits; Reformer refuses it
    has_lens = "project_on_vocab(layers_output[-1]) vs logits" in report.errors
    assert has_lens == (loaded.architecture.model_type != "reformer")


def test_streams_found_by_data_flow(loaded):
    arch, config = loaded.architecture, _hf(loaded).config.get_text_config()
    if arch.model_type == "reformer":
        assert (arch.residual_streams, arch.layer_input_argument) == (1, "hidden_states")
        assert loaded.residual_width == loaded.hidden_size
    else:
        assert (arch.residual_streams, arch.layer_input_argument) == (config.hc_count, None)
        assert loaded.residual_width == config.hc_count * config.hidden_size
        assert arch.head_chain[0].endswith("hyper_connection_mixer")  # the model's own merge of the streams


def test_residual_equals_hf_hidden_states_on_two_rows(loaded):
    hf, ids = _hf(loaded), _ids(_hf(loaded))
    _same_draws()
    with torch.no_grad():
        reference = hf(input_ids=ids, output_hidden_states=True).hidden_states
    _same_draws()
    with loaded.trace(ids):
        first = loaded.layers_input[0].save()
        out = loaded.layers_output[0].save()
        second = loaded.layers_input[1].save()  # Reformer: its hidden_states argument, not prev_attn_output
    assert out.shape == (2, SEQ, loaded.residual_width)
    torch.testing.assert_close(first, reference[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out, reference[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(second, reference[1], rtol=0, atol=1e-5)


def test_layer_output_edit_matches_a_torch_hook(loaded):
    hf, ids = _hf(loaded), _ids(_hf(loaded))
    delta = torch.randn(2, SEQ, loaded.residual_width, generator=torch.Generator().manual_seed(0))
    delta[1] = 0  # one row left alone: an edit must land on the row it was made for
    layer, add, residual_of = _layer_site(loaded, 0)
    received: list[torch.Tensor] = []  # what HF's layer 1 is called with (HF records hidden states before our hook)
    handles = [layer.register_forward_hook(lambda mod, args, out: add(out, delta)),
               _layer_site(loaded, 1)[0].register_forward_pre_hook(
                   lambda mod, args, kwargs: received.append(residual_of(args, kwargs).clone()), with_kwargs=True)]
    try:
        _same_draws()
        with torch.no_grad():
            expected = hf(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    _same_draws()
    with torch.no_grad():
        plain = hf(input_ids=ids).logits
    _same_draws()
    with loaded.trace(ids):
        loaded.layers_output[0] = loaded.layers_output[0] + delta
        seen = loaded.layers_input[1].save()  # what layer 1 reads
        logits = loaded.logits.save()
    torch.testing.assert_close(seen, received[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(logits[0], plain[0], atol=1e-3)  # the edit reached the logits
    torch.testing.assert_close(logits[1], plain[1], rtol=0, atol=1e-5)


def test_layer_input_edit_equals_the_previous_output_edit(loaded):
    ids = _ids(_hf(loaded))
    delta = torch.randn(2, SEQ, loaded.residual_width, generator=torch.Generator().manual_seed(1))
    _same_draws()
    with loaded.trace(ids):
        loaded.layers_output[0] = loaded.layers_output[0] + delta
        by_output = loaded.logits.save()
    _same_draws()
    with loaded.trace(ids):
        loaded.layers_input[1] = loaded.layers_input[1] + delta
        by_input = loaded.logits.save()
    _same_draws()
    with loaded.trace(ids):
        plain = loaded.logits.save()
    torch.testing.assert_close(by_input, by_output, rtol=0, atol=1e-5)
    assert not torch.allclose(by_input, plain, atol=1e-3)  # the write reached the model (the right argument)


def test_hyper_connection_project_on_vocab_merges_the_streams():
    model = StandardizedTransformer(*tiny_model("qwen4_exp_text"), check=False)
    ids = _ids(_hf(model))
    with model.trace(ids):
        lens = model.project_on_vocab(model.layers_output[-1]).save()
        logits = model.logits.save()
    torch.testing.assert_close(lens, logits, rtol=0, atol=1e-5)
    # one hidden-wide stream is not the residual stream: refused, naming the width to pass
    width, hidden = model.residual_width, model.hidden_size
    with pytest.raises(ValueError, match=rf"residual stream is 2 streams of hidden size {hidden} side by side "
                                         rf"\(hyper-connections\), {width} wide.*pass \(\.\.\., {width}\)"):
        model.project_on_vocab(torch.zeros(1, hidden))


def test_reformer_project_on_vocab_is_refused_with_its_reason():
    model = StandardizedTransformer(*tiny_model("reformer"), check=False)
    hidden = model.hidden_size
    with pytest.raises(ArchitectureError, match=rf"reads a {2 * hidden}-wide tensor .* last layer's {hidden}-wide "
                                                r"output .*read model.logits"):
        with model.trace(_ids(_hf(model))):
            model.project_on_vocab(model.layers_output[-1]).save()


def test_hyper_connection_steering_takes_one_part_per_stream():
    model = StandardizedTransformer(*tiny_model("qwen4_exp_text"), check=False)
    hf, ids, hidden = _hf(model), _ids(_hf(model)), model.hidden_size
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=rf"must have shape \({2 * hidden},\) \(this model's residual stream: 2 "
                                         rf"streams of hidden size {hidden} side by side; v.repeat\(2\)"):
        with model.trace(ids):
            model.steer(layers=0, steering_vector=v)
    handle = hf.model.layers[0].register_forward_hook(lambda mod, args, out: out + 3.0 * torch.cat([v, v]))
    try:
        with torch.no_grad():
            expected = hf(input_ids=ids).logits  # v added to both streams of layer 0's output
    finally:
        handle.remove()
    with model.trace(ids):
        model.steer(layers=0, steering_vector=v.repeat(2), factor=3.0)
        logits = model.logits.save()
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
