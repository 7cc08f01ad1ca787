"""Smoke test of bench/run.py: every workload runs once on a tiny model and its correctness check passes."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from unilens import StandardizedTransformer
from unilens.testing import tiny_model

_RUN = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("unilens_bench_run", _RUN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models():
    """A unilens model, and separate plain sdpa / eager copies of the same seeded weights."""
    hf, tok = tiny_model("llama", num_hidden_layers=3)
    model = StandardizedTransformer(hf, tokenizer=tok)
    hf_sdpa, _ = tiny_model("llama", num_hidden_layers=3, attn_implementation="sdpa")
    hf_eager, _ = tiny_model("llama", num_hidden_layers=3, attn_implementation="eager")
    return model, hf_sdpa, hf_eager


def _run_once(bench, workload, size="smoke"):
    timing = bench.measure(workload, size, reps=1, budget_s=0, min_reps=1, max_reps=1)
    assert set(timing.times) == set(workload.variants)
    assert all(len(v) == 1 and v[0] > 0 for v in timing.times.values())
    return timing


def test_prompts_have_exact_length(bench, models):
    tok = models[0].tokenizer
    prompts = bench.make_prompts(tok, 4, 12)
    assert len(set(prompts)) == 4
    assert [len(tok(p).input_ids) for p in prompts] == [12] * 4


def test_forward_attention_and_logit_lens_workloads(bench, models):
    model, hf_sdpa, hf_eager = models
    prompts = bench.make_prompts(model.tokenizer, 3, 10)
    batch = bench.encode(model.tokenizer, prompts)
    targets = {"nothing": 1.05, "logits": 1.02, "save_all": 1.05}
    from nnsight import LanguageModel

    hf_raw, tok = tiny_model("llama", num_hidden_layers=3, attn_implementation="sdpa")
    raw = LanguageModel(hf_raw, tokenizer=tok)  # the bare engine's reference rows
    for workload in (
        bench.forward_workload(model, hf_sdpa, batch, targets, raw=raw),
        bench.attention_workload(model, hf_eager, batch),
        bench.logit_lens_workload(model, hf_sdpa, prompts),
    ):
        timing = _run_once(bench, workload)
        assert bench.check_outputs(timing)  # raises on any disagreement with the baseline
    # the trace that saves every layer returns one (batch, seq, hidden) tensor per layer, equal to HF's hidden states
    saved = bench.forward_workload(model, hf_sdpa, batch, targets).variants["unilens trace, saves every layers_output"]()
    with torch.no_grad():
        hidden = hf_sdpa(**batch, output_hidden_states=True).hidden_states
    assert len(saved) == model.num_layers
    for i in range(model.num_layers - 1):  # HF's last hidden state is after the final norm
        torch.testing.assert_close(saved[i], hidden[i + 1], rtol=1e-5, atol=1e-6)


def test_manual_logit_lens_is_an_independent_oracle(bench, models):
    """The by-hand lens' last layer is the model's own next-token distribution."""
    model, hf_sdpa, _ = models
    prompts = bench.make_prompts(model.tokenizer, 2, 9)
    lens = bench.manual_logit_lens(hf_sdpa, model.tokenizer, prompts)
    with torch.no_grad():
        probs = torch.softmax(hf_sdpa(**bench.encode(model.tokenizer, prompts)).logits[:, -1], dim=-1)
    torch.testing.assert_close(lens[:, -1], probs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pairs", [1, 2])
def test_patching_matches_naive_loop(bench, models, pairs):
    model, hf_sdpa, _ = models
    prompts = bench.make_prompts(model.tokenizer, 2 * pairs, 8)  # clean / corrupted pairs
    workload = bench.patching_workload(model, hf_sdpa, prompts)
    timing = _run_once(bench, workload)
    bench.check_outputs(timing)
    naive = timing.first_outputs["naive loop, one forward per cell (torch hooks)"]
    for name in ("unilens activation_patching", "unilens activation_patching, metric_positions=-1"):
        ours = timing.first_outputs[name]
        assert naive.shape == ours.shape == (pairs, model.num_layers, 8)
        torch.testing.assert_close(ours, naive, rtol=1e-4, atol=1e-4)
    # patching the last layer at the last position gives the clean run's metric (an independent check of the loop)
    clean, _, metric = bench.patching_setup(hf_sdpa, model.tokenizer, prompts)
    with torch.no_grad():
        clean_metric = metric(hf_sdpa(**bench.encode(model.tokenizer, clean)).logits)  # (pairs,)
    torch.testing.assert_close(naive[:, -1, -1], clean_metric, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(naive[0, 0], naive[0, 0, :1].expand_as(naive[0, 0]))  # the cells really differ
    assert pairs == 1 or not torch.allclose(naive[0], naive[1])  # and the pairs


def test_overhead_workload(bench):
    timing = _run_once(bench, bench.overhead_workload("llama"), "per trace")
    assert bench.check_outputs(timing)
    achieved, target, met = bench.evaluate(timing, "unilens trace")
    assert achieved.endswith("ms") and "raw nnsight" in target and met in (True, False)


def test_cache_workload_stores_every_real_token(bench, models):
    model, hf_sdpa, _ = models
    texts = bench.cache_texts(model.tokenizer, 6)
    assert len({len(model.tokenizer(t).input_ids) for t in texts}) > 1  # varied lengths: padding happens
    timing = _run_once(bench, bench.cache_workload(model, hf_sdpa, texts, batch_size=4))
    assert bench.check_outputs(timing)
    store = timing.first_outputs["unilens cache_activations to disk"]
    assert store["layers_output.0"].shape == (len(store), model.hidden_size)
    achieved, target, met = bench.evaluate(timing, "unilens cache_activations to disk")
    assert "tokens/s" in achieved and met in (True, False)


def test_startup_workload_runs_whole_processes(bench):
    """The time-to-first-result row: three fresh processes, each printing ' Paris' (SmolLM2, converted copy)."""
    from unilens import load_default

    load_default(check=False)  # the converted copy the plain script loads exists
    timing = bench.measure(bench.startup_workload(), "smoke", reps=1, budget_s=0, min_reps=1, max_reps=1)
    assert any("Paris" in note for note in bench.check_outputs(timing))


def test_conformance_workload_builds(bench):
    workload = bench.conformance_workload()
    assert set(workload.variants) == {"default grid", "thorough grid"}
    workload.variants["thorough grid"] = workload.variants["default grid"]  # the smoke run keeps to seconds
    timing = _run_once(bench, workload)
    assert any("passes both grids" in note for note in bench.check_outputs(timing))


def test_tl_cache_workload_matches_the_hand_ordered_trace(bench, models):
    model = models[0]
    batch = bench.encode(model.tokenizer, bench.make_prompts(model.tokenizer, 2, 8))
    timing = _run_once(bench, bench.tl_cache_workload(model, batch))
    assert bench.check_outputs(timing)  # every cached tensor equals the hand-ordered trace's bitwise


def test_distributed_cache_runs_one_process_and_two_ranks(bench, tmp_path):
    """The data-parallel caching rows on a tiny model folder: a plain process and a 2-rank torchrun job (gloo)."""
    hf, tok = tiny_model("llama", num_hidden_layers=3)
    hf.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    ram = "one process, 2 threads, store in RAM (tmpfs)"
    results = bench.distributed_cache_runs(texts=16, shard_tokens=60, reps=1, model_folder=str(tmp_path / "model"),
                                           configs=["one process, 2 threads", ram, "torchrun 2 ranks x 1 thread"],
                                           timeout_s=300)  # fmt: skip
    one, two = results["one process, 2 threads"], results["torchrun 2 ranks x 1 thread"]
    assert (one["world"], two["world"]) == (1, 2) and two["torchrun"]
    # the same store on disk (same tokens, same bytes) and the same batches, split over the ranks
    assert one["tokens"] == two["tokens"] and one["bytes"] == two["bytes"] and one["batches"] == two["batches"]
    assert one["shards"] >= 2
    for r in (one, two):  # the bare-writes reference wrote every layer's rows of every token, as float32
        assert r["bare_bytes"] == r["tokens"] * r["num_layers"] * r["hidden_size"] * 4
        assert set(r["times"]) == {"plain", "plain_copy", "cache", "bare"}
    if bench.RAM_DISK.is_dir():  # the same store in RAM
        assert (results[ram]["tokens"], results[ram]["bytes"]) == (one["tokens"], one["bytes"])
    interference = bench.disk_interference(mb=16, reps=1)
    assert set(interference) <= {"disk", "ram", "mib"} and "disk" in interference and interference["mib"] == 16
    assert all(value > 0 for value in interference.values())
    lines = bench.distributed_cache_section(results, "tiny llama", interference)
    assert lines[0] == bench.DP_START and bench.DP_END in lines
    assert sum(line.startswith("| one process") or line.startswith("| torchrun") for line in lines) == len(results)
    assert any("disk_interference" in line for line in lines)
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n\nkept\n")
    bench.write_section(out, lines)
    bench.write_section(out, lines)  # replaced, not appended twice
    text = out.read_text()
    assert text.startswith("# results\n\nkept\n") and text.count(bench.DP_START) == 1
