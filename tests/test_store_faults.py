"""Fault injection on activation stores: every damaged file is refused on read with a `CacheCorruptError` naming it, or
repaired by running the same `cache_activations` call again, and a repaired store equals a store built cleanly (byte
for byte, and value for value); never a silently wrong value, never a raw library error.

Faults: byte flips in a shard and in the manifest, swapped manifest entries and swapped shard files, truncated and
deleted shards and manifests, a resume with a model differing in one weight of one layer (or in the torch thread
count), two writers at once (threads and processes) and stale locks, stores written by older formats."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unilens import StandardizedTransformer
from unilens.scale import reader, shard_file, store_format, store_lock, writer
from unilens.scale.sae import ActivationBatches
from unilens.scale.store import (
    ActivationStore,
    CacheCorruptError,
    CacheError,
    CacheLockedError,
    CacheMismatchError,
    CacheNotFoundError,
    cache_activations,
)
from unilens.testing import tiny_model

REPO = Path(__file__).resolve().parents[1]
TEXTS = [
    "The capital of France is Paris.",
    "Hi",
    "The cat sat on the mat. The dog ran in the park.",
    "One, two, three",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "Berlin",
    "A B C D E F",
]
NAMES = ["layers_output.*", "attention_probabilities.1", "logits"]
ARGS = {"batch_size": 2, "shard_tokens": 9, "progress": False}  # 5 shards of 9 to 20 tokens


@pytest.fixture(scope="module")
def model():
    hf, tok = tiny_model("llama", seed=0)
    return StandardizedTransformer(hf, tokenizer=tok)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory) -> Path:
    """The store built cleanly, once: what every repaired store must equal."""
    out = tmp_path_factory.mktemp("reference") / "store"
    store = cache_activations(model, TEXTS, NAMES, out, **ARGS)
    assert store.manifest["complete"] and len(store.shards) == 5
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _copy(reference: Path, tmp_path: Path) -> Path:
    out = tmp_path / "store"
    shutil.copytree(reference, out)
    return out


def _rerun(model, out: Path) -> ActivationStore:
    return cache_activations(model, TEXTS, NAMES, out, **ARGS)


def _assert_reference(out: Path, reference: Path) -> None:
    """``out`` is the clean store: every file byte for byte, every name's values (read through the checks)."""
    assert _files(out) == _files(reference)
    got, want = ActivationStore(out), ActivationStore(reference)
    for name in [*want.names, "token_ids", "text_index", "position"]:
        assert torch.equal(got[name], want[name]), name


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def _write_manifest(out: Path, manifest: dict, checksum: bool = True) -> None:
    """Rewrite the manifest as the writer does (its own checksum recomputed when ``checksum``)."""
    manifest = {k: v for k, v in manifest.items() if k != "manifest_xxh3_128"}
    if checksum:
        manifest["manifest_xxh3_128"] = store_format._manifest_digest(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _every_read_refuses(out: Path, k: int, match: str) -> None:
    """Every way of reading shard ``k`` raises `CacheCorruptError` matching ``match`` (a fresh store each time: the
    first read of a shard is the checked one)."""
    store = ActivationStore(out)
    row = store.shards[k]["rows"][0]
    reads = {
        "store[name]": lambda s: s["layers_output.0"],
        "store.shard(k)": lambda s: s.shard(k),
        "store.shard(k, names)": lambda s: s.shard(k, ["logits"]),
        "iter_shards": lambda s: list(s.iter_shards(["token_ids"])),
        "dataset": lambda s: s.dataset(["layers_output.1"])[row],
        "verify": lambda s: s.verify(),
        "ActivationBatches": lambda s: list(ActivationBatches(s, ["layers_output.0"], batch_size=4, shuffle=False)),
    }
    for what, read in reads.items():
        with pytest.raises(CacheCorruptError, match=match):
            read(ActivationStore(out))
            pytest.fail(f"{what} read a damaged shard")


# ----------------------------------------------------------------------------------------------------------------
# Shards: byte flips, truncation, deletion, swapped files
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["data end", "data middle", "text_index", "header json", "header size"])
def test_byte_flip_in_a_shard_is_refused_then_recomputed(model, reference, tmp_path, where):
    out = _copy(reference, tmp_path)
    shard = out / "shard_00002.safetensors"
    data = shard.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:start])
    offsets = {
        "data end": len(data) - 1,
        "data middle": start + (len(data) - start) // 2,
        "text_index": start + header["text_index"]["data_offsets"][0] + 8,  # the second row's text
        "header json": 8 + data[8:start].index(b'"shape"') + 2,
        "header size": 0,
    }
    _flip(shard, offsets[where], bit=1)
    _every_read_refuses(out, 2, r"shard_00002\.safetensors in .* (is corrupt|is unreadable).*run the same "
                                r"cache_activations call again")
    with pytest.warns(UserWarning, match=r"recomputing 1 damaged shard\(s\) .*shard_00002\.safetensors"):
        _rerun(model, out)
    _assert_reference(out, reference)


@pytest.mark.parametrize("cut", ["truncated", "emptied", "deleted", "extra bytes"])
def test_truncated_or_deleted_shard_is_refused_then_recomputed(model, reference, tmp_path, cut):
    out = _copy(reference, tmp_path)
    shard = out / "shard_00001.safetensors"
    data = shard.read_bytes()
    if cut == "deleted":
        shard.unlink()
        match = r"shard_00001\.safetensors of the store in .* is missing"
    else:
        shard.write_bytes({"truncated": data[: len(data) // 2], "emptied": b"", "extra bytes": data + b"\0"}[cut])
        match = r"shard_00001\.safetensors in .* is unreadable"
    _every_read_refuses(out, 1, match)
    with pytest.warns(UserWarning, match=r"recomputing 1 damaged shard\(s\) .*shard_00001\.safetensors"):
        _rerun(model, out)
    _assert_reference(out, reference)


def test_a_shard_damaged_after_its_checked_read_is_refused(reference, tmp_path):
    """A shard is checked the first time it is read; a file changed or removed after that is checked again (its
    size, inode and time are remembered), never read raw."""
    out = _copy(reference, tmp_path)
    store = ActivationStore(out)
    before = store["layers_output.0"]  # every shard checked
    assert torch.equal(store["layers_output.0"], before)
    shard = out / "shard_00003.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 4]))  # same size, new modification time
    with pytest.raises(CacheCorruptError, match=r"shard_00003\.safetensors in .* is corrupt"):
        store["logits"]
    shard.write_bytes(data[:100])
    with pytest.raises(CacheCorruptError, match=r"shard_00003\.safetensors in .* is unreadable \(truncated"):
        store.shard(3, ["logits"])
    shard.unlink()
    with pytest.raises(CacheCorruptError, match=r"shard_00003\.safetensors .* is missing"):
        store.dataset()[store.shards[3]["rows"][0]]


def test_swapped_shard_files_are_refused_then_recomputed(model, reference, tmp_path):
    out = _copy(reference, tmp_path)
    a, b = out / "shard_00001.safetensors", out / "shard_00002.safetensors"
    a.rename(out / "swap")
    b.rename(a)
    (out / "swap").rename(b)
    with pytest.raises(CacheCorruptError, match=r"shard_00001\.safetensors in .* (is corrupt|is unreadable)"):
        ActivationStore(out)["layers_output.0"]
    with pytest.warns(UserWarning, match=r"recomputing 2 damaged shard\(s\).*shard_00001.*shard_00002"):
        _rerun(model, out)
    _assert_reference(out, reference)


def test_reads_check_each_shard_once_and_cost_one_read(reference, monkeypatch):
    """The checks run once per shard (the file's bytes hashed as read); later reads of the shard are plain."""
    calls = []
    real = store_format._shard_digests
    monkeypatch.setattr(store_format, "_shard_digests", lambda data: calls.append(1) or real(data))
    monkeypatch.setattr(reader, "_shard_digests", store_format._shard_digests)
    store = ActivationStore(reference)
    first = {name: store[name] for name in store.names}
    assert len(calls) == len(store.shards)
    again = {name: store[name] for name in store.names}
    whole = [store.shard(k) for k in range(len(store.shards))]
    assert len(calls) == len(store.shards)  # nothing checked twice
    for name in store.names:
        assert torch.equal(first[name], again[name])
        assert torch.equal(torch.cat([s[name] for s in whole]), first[name])
    fresh = ActivationStore(reference)
    assert all(torch.equal(fresh.shard(k)[n], whole[k][n]) for k in range(len(whole)) for n in whole[k])  # one read
    assert len(calls) == 2 * len(store.shards)


# ----------------------------------------------------------------------------------------------------------------
# The manifest: byte flips, truncation, null, deletion, swapped entries
# ----------------------------------------------------------------------------------------------------------------


def test_every_byte_flip_in_the_manifest_is_refused_on_read(reference, tmp_path):
    out = _copy(reference, tmp_path)
    path = out / "manifest.json"
    original = path.read_bytes()
    for offset in range(0, len(original), 5):  # a byte in five, each a different bit
        data = bytearray(original)
        data[offset] ^= 1 << (offset % 8)
        path.write_bytes(bytes(data))
        with pytest.raises(CacheCorruptError, match=r"manifest\.json is damaged .*run the same cache_activations "):
            ActivationStore(out)
            pytest.fail(f"a flip at byte {offset} went unnoticed: {bytes(original[offset - 20 : offset + 20])!r}")


@pytest.mark.parametrize("field", ['"format_version": ', '"rows": [\n', '"xxh3_128_texts": "', '"weights_xxh3_128"',
                                   '"manifest_xxh3_128": "', '"complete": '])
def test_byte_flip_in_the_manifest_is_rebuilt_from_the_shards(model, reference, tmp_path, field):
    out = _copy(reference, tmp_path)
    path = out / "manifest.json"
    text = path.read_bytes()
    at = text.index(field.encode()) + len(field) + (8 if field.startswith('"rows"') else 0)
    _flip(path, at, bit=0)
    with pytest.raises(CacheCorruptError, match="manifest.json is damaged"):
        ActivationStore(out)
    with pytest.warns(UserWarning, match=r"manifest\.json is damaged .*rebuilt it from \d+ verified shard"):
        _rerun(model, out)
    _assert_reference(out, reference)


@pytest.mark.parametrize("damage", ["truncated", "null", "not JSON", "empty", "a list", "deleted", "no shards key"])
def test_damaged_or_deleted_manifest_is_refused_then_rebuilt(model, reference, tmp_path, damage):
    out = _copy(reference, tmp_path)
    path = out / "manifest.json"
    text = path.read_text()
    if damage == "deleted":
        path.unlink()
    elif damage == "no shards key":
        manifest = json.loads(text)
        del manifest["shards"]
        _write_manifest(out, manifest)
    else:
        path.write_text({"truncated": text[: len(text) // 2], "null": "null", "not JSON": "shards: 5\n",
                         "empty": "", "a list": "[1, 2]"}[damage])  # fmt: skip
    match = (r"manifest\.json is missing but .* holds 5 shard file\(s\)" if damage == "deleted"
             else r"manifest\.json is damaged \(")  # fmt: skip
    with pytest.raises(CacheCorruptError, match=match + r".*run the same cache_activations call again"):
        ActivationStore(out)
    with pytest.warns(UserWarning, match=r"manifest\.json .*rebuilt it from 5 verified shard\(s\) and recomputing the "
                                         r"other 0"):
        _rerun(model, out)
    _assert_reference(out, reference)


@pytest.mark.parametrize("swap", ["entries", "entries, checksum redone", "contents, file names kept"])
def test_swapped_manifest_entries_are_refused_then_rebuilt(model, reference, tmp_path, swap):
    """Two shard entries swapped: detected by the manifest's own checksum, and without it (a tool that rewrote the
    checksum) by the entries' order (each entry k names shard k; rows and texts laid end to end)."""
    out = _copy(reference, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["shards"]
    if swap == "contents, file names kept":
        shards[1], shards[2] = {**shards[2], "file": shards[1]["file"]}, {**shards[1], "file": shards[2]["file"]}
    else:
        shards[1], shards[2] = shards[2], shards[1]
    _write_manifest(out, manifest, checksum=swap != "entries")
    match = "checksum" if swap == "entries" else "out of order"
    with pytest.raises(CacheCorruptError, match=rf"manifest\.json is damaged \(.*{match}"):
        ActivationStore(out)
    with pytest.warns(UserWarning, match=r"rebuilt it from 5 verified shard"):
        _rerun(model, out)
    _assert_reference(out, reference)


def test_partial_manifest_keeps_its_verified_shards(model, reference, tmp_path):
    """A kill after shards 0-4 were renamed but before the manifest listed 2-4: the unlisted shards are adopted once
    their own metadata (this run, this shard, the digest of their data) and bytes check out; a damaged one is
    recomputed."""
    out = _copy(reference, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False
    _write_manifest(out, manifest)
    _flip(out / "shard_00003.safetensors", (out / "shard_00003.safetensors").stat().st_size - 3)
    before = {k: os.stat(out / f"shard_0000{k}.safetensors").st_mtime_ns for k in (0, 1, 2, 4)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unlisted shards are no damage to warn of
        _rerun(model, out)
    _assert_reference(out, reference)
    assert {k: os.stat(out / f"shard_0000{k}.safetensors").st_mtime_ns for k in (0, 1, 2, 4)} == before  # kept


def test_damaged_manifest_beside_another_runs_shards_is_refused(model, reference, tmp_path):
    """The manifest cannot be rebuilt from shards that another run wrote (another model here): refused, nothing
    removed."""
    other_hf, tok = tiny_model("llama", seed=1)
    out = tmp_path / "other"
    cache_activations(StandardizedTransformer(other_hf, tokenizer=tok), TEXTS, NAMES, out, **ARGS)
    (out / "manifest.json").write_text("{")
    before = _files(out)
    with pytest.raises(CacheMismatchError, match=r"manifest\.json is damaged .* were written by another run .*pass "
                                                 r"a new out_dir, or delete"):
        _rerun(model, out)
    assert _files(out) == before


def test_damaged_manifest_beside_old_format_shards_is_refused(model, reference, tmp_path):
    """Shards of format 3 and earlier carry no record of their store: without their manifest they cannot be
    verified, so they are not adopted (refused, nothing removed)."""
    out = _copy(reference, tmp_path)
    for path in sorted(out.glob("shard_*.safetensors")):  # rewritten as format 3 wrote them: no unilens metadata
        shard_file._write_shard(path, load_file(path))
        shard_file._commit(path)
    (out / "manifest.json").write_text('{"format": "unilens-activation-cache", "format_ver')
    before = _files(out)
    with pytest.raises(CacheMismatchError, match=r"older unilens \(store format 3 or earlier\)"):
        _rerun(model, out)
    assert _files(out) == before


def test_a_folder_without_store_is_not_found(tmp_path):
    with pytest.raises(CacheNotFoundError, match="holds no manifest.json: it is not an activation store"):
        ActivationStore(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError):  # still one for code that caught it before
        ActivationStore(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# One model per store: the fingerprint covers every weight and the numerics settings
# ----------------------------------------------------------------------------------------------------------------


def _edited(name: str, index: tuple[int, ...], delta: float = 1e-3) -> StandardizedTransformer:
    """The `model` fixture's model (same seed) with one element of one parameter changed."""
    hf, tok = tiny_model("llama", seed=0)
    with torch.no_grad():
        hf.get_parameter(name)[index] += delta
    return StandardizedTransformer(hf, tokenizer=tok)


def test_resume_with_one_weight_changed_is_refused(model, reference, tmp_path):
    out = _copy(reference, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False  # killed after shard 1
    _write_manifest(out, manifest)
    for later in range(2, 5):
        (out / f"shard_{later:05d}.safetensors").unlink()
    before = _files(out)
    edited = _edited("model.layers.1.mlp.down_proj.weight", (3, 5))  # one element of one layer
    with pytest.raises(CacheMismatchError, match=r"different model.*Differences: weights of "
                                                 r"model\.layers\.1\.mlp\.down_proj\.weight differ$"):
        _rerun(edited, out)
    with pytest.raises(CacheMismatchError, match=r"down_proj\.weight differ$"):  # and a complete store: not returned
        _rerun(edited, reference)
    assert _files(out) == before  # refused before anything was touched
    _rerun(model, out)  # the model that wrote it resumes it
    _assert_reference(out, reference)


def test_fingerprint_covers_every_parameter(model):
    """Each parameter's own digest changes with any one element of it (sampled parameters missed most of them)."""
    base = store_format._model_identity(model)["weights_xxh3_128"]
    hf = model.module_accessor.model
    assert set(base) == {name for name, _ in hf.named_parameters()}
    for name, param in hf.named_parameters():
        with torch.no_grad():
            flat = param.view(-1)
            i = flat.numel() // 2 + 1 if flat.numel() > 1 else 0
            old = flat[i].clone()
            flat[i] = torch.nextafter(old, old + 1)  # the smallest change there is
            try:
                now = store_format._model_identity(model)["weights_xxh3_128"]
            finally:
                flat[i] = old
        assert [k for k in base if base[k] != now[k]] == [name]
    assert store_format._model_identity(model)["weights_xxh3_128"] == base


def test_tensor_digest_reads_every_byte_in_pieces(monkeypatch):
    """`_tensor_digest`: the same for the same bytes whatever the piece size (parameters on an accelerator are copied
    off in pieces), different for another dtype or shape of the same bytes; bfloat16, 0-dim and strided tensors too."""
    t = torch.randn(33, 17)
    whole = store_format._tensor_digest(t)
    monkeypatch.setattr(store_format, "_HASH_CHUNK", 7)  # pieces that cut rows and elements
    assert store_format._tensor_digest(t) == whole
    assert store_format._tensor_digest(t.reshape(17, 33)) != whole
    assert store_format._tensor_digest(t.view(torch.int32)) != whole
    assert store_format._tensor_digest(t.t()) == store_format._tensor_digest(t.t().contiguous())
    b = t.to(torch.bfloat16)
    flipped = b.clone()
    flipped.view(torch.int16)[5, 3] ^= 1  # one bit
    assert store_format._tensor_digest(b) != store_format._tensor_digest(flipped)
    assert store_format._tensor_digest(torch.tensor(1.5)) != store_format._tensor_digest(torch.tensor(2.5))
    assert store_format._tensor_digest(torch.zeros(0, 4)) != store_format._tensor_digest(torch.zeros(4, 0))


def test_resume_under_another_thread_count_is_refused(model, reference, tmp_path):
    out = _copy(reference, tmp_path)
    previous = torch.get_num_threads()
    torch.set_num_threads(previous + 1)
    try:
        with pytest.raises(CacheMismatchError, match=rf"torch threads: store {previous}, this run {previous + 1} "
                                                     rf"\(torch.set_num_threads\({previous}\) or OMP_NUM_THREADS"):
            _rerun(model, out)
    finally:
        torch.set_num_threads(previous)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["numerics"]["torch_threads"] == previous and manifest["numerics"]["device"] == "cpu"


# ----------------------------------------------------------------------------------------------------------------
# Two writers, stale locks
# ----------------------------------------------------------------------------------------------------------------


def test_two_writer_threads_the_second_is_refused_at_once(model, reference, tmp_path, monkeypatch):
    out = tmp_path / "store"
    entered, go = threading.Event(), threading.Event()
    real = writer._shard_to_temp

    def held(*args, **kwargs):  # the first writer waits inside its first shard until the second has tried
        entered.set()
        assert go.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_shard_to_temp", held)
    errors: list[BaseException] = []
    first = threading.Thread(target=lambda: _catch(errors, lambda: _rerun(model, out)))
    first.start()
    try:
        assert entered.wait(60)
        started = time.monotonic()
        with pytest.raises(CacheLockedError, match=rf"another cache_activations call in this process \(pid "
                                                   rf"{os.getpid()}\) is writing to {out}"):
            _rerun(model, out)
        assert time.monotonic() - started < 5  # at once, not after tokenizing and probing
    finally:
        go.set()
        first.join(60)
    assert not errors, errors
    _assert_reference(out, reference)  # the first writer's store, untouched by the second; no lock file left


def _catch(errors: list, fn) -> None:
    try:
        fn()
    except BaseException as err:  # noqa: BLE001
        errors.append(err)


@pytest.fixture(scope="module")
def folder_model(tmp_path_factory):
    """The tiny model saved as a folder (a second process loads it) and the store it writes, built cleanly here."""
    root = tmp_path_factory.mktemp("saved")
    hf, tok = tiny_model("llama", seed=0)
    hf.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    loaded = StandardizedTransformer(str(root / "model"), dtype=torch.float32)
    cache_activations(loaded, TEXTS, NAMES, root / "reference", **ARGS)
    return root, loaded


WRITER = f"""
import sys, torch
from unilens import StandardizedTransformer, cache_activations
model = StandardizedTransformer(sys.argv[1], dtype=torch.float32)
cache_activations(model, {TEXTS!r}, {NAMES!r}, sys.argv[2], **{ARGS!r})
"""


def test_second_process_is_refused_then_a_killed_writers_lock_is_taken_over(folder_model, tmp_path):
    root, loaded = folder_model
    out = tmp_path / "store"
    env = {**os.environ, "UNILENS_CACHE_TEST_DELAY": "0.5", "OMP_NUM_THREADS": "1"}  # one thread, as this process
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root / "model"), str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "manifest.json").exists():  # the writer holds the lock and is computing shards
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        assert json.loads((out / ".lock").read_text()) == {"pid": proc.pid, "host": socket.gethostname()}
        with pytest.raises(CacheLockedError, match=rf"^another process \(pid {proc.pid}\) is writing to {out}; wait "
                                                   rf"for it or remove {out}/\.lock if no such process runs\.$"):
            cache_activations(loaded, TEXTS, NAMES, out, **ARGS)
        assert proc.poll() is None  # the first writer goes on
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert (out / ".lock").exists()  # left behind by the killed writer: stale, taken over
    cache_activations(loaded, TEXTS, NAMES, out, **ARGS)
    _assert_reference(out, root / "reference")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("flock", [True, False], ids=["flock", "no flock"])
def test_stale_lock_of_a_dead_process_is_taken_over(model, reference, tmp_path, monkeypatch, flock):
    if not flock:  # a filesystem without flock: the pid in the file decides
        monkeypatch.setattr(store_lock, "fcntl", None)
    out = tmp_path / "store"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    _rerun(model, out)
    _assert_reference(out, reference)
    assert not (out / ".lock").exists()


def test_without_flock_a_live_holder_is_refused(model, tmp_path, monkeypatch):
    monkeypatch.setattr(store_lock, "fcntl", None)
    out = tmp_path / "store"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(CacheLockedError, match=rf"another process \(pid {sleeper.pid}\) is writing"):
            _rerun(model, out)
        (out / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))  # another host's: cannot tell
        with pytest.raises(CacheLockedError, match=r"\(pid 1 on host elsewhere\)"):
            _rerun(model, out)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written


def test_refused_arguments_leave_no_folder_and_no_lock(model, tmp_path):
    with pytest.raises(CacheError, match="every text is empty"):
        cache_activations(model, ["", ""], NAMES, tmp_path / "a" / "b", **ARGS)
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------------------------------------------
# Stores written by older formats
# ----------------------------------------------------------------------------------------------------------------


def _as_format_3(out: Path, model) -> dict:
    """Rewrite ``out``'s manifest as store format 3 wrote it: a sampled weight fingerprint, no numerics, no HF module
    paths, no manifest checksum."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 3
    manifest["model"] = store_format._legacy_identity(model)
    del manifest["numerics"]
    manifest.pop("hf_modules", None)
    _write_manifest(out, manifest, checksum=False)
    return manifest


def test_old_format_store_reads_verifies_and_is_returned_when_complete(model, reference, tmp_path):
    out = _copy(reference, tmp_path)
    _as_format_3(out, model)
    store = ActivationStore(out)
    store.verify()
    want = ActivationStore(reference)
    assert all(torch.equal(store[name], want[name]) for name in want.names)
    before = _files(out)
    assert _rerun(model, out).manifest["format_version"] == 3  # the same call: the verified store, as it is
    assert _files(out) == before
    _flip(out / "shard_00004.safetensors", (out / "shard_00004.safetensors").stat().st_size - 1)
    with pytest.raises(CacheCorruptError, match=r"shard_00004\.safetensors .* is corrupt.*written by store format 3, "
                                                r"which cannot be repaired in place: recompute it .* new out_dir"):
        ActivationStore(out)["logits"]
    with pytest.raises(CacheCorruptError, match=r"shard_00004\.safetensors .* is corrupt"):
        _rerun(model, out)


def test_incomplete_old_format_store_is_not_resumed(model, reference, tmp_path):
    out = _copy(reference, tmp_path)
    manifest = _as_format_3(out, model)
    manifest["shards"], manifest["complete"] = manifest["shards"][:2], False
    _write_manifest(out, manifest, checksum=False)
    before = _files(out)
    with pytest.raises(CacheMismatchError, match=r"incomplete store written by store format 3, whose model "
                                                 r"fingerprint samples 3 weights.*Pass a new out_dir"):
        _rerun(model, out)
    assert _files(out) == before
    assert len(ActivationStore(out, allow_incomplete=True)) == manifest["shards"][-1]["rows"][1]


def test_damaged_manifest_without_shards_is_refused(model, tmp_path):
    """Nothing to rebuild it from, and it may not be a store's manifest at all: refused, the file left as it is."""
    out = tmp_path / "store"
    out.mkdir()
    (out / "manifest.json").write_text('{"format": "someone else\'s"}')
    with pytest.raises(CacheCorruptError, match=r"manifest\.json is damaged \(its format is .*holds no shard to "
                                                r"rebuild it from: pass a new out_dir, or delete"):
        _rerun(model, out)
    assert _files(out) == {"manifest.json": b'{"format": "someone else\'s"}'}


def test_a_newer_format_is_refused_with_the_upgrade_named(reference, tmp_path):
    out = _copy(reference, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = store_format.FORMAT_VERSION + 1
    _write_manifest(out, manifest)  # as a newer unilens would have written it: its checksum matches
    with pytest.raises(CacheError, match=r"written by a newer unilens \(store format 5; this one reads up to 4\): "
                                         r"upgrade unilens") as err:
        ActivationStore(out)
    assert not isinstance(err.value, CacheCorruptError)


def test_out_dir_that_is_a_file_is_refused(model, tmp_path):
    (tmp_path / "acts").write_text("not a folder")
    with pytest.raises(CacheError, match=r"out_dir .*acts is a file, not a folder: pass a folder\."):
        _rerun(model, tmp_path / "acts")
