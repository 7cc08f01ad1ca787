"""Tests for unilens.interventions, each against an independent oracle (plain HF forwards and torch hooks)."""

from __future__ import annotations

import pytest
import torch

from unilens import StandardizedTransformer, load_default
from unilens.analysis.attribution import direct_logit_attribution
from unilens.analysis.lens import (
    TargetPrompt,
    logit_lens,
    patchscope_lens,
    repeat_prompt,
)
from unilens.analysis.patching import activation_patching, attribution_patching
from unilens.analysis.steering import mean_difference_vector, steer_all
from unilens.hooks.steering import NonFiniteSteeringError, SteeringPositionError
from unilens.testing import tiny_model

CLEAN, CORRUPTED = "The capital of France is", "The capital of Italy is"

# Plain HF module paths of the tiny models (the oracle never goes through unilens' discovery).
PATHS = {
    "llama": dict(layers=lambda m: m.model.layers, attn="self_attn", mlp="mlp", o_proj=("self_attn", "o_proj"),
                  norm=lambda m: m.model.norm),
    "gpt2": dict(layers=lambda m: m.transformer.h, attn="attn", mlp="mlp", o_proj=("attn", "c_proj"),
                 norm=lambda m: m.transformer.ln_f),
}  # fmt: skip


def _std(model_type: str, dtype=torch.float32) -> StandardizedTransformer:
    hf, tok = tiny_model(model_type, seed=0)
    return StandardizedTransformer(hf.to(dtype), tokenizer=tok)


@pytest.fixture(scope="module")
def llama():
    return _std("llama")


@pytest.fixture(scope="module")
def gpt2():
    return _std("gpt2")


@pytest.fixture(scope="module")
def smol():
    return load_default()


def _tid(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == 1, f"{text!r} must be one token for this test, got {ids}"
    return ids[0]


def _ids(model, text: str) -> torch.Tensor:
    return model.tokenizer(text, return_tensors="pt").input_ids


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _module(hf, model_type: str, component: str, layer: int):
    paths = PATHS[model_type]
    block = paths["layers"](hf)[layer]
    if component == "resid":
        return block
    if component == "head":
        return getattr(getattr(block, paths["o_proj"][0]), paths["o_proj"][1])
    return getattr(block, paths[component])


def _run_with_hook(hf, module, ids, hook, pre=False) -> torch.Tensor:
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return hf(input_ids=ids).logits
    finally:
        handle.remove()


def _capture(hf, module, ids, pre=False) -> torch.Tensor:
    box = {}

    def hook(_m, args, out=None):
        box["x"] = (args[0] if pre else _first(out)).detach().clone()

    _run_with_hook(hf, module, ids, hook if not pre else (lambda m, a: hook(m, a)), pre=pre)
    return box["x"]


# ------------------------------------------------------------------------------------------------
# logit lens
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_logit_lens_matches_hf_hidden_states(model_type, side, request):
    model = request.getfixturevalue(model_type)
    hf = model.module_accessor.model
    prompts = ["The capital of France is", "Hi", "The cat sat on the mat"]
    old = model.tokenizer.padding_side
    model.tokenizer.padding_side = side
    try:
        probs = logit_lens(model, prompts)
        lens_all = logit_lens(model, prompts, all_positions=True)
    finally:
        model.tokenizer.padding_side = old
    assert probs.shape == (3, model.num_layers, model.vocab_size)
    norm, head = PATHS[model_type]["norm"](hf), hf.get_output_embeddings()
    for row, prompt in enumerate(prompts):  # oracle: each prompt alone, no padding, HF's own hidden states
        with torch.no_grad():
            out = hf(input_ids=_ids(model, prompt), output_hidden_states=True)
            expected_last = out.logits[0, -1].softmax(-1)
            torch.testing.assert_close(probs[row, -1], expected_last, atol=1e-6, rtol=1e-4)
            for layer in range(model.num_layers - 1):  # HF's last hidden state is already normed
                h = out.hidden_states[layer + 1][0, -1]
                torch.testing.assert_close(probs[row, layer], head(norm(h)).softmax(-1), atol=1e-6, rtol=1e-4)
    # all_positions: the last real position of each row is the per-prompt answer (padding side aware)
    assert lens_all.shape[:2] == (3, model.num_layers) and lens_all.shape[-1] == model.vocab_size
    seq = lens_all.shape[2]
    for row, prompt in enumerate(prompts):
        n = _ids(model, prompt).shape[1]
        last = seq - 1 if side == "left" else n - 1
        torch.testing.assert_close(lens_all[row, :, last], probs[row], atol=1e-6, rtol=1e-4)


def test_logit_lens_inverse(llama):
    probs, inv = logit_lens(llama, "The cat sat", return_inv_logits=True)
    with torch.no_grad():
        logits = llama.module_accessor.model(input_ids=_ids(llama, "The cat sat")).logits[0, -1]
    torch.testing.assert_close(inv[0, -1], (-logits).softmax(-1), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(probs[0, -1], logits.softmax(-1), atol=1e-6, rtol=1e-4)


def test_logit_lens_smollm2_says_paris(smol):
    probs = logit_lens(smol, "The capital of France is")
    paris = _tid(smol.tokenizer, " Paris")
    ranks = (probs[0] > probs[0, :, paris : paris + 1]).sum(-1)  # (layers,) rank of " Paris" per layer
    # measured: ranks ~2000-5000 up to layer 22, then 395, 91, 112, 33, 6, 2, 0 in the last layers
    assert ranks[-1] == 0, ranks
    assert (ranks[-3:] < 10).all() and ranks[: smol.num_layers // 2].min() > 100, ranks


# ------------------------------------------------------------------------------------------------
# activation patching
# ------------------------------------------------------------------------------------------------


def _naive_patching(model, model_type, component, metric, positions=None) -> torch.Tensor:
    """One HF forward per cell, with a plain torch hook that swaps the clean activation in."""
    hf = model.module_accessor.model
    clean_ids, corrupted_ids = _ids(model, CLEAN), _ids(model, CORRUPTED)
    seq = clean_ids.shape[1]
    positions = list(range(seq)) if positions is None else positions
    n_heads, head_dim = model.num_heads, model.hidden_size // model.num_heads
    rows = []
    for layer in range(model.num_layers):
        module = _module(hf, model_type, component, layer)
        clean_act = _capture(hf, module, clean_ids, pre=component == "head")
        row = []
        for j in range(n_heads) if component == "head" else positions:
            if component == "head":

                def hook(_m, args, j=j):
                    x = args[0].clone()
                    sl = slice(j * head_dim, (j + 1) * head_dim)
                    x[:, :, sl] = clean_act[:, :, sl]
                    return (x, *args[1:])

                logits = _run_with_hook(hf, module, corrupted_ids, hook, pre=True)
            else:

                def hook(_m, _args, out, p=j):
                    x = _first(out).clone()
                    x[:, p] = clean_act[:, p]
                    return (x, *out[1:]) if isinstance(out, tuple) else x

                logits = _run_with_hook(hf, module, corrupted_ids, hook)
            row.append(metric(logits)[0])
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("component", ["resid", "attn", "mlp", "head"])
def test_activation_patching_matches_naive_loop(model_type, component, request):
    model = request.getfixturevalue(model_type)
    paris, rome = _tid(model.tokenizer, " Paris"), _tid(model.tokenizer, " Rome")

    def metric(logits):
        return logits[:, -1, paris] - logits[:, -1, rome]

    expected = _naive_patching(model, model_type, component, metric)
    batched = activation_patching(model, CLEAN, CORRUPTED, metric, component=component, batch_size=1000)
    one_by_one = activation_patching(model, CLEAN, CORRUPTED, metric, component=component, batch_size=1,
                                     progress=False)  # fmt: skip
    assert batched.shape == expected.shape
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(one_by_one, expected, atol=1e-5, rtol=0)
    assert expected.std() > 1e-3  # the patching effect is not trivially constant


def test_activation_patching_subsets_and_chunks(llama):
    paris = _tid(llama.tokenizer, " Paris")

    def metric(logits):
        return logits[:, -1, paris]

    full = activation_patching(llama, CLEAN, CORRUPTED, metric, batch_size=1000)
    part = activation_patching(llama, CLEAN, CORRUPTED, metric, layers=[1], positions=[-1, 2], batch_size=1)
    torch.testing.assert_close(part, full[[1]][:, [full.shape[1] - 1, 2]], atol=1e-5, rtol=0)
    chunked = activation_patching(llama, CLEAN, CORRUPTED, metric, batch_size=3, progress=False)  # uneven chunks
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_activation_patching_resumes_from_the_corrupted_cache(model_type, request):
    """The position-major path (start at the patched position from the corrupted key/value cache, skip the
    layers below the first patched one) is taken without a fallback warning and equals whole-sequence runs."""
    model = request.getfixturevalue(model_type)
    paris = _tid(model.tokenizer, " Paris")

    def metric(logits):
        return logits[:, -1, paris] - logits[:, 1, paris]  # reads a position before most patched ones too

    import warnings

    first_mlp = model.module_accessor.get_layers()[0].mlp  # inside the layer: runs only if the layer does
    for layers in (None, [1]):  # [1]: layer 0 is skipped, fed the corrupted outputs
        calls = []
        handle = first_mlp.register_forward_hook(lambda *_: calls.append(1))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback would warn
            resumed = activation_patching(model, CLEAN, CORRUPTED, metric, layers=layers, progress=False)
        handle.remove()
        if layers == [1]:
            assert len(calls) == 2  # the clean run and the corrupted (cache) run only: no patched run computes it
        whole = activation_patching(model, CLEAN, CORRUPTED, metric, layers=layers, progress=False,
                                    reuse_prefix=False)  # fmt: skip
        torch.testing.assert_close(resumed, whole, atol=1e-5, rtol=0)
        assert whole.std() > 1e-3


def test_activation_patching_falls_back_when_the_cache_check_fails(llama, monkeypatch):
    """A cache that does not reproduce the corrupted run is caught by the check: warning, whole-sequence runs."""
    from unilens.analysis import sweep as patching

    paris = _tid(llama.tokenizer, " Paris")

    def metric(logits):
        return logits[:, -1, paris]

    expected = activation_patching(llama, CLEAN, CORRUPTED, metric, progress=False, reuse_prefix=False)
    monkeypatch.setattr(patching.CorruptedRun, "cache_kwargs", lambda self, start, rows: {})  # no cache
    with pytest.warns(UserWarning, match="does not reproduce the corrupted run"):
        got = activation_patching(llama, CLEAN, CORRUPTED, metric, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# attribution patching
# ------------------------------------------------------------------------------------------------


# GPT-2 runs entirely in float64, so a small step and a tight tolerance. Llama's RMSNorm casts its input to
# float32 whatever the model dtype, so finite differences carry float32 round-off (~1e-7 / eps): a larger
# step (central differences keep the truncation error O(eps^2)) and a looser tolerance there.
FD_SETUP = {"gpt2": (1e-4, 1e-7, 1e-6), "llama": (1e-2, 1e-4, 1e-3)}  # eps, atol, rtol


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("component", ["resid", "attn", "mlp"])
def test_attribution_patching_matches_finite_differences(component, model_type):
    model = _std(model_type, dtype=torch.float64)
    eps, atol, rtol = FD_SETUP[model_type]
    hf = model.module_accessor.model
    paris, rome = _tid(model.tokenizer, " Paris"), _tid(model.tokenizer, " Rome")

    def metric(logits):
        return logits[:, -1, paris] - logits[:, -1, rome]

    estimate = attribution_patching(model, CLEAN, CORRUPTED, metric, component=component)
    clean_ids, corrupted_ids = _ids(model, CLEAN), _ids(model, CORRUPTED)
    seq = clean_ids.shape[1]
    expected = torch.zeros(model.num_layers, seq, dtype=torch.float64)
    for layer in range(model.num_layers):
        module = _module(hf, model_type, component, layer)
        delta = _capture(hf, module, clean_ids) - _capture(hf, module, corrupted_ids)
        for p in range(seq):

            def run(step):
                def hook(_m, _args, out):
                    x = _first(out).clone()
                    x[:, p] += step * delta[:, p]
                    return (x, *out[1:]) if isinstance(out, tuple) else x

                return metric(_run_with_hook(hf, module, corrupted_ids, hook))[0]

            expected[layer, p] = (run(eps) - run(-eps)) / (2 * eps)  # central difference: error O(eps^2)
    assert estimate.dtype == torch.float64
    torch.testing.assert_close(estimate, expected, atol=atol, rtol=rtol)
    assert expected.abs().max() > 1e-3


def test_attribution_vs_patching_smollm2(smol):
    assert _ids(smol, CLEAN).shape == _ids(smol, CORRUPTED).shape
    paris, rome = _tid(smol.tokenizer, " Paris"), _tid(smol.tokenizer, " Rome")

    def metric(logits):
        return logits[:, -1, paris] - logits[:, -1, rome]

    layers = list(range(0, smol.num_layers, 5))
    patched = activation_patching(smol, CLEAN, CORRUPTED, metric, layers=layers, progress=False)
    estimate = attribution_patching(smol, CLEAN, CORRUPTED, metric, layers=layers)
    with torch.no_grad():
        baseline = metric(smol.module_accessor.model(input_ids=_ids(smol, CORRUPTED)).logits)[0]
    effect = patched - baseline  # patching effect; attribution estimates this difference
    corr = torch.corrcoef(torch.stack([effect.flatten(), estimate.flatten()]))[0, 1].item()
    print(f"\nSmolLM2 resid attribution vs activation patching correlation ({len(layers)} layers): {corr:.3f}")
    assert corr > 0.3


# ------------------------------------------------------------------------------------------------
# patchscope
# ------------------------------------------------------------------------------------------------


def test_patchscope_identity_equals_unpatched(llama):
    sources = [CLEAN, "The cat sat on the mat"]
    targets = [TargetPrompt(s, -1) for s in sources]
    probs = patchscope_lens(llama, sources, targets, layers=[0, 1])
    hf = llama.module_accessor.model
    for row, prompt in enumerate(sources):
        with torch.no_grad():
            expected = hf(input_ids=_ids(llama, prompt)).logits[0, -1].softmax(-1)
        for slot in range(2):
            torch.testing.assert_close(probs[row, slot], expected, atol=1e-6, rtol=1e-4)


def test_patchscope_matches_hook_oracle(gpt2):
    """A real patch: the source's last-token residual at layer L into position 3 of a longer target."""
    hf = gpt2.module_accessor.model
    source, target = CLEAN, repeat_prompt(["cat", "sun"], placeholder="?")
    target = TargetPrompt(target.prompt, 3)
    probs = patchscope_lens(gpt2, [source], target, layers=[1, 0])  # order kept in the output
    for slot, layer in enumerate([1, 0]):
        block = PATHS["gpt2"]["layers"](hf)[layer]
        state = _capture(hf, block, _ids(gpt2, source))[:, -1]

        def hook(_m, _args, out):
            x = _first(out).clone()
            x[:, 3] = state
            return (x, *out[1:]) if isinstance(out, tuple) else x

        expected = _run_with_hook(hf, block, _ids(gpt2, target.prompt), hook)[0, -1].softmax(-1)
        torch.testing.assert_close(probs[0, slot], expected, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# direct logit attribution
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_dla_sums_to_logit(model_type, request):
    model = request.getfixturevalue(model_type)
    hf = model.module_accessor.model
    paris = _tid(model.tokenizer, " Paris")
    dla = direct_logit_attribution(model, CLEAN, " Paris")
    with torch.no_grad():
        logit = hf(input_ids=_ids(model, CLEAN)).logits[0, -1, paris].double()
    total = dla["embed"] + dla["layers"].sum() + dla["bias"]
    torch.testing.assert_close(total, logit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dla["heads"].sum(-1) + dla["head_bias"], dla["attn"], atol=1e-6, rtol=1e-6)
    assert dla["layers"].shape == (2 * model.num_layers,) and dla["heads"].shape == (model.num_layers, model.num_heads)
    # one term by hand, with the final norm's scale frozen at the full forward's value
    norm = PATHS[model_type]["norm"](hf)
    final = _capture(hf, PATHS[model_type]["layers"](hf)[-1], _ids(model, CLEAN))[0, -1].double()
    mlp0 = _capture(hf, _module(hf, model_type, "mlp", 0), _ids(model, CLEAN))[0, -1].double()
    w = hf.get_output_embeddings().weight[paris].double() * norm.weight.double()
    if model_type == "gpt2":  # LayerNorm: centre, divide by the std
        expected = w @ (mlp0 - mlp0.mean()) / torch.sqrt(final.var(unbiased=False) + norm.eps)
    else:  # RMSNorm
        expected = w @ mlp0 / torch.sqrt(final.pow(2).mean() + norm.variance_epsilon)
    torch.testing.assert_close(dla["mlp"][0], expected, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# steering
# ------------------------------------------------------------------------------------------------


def test_steer_all_and_mean_difference(llama):
    hf = llama.module_accessor.model
    layers = PATHS["llama"]["layers"](hf)
    pos, neg = ["I like the cat", "The sun"], ["I like the dog", "The cold water"]
    v = mean_difference_vector(llama, pos, neg, layer=1)

    def last_mean(prompts):
        return torch.stack([_capture(hf, layers[1], _ids(llama, p))[0, -1] for p in prompts]).mean(0)

    torch.testing.assert_close(v, last_mean(pos) - last_mean(neg), atol=1e-5, rtol=1e-5)
    g = torch.Generator().manual_seed(0)
    vectors = {1: torch.randn(llama.hidden_size, generator=g), 0: torch.randn(llama.hidden_size, generator=g)}
    logits = steer_all(llama, "The cat sat", vectors, factor=3.0)
    handles = [
        layers[i].register_forward_hook(
            lambda _m, _a, out, i=i: (_first(out) + 3.0 * vectors[i], *out[1:]) if isinstance(out, tuple)
            else out + 3.0 * vectors[i]
        )
        for i in vectors
    ]  # fmt: skip
    try:
        with torch.no_grad():
            expected = hf(input_ids=_ids(llama, "The cat sat")).logits
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(llama):
    def metric(logits):
        return logits[:, -1, 5]

    with pytest.raises(ValueError, match="same length.*clean .* has \\d+ tokens, corrupted .* has \\d+"):
        activation_patching(llama, CLEAN, "The cat", metric)
    with pytest.raises(ValueError, match="same length"):
        attribution_patching(llama, CLEAN, "The cat", metric)
    with pytest.raises(IndexError, match="position 99 out of range"):
        activation_patching(llama, CLEAN, CORRUPTED, metric, positions=[0, 99])
    with pytest.raises(IndexError, match="layer 7 out of range"):
        activation_patching(llama, CLEAN, CORRUPTED, metric, layers=[7])
    with pytest.raises(ValueError, match="component must be one of"):
        activation_patching(llama, CLEAN, CORRUPTED, metric, component="embed")
    with pytest.raises(ValueError, match="metric must map logits"):
        activation_patching(llama, CLEAN, CORRUPTED, lambda logits: logits[:, -1], layers=[0], positions=[0])
    with pytest.raises(IndexError, match="index_to_patch=40 is out of range"):
        patchscope_lens(llama, [CLEAN], TargetPrompt("The cat", 40), layers=[0])
    with pytest.raises(ValueError, match="3 target prompts for 2 sources"):
        patchscope_lens(llama, [CLEAN, "Hi"], [repeat_prompt()] * 3, layers=[0])
    with pytest.raises(ValueError, match="one token"):
        direct_logit_attribution(llama, CLEAN, " Paris is")


# ------------------------------------------------------------------------------------------------
# steering positions and vectors (issue 27): refused per row, never clamped or steered at padding
# ------------------------------------------------------------------------------------------------

RAGGED = ["The capital of France is", "Hi"]  # 5 and 2 tokens


def _padded(side: str) -> StandardizedTransformer:
    hf, tok = tiny_model("llama", seed=0)
    return StandardizedTransformer(hf, tokenizer=tok, check=False, tokenizer_kwargs={"padding_side": side})


def _steered_cells(model, prompts, **steer) -> list[list[int]]:
    """Per row: the columns where model.steer changed layers_output[1] (a plain trace beside it)."""
    vector = torch.randn(model.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), model.trace(prompts):
        model.steer(layers=1, steering_vector=vector, factor=5.0, **steer)
        steered = model.layers_output[1].save()
    with torch.no_grad(), model.trace(prompts):
        plain = model.layers_output[1].save()
    delta = (steered - plain).norm(dim=-1)
    return [(row > 1e-4).nonzero().flatten().tolist() for row in delta]


@pytest.mark.parametrize("side", ["left", "right"])
def test_steer_positions_beyond_a_rows_start_or_end_are_refused_per_row(side):
    model = _padded(side)
    short_first = 3 if side == "left" else 0  # the first column of "Hi" in the padded batch
    for positions in (-3, 0 if side == "left" else 4, [short_first, 1 if side == "left" else 2]):
        with pytest.raises(SteeringPositionError, match=r"is not a token of row 1, which has 2 tokens \(columns "
                           rf"{short_first}\.\.{short_first + 1} of 5, {side}-padded") as err:
            with model.trace(RAGGED):
                model.steer(layers=1, steering_vector=torch.ones(model.hidden_size), positions=positions)
        assert isinstance(err.value, ValueError) and isinstance(err.value, IndexError)  # IndexError: as before
        assert "\n" not in str(err.value)
    for positions in (-99, 5):  # beyond every row: the first row is named
        with pytest.raises(SteeringPositionError, match=rf"position {positions} is not a token of row 0, which has 5 "
                           r"tokens \(positions -5\.\.4\)"):
            with model.trace(RAGGED):
                model.steer(layers=1, steering_vector=torch.ones(model.hidden_size), positions=positions)
    # correct use: the same token of each row, counted from its last real token; columns every row has
    assert _steered_cells(model, RAGGED, positions=-2) == [[3], [short_first]]
    assert _steered_cells(model, RAGGED, positions=-6 + 5, batch_index=0) == [[4], []]
    assert _steered_cells(model, RAGGED, positions=-5, batch_index=[0]) == [[0], []]  # row 1 not steered: fine
    assert _steered_cells(model, RAGGED, positions=short_first + 1) == [[short_first + 1], [short_first + 1]]
    assert _steered_cells(model, RAGGED, positions=slice(3, 5) if side == "left" else slice(0, 2)) == [
        [3, 4] if side == "left" else [0, 1], [3, 4] if side == "left" else [0, 1]]
    # a list of rows pairs up with a list of positions, as plain indexing does (unchanged)
    assert _steered_cells(model, RAGGED, positions=[0, short_first], batch_index=[0, 1]) == [[0], [short_first]]
    with pytest.raises(SteeringPositionError, match=r"slice 0:2 selects no token of row 1" if side == "left"
                       else r"slice 3:5 selects no token of row 1"):
        with model.trace(RAGGED):
            model.steer(layers=1, steering_vector=torch.ones(model.hidden_size),
                        positions=slice(0, 2) if side == "left" else slice(3, 5))


def test_steer_positions_out_of_range_alone_are_refused():
    """The prompt alone: -99 / 5 raised a raw IndexError; now a SteeringPositionError naming the row's length."""
    model = _padded("left")
    for positions in (-99, 5, [0, 7]):
        with pytest.raises(SteeringPositionError, match=r"position (-99|5|7) is not a token of row 0, which has 2 "
                           r"tokens \(positions -2\.\.1\)"):
            with model.trace("Hi"):
                model.steer(layers=0, steering_vector=torch.ones(model.hidden_size), positions=positions)
    with pytest.raises(SteeringPositionError, match=r"batch_index 2 is out of range: this forward has 2 rows"):
        with model.trace(RAGGED):
            model.steer(layers=0, steering_vector=torch.ones(model.hidden_size), batch_index=2)
    assert _steered_cells(model, "Hi", positions=-2) == [[0]]
    assert _steered_cells(model, "Hi", positions=[0, 1]) == [[0, 1]]


def _forwards(model) -> list[int]:
    """A counter of forwards of the model's HF module (a plain torch hook)."""
    calls = [0]
    model.module_accessor.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("side", ["left", "right"])
def test_steer_all_checks_positions_before_the_forward(side):
    model = _padded(side)
    calls = _forwards(model)
    v = torch.ones(model.hidden_size)
    with pytest.raises(SteeringPositionError, match=r"steer_all: position 99 is not a token of row 0"):
        steer_all(model, RAGGED, {0: v}, positions=99)
    with pytest.raises(SteeringPositionError, match=r"steer_all: position -3 is not a token of row 1, which has 2"):
        steer_all(model, RAGGED, {0: v}, positions=-3)
    with pytest.raises(SteeringPositionError, match=r"steer_all: batch_rows 5 is out of range"):
        steer_all(model, RAGGED, {0: v}, batch_rows=5)
    assert calls[0] == 0  # refused before any forward
    steered = steer_all(model, RAGGED, {0: v}, positions=-1)  # each row's last real token
    assert calls[0] == 1 and steered.shape[:2] == (2, 5)


def test_nonfinite_steering_vectors_are_refused_with_their_location(llama):
    calls = _forwards(llama)
    v = torch.ones(llama.hidden_size)
    bad = v.clone()
    bad[[5, 9]] = torch.tensor([float("inf"), float("nan")])
    with pytest.raises(NonFiniteSteeringError, match=r"steer_all: vectors\[1\]: the steering vector has 2 NaN / inf "
                       r"values \(of 64\), the first inf at index 5.*allow_nonfinite=True"):
        steer_all(llama, CLEAN, {0: v, 1: bad})
    with pytest.raises(NonFiniteSteeringError, match=r"steer_all: vectors\[0\]: factor is nan"):
        steer_all(llama, CLEAN, {0: v}, factor=float("nan"))
    assert calls[0] == 0
    with pytest.raises(NonFiniteSteeringError, match=r"steer: the steering vector has 2 NaN"):
        with llama.trace(CLEAN):
            llama.steer(layers=1, steering_vector=bad)
    # deliberate: allowed, and the values are really added
    logits = steer_all(llama, CLEAN, {1: bad}, allow_nonfinite=True)
    assert not torch.isfinite(logits).all()
    assert torch.isfinite(steer_all(llama, CLEAN, {1: v})).all()


def test_steer_in_a_generation_step_counts_this_steps_positions(llama):
    """Inside model.generate, a cached step computes one position: -1 steers it in every row, -2 is refused (a raw
    IndexError before) with a message saying why."""
    v = torch.ones(llama.hidden_size)
    with torch.no_grad(), llama.generate(max_new_tokens=3, min_new_tokens=3) as tracer:
        with tracer.invoke(RAGGED):
            for _ in tracer.iter[:3]:
                llama.steer(layers=0, steering_vector=v, positions=-1)
        with tracer.invoke():
            tokens = tracer.result.save()
    assert tokens.shape == (2, 8)
    with pytest.raises(SteeringPositionError, match=r"position -2 is not a token of row 0, which has 1 token .*this "
                       r"generation step computes 1 of the 6 positions"):
        with torch.no_grad(), llama.generate(max_new_tokens=3) as tracer:
            with tracer.invoke(RAGGED):
                for _ in tracer.iter[:3]:
                    llama.steer(layers=0, steering_vector=v, positions=-2)
