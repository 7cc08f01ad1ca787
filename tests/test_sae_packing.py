"""SAELens-style packed caching (``cache_activations(..., context_size=n)``) and the early stop of every read.

Oracles: the packing is checked against an independent token-by-token statement of SAELens's rules (written here,
not derived from unilens's code) on random token streams that hit every edge (texts that start with BOS or the
separator, a separator landing in a context's last slot, texts longer than several contexts, empty texts); the
stored activations against HF's own ``output_hidden_states`` of each packed context run alone; the early stop
against the same read with the stop disabled (bitwise), and by counting the modules that ran.
"""

from __future__ import annotations

import random

import datasets
import pytest
import torch

from unilens import StandardizedTransformer
from unilens.hooks.reads import forward_order
from unilens.scale import capture
from unilens.scale.plan import _pack
from unilens.scale.sae import export_to_datasets
from unilens.scale.store import CacheError, cache_activations
from unilens.testing import tiny_model

TEXTS = [
    "The cat sat on the mat and looked at the door",
    "Hello there",
    "One two three four five six seven",
    "A",
    "",
    "Colorless green ideas sleep furiously tonight",
    "The capital of France is Paris",
    "x y z",
    "She sells sea shells by the sea shore",
] * 2


class _ListTokenizer:
    """A tokenizer whose texts are token lists written as strings (``"5 1 7"``), with special ids of our choosing."""

    def __init__(self, bos: int | None, eos: int | None = None):
        self.bos_token_id, self.eos_token_id, self.sep_token_id = bos, eos, None

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False  # SAELens tokenizes texts without special tokens
        return {"input_ids": [[int(t) for t in text.split()] for text in texts]}


def _reference(texts: list[list[int]], size: int, bos: int | None, sep: int | None) -> tuple[list[list[int]], int]:
    """SAELens's packing, one token at a time: a context that opens gets BOS first unless the token is BOS; a text
    whose first token joins an open context is preceded by the separator unless it is the separator (and a separator
    that fills the context leaves the token to open the next one); full contexts are emitted, the last unfilled one
    dropped. Returns (contexts, text tokens dropped)."""
    contexts: list[list[int]] = []
    current: list[int] = []
    current_text = 0  # text tokens in `current`

    def push(token: int, text: bool) -> None:
        nonlocal current_text
        current.append(token)
        current_text += text
        if len(current) == size:
            contexts.append(current.copy())
            current.clear()
            current_text = 0

    for tokens in texts:
        for i, token in enumerate(tokens):
            if i == 0 and current and sep is not None and token != sep:
                push(sep, False)
            if not current and bos is not None and token != bos:
                push(bos, False)
            push(token, True)
    return contexts, current_text


def test_packing_matches_saelens_rules_on_random_streams():
    rng = random.Random(0)
    cases = 0
    for _ in range(400):
        bos = rng.choice([1, None])
        sep_choice = rng.choice(["bos", "eos", 9, None])
        tok = _ListTokenizer(bos=bos, eos=2)
        sep = {"bos": bos, "eos": 2, 9: 9, None: None}[sep_choice]
        size = rng.randint(2, 9)
        # tokens 1, 2 and 9 are BOS / EOS / a separator id: texts start with them (and hold them) often
        texts = [[rng.choice([1, 2, 9, 3, 4, 5, 6]) for _ in range(rng.choice([0, 1, 2, 3, 7, 20]))]
                 for _ in range(rng.randint(1, 12))]  # fmt: skip
        expected, dropped = _reference([t for t in texts if t], size, bos, sep)
        strings = [" ".join(map(str, t)) for t in texts]
        if not expected:
            continue
        for prepend in (True, False):
            if not prepend:
                expected_np, dropped_np = _reference([t for t in texts if t], size, None, sep)
            else:
                expected_np, dropped_np = expected, dropped
            if not expected_np:
                continue
            tokens = _pack(tok, strings, size, prepend_bos=prepend, separator=sep_choice, chunk=5)
            got = [tokens.of(k).tolist() for k in range(len(tokens.text_index))]
            assert got == expected_np, (texts, size, bos, sep, prepend)
            assert tokens.packing["dropped_tokens"] == dropped_np
            assert tokens.skipped == [j for j, t in enumerate(texts) if not t]
            cases += 1
    assert cases > 300


def test_pack_exclude_sinks_marks_first_and_inserted_tokens():
    tok = _ListTokenizer(bos=1)
    # contexts of 4, BOS and separator 1: "5 6" opens [1 5 6 .], "7" needs a separator, which takes the last slot:
    # [1 5 6 1]; "7" opens [1 7 . .]; "1 8 3" starts with the separator (none added): [1 7 1 8]; "3" runs on into
    # [1 3 . .], never filled: dropped
    tokens = _pack(tok, ["5 6", "7", "1 8 3"], 4, exclude_sinks=True)
    assert [tokens.of(k).tolist() for k in range(len(tokens.text_index))] == [[1, 5, 6, 1], [1, 7, 1, 8]]
    assert tokens.packing["dropped_tokens"] == 1
    # sinks: position 0 of each context and the inserted separator; the text's own 1 (context 1, position 2) stays
    assert tokens.keep.tolist() == [False, True, True, False, False, True, True, True]
    ids, position = tokens.kept_positions(0, 2)
    assert ids.tolist() == [5, 6, 7, 1, 8] and position.tolist() == [1, 2, 1, 2, 3]
    assert tokens.row_offsets.tolist() == [0, 2, 5]


@pytest.fixture(scope="module")
def llama():
    hf, tok = tiny_model("llama")
    return StandardizedTransformer(hf, tokenizer=tok), hf, tok


def test_packed_store_equals_each_context_run_alone(llama, tmp_path):
    model, hf, tok = llama
    with pytest.warns(UserWarning, match="empty text"):
        store = cache_activations(model, TEXTS, ["layers_output.0", "layers_output.1", "attention_probabilities.0"],
                                  tmp_path / "s", context_size=12, batch_size=3, shard_tokens=30, progress=False)
    packing = store.manifest["packing"]
    n = packing["num_contexts"]
    assert len(store) == n * 12 and len(store.shards) > 1 and store.manifest["args"]["padding"] == "none"
    ids = store["token_ids"].view(n, 12)
    expected, dropped = _reference([tok(t, add_special_tokens=False).input_ids for t in TEXTS if t], 12,
                                   tok.bos_token_id, tok.bos_token_id)  # fmt: skip
    assert ids.tolist() == expected and packing["dropped_tokens"] == dropped
    assert store["text_index"].tolist() == [c for c in range(n) for _ in range(12)]
    assert store["position"].tolist() == list(range(12)) * n
    outputs = {}  # the decoder layers' own outputs (HF's last hidden state is after the final norm)
    hooks = [hf.model.layers[i].register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
             for i in (0, 1)]  # fmt: skip
    try:
        with torch.no_grad():
            for c in range(n):
                hf(ids[c : c + 1])  # the context alone, as SAELens runs it: no mask, no padding
                for layer in (0, 1):
                    ours = store[f"layers_output.{layer}"][c * 12 : (c + 1) * 12]
                    torch.testing.assert_close(ours, outputs[layer][0], rtol=1e-5, atol=1e-5)  # batched vs alone
    finally:
        for hook in hooks:
            hook.remove()
    probs = store["attention_probabilities.0"].view(n, 12, -1, 12).transpose(1, 2)  # (context, heads, query, key)
    assert torch.allclose(probs.sum(-1), torch.ones(())) and probs.triu(1).abs().max() == 0  # causal, in-context


def test_exclude_sinks_drops_first_and_separator_rows_only(llama, tmp_path):
    model, _, tok = llama
    texts = [t for t in TEXTS if t]
    full = cache_activations(model, texts, ["layers_output.1"], tmp_path / "full", context_size=10, progress=False)
    lean = cache_activations(model, texts, ["layers_output.1"], tmp_path / "lean", context_size=10,
                             exclude_sinks=True, progress=False)  # fmt: skip
    bos = tok.bos_token_id
    # inserted tokens are BOS here (prepend and separator); no text holds BOS: the sinks are exactly the BOS rows
    sinks = (full["position"] == 0) | (full["token_ids"] == bos)
    assert int(sinks.sum()) > full.manifest["packing"]["num_contexts"]  # separators too, not only position 0
    for key in ("layers_output.1", "token_ids", "text_index", "position"):
        assert torch.equal(lean[key], full[key][~sinks]), key
    assert lean.manifest["packing"]["exclude_sinks"] is True


def test_packed_export_is_one_context_per_row_with_hf_names(llama, tmp_path):
    model, _, _ = llama
    store = cache_activations(model, [t for t in TEXTS if t], ["layers_output.1", "mlps_output.0", "layers_input.1"],
                              tmp_path / "s", context_size=8, progress=False)  # fmt: skip
    assert store.manifest["hf_modules"] == {"mlps_output.0": "model.layers.0.mlp", "layers_output.1": "model.layers.1"}
    info = export_to_datasets(store, tmp_path / "hf", names=["layers_output.1", "mlps_output.0"], column_names="hf")
    assert info["dropped_tokens"] == 0 and info["contexts"] == store.manifest["packing"]["num_contexts"]
    ds = datasets.load_from_disk(str(tmp_path / "hf")).with_format("torch")
    assert set(ds.column_names) == {"model.layers.1", "model.layers.0.mlp", "token_ids"}
    for c in (0, info["contexts"] - 1):
        assert torch.equal(ds[c]["model.layers.1"], store["layers_output.1"][c * 8 : (c + 1) * 8])
        assert ds[c]["token_ids"].tolist() == store["token_ids"][c * 8 : (c + 1) * 8].tolist()
    with pytest.raises(ValueError, match="not the output of one HF module"):
        export_to_datasets(store, tmp_path / "hf2", names=["layers_input.1"], column_names="hf")


def test_packing_arguments_are_checked(llama, tmp_path):
    model, _, _ = llama
    with pytest.raises(CacheError, match="only apply to packed contexts"):
        cache_activations(model, TEXTS, "layers_output.0", tmp_path / "a", exclude_sinks=True, progress=False)
    with pytest.raises(CacheError, match="max_length and context_size"):
        cache_activations(model, TEXTS, "layers_output.0", tmp_path / "b", context_size=8, max_length=4,
                          progress=False)  # fmt: skip
    with pytest.raises(CacheError, match="fewer than one context"):
        cache_activations(model, ["Hello"], "layers_output.0", tmp_path / "c", context_size=64, progress=False)
    with pytest.raises(CacheError, match="separator must be"):
        cache_activations(model, TEXTS, "layers_output.0", tmp_path / "d", context_size=8, separator="pad",
                          progress=False)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Early stop: reads and caching stop after the deepest name, with the same values
# ----------------------------------------------------------------------------------------------------------------


def _count_calls(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]
    return calls, module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_read_stops_after_the_deepest_name_with_the_same_values(arch):
    model = StandardizedTransformer(*tiny_model(arch))
    hf = model.module_accessor.model
    head = hf.get_output_embeddings()
    last = model.layers[model.num_layers - 1]._module
    forward_order(model)  # recorded once per model, with a forward of its own: before the counting starts
    for names in (["layers_output.0"], ["attention_probabilities.0", "mlps_output.0"], ["layers_input.1"]):
        head_calls, h1 = _count_calls(head)
        last_calls, h2 = _count_calls(last)
        try:
            stopped = model.read("The cat sat on the mat", names)
        finally:
            h1.remove()
            h2.remove()
        assert head_calls == [0] and last_calls == [0], names
        full = model.read("The cat sat on the mat", [*names, "logits"])  # runs to the end: no stop
        for name in names:
            assert torch.equal(stopped[name], full[name]), (arch, name)


@pytest.mark.parametrize("names", [["layers_output.0"], ["layers_output.0", "attention_probabilities.0"],
                                   ["attention_probabilities.0"]])  # fmt: skip
def test_cache_stops_after_the_deepest_name_with_the_same_values(llama, tmp_path, monkeypatch, names):
    model, _, _ = llama
    last = model.layers[model.num_layers - 1]._module
    forward_order(model)
    calls, handle = _count_calls(last)
    try:
        stopped = cache_activations(model, TEXTS[:4], names, tmp_path / "a", batch_size=4, progress=False)
    finally:
        handle.remove()
    assert calls == [0]
    monkeypatch.setattr(capture, "_RUNS_TO_THE_END", ("logits", "next_token_probs", *{n.split(".")[0] for n in names}))
    calls, handle = _count_calls(last)
    try:
        full = cache_activations(model, TEXTS[:4], names, tmp_path / "b", batch_size=4, progress=False)
    finally:
        handle.remove()
    assert calls[0] > 0  # the reference ran the whole forward
    for name in names:
        assert torch.equal(stopped[name], full[name]), name
