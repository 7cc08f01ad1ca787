"""unilens.sae: shuffled multi-name batches over an activation store, and the Hugging Face `datasets` export.

Oracles: every row handed out is looked up by its (text_index, position) in the store read back row by row, and
layers_output rows are also checked against HF's own ``output_hidden_states`` for that text run alone; the export is
read back with ``datasets.load_from_disk`` (not with unilens).
"""

from __future__ import annotations

import sys

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.scale.sae import (
    ActivationBatches,
    export_to_datasets,
    transformer_lens_hook_name,
)
from unilens.scale.store import cache_activations
from unilens.testing import tiny_model

TEXTS = [
    "The cat sat on the mat and looked at the door",
    "Hello there",
    "One two three four five six seven",
    "A",
    "Colorless green ideas sleep furiously tonight",
    "The capital of France is Paris",
    "x y z",
    "She sells sea shells by the sea shore",
]
NAMES = ["layers_output.0", "layers_output.1", "attention_heads.1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf, tok = tiny_model("llama")
    model = StandardizedTransformer(hf, tokenizer=tok)
    out = tmp_path_factory.mktemp("sae") / "store"
    store = cache_activations(model, TEXTS, ["layers_output.*", "attention_heads.1"], out, batch_size=3,
                              shard_tokens=9, progress=False)
    assert len(store.shards) >= 5  # several shards: the shard split and the shuffle have something to do
    return model, hf, tok, store


def _rows_by_token(store) -> dict[tuple[int, int], int]:
    keys = zip(store["text_index"].tolist(), store["position"].tolist())
    return {key: r for r, key in enumerate(keys)}


def _hf_hidden(hf, tok, text_index: int) -> tuple[torch.Tensor, ...]:
    ids = tok(TEXTS[text_index], return_tensors="pt").input_ids
    with torch.no_grad():
        return hf(ids, output_hidden_states=True).hidden_states  # per layer (1, seq, hidden)


def _check_pass(batches, store, names, batch_size, drop_last=False) -> list[tuple[int, int]]:
    """Every row once (unless drop_last), each equal to the store's row of the same token; returns token order."""
    index = _rows_by_token(store)
    flat = {name: store[name] for name in names}
    order = []
    for b, batch in enumerate(batches):
        n = len(batch["position"])
        assert set(batch) == {*names, "token_ids", "text_index", "position"}
        assert all(len(t) == n for t in batch.values())
        if b < len(batches) - 1 or drop_last:
            assert n == batch_size
        keys = list(zip(batch["text_index"].tolist(), batch["position"].tolist()))
        rows = torch.tensor([index[k] for k in keys])
        for name in names:
            assert torch.equal(batch[name], flat[name][rows]), name
        assert torch.equal(batch["token_ids"], store["token_ids"][rows])
        order += keys
    assert len(set(order)) == len(order)
    if not drop_last:
        assert len(order) == len(store)
    return order


def test_stream_every_row_once_with_values_and_fixed_seed(setup):
    model, hf, tok, store = setup
    stream = ActivationBatches(store, NAMES, batch_size=5, shuffle_buffer=8, seed=3)
    first = list(stream)
    order = _check_pass(first, store, NAMES, 5)
    assert [k for k in order] != sorted(order)  # shuffled
    texts_in_first = {int(t) for t in first[0]["text_index"]}
    assert len(texts_in_first) > 1  # the buffer mixes texts
    again = list(ActivationBatches(store, NAMES, batch_size=5, shuffle_buffer=8, seed=3))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in a) and len(first) == len(again)
    other = _check_pass(list(ActivationBatches(store, NAMES, batch_size=5, shuffle_buffer=8, seed=4)), store, NAMES, 5)
    assert other != order
    stream.set_epoch(1)
    assert _check_pass(list(stream), store, NAMES, 5) != order

    # independent oracle: HF's own hidden states for the text alone (hidden_states[1] = layer 0's output; the last
    # layer's HF state is already normed, so layer 0 is the one with an HF counterpart on this 2-layer model)
    batch = first[0]
    for j in range(len(batch["position"])):
        k, p = int(batch["text_index"][j]), int(batch["position"][j])
        hidden = _hf_hidden(hf, tok, k)
        torch.testing.assert_close(batch["layers_output.0"][j], hidden[1][0, p], rtol=1e-5, atol=1e-5)


def test_stream_unshuffled_is_store_order_and_drop_last(setup):
    _, _, _, store = setup
    batches = list(ActivationBatches(store, ["layers_output.1"], batch_size=4, shuffle=False))
    order = _check_pass(batches, store, ["layers_output.1"], 4)
    assert order == list(zip(store["text_index"].tolist(), store["position"].tolist()))
    dropped = list(ActivationBatches(store, ["layers_output.1"], batch_size=4, seed=0, drop_last=True))
    _check_pass(dropped, store, ["layers_output.1"], 4, drop_last=True)
    assert len(dropped) * 4 <= len(store) and all(len(b["position"]) == 4 for b in dropped)


def test_dataloader_workers_and_ranks_split_shards_deterministically(setup):
    _, _, _, store = setup
    stream = ActivationBatches(store, NAMES, batch_size=4, shuffle_buffer=6, seed=1)

    def run():
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        return list(loader)

    first = run()
    _check_pass_any_length(first, store)
    second = run()
    assert len(first) == len(second)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second) for k in a)

    seen = []
    for rank in range(2):
        part = list(ActivationBatches(store, NAMES, batch_size=4, shuffle_buffer=6, seed=1, rank=rank, world_size=2))
        seen.append({(int(t), int(p)) for b in part for t, p in zip(b["text_index"], b["position"])})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == len(store)


def _check_pass_any_length(batches, store):
    """Workers each end with a short batch: every row once, values equal the store's."""
    index = _rows_by_token(store)
    keys = [(int(t), int(p)) for b in batches for t, p in zip(b["text_index"], b["position"])]
    assert sorted(keys) == sorted(index) and len(set(keys)) == len(keys)
    flat = store["layers_output.0"]
    for b in batches:
        rows = torch.tensor([index[(int(t), int(p))] for t, p in zip(b["text_index"], b["position"])])
        assert torch.equal(b["layers_output.0"], flat[rows])


def test_stream_rejects_bad_arguments(setup):
    _, _, _, store = setup
    with pytest.raises(KeyError, match="not in this store"):
        ActivationBatches(store, ["mlps_output.0"])
    with pytest.raises(ValueError, match="batch_size"):
        ActivationBatches(store, NAMES, batch_size=0)
    with pytest.raises(ValueError, match="rank"):
        ActivationBatches(store, NAMES, rank=2, world_size=2)


def test_export_reads_back_with_datasets(setup, tmp_path):
    datasets = pytest.importorskip("datasets")  # in the lock: the suite always has it
    _, hf, tok, store = setup
    ctx = 6
    info = export_to_datasets(store, tmp_path / "hf", context_size=ctx, names=NAMES, column_names="transformer_lens",
                              metadata=True)
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    assert ds.num_rows == info["contexts"] == len(store) // ctx and info["dropped_tokens"] == len(store) % ctx
    assert ds.features["blocks.1.hook_resid_post"].shape == (ctx, model_hidden(store))
    assert ds.features["token_ids"].length == ctx
    got = ds.with_format("torch")[:]
    take = info["tokens"]
    for name in NAMES:
        column = transformer_lens_hook_name(name)
        want = store[name][:take].reshape(info["contexts"], ctx, -1)  # (contexts, context, d_in)
        assert got[column].dtype == torch.float32 and torch.equal(got[column], want), name
    assert torch.equal(got["token_ids"], store["token_ids"][:take].reshape(-1, ctx))
    assert torch.equal(got["text_index"], store["text_index"][:take].reshape(-1, ctx))
    assert torch.equal(got["position"], store["position"][:take].reshape(-1, ctx))
    # independent oracle: context 1, every token, against HF run on its own text
    for j in range(ctx):
        k, p = int(got["text_index"][1, j]), int(got["position"][1, j])
        torch.testing.assert_close(got["blocks.0.hook_resid_post"][1, j], _hf_hidden(hf, tok, k)[1][0, p],
                                   rtol=1e-5, atol=1e-5)
    print(f"export: {info['contexts']} contexts x {ctx} tokens, {info['bytes']} bytes on disk")


def test_export_half_precision_and_errors(setup, tmp_path):
    datasets = pytest.importorskip("datasets")
    _, _, _, store = setup
    info = export_to_datasets(store, tmp_path / "half", context_size=4, names=["layers_output.1"],
                              column_names={"layers_output.1": "resid"}, dtype="float16")
    ds = datasets.load_from_disk(str(tmp_path / "half"))
    assert ds.features["resid"].dtype == "float16"
    # datasets' numpy / torch formats upcast float16 to float32: read the Arrow storage (list<list<halffloat>>)
    storage = ds.data.column("resid").combine_chunks().storage
    d_in = ds.features["resid"].shape[1]
    got = torch.from_numpy(storage.flatten().flatten().to_numpy().copy()).reshape(-1, 4, d_in)
    want = store["layers_output.1"][: info["tokens"]].to(torch.float16).reshape(-1, 4, d_in)
    assert got.dtype == torch.float16 and torch.equal(got, want)
    with pytest.raises(FileExistsError, match="not empty"):
        export_to_datasets(store, tmp_path / "half", context_size=4)
    with pytest.raises(ValueError, match="no column"):
        export_to_datasets(store, tmp_path / "x", context_size=4, names=["attention_heads.1"],
                           column_names={"layers_output.1": "a"})
    with pytest.raises(ValueError, match="context_size"):
        export_to_datasets(store, tmp_path / "y", context_size=0)
    with pytest.raises(ValueError, match="fewer than one context"):
        export_to_datasets(store, tmp_path / "y", context_size=len(store) + 1)


def test_export_without_datasets_names_the_extra(setup, tmp_path, monkeypatch):
    _, _, _, store = setup
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'unilens\[sae\]'"):
        export_to_datasets(store, tmp_path / "z", context_size=4)


def model_hidden(store) -> int:
    return store.manifest["model"]["hidden_size"]
