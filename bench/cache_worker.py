"""One process (or one ``torchrun`` rank) of the data-parallel caching benchmark (``bench/run.py``,
``distributed_cache_section``): plain HF forwards of this rank's batches and ``cache_activations`` of the same texts,
timed alternately in the same process; rank 0 writes the times as JSON.

The plain baselines run exactly the batches ``cache_activations`` runs on this rank (its shard plan, its length-sorted
batches, right padding, the same ``logits_to_keep``): ``plain`` on the very model caching runs (its HF module called
without a trace: the same weights at the same addresses), so ``plain / cache`` is the cost of reading, copying and
writing the activations; ``plain_copy`` on a separately loaded HF sdpa copy of the model, which adds unilens's own
wrapping and the difference between two loads of the same weights (measured here: up to ~2% either way between two
identical HF copies); ``bare`` (every layer's output only) on the very model too, with a torch hook per layer that
appends each text's rows to one file per shard and fsyncs it: the bytes alone, on this machine's disk or tmpfs, with no
unilens code. Every timed call starts and ends at a barrier, so a distributed time is the slowest rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--texts", type=int, default=128, help="number of texts (bench/run.py cache_texts)")
    p.add_argument("--names", nargs="+", default=["layers_output.*"])
    p.add_argument("--shard-tokens", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    p.add_argument("--out", required=True, help="store folder (rewritten every call)")
    p.add_argument("--result", required=True, help="JSON written by rank 0")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import unilens
    from unilens.arch.loading import default_model_path, load_hf_model
    from unilens.core.distributed import (
        all_gather_objects,
        barrier,
        init_from_env,
        rank_world,
    )
    from unilens.scale import plan as cache_mod

    started = init_from_env()
    rank, world = rank_world()
    source = args.model or default_model_path()
    model = unilens.StandardizedTransformer(source, dtype=torch.float32) if args.model else unilens.load_default()
    hf, tokenizer = load_hf_model(source, dtype=torch.float32, attn_implementation="sdpa")
    import run as bench  # bench/run.py: the texts of the one-process caching workload

    texts = bench.cache_texts(tokenizer, args.texts)
    tokens = cache_mod._tokenize(model.tokenizer, texts, None)
    plan = cache_mod._plan_shards(tokens, args.shard_tokens)
    mine = list(range(len(plan)))[rank::world]  # what cache_activations gives this rank on a fresh store
    pad_id = cache_mod._pad_id(model.tokenizer)
    lean = model._keep_last_logits_kwargs() if "logits" not in args.names else {}
    shard_batches: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = []  # (shard, its (ids, mask) batches)
    for k in mine:
        shard_batches.append((k, []))
        for batch in cache_mod._batches(tokens, *plan[k], args.batch_size):
            rows = [tokens.of(i) for i in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, : len(r)], mask[b, : len(r)] = torch.from_numpy(r), 1
            shard_batches[-1][1].append((ids, mask))
    batches = [batch for _, in_shard in shard_batches for batch in in_shard]
    out = Path(args.out)

    wrapped = model.module_accessor.model  # the HF module caching runs (outside a trace nnsight passes calls through)

    def plain() -> None:
        with torch.no_grad():
            for ids, mask in batches:
                wrapped(input_ids=ids, attention_mask=mask, **lean)

    def plain_copy() -> None:
        with torch.no_grad():
            for ids, mask in batches:
                hf(input_ids=ids, attention_mask=mask, **lean)

    def cache() -> None:
        unilens.cache_activations(model, texts, args.names, out, batch_size=args.batch_size,
                                  shard_tokens=args.shard_tokens, progress=False)  # fmt: skip

    # The least any crash-safe cache of every layer's output writes, no unilens code: the same forwards, a torch hook
    # per decoder layer appending each text's rows to one file per shard (same folder as the store), fsync per shard;
    # no layout, no checksum, no manifest. It prices the bytes themselves on this machine's disk (or tmpfs).
    bare_dir = out.with_name(f"{out.name}-bare-rank{rank}")
    layer_modules = [model.layers[i]._module for i in range(model.num_layers)]
    bare_bytes = [0]  # what the last bare call wrote on this rank

    def bare() -> None:
        shutil.rmtree(bare_dir, ignore_errors=True)
        bare_dir.mkdir(parents=True, exist_ok=True)
        lengths: list[int] = []
        fd = -1

        def append(_module: Any, _args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)
            for j, length in enumerate(lengths):
                os.write(fd, hidden[j, :length].contiguous().view(torch.uint8).numpy().reshape(-1))

        handles = [module.register_forward_hook(append) for module in layer_modules]
        try:
            with torch.no_grad():
                for k, in_shard in shard_batches:
                    fd = os.open(bare_dir / f"shard_{k:05d}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    for ids, mask in in_shard:
                        lengths[:] = mask.sum(1).tolist()
                        wrapped(input_ids=ids, attention_mask=mask, **lean)
                    os.fsync(fd)
                    os.close(fd)
        finally:
            for handle in handles:
                handle.remove()
        bare_bytes[0] = sum(f.stat().st_size for f in bare_dir.iterdir())

    variants = {"plain": plain, "plain_copy": plain_copy, "cache": cache}
    if args.names == ["layers_output.*"]:
        variants["bare"] = bare
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rep in range(args.reps + 1):  # round 0 warms up
        for j in range(len(variants)):
            name = list(variants)[(rep + j) % len(variants)]
            if name == "cache" and rank == 0:
                shutil.rmtree(out, ignore_errors=True)  # a fresh store each call (a complete one returns at once)
            barrier()
            t0 = time.perf_counter()
            variants[name]()
            barrier()
            if rep:
                times[name].append(time.perf_counter() - t0)
    written = sum(f.stat().st_size for f in out.iterdir())
    shutil.rmtree(bare_dir, ignore_errors=True)
    n_batches = sum(all_gather_objects(len(batches)))
    bare_written = sum(all_gather_objects(bare_bytes[0]))
    if rank == 0:
        Path(args.result).write_text(json.dumps({
            "times": times, "tokens": int(tokens.offsets[-1]), "bytes": written, "world": world,
            "threads": args.threads, "shards": len(plan), "batches": n_batches, "names": args.names,
            "texts": len(texts), "torchrun": "WORLD_SIZE" in os.environ, "bare_bytes": bare_written,
            "hidden_size": model.hidden_size, "num_layers": model.num_layers,
        }))  # fmt: skip
    if started:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
