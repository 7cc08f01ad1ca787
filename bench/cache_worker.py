"""One process (or one ``torchrun`` rank) of the data-parallel caching benchmark (``bench/run.py``,
``distributed_cache_section``): plain HF forwards of this rank's batches and ``cache_activations`` of the same texts,
timed alternately in the same process; rank 0 writes the times as JSON.

The plain baseline runs exactly the batches ``cache_activations`` runs on this rank (its shard plan, its length-sorted
batches, right padding, the same ``logits_to_keep``), on a separately loaded sdpa copy of the model, so the ratio is
the cost of reading, copying and writing the activations. Every timed call starts and ends at a barrier, so a
distributed time is the slowest rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

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
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    p.add_argument("--out", required=True, help="store folder (rewritten every call)")
    p.add_argument("--result", required=True, help="JSON written by rank 0")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import unilens
    from unilens import cache as cache_mod
    from unilens.distributed import all_gather_objects, barrier, init_from_env, rank_world
    from unilens.loading import default_model_path, load_hf_model

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
    batches = []
    for k in mine:
        for batch in cache_mod._batches(tokens, *plan[k], args.batch_size):
            rows = [tokens.of(i) for i in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for b, r in enumerate(rows):
                ids[b, : len(r)], mask[b, : len(r)] = torch.from_numpy(r), 1
            batches.append((ids, mask))
    out = Path(args.out)

    def plain() -> None:
        with torch.no_grad():
            for ids, mask in batches:
                hf(input_ids=ids, attention_mask=mask, **lean)

    def cache() -> None:
        unilens.cache_activations(model, texts, args.names, out, batch_size=args.batch_size,
                                  shard_tokens=args.shard_tokens, progress=False)  # fmt: skip

    variants = {"plain": plain, "cache": cache}
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
    n_batches = sum(all_gather_objects(len(batches)))
    if rank == 0:
        Path(args.result).write_text(json.dumps({
            "times": times, "tokens": int(tokens.offsets[-1]), "bytes": written, "world": world,
            "threads": args.threads, "shards": len(plan), "batches": n_batches, "names": args.names,
            "texts": len(texts), "torchrun": "WORLD_SIZE" in os.environ,
        }))  # fmt: skip
    if started:
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
