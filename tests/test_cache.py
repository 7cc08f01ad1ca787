"""Tests for unilens.cache: values vs single-text traces, padding, resume after SIGKILL / disk full, bad inputs."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from unilens import StandardizedTransformer
from unilens.core.names import MODULE, names_of_kind
from unilens.scale import capture, plan, shard_file, store_format
from unilens.scale.store import (
    ActivationStore,
    CacheCorruptError,
    CacheDiskFullError,
    CacheError,
    cache_activations,
    main_cache,
    read_texts,
)
from unilens.testing import ZOO_REQUIRED, tiny_model

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "The capital of France is Paris.",
    "Hi",
    "The cat sat on the mat. The dog ran in the park. The bird sang in the tree.",
    "",  # empty: skipped with a warning, the others keep their index
    "One, two, three",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "Berlin",
]
_LAYER_ACCESSORS = names_of_kind(MODULE, per_layer=True)  # module inputs / outputs: read by torch hooks
NAMES = ["layers_output.*", "attentions_output.0", "mlps_input.1", "attention_probabilities.1", "logits"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])  # rotary and absolute (learned) positions
def model(request):
    hf, tok = tiny_model(request.param, seed=0)
    return StandardizedTransformer(hf, tokenizer=tok)


def _alone(model, text: str) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Oracle: one trace of `text` alone (no padding), read through the accessors directly."""
    ids = model.tokenizer(text)["input_ids"]
    batch = torch.tensor([ids])
    out: dict[str, torch.Tensor] = {}
    n = model.num_layers
    with torch.no_grad(), model.trace({"input_ids": batch, "attention_mask": torch.ones_like(batch)}):
        out["attentions_output.0"] = model.attentions_output[0].save()
        for i in range(n):
            if i == 1:
                out["attention_probabilities.1"] = model.attention_probabilities[1].save()
                out["mlps_input.1"] = model.mlps_input[1].save()
            out[f"layers_output.{i}"] = model.layers_output[i].save()
        out["logits"] = model.logits.save()
    rows = {k: v[0] for k, v in out.items()}
    rows["attention_probabilities.1"] = rows["attention_probabilities.1"].transpose(0, 1)  # (query, heads, key)
    return ids, rows


def _build(model, out_dir, batch_size, **kwargs):
    with pytest.warns(UserWarning, match=r"skipping 1 empty text\(s\) \(indices \[3\]\)"):
        return cache_activations(
            model, TEXTS, NAMES, out_dir, batch_size=batch_size, shard_tokens=12, progress=False, **kwargs
        )


def test_values_equal_single_text_traces(model, tmp_path):
    exact = _build(model, tmp_path / "b1", batch_size=1)  # each text alone: same shapes as the oracle
    batched = _build(model, tmp_path / "b3", batch_size=3)  # texts of different lengths padded together
    assert exact.names == batched.names and len(exact.manifest["shards"]) > 2
    key_length = exact.manifest["args"]["key_length"]
    expected_tokens = 0
    for index, text in enumerate(TEXTS):
        if not text:
            assert not bool((exact["text_index"] == index).any())
            continue
        ids, oracle = _alone(model, text)
        expected_tokens += len(ids)
        for store in (exact, batched):
            sel = store["text_index"] == index
            assert store["token_ids"][sel].tolist() == ids
            assert store["position"][sel].tolist() == list(range(len(ids)))
        for name, want in oracle.items():
            if name == "attention_probabilities.1":
                # layout (query, heads, key_length): the text's own keys, then exact zeros
                padded = torch.zeros(len(ids), want.shape[1], key_length)
                padded[..., : len(ids)] = want
                want = padded
            got_exact = exact[name][exact["text_index"] == index]
            got_batched = batched[name][batched["text_index"] == index]
            # batch_size=1 runs the very same computation as the oracle trace: bitwise equal in fp32
            assert torch.equal(got_exact, want), name
            # padded batches change matmul shapes, hence the summation order: rounding-level (~1e-7) differences
            torch.testing.assert_close(got_batched, want, atol=1e-5, rtol=0)
    # padding never reaches the store: one row per real token
    assert len(exact) == len(batched) == expected_tokens == exact.manifest["inputs"]["num_tokens"]
    assert exact.manifest["inputs"]["skipped_texts"] == [3]


@pytest.mark.parametrize("model_type", ZOO_REQUIRED)
def test_hook_reads_equal_the_accessors(model_type):
    """cache_activations reads module inputs / outputs with torch hooks (and, with nothing else to read, without a
    trace): on every architecture they are bitwise the tensors the accessors return in a trace, in a padded batch
    (OPT's flattened MLP tokens, Falcon's in-place MLP output, MoE blocks, parallel attention / MLP)."""
    hf, tok = tiny_model(model_type, seed=0)
    model = StandardizedTransformer(hf, tokenizer=tok, check=False)
    names = store_format._resolve_names(model, [f"{a}.*" for a in _LAYER_ACCESSORS])
    rows = [torch.arange(3, 12).numpy(), torch.arange(20, 25).numpy()]  # 9 and 5 tokens: right padding
    pad = plan._pad_id(model.tokenizer)
    for with_logits in (False, True):  # hook reads only (no trace) / hook reads inside the trace that reads logits
        wanted = names + ([store_format._Name("logits", None)] if with_logits else [])
        hooked, mask = capture._run_batch(model, wanted, rows, pad)
        traced, _ = capture._run_batch(model, wanted, rows, pad, hooks=False)
        consumed: dict[str, torch.Tensor] = {}  # values handed over during the forward, copied at once (as stored)
        rest, _ = capture._run_batch(model, wanted, rows, pad,
                                     consume=lambda k, v: consumed.__setitem__(k, v.clone()))
        assert set(hooked) == set(traced) == {n.key for n in wanted} == set(consumed) | set(rest)
        assert set(rest) == (set(traced) if with_logits else set())  # a trace runs: values come back after it
        real = mask.bool()
        for key, want in traced.items():
            for got in (hooked[key], consumed.get(key, rest.get(key))):
                assert got.shape == want.shape, key
                assert torch.equal(got[real], want[real]), key  # padded positions never reach a store


def test_dataset_rows_and_shards(tmp_path):
    hf, tok = tiny_model("llama", seed=1)
    model = StandardizedTransformer(hf, tokenizer=tok)
    store = cache_activations(
        model, TEXTS[:3], ["layers_output.0", "layers_output.1"], tmp_path, batch_size=2, shard_tokens=5, progress=False
    )
    full = store["layers_output.1"]
    ds = store.dataset(["layers_output.1"])
    assert len(ds) == full.shape[0] == sum(len(tok(t)["input_ids"]) for t in TEXTS[:3])
    for i in (0, 7, len(ds) - 1):
        row = ds[i]
        assert torch.equal(row["layers_output.1"], full[i])
        assert int(row["text_index"]) == int(store["text_index"][i])
    per_shard = torch.cat([s["layers_output.1"] for s in store.iter_shards(["layers_output.1"])])
    assert torch.equal(per_shard, full)
    with pytest.raises(KeyError, match="layers_output.5"):
        store["layers_output.5"]


def _store_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    hf, tok = tiny_model("llama", seed=2)
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    texts = tmp_path_factory.mktemp("texts") / "texts.txt"
    lines = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(40)]
    lines[10] = ""  # an empty line: an empty text, skipped with a warning
    texts.write_text("\n".join(lines) + "\n")
    return folder, texts


def _main(saved_model, out_dir):
    folder, texts = saved_model
    return main_cache(str(texts), ["layers_output.*", "mlps_output.1"], str(out_dir), str(folder), 3, 16,
                      shard_tokens=40, progress=False)  # fmt: skip


def test_sigkill_then_resume_is_byte_identical(saved_model, tmp_path):
    folder, texts = saved_model
    with pytest.warns(UserWarning, match="empty"):
        reference = _main(saved_model, tmp_path / "reference")
    assert reference.manifest["complete"] and reference.manifest["num_shards"] >= 5

    out = tmp_path / "killed"
    # slow the batches down so the kill lands mid-run; one torch thread, as this process (conftest): a store records
    # the thread count and refuses a resume under another (the last bits of a matmul depend on it)
    env = {**os.environ, "UNILENS_CACHE_TEST_DELAY": "0.3", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "unilens.scale.store", str(texts), str(out), "--names", "layers_output.*",
           "mlps_output.1", "--model", str(folder), "--batch-size", "3", "--max-length", "16", "--shard-tokens", "40",
           "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            manifest = out / "manifest.json"
            if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 1:
                break
            time.sleep(0.05)
        time.sleep(0.4)  # into the next shard's batches
        assert proc.poll() is None, f"the run ended before the kill: {proc.communicate()[1].decode()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and 1 <= len(partial["shards"]) < partial["num_shards"]
    with pytest.raises(CacheError, match="incomplete"):
        ActivationStore(out)

    with pytest.warns(UserWarning, match="empty"):
        resumed = _main(saved_model, out)
    assert resumed.manifest["complete"]
    # every shard and the manifest byte for byte (the manifest holds no timestamp or path, nothing run-dependent)
    assert _store_bytes(out) == _store_bytes(tmp_path / "reference")
    resumed.verify()


def test_resume_ignores_and_cleans_partial_files(saved_model, tmp_path):
    """A kill between 'shard renamed' and 'manifest updated', or during a temp write, leaves files never read."""
    with pytest.warns(UserWarning, match="empty"):
        reference = _main(saved_model, tmp_path / "reference")
    out = tmp_path / "crashed"
    shutil.copytree(tmp_path / "reference", out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:1], False
    manifest["manifest_xxh3_128"] = store_format._manifest_digest(manifest)  # as the run wrote it after shard 0
    (out / "manifest.json").write_text(json.dumps(manifest))
    for later in range(2, len(reference.shards)):  # renamed but not yet listed, intact: adopted once verified
        assert (out / f"shard_{later:05d}.safetensors").exists()
    (out / "shard_00001.safetensors").write_bytes(b"garbage: renamed but not yet listed")
    (out / "shard_00002.safetensors.tmp").write_bytes(b"half a shard")
    (out / "manifest.json.tmp").write_bytes(b"{")
    with pytest.warns(UserWarning, match="empty"):
        _main(saved_model, out)
    assert _store_bytes(out) == _store_bytes(tmp_path / "reference")
    assert reference.manifest["num_shards"] == len(reference.shards)


def test_disk_full_keeps_store_consistent_and_resumable(saved_model, tmp_path, monkeypatch):
    with pytest.warns(UserWarning, match="empty"):
        _main(saved_model, tmp_path / "reference")
    real_pwrite = shard_file._pwrite

    def full_disk(fd, data, offset):  # the disk fills while the third shard's rows are written (mid-forward)
        if os.readlink(f"/proc/self/fd/{fd}").endswith("shard_00002.safetensors.tmp") and offset > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_pwrite(fd, data, offset)

    monkeypatch.setattr(shard_file, "_pwrite", full_disk)
    out = tmp_path / "full"
    with pytest.warns(UserWarning, match="empty"), pytest.raises(CacheDiskFullError, match="disk full.*resume"):
        _main(saved_model, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    on_disk = sorted(p.name for p in out.iterdir())
    assert on_disk == ["manifest.json", "shard_00000.safetensors", "shard_00001.safetensors"]  # no temp file left
    partial = ActivationStore(out, allow_incomplete=True)
    partial.verify()
    assert len(partial) == manifest["shards"][-1]["rows"][1]

    monkeypatch.setattr(shard_file, "_pwrite", real_pwrite)
    with pytest.warns(UserWarning, match="empty"):
        _main(saved_model, out)
    assert _store_bytes(out) == _store_bytes(tmp_path / "reference")


def test_verify_names_the_corrupt_shard(tmp_path):
    hf, tok = tiny_model("gpt2", seed=3)
    model = StandardizedTransformer(hf, tokenizer=tok)
    store = cache_activations(model, TEXTS[:3], ["layers_output.0"], tmp_path, shard_tokens=8, progress=False)
    store.verify()
    shard = tmp_path / store.shards[1]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=store.shards[1]["file"]):
        store.verify()
    for cut in (data[:-8], data + b"\0"):  # a truncated shard, or one with bytes past its last tensor
        shard.write_bytes(bytes(cut))
        with pytest.raises(CacheCorruptError, match=f"{store.shards[1]['file']}.*unreadable"):
            store.verify()
    data[-1] ^= 0xFF  # repaired; then the manifest rewritten as formats 2 and 1 wrote it (a whole-file xxh3_128 or
    shard.write_bytes(bytes(data))  # sha256 per shard): still verified
    original = json.loads((tmp_path / "manifest.json").read_text())
    for key, digest in [("xxh3_128", lambda b: xxhash.xxh3_128(b).hexdigest()),
                        ("sha256", lambda b: hashlib.sha256(b).hexdigest())]:  # fmt: skip
        manifest = json.loads(json.dumps(original))
        manifest["format_version"] = 2 if key == "xxh3_128" else 1  # no manifest checksum, no numerics before 4
        for gone in ("manifest_xxh3_128", "numerics"):
            del manifest[gone]
        for entry in manifest["shards"]:
            del entry["xxh3_128_texts"]
            entry[key] = digest((tmp_path / entry["file"]).read_bytes())
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        legacy = ActivationStore(tmp_path)
        legacy.verify()
        shard.write_bytes(bytes(data[:1]) + bytes([data[1] ^ 0xFF]) + bytes(data[2:]))
        with pytest.raises(CacheCorruptError, match=f"{store.shards[1]['file']}.*{key}"):
            legacy.verify()
        shard.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_shard_bytes_are_safetensors_own(dtype, tmp_path):
    """Shards are written straight from their buffers in safetensors' own layout: the very bytes
    safetensors.torch.save makes, read back equal by safetensors, with the checksum its definition gives."""
    from safetensors.torch import load_file, save

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "layers_output.1": torch.randn(5, 3, generator=gen).to(dtype),
        "layers_output.0": torch.randn(5, 3, generator=gen).to(dtype),
        "attention_probabilities.0": torch.rand(5, 2, 4, generator=gen).to(dtype),
        "logits": torch.randn(5, 7, generator=gen),  # float32 beside another dtype
        "token_ids": torch.arange(5), "text_index": torch.tensor([3, 3, 4, 7, 7]),
        "position": torch.tensor([0, 1, 0, 0, 1]),
    }  # fmt: skip
    size, digest = shard_file._write_shard(tmp_path / "shard.safetensors", tensors)
    assert not (tmp_path / "shard.safetensors").exists()  # a temp file until committed
    shard_file._commit(tmp_path / "shard.safetensors")
    written = (tmp_path / "shard.safetensors").read_bytes()
    assert written == save(tensors, metadata={"format": "pt"})
    back = load_file(tmp_path / "shard.safetensors")
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    # the checksum, by its definition: xxh3_128 of the header bytes, then of each tensor's rows of each text (texts:
    # rows 0-1, 2, 3-4), tensors in file order, each block hashed here from the tensor, not from the file
    start = 8 + int.from_bytes(written[:8], "little")
    order = sorted(tensors, key=lambda name: json.loads(written[8:start])[name]["data_offsets"])
    blocks = [xxhash.xxh3_128(tensors[name][a:b].contiguous().view(torch.uint8).numpy().tobytes()).digest()
              for name in order for a, b in [(0, 2), (2, 3), (3, 5)]]  # fmt: skip
    assert size == len(written)
    assert digest == xxhash.xxh3_128(written[:start] + b"".join(blocks)).hexdigest()
    with open(tmp_path / "shard.safetensors", "rb") as f:  # and verify's recomputation from the file
        assert store_format._file_text_digest(f) == digest


def test_shard_file_writes_a_padded_batch_of_texts(tmp_path):
    """`_ShardFile.write_texts` puts each text of a right-padded batch at its own rows (texts adjacent in the file go
    out in one pwritev), and its checksum is the one recomputed from the file."""
    from safetensors.torch import load_file

    path = tmp_path / "shard.safetensors"
    shard = shard_file._ShardFile(path, {"x": (torch.float32, (3,)), "text_index": (torch.int64, ())},
                                 bounds=np.array([0, 2, 3, 5]))  # texts: rows 0-1, 2, 3-4  # fmt: skip
    batch = torch.arange(18, dtype=torch.float32).reshape(2, 3, 3)  # (batch, width, row), right padded
    shard.write_texts("x", batch, [(0, 3, 2), (1, 2, 1)])  # rows 2 and 3-4: adjacent in the file
    shard.write_texts("x", batch[1:], [(0, 0, 2)])
    shard.write("text_index", 0, torch.tensor([0, 0, 1, 2, 2]))
    size, digest = shard.finish()
    shard_file._commit(path)
    assert torch.equal(load_file(path)["x"], torch.cat([batch[1, :2], batch[1, :1], batch[0, :2]]))
    with open(path, "rb") as f:
        assert (size, digest) == (path.stat().st_size, store_format._file_text_digest(f))


def test_shard_file_refuses_unwritten_or_misfit_rows(tmp_path):
    """A shard is written in place a text at a time: a text never written (a hole: zeros on disk), a text written
    twice, rows that are not whole texts, or rows that do not fit its layout are errors, never a silently wrong file."""
    path = tmp_path / "shard.safetensors"
    specs = {"x": (torch.float32, (3,)), "token_ids": (torch.int64, ())}
    shard = shard_file._ShardFile(path, specs, bounds=np.array([0, 2, 3, 5]))  # texts: rows 0-1, 2, 3-4
    shard.write_texts("x", torch.ones(2, 2, 3), [(1, 2, 1), (0, 0, 2)])  # a batch of two texts: one pwritev
    shard.write("token_ids", 0, torch.arange(5))
    with pytest.raises(CacheError, match="rows"):
        shard.write("x", 3, torch.ones(3, 3))  # past row 4, the last
    with pytest.raises(CacheError, match="rows"):
        shard.write("x", 3, torch.ones(2, 4))  # a row of another shape
    with pytest.raises(CacheError, match="not whole texts"):
        shard.write("x", 3, torch.ones(1, 3))  # half of the third text
    with pytest.raises(CacheError, match="written twice"):
        shard.write("x", 2, torch.ones(1, 3))
    with pytest.raises(CacheError, match=r"\{'x': 1\}"):
        shard.finish()  # the third text of x was never written
    assert not list(tmp_path.iterdir())  # the temp file is gone


def test_bad_inputs(tmp_path):
    hf, tok = tiny_model("llama", seed=4)
    model = StandardizedTransformer(hf, tokenizer=tok)
    def run(texts, names, out, **kw):
        return cache_activations(model, texts, names, out, progress=False, **kw)

    with pytest.raises(CacheError, match="texts is empty"):
        run([], ["layers_output.0"], tmp_path / "a")
    with pytest.raises(CacheError, match="single string"):
        run("The cat", ["layers_output.0"], tmp_path / "a")
    with pytest.raises(CacheError, match="every text is empty"):
        run(["", ""], ["layers_output.0"], tmp_path / "a")
    with pytest.raises(CacheError, match="not a str"):
        run(["ok", 3], ["layers_output.0"], tmp_path / "a")
    with pytest.raises(CacheError, match=r"unknown activation name 'resid\.0'.*layers_output\.<layer\|\*>"):
        run(["ok"], ["resid.0"], tmp_path / "a")
    with pytest.raises(CacheError, match="out of range"):
        run(["ok"], ["layers_output.99"], tmp_path / "a")
    with pytest.raises(CacheError, match="attention_probabilities instead"):
        run(["ok"], ["attention_scores.0"], tmp_path / "a")
    with pytest.raises(CacheError, match="batch_size"):
        run(["ok"], ["layers_output.0"], tmp_path / "a", batch_size=0)
    assert not (tmp_path / "a").exists()  # nothing written for refused arguments

    run(["The cat sat", "Hello"], ["layers_output.0"], tmp_path / "store")
    before = _store_bytes(tmp_path / "store")
    # same call again: the complete store is returned untouched
    assert len(run(["The cat sat", "Hello"], ["layers_output.0"], tmp_path / "store")) > 0
    other_hf, _ = tiny_model("llama", seed=5)
    other = StandardizedTransformer(other_hf, tokenizer=tok)
    with pytest.raises(CacheError, match=r"different model.*weights of 16 of 21 parameters differ \(lm_head.weight, "):
        cache_activations(other, ["The cat sat", "Hello"], ["layers_output.0"], tmp_path / "store", progress=False)
    with pytest.raises(CacheError, match="names"):
        run(["The cat sat", "Hello"], ["layers_output.1"], tmp_path / "store")
    with pytest.raises(CacheError, match="tokens_sha256"):
        run(["The cat sat", "Goodbye"], ["layers_output.0"], tmp_path / "store")
    with pytest.raises(CacheError, match="batch_size"):
        run(["The cat sat", "Hello"], ["layers_output.0"], tmp_path / "store", batch_size=1)
    assert _store_bytes(tmp_path / "store") == before  # refused runs leave the store as it was

    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not an activation store"):
        run(["ok"], ["layers_output.0"], tmp_path / "foreign")


def test_read_texts(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"text": "a b"}\n\n{"text": "", "id": 2}\n{"text": "c"}\n')
    assert read_texts(jsonl) == ["a b", "", "c"]
    txt = tmp_path / "t.txt"
    txt.write_text("first\n\nthird  \n")
    assert read_texts(txt) == ["first", "", "third  "]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "a"}\n')
    with pytest.raises(CacheError, match=r'bad.jsonl:1.*"text"'):
        read_texts(bad)
    (tmp_path / "t.csv").write_text("x")
    with pytest.raises(CacheError, match="unsupported"):
        read_texts(tmp_path / "t.csv")
