"""Data parallel on torch.distributed: `torchrun --nproc-per-node 2` (gloo, CPU) caching writes the same store, byte for
byte, as one process; a rank killed with SIGKILL and the job relaunched resumes to that same store; patching over
prompt pairs split across ranks equals the one-process result; the README's torchrun command runs as written."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from unilens import ActivationStore, StandardizedTransformer, activation_patching
from unilens.core.distributed import split_range
from unilens.testing import tiny_model

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # `torchrun` of this interpreter
NAMES = ["layers_output.*", "attention_probabilities.1", "logits"]
ARGS = ["--batch-size", "2", "--shard-tokens", "40", "--no-progress"]  # 9 shards of ~48 tokens: work for both ranks
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny llama saved as a model folder (what the CLI loads) and 24 texts of 3 to 16 tokens."""
    root = tmp_path_factory.mktemp("dist")
    hf, tok = tiny_model("llama")
    hf.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    words = "the cat sat on a mat while dogs ran far away from home and birds sang".split()
    texts = [" ".join(words[(7 * i + j) % len(words)] for j in range(2 + (5 * i) % 13)) for i in range(24)]
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    return root


def _cache_cmd(folder: Path, out: Path, ranks: int | None) -> list[str]:
    cli = ["-m", "unilens", "cache", "--texts", str(folder / "texts.txt"), "--names", *NAMES, "--out", str(out),
           "--model", str(folder / "model"), *ARGS]  # fmt: skip
    if ranks is None:
        return [sys.executable, *cli]
    return [*TORCHRUN, "--standalone", "--nproc-per-node", str(ranks), *cli]  # --standalone: a free port


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=REPO, env={**ENV, **kwargs.pop("env", {})}, capture_output=True, text=True,
                            timeout=120, **kwargs)  # fmt: skip
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def _files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


@pytest.fixture(scope="module")
def one_process_store(folder):
    """The single-process store (`python -m unilens cache`), checked against plain HF hidden states."""
    out = folder / "one"
    _run(_cache_cmd(folder, out, None))
    store = ActivationStore(out)
    # independent oracle for a few texts: the HF model's own output_hidden_states, text by text (no padding)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder / "model")
    texts = (folder / "texts.txt").read_text().splitlines()
    for i in (0, 5, 23):
        ids = tok(texts[i], return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = hf(ids, output_hidden_states=True).hidden_states  # (1, seq, hidden) per layer + embeddings
        rows = store["text_index"] == i
        assert store["token_ids"][rows].tolist() == ids[0].tolist()
        for layer in range(hf.config.num_hidden_layers - 1):  # the last entry is after the final norm
            torch.testing.assert_close(store[f"layers_output.{layer}"][rows], hidden[layer + 1][0],
                                       rtol=1e-5, atol=1e-5)  # batched vs one text: float32 rounding only
    return out


def test_two_ranks_write_the_one_process_store_byte_for_byte(folder, one_process_store):
    out = folder / "two"
    result = _run(_cache_cmd(folder, out, 2))
    assert result.stdout.count("ActivationStore(") == 1, result.stdout  # one summary, from rank 0
    assert _files(out) == _files(one_process_store)  # every shard and the manifest, byte for byte
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_shards"] == 9
    a, b = ActivationStore(out), ActivationStore(one_process_store)
    for name in [*a.names, "token_ids", "text_index", "position"]:
        assert torch.equal(a[name], b[name]), name


def test_two_ranks_with_generation_equal_one_process(folder):
    """Generation-time capture split over ranks: the same store as one in-process call."""
    out = folder / "gen-two"
    cmd = _cache_cmd(folder, out, 2)
    cmd[cmd.index("--names") + 1 : cmd.index("--out")] = ["layers_output.*", "logits"]
    _run([*cmd, "--generate-tokens", "3"])
    from unilens.scale.store import cache_activations, read_texts

    model = StandardizedTransformer(str(folder / "model"), dtype=torch.float32)
    cache_activations(model, read_texts(folder / "texts.txt"), ["layers_output.*", "logits"], folder / "gen-one",
                      batch_size=2, shard_tokens=40, progress=False, generate_tokens=3)  # fmt: skip
    assert _files(out) == _files(folder / "gen-one")
    store = ActivationStore(out)
    assert len(store) > store.manifest["inputs"]["num_tokens"]  # generated rows beyond the prompts' tokens


def _rank_pid(parent: int, rank: int, deadline: float) -> int:
    """The pid of torchrun's worker with RANK=rank (found through /proc: the agent's children)."""
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{parent}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under torchrun {parent}")


def test_sigkill_one_rank_then_relaunch_resumes_to_the_same_store(folder, one_process_store):
    out = folder / "killed"
    cmd = _cache_cmd(folder, out, 2)
    # slow batches (0.4 s each) so the kill lands mid-run; the kill waits for a finished shard, not for a time
    proc = subprocess.Popen(cmd, cwd=REPO, env={**ENV, "UNILENS_CACHE_TEST_DELAY": "0.4"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        victim = _rank_pid(proc.pid, 1, deadline)
        while not list(out.glob("shard_*.done.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            time.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=60)  # torchrun stops the other rank and fails
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    finished = {p.name.replace(".done.json", ".safetensors") for p in out.glob("shard_*.done.json")}
    finished |= {e["file"] for e in manifest["shards"]}
    assert 0 < len(finished) < 9, finished
    before = {name: os.stat(out / name).st_mtime_ns for name in finished}

    _run(cmd)  # the same job again
    assert _files(out) == _files(one_process_store)
    # resumed where it stopped: the finished shards were kept, not recomputed
    assert {name: os.stat(out / name).st_mtime_ns for name in finished} == before


def _pairs(tokenizer, n: int = 5) -> tuple[list[str], list[str]]:
    """``n`` (clean, corrupted) prompt pairs, one word swapped, all the same number of tokens for ``tokenizer``."""
    words = "cat dog bird fish cow hen fox owl bee ant rat pig elk yak emu".split()
    prompts = [f"The {w} sat on the {v} mat" for w in words for v in words if w != v]
    by_length: dict[int, list[str]] = {}
    for prompt in prompts:
        by_length.setdefault(len(tokenizer(prompt).input_ids), []).append(prompt)
    group = max(by_length.values(), key=len)
    assert len(group) >= 2 * n, "not enough prompts of one length"
    return group[0 : 2 * n : 2], group[1 : 2 * n : 2]


PATCH_SCRIPT = """
import json, sys, torch
import torch.distributed as dist
from unilens import StandardizedTransformer, activation_patching
dist.init_process_group("gloo")
model = StandardizedTransformer(sys.argv[1], dtype=torch.float32)
clean, corrupted = json.load(open(sys.argv[3]))
target = model.tokenizer(" home").input_ids[-1]
result = activation_patching(model, clean, corrupted, lambda logits: logits[:, -1, target], progress=False)
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, result)
if dist.get_rank() == 0:
    assert all(torch.equal(g, result) for g in gathered), "ranks returned different results"
    torch.save(result, sys.argv[2])
dist.destroy_process_group()
"""


def test_patching_pairs_split_over_two_ranks_equal_one_process(folder, tmp_path):
    model = StandardizedTransformer(str(folder / "model"), dtype=torch.float32)
    clean, corrupted = _pairs(model.tokenizer)
    (tmp_path / "pairs.json").write_text(json.dumps([clean, corrupted]))
    script = tmp_path / "patch.py"
    script.write_text(PATCH_SCRIPT)
    _run([*TORCHRUN, "--standalone", "--nproc-per-node", "2", str(script), str(folder / "model"),
          str(tmp_path / "result.pt"), str(tmp_path / "pairs.json")])  # fmt: skip
    distributed = torch.load(tmp_path / "result.pt")

    target = model.tokenizer(" home").input_ids[-1]
    single = activation_patching(model, clean, corrupted, lambda logits: logits[:, -1, target],
                                 progress=False)  # (pairs, layers, positions)
    assert distributed.shape == single.shape == (5, model.num_layers, single.shape[-1])
    # each rank batches its own 3 or 2 pairs' patched runs, one process all 5: the same per-row math in other
    # batch shapes, so float32 GEMM blocking may differ in the last bits
    torch.testing.assert_close(distributed, single, rtol=1e-5, atol=1e-6)
    # and the split is what the docs promise: contiguous blocks, rank 0 first
    assert [list(split_range(5, r, 2)) for r in range(2)] == [[0, 1, 2], [3, 4]]


def test_readme_torchrun_command_runs(folder, one_process_store):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    commands = [c for block in re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
                for c in block.replace("\\\n", " ").splitlines() if c.strip().startswith("torchrun")]
    assert commands, "README.md's 'Scaling out' section has no torchrun command in a ```bash block"
    argv = shlex.split(commands[0])
    assert argv[0] == "torchrun" and "--standalone" in argv and "--nproc-per-node" in argv, argv
    assert argv[argv.index("-m") + 1 : argv.index("-m") + 3] == ["unilens", "cache"], argv
    # the documented command, on the tiny model folder and this test's texts, its own --out folder, and shards small
    # enough for this test's 432 tokens to keep both ranks busy
    swap = {"--model": str(folder / "model"), "--texts": str(folder / "texts.txt"), "--out": str(folder / "readme"),
            "--shard-tokens": "40"}
    for flag, value in swap.items():
        assert flag in argv, f"the README command lacks {flag}"
        argv[argv.index(flag) + 1] = value
    cwd = folder / "readme-cwd"
    cwd.mkdir(exist_ok=True)
    result = subprocess.run([*TORCHRUN, *argv[1:]], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    store = ActivationStore(folder / "readme")
    assert store.manifest["num_shards"] >= 2
    # one progress bar (rank 0's), counting every rank's tokens: rank 0 alone computes about half of them
    assert f"{len(store)}/{len(store)}" in result.stderr and result.stderr.count("caching activations:   0%") == 1
    assert len(store) == len(ActivationStore(one_process_store))
    ref = ActivationStore(one_process_store)
    assert torch.equal(store["token_ids"], ref["token_ids"]) and torch.equal(store["position"], ref["position"])
    for name in store.names:  # the same texts through the same model: the one-process rows
        # (the README's batch size may differ from this file's: other batch shapes, float32 rounding only)
        torch.testing.assert_close(store[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)
    shutil.rmtree(folder / "readme")
