"""Tests for unilens.patching: the fast paths of activation patching (resumed from the corrupted cache, rows
joining the batch at their layer, logits at the metric's positions only) against the plain computation, on every
zoo architecture, and the run-time checks that guard them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from unilens import StandardizedTransformer
from unilens.analysis.patching import activation_patching
from unilens.testing import ZOO_REQUIRED, tiny_model

CLEAN, CORRUPTED = "The capital of France is Paris and", "The capital of Italy is Rome and"
# two prompt pairs of equal length (the tiny tokenizers split these into the same number of tokens)
CLEANS = [CLEAN, "The capital of Germany is Berlin and"]
CORRUPTEDS = [CORRUPTED, "The capital of France is Paris and"]


def _plain(model, metric, clean=CLEAN, corrupted=CORRUPTED, **kwargs) -> torch.Tensor:
    """The reference: every patched run from the input, over the whole sequence and every layer."""
    return activation_patching(model, clean, corrupted, metric, progress=False, reuse_prefix=False, stagger=False,
                               **kwargs)  # fmt: skip


def _per_pair(metrics) -> callable:
    """A metric for a list of pairs that reads pair i's own token: it must get the pairs' rows in pair order."""
    return lambda logits: torch.stack([metrics[i](logits[i : i + 1])[0] for i in range(len(metrics))])


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_fast_paths_equal_plain_runs_on_every_zoo_model(model_type):
    """Resumed + staggered patching of two prompt pairs at once equals plain runs of each pair alone, for every
    component, without a fallback warning (a fallback would be correct but slow: it must not happen here)."""
    model = StandardizedTransformer(*tiny_model(model_type, seed=0))
    # per pair: reads two positions, one before most patched positions; and the last position only
    metrics = [lambda lg: lg[:, -1, 5] - lg[:, 2, 7], lambda lg: lg[:, -1, 9] - lg[:, 2, 7]]
    lasts = [lambda lg: lg[:, -1, 5], lambda lg: lg[:, -1, 9]]

    for component in ("resid", "attn", "mlp", "head"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="activation_patching")
            fast = activation_patching(model, CLEANS, CORRUPTEDS, _per_pair(metrics), component=component,
                                       progress=False)  # fmt: skip
            fast_last = activation_patching(model, CLEANS, CORRUPTEDS, _per_pair(lasts), component=component,
                                            progress=False, metric_positions=-1)  # fmt: skip
        for i, (clean, corrupted) in enumerate(zip(CLEANS, CORRUPTEDS)):
            expected = _plain(model, metrics[i], clean, corrupted, component=component)
            torch.testing.assert_close(fast[i], expected, atol=1e-5, rtol=0, msg=lambda m: f"{component}: {m}")
            torch.testing.assert_close(fast_last[i], _plain(model, lasts[i], clean, corrupted, component=component),
                                       atol=1e-5, rtol=0, msg=lambda m: f"{component}, metric_positions=-1: {m}")
            assert expected.std() > 0, f"{component}: constant patching effect, the comparison proves nothing"


@pytest.fixture(scope="module")
def llama():
    hf, tok = tiny_model("llama", seed=0)
    return StandardizedTransformer(hf, tokenizer=tok)


def _tid(model, text: str) -> int:
    return model.tokenizer(text, add_special_tokens=False).input_ids[0]


def test_rows_join_the_batch_at_their_layer(llama):
    """Staggering is real: within one patched forward, deeper layers see more rows than shallower ones, and a
    resid sweep runs layer 0 on patched rows once only (the check's plain run), never in the sweep itself."""
    seen: list[tuple[int, int]] = []  # (layer, rows) per call, in call order
    blocks = llama.module_accessor.get_layers()
    handles = [blk.register_forward_hook(lambda _m, args, _o, i=i: seen.append((i, args[0].shape[0])))
               for i, blk in enumerate(blocks)]  # fmt: skip
    paris = _tid(llama, " Paris")
    try:
        activation_patching(llama, CLEAN, CORRUPTED, lambda lg: lg[:, -1, paris], progress=False)
    finally:
        for handle in handles:
            handle.remove()
    forwards, current = [], []
    for layer, rows in seen:  # split the calls into forwards: a new one starts at a layer not above the last
        if current and layer <= current[-1][0]:
            forwards.append(current)
            current = []
        current.append((layer, rows))
    forwards.append(current)
    grown = [f for f in forwards if f[-1][1] > f[0][1]]
    assert grown, f"no forward grew its batch: {forwards}"
    assert sum(rows > 1 for f in forwards for layer, rows in f if layer == 0) == 1, forwards


def test_a_staggered_run_that_disagrees_with_plain_rows_is_caught(llama, monkeypatch):
    """The run-time check: rows that join wrong (here: an offset added to every joining row) make the check
    fail, with a warning, and the sweep computes every row plainly, so the result is still right."""
    from unilens.analysis import sweep as patching

    paris = _tid(llama, " Paris")

    def metric(logits):
        return logits[:, -1, paris]

    expected = _plain(llama, metric)
    joining = patching.ChunkRunner._joining_rows
    monkeypatch.setattr(patching.ChunkRunner, "_joining_rows", lambda self, *a: joining(self, *a) + 0.5)
    with pytest.warns(UserWarning, match="rows joining the batch at their patched layer does not reproduce"):
        got = activation_patching(llama, CLEAN, CORRUPTED, metric, progress=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_model_that_cannot_grow_its_batch_falls_back(llama, monkeypatch):
    """A model whose code refuses a batch that grows (here: each layer's cache gets one row more than the
    layer's batch) raises inside the check: warning, plain rows, right result."""
    from unilens.analysis import sweep as patching

    paris = _tid(llama, " Paris")
    expected = _plain(llama, lambda lg: lg[:, -1, paris])
    cache_kwargs = patching.CorruptedRun.cache_kwargs
    monkeypatch.setattr(patching.CorruptedRun, "cache_kwargs",
                        lambda self, start, pairs: cache_kwargs(self, start, pairs if isinstance(pairs[0], int)
                                                                else [[*p, p[0]] for p in pairs]))
    with pytest.warns(UserWarning, match="rows joining the batch at their patched layer fails"):
        got = activation_patching(llama, CLEAN, CORRUPTED, lambda lg: lg[:, -1, paris], progress=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_metric_positions(llama):
    """The metric gets exactly the listed positions' logits, in order; the values equal the full computation."""
    paris, rome = _tid(llama, " Paris"), _tid(llama, " Rome")
    seq = len(llama.tokenizer(CLEAN).input_ids)
    shapes = []

    def two(logits):
        shapes.append(tuple(logits.shape[1:]))
        return logits[:, 0, paris] - logits[:, 1, rome]  # position 3, then the last

    got = activation_patching(llama, CLEAN, CORRUPTED, two, metric_positions=[3, -1], progress=False)
    expected = _plain(llama, lambda lg: lg[:, 3, paris] - lg[:, -1, rome])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert set(shapes) == {(2, llama.vocab_size)}
    # a metric written for full logits that reads the last position works unchanged
    full = _plain(llama, lambda lg: lg[:, -1, paris])
    last = activation_patching(llama, CLEAN, CORRUPTED, lambda lg: lg[:, -1, paris], metric_positions=seq - 1,
                               progress=False)  # fmt: skip
    torch.testing.assert_close(last, full, atol=1e-5, rtol=0)
    with pytest.raises(IndexError, match="metric position 99 out of range"):
        activation_patching(llama, CLEAN, CORRUPTED, lambda lg: lg[:, -1, 0], metric_positions=99)


def test_lists_of_pairs_call_the_metric_per_cell_in_pair_order(llama):
    """With lists, the metric sees one cell's runs of every pair, in pair order (a metric indexing by pair, as on
    a batched forward of the corrupted prompts, works), also for a list of one pair; a string pair keeps the
    plain (rows, ...) form and result shape."""
    seen = []
    targets = torch.tensor([_tid(llama, " Paris"), _tid(llama, " Rome")])

    def by_pair(logits):
        seen.append(logits.shape[0])
        return logits[torch.arange(len(targets)), -1, targets]

    both = activation_patching(llama, CLEANS, CORRUPTEDS, by_pair, progress=False)
    assert set(seen) == {2} and both.shape == (2, llama.num_layers, 7)
    one = activation_patching(llama, CLEANS[:1], CORRUPTEDS[:1], lambda lg: lg[torch.arange(1), -1, targets[:1]],
                              progress=False)  # fmt: skip
    single = activation_patching(llama, CLEAN, CORRUPTED, lambda lg: lg[:, -1, targets[0]], progress=False)
    assert one.shape == (1, *single.shape)
    torch.testing.assert_close(one[0], single, atol=1e-5, rtol=0)
    torch.testing.assert_close(both[0], single, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="as many prompts"):
        activation_patching(llama, CLEANS, CORRUPTEDS[:1], by_pair)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_subsets_chunks_and_half_precision(dtype):
    """Layer / position subsets, tiny chunks, heads patched at some positions only (runs resume there), and the
    metric on one position, for two pairs, equal plain runs; in bfloat16 too, without a fallback warning.
    bfloat16 keeps 8 bits of mantissa (relative step 2**-8 = 3.9e-3): differently shaped kernels round apart
    by a few such steps on these O(0.1) metrics, hence 1e-2 there and 1e-5 in float32."""
    hf, tok = tiny_model("llama", seed=0, num_hidden_layers=4)
    model = StandardizedTransformer(hf.to(dtype), tokenizer=tok)

    def metric(logits):
        return logits[torch.arange(2), -1, torch.tensor([5, 9])]

    atol = 1e-5 if dtype == torch.float32 else 1e-2
    for component, kwargs in [
        ("resid", dict(layers=[1, 3], positions=[-1, 2], batch_size=1)),
        ("resid", dict(batch_size=3)),
        ("head", dict(positions=[3, 4])),
        ("attn", dict(positions=[0, 5], metric_positions=[-1])),
    ]:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="activation_patching")
            fast = activation_patching(model, CLEANS, CORRUPTEDS, metric, component=component, progress=False,
                                       **kwargs)  # fmt: skip
        plain = _plain(model, metric, CLEANS, CORRUPTEDS, component=component, **kwargs)
        torch.testing.assert_close(fast, plain, atol=atol, rtol=0, msg=lambda m: f"{component} {kwargs}: {m}")
        if dtype == torch.float32:
            assert plain.std() > 10 * atol, f"{component}: effects too small for the comparison to mean anything"


def test_cache_keyword_read_from_the_signature():
    """transformers 5.24 takes the key/value cache as `cache=` (`past_key_values=` warns); older releases only know
    `past_key_values=`: decided from the forward's signature, never from a version string."""
    from unilens.analysis.sweep import cache_keyword, output_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, **kwargs): ...

    assert cache_keyword(Old()) == "past_key_values" and cache_keyword(New()) == "cache"
    hf, _ = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither passing nor reading the cache may warn
        with torch.no_grad():
            out = hf(ids, use_cache=True)
        assert output_cache(out) is not None
        with torch.no_grad():
            hf(torch.tensor([[8]]), use_cache=True, **{cache_keyword(hf): output_cache(out)})


def test_arguments_checked_before_any_forward(llama):
    """A wrong batch_size / metric / layer list is one line before the clean run (it failed after it, or raw);
    the same call with right values (a numpy integer batch size included) gives the plain result."""
    calls = [0]
    handle = llama.module_accessor.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    paris = _tid(llama, " Paris")

    def metric(logits):
        return logits[:, -1, paris]

    try:
        for kwargs, error, pattern in [
            (dict(batch_size="4"), TypeError, r"^batch_size must be an int >= 1, got str '4'; e.g. batch_size=4\.$"),
            (dict(batch_size=2.5), TypeError, r"^batch_size must be an int >= 1, got float 2.5\.$"),
            (dict(batch_size=0), ValueError, r"^batch_size must be an int >= 1, got 0\.$"),
            (dict(layers=[]), ValueError, r"^layers is empty"),
            (dict(layers=[True]), TypeError, r"^layer must be an int, got bool True\.$"),
            (dict(positions=["-1"]), TypeError, r"^position must be an int, got str '-1'\.$"),
        ]:
            with pytest.raises(error, match=pattern):
                activation_patching(llama, CLEANS, CORRUPTEDS, metric, progress=False, **kwargs)
        with pytest.raises(TypeError, match=r"^metric must be a function"):
            activation_patching(llama, CLEANS, CORRUPTEDS, "logit diff", progress=False)
        assert calls[0] == 0
    finally:
        handle.remove()
    got = activation_patching(llama, CLEAN, CORRUPTED, metric, batch_size=np.int64(3), layers=[np.int64(1)],
                              progress=False)
    torch.testing.assert_close(got, _plain(llama, metric, layers=[1]), atol=1e-5, rtol=0)
