"""Benchmarks: unilens' cost as ratios to the plain HF forward, every variant timed side by side in one run.

Run ``python bench/run.py [--quick] [--anchors]`` (``make bench``); it writes ``bench/RESULTS.md``.
The workload builders (``forward_workload``, ``attention_workload``, ``logit_lens_workload``,
``patching_workload``, ``cache_workload``, ``overhead_workload``, ``distributed_cache_runs``) are importable so ``tests/test_bench_smoke.py`` can run each
once on a tiny model.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # `python bench/run.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))

import unilens  # noqa: E402
from unilens import interventions

# Text the prompts are cut from (any English works; windows that round-trip through the tokenizer are kept).
TEXT = (
    "The capital of France is Paris, and the capital of Italy is Rome. The river that runs through Paris is "
    "the Seine, while Rome has the Tiber. When Mary and John went to the store, John gave a drink to Mary. "
    "Language models predict the next token from the previous ones; attention heads move information between "
    "positions and the residual stream carries it from one layer to the next. The quick brown fox jumps over "
    "the lazy dog. In the morning the market opens early, farmers bring vegetables, bakers bring bread, and "
    "the whole town gathers in the square to trade news about the weather, the harvest and the coming fair. "
)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def make_prompts(tokenizer, batch: int, seq: int) -> list[str]:
    """``batch`` different strings that each tokenize to exactly ``seq`` tokens (so no padding is involved).

    Example:
        >>> from unilens.testing import make_tokenizer
        >>> [len(make_tokenizer()(p).input_ids) for p in make_prompts(make_tokenizer(), 2, 8)]
        [8, 8]
    """
    n_special = len(tokenizer("").input_ids)
    width = seq - n_special
    if width < 1:
        raise ValueError(f"seq={seq} leaves no room for text after {n_special} special tokens.")
    ids = tokenizer(TEXT * (1 + (width * (batch + 4)) // 60)).input_ids[n_special:]
    prompts: list[str] = []
    start = 0
    while len(prompts) < batch:
        if start + width > len(ids):
            ids = ids + ids  # long prompts with a small corpus: keep cycling the text
        text = tokenizer.decode(ids[start : start + width])
        if len(tokenizer(text).input_ids) == seq and text not in prompts:
            prompts.append(text)
        start += max(1, width // 3)
    return prompts


def encode(tokenizer, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` ``(batch, seq)``: the exact inputs every variant receives."""
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ------------------------------------------------------------------------------------------------
# Workloads: named zero-argument callables timed side by side, with their targets
# ------------------------------------------------------------------------------------------------


@dataclass
class Target:
    """``ratio<=``: median(variant) / median(baseline) <= value; ``speedup>=``: median(baseline) / median(variant)
    >= value; ``ms_over<=``: median(variant) - median(reference) <= value milliseconds."""

    kind: str
    value: float
    reference: str | None = None  # only for ms_over<= (defaults to the baseline)

    def describe(self) -> str:
        if self.kind == "ratio<=":
            return f"<= {self.value:g}x"
        if self.kind == "speedup>=":
            return f">= {self.value:g}x faster"
        if self.kind == "throughput>=":
            return f">= {self.value:g}x plain tokens/s"
        return f"<= {self.value:g} ms over {self.reference}"


@dataclass
class Workload:
    title: str
    baseline: str
    variants: dict[str, Callable[[], Any]]
    targets: dict[str, Target] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    threads: int | None = None  # torch threads while timing (None: leave as is)
    # False: the first call is timed as the first repetition (for workloads whose one call already runs
    # hundreds of forwards on models warmed up by the workloads before it)
    warmup: bool = True


def _layer_output(output: Any) -> torch.Tensor:
    """A decoder layer returns a tensor or a tuple whose first element is the hidden state ``(batch, seq, hidden)``."""
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def forward_workload(
    model, hf_sdpa, batch: dict[str, torch.Tensor], targets: dict[str, float], raw=None
) -> Workload:
    """Plain HF sdpa forward vs unilens traces: doing nothing, reading logits only, saving every ``layers_output``.

    ``targets``: ``{"nothing": r, "logits": r, "save_all": r}`` ratio caps to the plain forward. ``raw``: an
    nnsight ``LanguageModel`` over another copy of the weights (a Llama-style model): the same traces through the
    bare engine, the floor unilens builds on.
    """

    def plain():
        with torch.no_grad():
            return hf_sdpa(**batch).logits

    def trace_nothing():
        with torch.no_grad(), model.trace(batch):
            pass

    def trace_logits():
        with torch.no_grad(), model.trace(batch):
            logits = model.logits.save()
        return logits

    def trace_save_all():
        saved: list[torch.Tensor] = []  # built before the block: nnsight does not push containers back
        with torch.no_grad(), model.trace(batch):
            for i in range(model.num_layers):
                saved.append(model.layers_output[i].save())  # (batch, seq, hidden)
        return saved

    variants = {
        "HF forward (sdpa)": plain,
        "unilens trace, nothing requested": trace_nothing,
        "unilens trace, hooks installed but unused (reads logits)": trace_logits,
        "unilens trace, saves every layers_output": trace_save_all,
    }
    if raw is not None:

        def raw_logits():
            with torch.no_grad(), raw.trace(batch):
                logits = raw.output.logits.save()
            return logits

        def raw_save_all():
            saved: list[torch.Tensor] = []
            with torch.no_grad(), raw.trace(batch):
                for layer in raw.model.layers:
                    saved.append(layer.output.save())  # (batch, seq, hidden)
            return saved

        variants["raw nnsight trace, reads logits"] = raw_logits
        variants["raw nnsight trace, saves every layer output"] = raw_save_all

    return Workload(
        title="forward and residual-stream tracing",
        baseline="HF forward (sdpa)",
        variants=variants,
        targets={
            "unilens trace, nothing requested": Target("ratio<=", targets["nothing"]),
            "unilens trace, hooks installed but unused (reads logits)": Target("ratio<=", targets["logits"]),
            "unilens trace, saves every layers_output": Target("ratio<=", targets["save_all"]),
        },
    )


def attention_workload(model, hf_eager, batch: dict[str, torch.Tensor]) -> Workload:
    """HF eager forward with ``output_attentions=True`` vs unilens saving every ``attention_probabilities[i]``."""

    def eager():
        with torch.no_grad():
            return hf_eager(**batch, output_attentions=True).attentions

    def unilens_probs():
        saved: list[torch.Tensor] = []
        with torch.no_grad(), model.trace(batch):
            for i in range(model.num_layers):
                saved.append(model.attention_probabilities[i].save())  # (batch, heads, query, key)
        return saved

    return Workload(
        title="attention probabilities of every layer",
        baseline="HF eager forward, output_attentions=True",
        variants={"HF eager forward, output_attentions=True": eager, "unilens saves every attention_probabilities": unilens_probs},
        targets={"unilens saves every attention_probabilities": Target("ratio<=", 1.08)},
    )


# The forward order of a Llama-style layer, written out by hand (the baseline of the run_with_cache row: what a user
# who knows nnsight's rule writes). Names a model lacks are skipped.
HAND_ORDER: tuple[str, ...] = (
    "layers_input", "attention_inputs_per_head", "attention_queries_input", "attention_keys_input",
    "attention_values_input", "input_norms_scale", "input_norms_normalized", "attentions_input",
    "attention_queries_pre_rotary",
    "attention_keys_pre_rotary", "attention_queries", "attention_keys", "attention_values", "attention_scores",
    "attention_probabilities", "attention_heads", "attention_head_results", "attentions_output", "layers_resid_mid",
    "post_attention_norms_scale", "post_attention_norms_normalized", "mlps_input", "mlps_pre_activation",
    "mlps_pre_linear", "mlps_post_activation", "mlps_output", "layers_output",
)  # fmt: skip


def tl_cache_workload(model, batch: dict[str, torch.Tensor]) -> Workload:
    """``run_with_cache`` with every TL name (every standardized tensor they alias, read in ONE forward, names in any
    order) vs the same standardized reads written by hand in forward order in one trace."""
    from unilens.compat import tl

    infos = [tl.resolve(model, n) for n in tl.hook_names(model)]
    locations = set(loc for info in infos for loc in info.read_locations)
    n = model.num_layers
    hand = [("token_embeddings", None)] + [(a, i) for i in range(n) for a in HAND_ORDER if (a, i) in locations]
    hand += [loc for loc in (("final_norm_scale", None), ("final_norm_normalized", None)) if loc in locations]
    missing = locations - set(hand) - {("logits", None)}
    assert not missing, f"the hand order lacks {sorted(missing)}"

    def by_hand():
        saved: dict = {}  # built before the block: nnsight does not push containers back
        with torch.no_grad(), model.trace(batch):
            for accessor, layer in hand:
                value = getattr(model, accessor)
                saved[(accessor, layer)] = (value if layer is None else value[layer]).save()
            saved[("logits", None)] = model.logits.save()
        return saved

    def cache():
        return model.run_with_cache(batch["input_ids"], attention_mask=batch["attention_mask"])

    return Workload(
        title="TransformerLens-style run_with_cache, every name",
        baseline="one trace, the same standardized reads in forward order by hand",
        variants={"one trace, the same standardized reads in forward order by hand": by_hand,
                  "unilens run_with_cache (every TL name)": cache},
        targets={"unilens run_with_cache (every TL name)": Target("ratio<=", 1.0)},
        notes=[f"{len(infos)} TL names over {len(locations)} standardized tensors (the per-head input copies and "
               "hook_mlp_in are views of the residual reads)."],
    )


def manual_logit_lens(hf, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """The by-hand baseline: one forward with plain torch hooks keeping each layer's last-position hidden state,
    then ONE final norm + unembedding + softmax on the stacked ``(batch, layers, hidden)`` tensor.

    Prompts must all have the same length (no padding), which ``make_prompts`` guarantees.
    """
    batch = encode(tokenizer, prompts)
    last: list[torch.Tensor] = []
    handles = [
        layer.register_forward_hook(lambda _m, _a, out: last.append(_layer_output(out)[:, -1]))
        for layer in hf.model.layers
    ]
    try:
        with torch.no_grad():
            hf(**batch)
            stacked = torch.stack(last, dim=1)  # (batch, layers, hidden)
            return torch.softmax(hf.lm_head(hf.model.norm(stacked)).float(), dim=-1)  # (batch, layers, vocab)
    finally:
        for handle in handles:
            handle.remove()


def logit_lens_workload(model, hf_sdpa, prompts: Sequence[str]) -> Workload:
    """``interventions.logit_lens`` vs a plain forward + one stacked final-norm/unembedding done by hand."""
    tokenizer = model.tokenizer

    def lens():
        return interventions.logit_lens(model, list(prompts))

    return Workload(
        title="logit lens (every layer, last position)",
        baseline="plain forward + stacked norm/unembed by hand",
        variants={
            "plain forward + stacked norm/unembed by hand": lambda: manual_logit_lens(hf_sdpa, tokenizer, prompts),
            "unilens logit_lens": lens,
        },
        targets={"unilens logit_lens": Target("ratio<=", 1.10)},
    )


def naive_activation_patching(
    hf, tokenizer, clean: Sequence[str], corrupted: Sequence[str], metric: Callable[[torch.Tensor], torch.Tensor],
    layers: Sequence[int],
) -> torch.Tensor:
    """The naive baseline: one clean forward of the n clean prompts caching every layer's output, then one forward
    of the n corrupted prompts per (layer, position) cell, a plain torch forward hook writing the clean value
    there in every row. ``(n, layers, seq)``."""
    clean_batch, corrupted_batch = encode(tokenizer, clean), encode(tokenizer, corrupted)
    n, seq = clean_batch["input_ids"].shape
    blocks = hf.model.layers
    cache: dict[int, torch.Tensor] = {}

    def keep(index):
        return lambda _m, _a, out: cache.__setitem__(index, _layer_output(out).clone())  # (n, seq, hidden)

    handles = [blocks[i].register_forward_hook(keep(i)) for i in layers]
    try:
        with torch.no_grad():
            hf(**clean_batch)
    finally:
        for handle in handles:
            handle.remove()

    results = torch.empty(n, len(layers), seq)
    for row, layer in enumerate(layers):
        for pos in range(seq):

            def patch(_m, _a, out, layer=layer, pos=pos):
                hidden = _layer_output(out).clone()
                hidden[:, pos] = cache[layer][:, pos]
                return _with_first(out, hidden)

            handle = blocks[layer].register_forward_hook(patch)
            try:
                with torch.no_grad():
                    logits = hf(**corrupted_batch).logits  # (n, seq, vocab)
            finally:
                handle.remove()
            results[:, row, pos] = metric(logits).float()
    return results


def patching_setup(hf, tokenizer, prompts: Sequence[str]):
    """Prompt pairs (clean ``prompts[2i]``, corrupted ``prompts[2i + 1]``, all the same length) and a metric: the
    logit of each clean prompt's top next token, at the last position of its pair's row."""
    clean, corrupted = list(prompts[0::2]), list(prompts[1::2])
    with torch.no_grad():
        top = hf(**encode(tokenizer, clean)).logits[:, -1].argmax(-1)  # (pairs,)
    return clean, corrupted, lambda logits: logits[torch.arange(len(top)), -1, top]


def patching_workload(model, hf_sdpa, prompts: Sequence[str], layers: Sequence[int] | None = None) -> Workload:
    """``interventions.activation_patching`` over layers x all positions vs the naive one-forward-per-cell loop,
    for ``len(prompts) // 2`` prompt pairs at once; with the metric on full logits, and on the last position."""
    layers = list(range(model.num_layers)) if layers is None else list(layers)
    clean, corrupted, metric = patching_setup(hf_sdpa, model.tokenizer, prompts)

    def unilens_patching(**kwargs):
        out = interventions.activation_patching(model, clean, corrupted, metric, component="resid", layers=layers,
                                                progress=False, **kwargs)  # fmt: skip
        return out  # (pairs, layers, seq)

    def naive():
        return naive_activation_patching(hf_sdpa, model.tokenizer, clean, corrupted, metric, layers)

    seq = len(model.tokenizer(clean[0]).input_ids)
    pairs = "one pair" if len(clean) == 1 else f"{len(clean)} pairs"
    return Workload(
        title=f"activation patching, {len(layers)} layers x {seq} positions (resid), {pairs}",
        baseline="naive loop, one forward per cell (torch hooks)",
        variants={
            "naive loop, one forward per cell (torch hooks)": naive,
            "unilens activation_patching": unilens_patching,
            "unilens activation_patching, metric_positions=-1": lambda: unilens_patching(metric_positions=-1),
        },
        targets={
            "unilens activation_patching": Target("speedup>=", 10.0),
            "unilens activation_patching, metric_positions=-1": Target("speedup>=", 10.0),
        },
        warmup=False,
    )


def cache_texts(tokenizer, n: int = 64) -> list[str]:
    """``n`` texts of 8 to 64 tokens cut from TEXT: a small dataset with varied lengths (so padding occurs)."""
    ids = tokenizer(TEXT * 8).input_ids
    texts, start = [], 0
    for k in range(n):
        width = 8 + (k * 37) % 57  # 8..64 tokens
        if start + width > len(ids):
            start = 0
        texts.append(tokenizer.decode(ids[start : start + width]))
        start += width // 2
    return texts


def cache_workload(model, hf_sdpa, texts: Sequence[str], batch_size: int = 8) -> Workload:
    """``cache_activations(model, texts, "layers_output.*")`` to a fresh store vs plain forwards of the same texts
    batched the same way (sorted by length, ``batch_size`` per forward, right padding); same tokens, so the
    throughput ratio (tokens/s) is baseline time / caching time."""
    import shutil
    import tempfile

    tokenizer = model.tokenizer
    lengths = [len(tokenizer(t).input_ids) for t in texts]
    order = sorted(range(len(texts)), key=lambda k: (-lengths[k], k))
    batches = [[texts[k] for k in order[i : i + batch_size]] for i in range(0, len(order), batch_size)]
    root = Path(tempfile.mkdtemp(prefix="unilens-bench-cache-"))

    def plain():
        with torch.no_grad():
            for group in batches:
                enc = tokenizer(group, padding=True, return_tensors="pt")
                hf_sdpa(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return sum(lengths)

    def cache(names: str = "layers_output.*", folder: str = "store"):
        out = root / folder  # one per variant: each returns its store, read by the checks after the timing
        shutil.rmtree(out, ignore_errors=True)  # a fresh store each call (a complete one would return at once)
        store = unilens.cache_activations(model, list(texts), names, out, batch_size=batch_size,
                                          progress=False)  # fmt: skip
        return store

    late = f"layers_output.{model.num_layers - 2}"  # a late layer: the forward stops after it (no final layer, norm, head)

    return Workload(
        title=f"activation caching, every layers_output, {len(texts)} texts / {sum(lengths)} tokens, batch {batch_size}",
        baseline="plain forwards of the same batches",
        variants={"plain forwards of the same batches": plain, "unilens cache_activations to disk": cache,
                  f"unilens cache_activations to disk, {late} only": lambda: cache(late, "store-late")},
        targets={"unilens cache_activations to disk": Target("throughput>=", 0.8),
                 f"unilens cache_activations to disk, {late} only": Target("throughput>=", 0.8)},
        notes=[f"store written under {root} (safetensors shards + manifest), rewritten each repetition."],
    )


# Data-parallel caching: every configuration is its own process (or torchrun job) running bench/cache_worker.py,
# which times plain forwards of its batches and cache_activations alternately, in the same process.
DP_CONFIGS = {  # label: (torchrun ranks or None for a plain process, torch threads per process, store in RAM)
    "one process, 2 threads": (None, 2, False),
    "one process, 2 threads, store in RAM (tmpfs)": (None, 2, True),
    "torchrun 1 rank x 2 threads": (1, 2, False),
    "torchrun 2 ranks x 1 thread": (2, 1, False),
}
RAM_DISK = Path("/dev/shm")  # tmpfs on Linux: a store there costs a memory copy, no disk writeback
DP_START, DP_END = "<!-- distributed-cache:start -->", "<!-- distributed-cache:end -->"


def distributed_cache_runs(
    texts: int = 48, shard_tokens: int = 250, reps: int = 5, names: Sequence[str] = ("layers_output.*",),
    model_folder: str | None = None, configs: Sequence[str] = tuple(DP_CONFIGS), timeout_s: float = 1800,
) -> dict[str, dict[str, Any]]:
    """Run bench/cache_worker.py once per configuration (``DP_CONFIGS``); {label: the worker's JSON result}."""
    import subprocess

    results = {}
    root = Path(tempfile.mkdtemp(prefix="unilens-bench-dp-"))
    ram = Path(tempfile.mkdtemp(prefix="unilens-bench-dp-", dir=RAM_DISK)) if RAM_DISK.is_dir() else None
    for label in configs:
        ranks, threads, in_ram = DP_CONFIGS[label]
        if in_ram and ram is None:
            continue  # no tmpfs on this machine
        launcher = [sys.executable] if ranks is None else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
        cmd = [*launcher, str(HERE / "cache_worker.py"), "--threads", str(threads), "--texts", str(texts),
               "--shard-tokens", str(shard_tokens), "--reps", str(reps), "--names", *names,
               "--out", str((ram if in_ram else root) / "store"), "--result", str(root / "result.json")]  # fmt: skip
        cmd += ["--model", model_folder] if model_folder else []
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            raise RuntimeError(f"{label} failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        results[label] = json.loads((root / "result.json").read_text())
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    if ram is not None:
        shutil.rmtree(ram, ignore_errors=True)
    return results


def disk_interference(mb: int = 128, reps: int = 3) -> dict[str, float]:
    """A machine fact, no unilens code: how much a thread writing ``mb`` MiB (the bytes of one caching run, in 16 MiB
    files with fsync, as shards are written) slows a 2-thread float32 matmul loop, for a folder on the disk (the
    temp folder) and in RAM (tmpfs). Returns ``{"disk": slowdown, "ram": slowdown, "mib": mb}`` (1.0 = none),
    medians."""
    import shutil
    import threading

    threads = torch.get_num_threads()
    torch.set_num_threads(2)

    a, w = torch.randn(512, 576), torch.randn(1536, 576)
    data = [os.urandom(16 * 2**20) for _ in range(max(1, mb // 16))]

    def gemms(n: int = 300) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            torch.nn.functional.linear(a, w)
        return time.perf_counter() - t0

    def write(folder: Path) -> None:
        for i, chunk in enumerate(data):
            with open(folder / f"part{i}", "wb") as f:
                f.write(chunk)
                f.flush()
                os.fsync(f.fileno())

    gemms()
    out: dict[str, list[float]] = {"disk": [], "ram": []}
    for _ in range(reps):
        for key, parent in (("disk", None), ("ram", RAM_DISK if RAM_DISK.is_dir() else None)):
            if key == "ram" and parent is None:
                continue
            folder = Path(tempfile.mkdtemp(prefix="unilens-bench-io-", dir=parent))
            alone = gemms()
            writer = threading.Thread(target=write, args=(folder,))
            writer.start()
            busy = gemms()
            writer.join()
            shutil.rmtree(folder, ignore_errors=True)
            out[key].append(busy / alone)
    torch.set_num_threads(threads)
    return {**{key: statistics.median(v) for key, v in out.items() if v}, "mib": mb}


def distributed_cache_section(results: dict[str, dict[str, Any]], model_name: str,
                              interference: dict[str, float] | None = None) -> list[str]:
    """The delimited RESULTS.md section: tokens/s and MB/s written per configuration, ratio to plain forwards of
    the same batches (same process), and 2 ranks x 1 thread against 1 rank x 2 threads, with the goals;
    ``interference`` (`disk_interference`) says what writing the same bytes costs a matmul loop on this machine."""
    any_result = next(iter(results.values()))
    lines = [DP_START, f"## Data-parallel activation caching ({model_name})", "",
             f"`cache_activations(..., {any_result['names']})` of {any_result['texts']} texts / "
             f"{any_result['tokens']} tokens in {any_result['shards']} shards (batch 8, float32 store), every "
             "configuration its own process or `torchrun` job (bench/cache_worker.py). Within each, plain forwards "
             "of exactly the batches caching runs (same shard plan, sort, padding, `logits_to_keep`) and the caching "
             "call alternate, each timed between barriers (a distributed time is the slowest rank's); medians. "
             "*Plain* is the very model caching runs (its HF module called without a trace: same weights, same "
             "memory), so caching / plain is the cost of caching; *HF copy* is a separately loaded HF sdpa model, "
             "which adds unilens's wrapping and the spread between two loads of the same weights (the HF copy / "
             "plain column: identical weights, different allocations). *Bare writes* is the least any crash-safe "
             "cache of these activations does, no unilens code: the same forwards on the same model with a torch "
             "hook per layer appending each text's rows to one file per shard, fsync per shard (no layout, checksum "
             "or manifest); bare / plain prices the bytes themselves on this machine. The store is in the temp "
             "folder on disk, except in the tmpfs row.", "",
             "| configuration | reps | plain tokens/s | caching tokens/s | MB/s written | caching / plain | goal | met "
             "| bare writes / plain | HF copy / plain | caching / HF copy |",
             "|---|---:|---:|---:|---:|---:|---|---|---:|---:|---:|"]  # fmt: skip
    rates, over_bare = {}, []
    for label, r in results.items():
        times = {name: statistics.median(t) for name, t in r["times"].items()}
        plain, cache, copy = times["plain"], times["cache"], times["plain_copy"]
        rates[label] = r["tokens"] / cache
        ratio = plain / cache
        goal, met = ("", "")
        if label.startswith("one process"):
            goal, met = ">= 0.95x", "yes" if ratio >= 0.95 else "**no**"
        bare = f"{plain / times['bare']:.3f}x" if "bare" in times else "-"
        if "bare" in times:
            over_bare.append(f"{label}: {times['bare'] / cache:.3f}x")
        lines.append(f"| {label} | {len(r['times']['cache'])} | {r['tokens'] / plain:,.0f} | {rates[label]:,.0f} | "
                     f"{r['bytes'] / cache / 2**20:,.1f} | {ratio:.3f}x | {goal} | {met} | {bare} | "
                     f"{plain / copy:.3f}x | {copy / cache:.3f}x |")
    two, one = "torchrun 2 ranks x 1 thread", "torchrun 1 rank x 2 threads"
    lines.append("")
    if over_bare:
        lines.append(f"- caching / bare writes, tokens/s (what unilens adds to writing the same bytes): "
                     f"{'; '.join(over_bare)}.")
    if two in rates and one in rates:
        ratio = rates[two] / rates[one]
        lines += [f"- 2 ranks x 1 thread / 1 rank x 2 threads, caching tokens/s: **{ratio:.3f}x** (goal >= 0.9x: "
                  f"{'met' if ratio >= 0.9 else 'not met'})."]
    if interference:
        lines += [f"- this machine's disk, no unilens code (`disk_interference`): a thread writing "
                  f"{interference['mib']} MiB with fsync "
                  f"slows a 2-thread matmul loop {interference['disk']:.2f}x on the disk"
                  + (f", {interference['ram']:.2f}x in RAM (tmpfs)" if "ram" in interference else "")
                  + ". Caching writes its bytes as it goes, so the disk rows carry that cost (the bare-writes column "
                  "prices it)."]
    lines += [f"- load average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} "
              f"({os.cpu_count()} logical cores).", DP_END, ""]
    return lines


def write_section(path: Path, lines: list[str]) -> None:
    """Replace the ``DP_START``..``DP_END`` block of ``path`` (or append it): the rest of the file is kept."""
    text = path.read_text() if path.exists() else ""
    block = "\n".join(lines).rstrip("\n") + "\n"
    if DP_START in text and DP_END in text:
        head, rest = text.split(DP_START, 1)
        text = head + block.rstrip("\n") + rest.split(DP_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def overhead_workload(model_type: str = "llama") -> Workload:
    """Fixed per-trace cost on a tiny model: unilens trace vs a raw nnsight ``LanguageModel`` trace vs a plain
    forward, three copies of the same seeded weights (wrapping changes the module, so each gets its own)."""
    from nnsight import LanguageModel

    from unilens.testing import tiny_model

    hf_u, tok = tiny_model(model_type)
    hf_raw, _ = tiny_model(model_type)
    hf_plain, _ = tiny_model(model_type)
    model = unilens.StandardizedTransformer(hf_u, tokenizer=tok)
    with warnings.catch_warnings():  # nnsight 0.8 suggests TransformersModel; unilens subclasses LanguageModel
        warnings.simplefilter("ignore")
        raw = LanguageModel(hf_raw, tokenizer=tok)
    batch = encode(tok, make_prompts(tok, 2, 8))

    def plain():
        with torch.no_grad():
            return hf_plain(**batch).logits

    def raw_trace():
        with torch.no_grad(), raw.trace(batch):
            logits = raw.output.logits.save()
        return logits

    def unilens_trace():
        with torch.no_grad(), model.trace(batch):
            logits = model.logits.save()
        return logits

    return Workload(
        title=f"fixed per-trace overhead, tiny {model_type} (2 x 8 tokens, reads logits)",
        baseline="plain forward",
        variants={"plain forward": plain, "raw nnsight LanguageModel trace": raw_trace, "unilens trace": unilens_trace},
        targets={"unilens trace": Target("ms_over<=", 1.0, "raw nnsight LanguageModel trace")},
        threads=1,
    )


def conformance_workload(impl: str = "sdpa") -> Workload:
    """Wall time of `check_attention` on the default grid (seconds) and on the thorough one, three dtypes."""
    from unilens.conformance.kernels import check_attention

    def grid(level: str):
        def call():
            return check_attention(impl, level=level).passed
        return call

    return Workload(
        title=f"conformance grids of check_attention ({impl}, float32 + bfloat16 + float16)",
        baseline="default grid",
        variants={"default grid": grid("default"), "thorough grid": grid("thorough")},
        warmup=False,
    )


_PLAIN_STARTUP = """
import glob, os, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
with torch.no_grad():
    logits = model(**tok("The capital of France is", return_tensors="pt")).logits
print(tok.decode(logits[0, -1].argmax()))
"""
_UNILENS_STARTUP = """
from unilens import load_default
model = load_default()
with model.trace("The capital of France is"):
    probs = model.next_token_probs.save()
print(model.tokenizer.decode(probs[0].argmax()))
"""


def startup_workload() -> Workload:
    """Time to a first result, whole processes (interpreter start to exit): a user's own script that loads the same
    converted SmolLM2 files with transformers and runs one forward, vs ``load_default()`` + one trace (imports,
    discovery, hooks, load-time validation included), vs the CLI's ``unilens lens``."""
    import subprocess

    from unilens.arch.loading import default_model_path, gguf_cache_dir

    folder = str(gguf_cache_dir(default_model_path()))  # made by load_default() before this workload runs
    tmp = Path(tempfile.mkdtemp(prefix="unilens-startup-"))
    (tmp / "plain.py").write_text(_PLAIN_STARTUP)
    (tmp / "first_trace.py").write_text(_UNILENS_STARTUP)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}

    def run(*cmd: str):
        def call():
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
            if out.returncode:
                raise RuntimeError(f"{cmd} failed: {out.stderr[-2000:]}")
            return out.stdout
        return call

    unilens_cli = str(Path(sys.executable).with_name("unilens"))
    return Workload(
        title="time to first result (whole process: import, load, first forward)",
        baseline="plain transformers: load the converted files + one forward",
        variants={
            "plain transformers: load the converted files + one forward": run(sys.executable, "plain.py", folder),
            "unilens: load_default() + one trace": run(sys.executable, "first_trace.py"),
            "unilens lens (CLI)": run(unilens_cli, "lens", "The capital of France is"),
        },
        targets={"unilens: load_default() + one trace": Target("ratio<=", 1.2),
                 "unilens lens (CLI)": Target("ratio<=", 1.2)},
        warmup=False,  # load_default() above already read every file once: the OS cache is warm
    )


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    workload: Workload
    size: str
    times: dict[str, list[float]]  # seconds per call, per variant
    first_outputs: dict[str, Any]

    def median_ms(self, name: str) -> float:
        return statistics.median(self.times[name]) * 1000

    def paired_ratio(self, name: str) -> float:
        """Median over repetitions of (variant / baseline) within the same round: insensitive to slow drift."""
        base = self.times[self.workload.baseline]
        return statistics.median(v / b for v, b in zip(self.times[name], base))


def measure(workload: Workload, size: str, reps: int | None, budget_s: float, min_reps: int, max_reps: int) -> Timing:
    """Warm up each variant once (keeping its output for the correctness checks), then time ``reps`` rounds.

    Each round runs every variant once, starting at a rotating variant, so slow drift (other processes,
    thermal state) hits all variants alike. ``reps=None`` picks as many rounds as fit ``budget_s``
    (between ``min_reps`` and ``max_reps``) from the warm-up times.
    """
    previous_threads = torch.get_num_threads()
    if workload.threads is not None:
        torch.set_num_threads(workload.threads)
    try:
        names = list(workload.variants)
        first: dict[str, Any] = {}
        times: dict[str, list[float]] = {name: [] for name in names}
        warm = 0.0
        for name in names:
            gc.collect()
            start = time.perf_counter()
            first[name] = workload.variants[name]()
            elapsed = time.perf_counter() - start
            warm += elapsed
            if not workload.warmup:
                times[name].append(elapsed)
        if reps is None:
            reps = int(max(min_reps, min(max_reps, budget_s // max(warm, 1e-9))))
        for rep in range(0 if workload.warmup else 1, reps):
            for k in range(len(names)):
                name = names[(rep + k) % len(names)]
                gc.collect()
                start = time.perf_counter()
                workload.variants[name]()
                times[name].append(time.perf_counter() - start)
        return Timing(workload, size, times, first)
    finally:
        torch.set_num_threads(previous_threads)


def evaluate(timing: Timing, name: str) -> tuple[str, str, bool | None]:
    """(achieved, target text, met) for a variant with a target."""
    target = timing.workload.targets.get(name)
    if target is None:
        return "", "", None
    med = timing.median_ms(name)
    base = timing.median_ms(timing.workload.baseline)
    if target.kind == "ratio<=":
        ratio = med / base
        digits = 4 if f"{ratio:.3f}" == f"{target.value:.3f}" else 3  # 1.0204x, not a "missed" 1.020x
        return f"{ratio:.{digits}f}x", target.describe(), ratio <= target.value
    if target.kind == "speedup>=":
        speedup = base / med
        return f"{speedup:.1f}x faster", target.describe(), speedup >= target.value
    if target.kind == "throughput>=":  # same tokens: tokens/s ratio = baseline time / variant time
        throughput = base / med
        return f"{throughput:.2f}x plain tokens/s", target.describe(), throughput >= target.value
    over = med - timing.median_ms(target.reference or timing.workload.baseline)
    return f"{over:+.2f} ms", target.describe(), over <= target.value


# ------------------------------------------------------------------------------------------------
# Correctness checks (run on the warm-up outputs, before anything is reported)
# ------------------------------------------------------------------------------------------------


def check_outputs(timing: Timing) -> list[str]:
    """Compare each unilens variant's warm-up output with its baseline's; raise on disagreement, return notes."""
    out, title = timing.first_outputs, timing.workload.title
    notes: list[str] = []
    if title.startswith("forward"):
        plain = out["HF forward (sdpa)"]
        traced = out["unilens trace, hooks installed but unused (reads logits)"]
        torch.testing.assert_close(traced, plain, rtol=0, atol=0)  # same sdpa kernel, same weights: bitwise
        notes.append("unilens logits equal the plain sdpa forward's bitwise.")
        if "raw nnsight trace, reads logits" in out:
            torch.testing.assert_close(out["raw nnsight trace, reads logits"], plain, rtol=0, atol=0)
            for ours, theirs in zip(out["unilens trace, saves every layers_output"],
                                    out["raw nnsight trace, saves every layer output"]):  # fmt: skip
                torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
            notes.append("the raw nnsight traces (the engine alone, another copy of the weights) return the same "
                         "logits and layer outputs bitwise: the reference for what tracing itself costs.")
    elif title.startswith("attention"):
        for i, (hf_p, ul_p) in enumerate(zip(out["HF eager forward, output_attentions=True"],
                                             out["unilens saves every attention_probabilities"])):
            # same eager math (matmul, additive mask, fp32 softmax) in both; allow float32 rounding only
            torch.testing.assert_close(ul_p, hf_p, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"layer {i}: {m}")
        notes.append("unilens probabilities match HF eager output_attentions (rtol 1e-5) on every layer.")
    elif title.startswith("TransformerLens-style run_with_cache"):
        from unilens.compat import tl

        hand = out["one trace, the same standardized reads in forward order by hand"]
        logits, cache = out["unilens run_with_cache (every TL name)"]
        model = cache.model
        torch.testing.assert_close(logits, hand[("logits", None)], rtol=0, atol=0)
        for name in cache:
            info = tl.resolve(model, name)
            ref = info.from_reads([hand[loc] for loc in info.read_locations])
            torch.testing.assert_close(cache[name], ref, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
        notes.append(f"all {len(cache)} cached tensors equal the hand-ordered trace's bitwise.")
    elif title.startswith("conformance grids"):
        assert all(out.values()), "a correct kernel failed its conformance grid"
        notes.append("the kernel passes both grids; the thorough grid goes to 1031 keys with every feature.")
    elif title.startswith("time to first result"):
        answers = {name: value.strip().splitlines()[-1] if name != "unilens lens (CLI)" else value
                   for name, value in out.items()}
        assert answers["plain transformers: load the converted files + one forward"] == "Paris", answers
        assert answers["unilens: load_default() + one trace"] == "Paris", answers
        last_row = answers["unilens lens (CLI)"].strip().splitlines()[-1]  # the last layer's top token first
        assert last_row.split()[1] == "' Paris'" or "' Paris'" in last_row.split("%")[0], last_row
        notes.append("every process prints ' Paris'.")
    elif title.startswith("logit lens"):
        manual = out["plain forward + stacked norm/unembed by hand"]
        lens = out["unilens logit_lens"]
        diff = (lens - manual).abs().max().item()
        torch.testing.assert_close(lens, manual, rtol=1e-5, atol=1e-6)  # float32 rounding between two models
        notes.append(f"logit_lens equals the by-hand lens (max abs diff {diff:.1e}).")
    elif title.startswith("activation patching"):
        naive = out["naive loop, one forward per cell (torch hooks)"]  # (pairs, layers, seq)
        for name in ("unilens activation_patching", "unilens activation_patching, metric_positions=-1"):
            ours = out[name].reshape(naive.shape)  # one pair: (layers, seq)
            diff = (ours - naive).abs().max().item()
            # A batched forward (many patched rows) and a smaller one use different GEMM blockings, so the
            # metric can differ in the last float32 bits; anything beyond rounding is a real disagreement.
            torch.testing.assert_close(ours, naive, rtol=1e-4, atol=1e-4)
            notes.append(f"{name} equals the naive loop on all {naive.numel()} cells "
                         f"(max abs diff {diff:.1e}, {'bitwise' if diff == 0 else 'float32 rounding'}).")
    elif title.startswith("activation caching"):
        store = out["unilens cache_activations to disk"]
        n_tokens = out["plain forwards of the same batches"]
        assert len(store) == n_tokens, f"the store holds {len(store)} rows for {n_tokens} real tokens"
        notes.append(f"the store holds exactly the {n_tokens} real tokens (no padding rows).")
    elif title.startswith("fixed per-trace"):
        torch.testing.assert_close(out["unilens trace"], out["plain forward"], rtol=0, atol=0)
        torch.testing.assert_close(out["raw nnsight LanguageModel trace"], out["plain forward"], rtol=0, atol=0)
        notes.append("all three return identical logits.")
    return notes


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_section(
    load_start: tuple[float, ...], load_end: tuple[float, ...], threads: int, default_threads: int, args
) -> list[str]:
    chosen = "torch's default" if threads == default_threads else f"set by --threads; torch's default is {default_threads}"

    return [
        "## Machine",
        "",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores",
        f"- torch threads: {threads} ({chosen}) for the SmolLM2 workloads; 1 for the tiny-model overhead row",
        f"- load average (1, 5, 15 min) at start: {', '.join(f'{x:.2f}' for x in load_start)}; "
        f"at end: {', '.join(f'{x:.2f}' for x in load_end)}",
        f"- Python {platform.python_version()}, torch {torch.__version__}, transformers {_version('transformers')}, "
        f"nnsight {_version('nnsight')}, unilens {unilens.__version__}",
        f"- model: {unilens.loading.DEFAULT_MODEL_NAME}, float32, CPU",
        f"- mode: {'--quick' if args.quick else 'full'}; medians over interleaved repetitions after one warm-up call "
        "per variant (each repetition runs every variant once, starting at a rotating variant)",
        "",
    ]


def noise_note(timing: Timing, name: str) -> str:
    """For a missed ratio target: whether the variant's and the baseline's min - max ranges overlap."""
    a, b = timing.times[name], timing.times[timing.workload.baseline]
    if min(a) <= max(b) and min(b) <= max(a):
        spread = (max(b) - min(b)) / statistics.median(b)
        return (f"the variant's and the baseline's min - max ranges overlap (baseline spread {spread:.0%} of its "
                "median): not separable from this run's noise")
    return "the ranges do not overlap: a real cost (see bench/README.md, profiles)"


def table(timing: Timing) -> list[str]:
    w = timing.workload
    base = timing.median_ms(w.baseline)
    reps = len(next(iter(timing.times.values())))
    lines = [
        f"### {w.title} — {timing.size} ({reps} reps)",
        "",
        "| variant | median ms | min - max ms | ratio to baseline | paired ratio | target | reached | met |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for name, values in timing.times.items():
        med = timing.median_ms(name)
        achieved, target, met = evaluate(timing, name)
        ratio = "baseline" if name == w.baseline else f"{med / base:.3f}x"
        paired = "" if name == w.baseline else f"{timing.paired_ratio(name):.3f}x"
        mark = "" if met is None else ("yes" if met else "**no**")
        lines.append(
            f"| {name} | {med:.2f} | {min(values) * 1000:.2f} - {max(values) * 1000:.2f} | {ratio} | {paired} | "
            f"{target} | {achieved} | {mark} |"
        )
    lines.append("")
    for name in w.targets:
        met = evaluate(timing, name)[2]
        if met is False and w.targets[name].kind == "ratio<=":
            lines.append(f"- missed by {name}: {noise_note(timing, name)}.")
    for note in w.notes:
        lines.append(f"- {note}")
    if lines[-1] != "":
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------------------
# Anchors: nnterp and TransformerLens in their own virtualenv (never a project dependency)
# ------------------------------------------------------------------------------------------------

ANCHOR_VENV = HERE / ".venv-anchors"
ANCHOR_PACKAGES = ["torch==2.13.0", "nnsight==0.7.0", "nnterp==1.3.0", "transformer-lens==4.3.0"]


def run_anchors(quick: bool, timeout_s: float, prompts_by_size: dict[str, list[str]], threads: int) -> tuple[dict | None, str]:
    """Create ``bench/.venv-anchors`` if needed and run ``bench/anchors.py`` there; (timings or None, message)."""
    import subprocess

    python = ANCHOR_VENV / "bin" / "python"
    if not python.exists():
        try:
            subprocess.run([sys.executable, "-m", "venv", str(ANCHOR_VENV)], check=True, capture_output=True)
            subprocess.run([str(python), "-m", "pip", "install", "-q", *ANCHOR_PACKAGES], check=True,
                           capture_output=True, text=True, timeout=timeout_s)
        except subprocess.CalledProcessError as err:
            tail = (err.stderr or "").strip().splitlines()[-3:] if isinstance(err.stderr, str) else []
            return None, f"installing {' '.join(ANCHOR_PACKAGES)} failed: {' / '.join(tail) or err}"
        except subprocess.TimeoutExpired:
            return None, f"installing the anchor packages took over {timeout_s:.0f} s; skipped"
    from unilens.arch.loading import gguf_cache_dir

    cached = gguf_cache_dir(unilens.default_model_path())
    if not (cached / "config.json").exists():
        return None, f"no safetensors copy of SmolLM2 at {cached}; run the main bench once first"
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts_by_size, f)  # the exact prompts of the main run
    cmd = [str(python), str(HERE / "anchors.py"), str(cached), f.name, "--threads", str(threads)]
    cmd += ["--quick"] if quick else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"the anchor run took over {timeout_s:.0f} s; skipped"
    if proc.returncode != 0:
        return None, "the anchor run failed: " + " / ".join(proc.stderr.strip().splitlines()[-3:])
    return json.loads(proc.stdout.strip().splitlines()[-1]), "ok"


# The anchor workload names (bench/anchors.py) and the unilens variant each one is compared with.
ANCHOR_EQUIVALENTS = {
    "trace saving every layers_output": "unilens trace, saves every layers_output",
    "every attention_probabilities": "unilens saves every attention_probabilities",
    "logit lens": "unilens logit_lens",
}


def anchor_comparable(timings: list[Timing]) -> dict[tuple[str, str], float]:
    """{(anchor workload, size): unilens ratio to the same kind of baseline} from this run's timings."""
    ratios = {}
    for timing in timings:
        base = timing.median_ms(timing.workload.baseline)
        for anchor_name, variant in ANCHOR_EQUIVALENTS.items():
            if variant in timing.times:
                ratios[(anchor_name, timing.size)] = timing.median_ms(variant) / base
    return ratios


def anchor_section(result: dict | None, message: str, unilens_ratios: dict[tuple[str, str], float]) -> list[str]:
    lines = ["## Anchors: nnterp and TransformerLens (separate virtualenv `bench/.venv-anchors`)", ""]
    if result is None:
        return lines + [f"Not measured: {message}.", ""]
    lines += [f"Versions: {result.get('versions')}. Each ratio is to its baseline timed interleaved with it in the "
              "same subprocess (bench/anchors.py); compare it with the unilens ratio to the same baseline above.", ""]
    lines += ["| workload | size | tool | baseline | median ms | ratio to baseline | unilens ratio |",
              "|---|---|---|---|---:|---:|---:|"]
    for row in result["rows"]:
        ratio = f"{row['ratio']:.3f}x" if row.get("ratio") is not None else "-"
        med = f"{row['median_ms']:.2f}" if row.get("median_ms") is not None else row.get("error", "failed")
        ours = unilens_ratios.get((row["workload"], row["size"]))
        lines.append(f"| {row['workload']} | {row['size']} | {row['tool']} | {row.get('baseline', '-')} | {med} | "
                     f"{ratio} | {f'{ours:.3f}x' if ours else '-'} |")
    return lines + [""]


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few repetitions, 3 patched layers")
    parser.add_argument("--anchors", action="store_true", help="also time nnterp / TransformerLens (own venv)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the SmolLM2 workloads (default: torch's default). On a machine "
                        "other jobs keep busy, 1 avoids OpenMP oversubscription, which makes 2-thread timings "
                        "several times slower and very noisy")
    parser.add_argument("--patch-layers", type=int, default=None,
                        help="patch only this many evenly spaced layers (default: all; --quick: 3)")
    parser.add_argument("--out", default=str(HERE / "RESULTS.md"), help="where to write the report")
    parser.add_argument("--only-distributed-cache", action="store_true",
                        help="run only the data-parallel caching configurations and replace their delimited "
                        "section of --out (the rest of the file is kept)")
    args = parser.parse_args(argv)
    if args.only_distributed_cache:
        results = distributed_cache_runs(texts=24 if args.quick else 48, reps=2 if args.quick else 5)
        write_section(Path(args.out), distributed_cache_section(results, unilens.loading.DEFAULT_MODEL_NAME,
                                                                disk_interference()))
        _log(f"wrote the data-parallel caching section of {args.out}")
        return 0

    from unilens.arch.loading import default_model_path, load_hf_model

    load_start = os.getloadavg()
    default_threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    started = time.perf_counter()
    _log(f"load average {load_start}, torch threads {threads}; loading SmolLM2 four times (unilens, sdpa, eager, raw "
         "nnsight)")
    model = unilens.load_default()
    hf_sdpa, tokenizer = load_hf_model(default_model_path(), dtype=torch.float32, attn_implementation="sdpa")
    hf_eager, _ = load_hf_model(default_model_path(), dtype=torch.float32, attn_implementation="eager")
    from nnsight import LanguageModel

    raw = LanguageModel(load_hf_model(default_model_path(), dtype=torch.float32, attn_implementation="sdpa")[0],
                        tokenizer=tokenizer)  # the bare engine, for reference rows  # fmt: skip

    # (reps or None for "fit the budget", budget seconds, min reps, max reps)
    plan = (None, 8.0, 2, 3) if args.quick else (None, 45.0, 5, 30)
    sizes = {"batch 8 x 16 tokens": (8, 16), "batch 1 x 512 tokens": (1, 512)}
    forward_targets = {
        "batch 8 x 16 tokens": {"nothing": 1.05, "logits": 1.02, "save_all": 1.05},
        "batch 1 x 512 tokens": {"nothing": 1.02, "logits": 1.02, "save_all": 1.02},
    }
    timings: list[Timing] = []
    prompts_by_size = {size: make_prompts(tokenizer, b, s) for size, (b, s) in sizes.items()}
    for size, prompts in prompts_by_size.items():
        batch = encode(tokenizer, prompts)
        for workload in (
            forward_workload(model, hf_sdpa, batch, forward_targets[size], raw=raw),
            attention_workload(model, hf_eager, batch),
            logit_lens_workload(model, hf_sdpa, prompts),
        ):
            _log(f"{workload.title} — {size}")
            timing = measure(workload, size, *plan)
            workload.notes.extend(check_outputs(timing))
            timings.append(timing)

    workload = tl_cache_workload(model, encode(tokenizer, prompts_by_size["batch 8 x 16 tokens"]))
    _log(workload.title)
    timing = measure(workload, "batch 8 x 16 tokens", *plan)
    workload.notes.extend(check_outputs(timing))
    timings.append(timing)

    n_patch = args.patch_layers if args.patch_layers is not None else (3 if args.quick else None)
    patch_layers = None
    if n_patch is not None and n_patch < model.num_layers:
        patch_layers = sorted({round(k * (model.num_layers - 1) / max(n_patch - 1, 1)) for k in range(n_patch)})
    # one clean / corrupted pair (naive: 1 x 16 forwards), and 8 pairs (naive: batch 8 x 16 forwards)
    for pairs, reps in ((1, 1 if args.quick else 2), (8, 1)):
        workload = patching_workload(model, hf_sdpa, make_prompts(tokenizer, 2 * pairs, 16), patch_layers)
        if patch_layers is not None:
            workload.notes.append(f"layers {patch_layers} only (`--quick` / `--patch-layers`); a full run patches "
                                  "every layer.")  # fmt: skip
        _log(workload.title)
        size = "one clean / corrupted pair of 16 tokens" if pairs == 1 else f"{pairs} pairs, batch {pairs} x 16 tokens"
        timing = measure(workload, size, reps, 0, 1, 2)
        workload.notes.extend(check_outputs(timing))
        timings.append(timing)

    workload = cache_workload(model, hf_sdpa, cache_texts(tokenizer, 24 if args.quick else 64))
    _log(workload.title)
    timing = measure(workload, "SmolLM2, fp32 store", *plan)
    workload.notes.extend(check_outputs(timing))
    timings.append(timing)

    workload = conformance_workload()
    _log(workload.title)
    timing = measure(workload, "every case, seed 0", 1 if args.quick else 2, 0, 1, 2)
    workload.notes.extend(check_outputs(timing))
    timings.append(timing)

    workload = startup_workload()
    _log(workload.title)
    timing = measure(workload, "SmolLM2, fp32", 3 if args.quick else 7, 0, 1, 7)
    workload.notes.extend(check_outputs(timing))
    timings.append(timing)

    workload = overhead_workload("llama")
    _log(workload.title)
    timing = measure(workload, "per trace", 20 if args.quick else 100, 0, 1, 100)
    workload.notes.extend(check_outputs(timing))
    timings.append(timing)

    _log("data-parallel activation caching (subprocesses and torchrun jobs)")
    dp_lines = distributed_cache_section(distributed_cache_runs(texts=24 if args.quick else 48,
                                                                reps=2 if args.quick else 5),
                                         unilens.loading.DEFAULT_MODEL_NAME, disk_interference())  # fmt: skip

    anchors: tuple[dict | None, str] | None = None
    if args.anchors:
        _log("anchors: nnterp / TransformerLens in bench/.venv-anchors")
        anchors = run_anchors(args.quick, timeout_s=1800, prompts_by_size=prompts_by_size, threads=threads)

    elapsed = time.perf_counter() - started
    lines = ["# unilens benchmark results", "", "Written by `python bench/run.py" + (" --quick" if args.quick else "")
             + (" --anchors" if args.anchors else "") + f"` in {elapsed:.0f} s. See bench/README.md for what each "
             "row measures.", ""]
    lines += machine_section(load_start, os.getloadavg(), threads, default_threads, args)
    lines += ["## Summary", "", "| workload | size | variant | target | reached | met |", "|---|---|---|---|---|---|"]
    for timing in timings:
        for name in timing.workload.targets:
            achieved, target, met = evaluate(timing, name)
            lines.append(f"| {timing.workload.title} | {timing.size} | {name} | {target} | {achieved} | "
                         f"{'yes' if met else '**no**'} |")
    lines += ["", "## Tables", ""]
    for timing in timings:
        lines += table(timing)
    lines += dp_lines
    if anchors is not None:
        lines += anchor_section(*anchors, unilens_ratios=anchor_comparable(timings))
    lines += ["Profiles of the workloads that missed a target, and what would close them: bench/README.md.", ""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    _log(f"wrote {args.out} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
