"""What offloading costs: SmolLM2 forward in memory vs with layers 20-29 on disk (accelerate `offload_folder`).

    python bench/offload_overhead.py [--tokens 56] [--reps 9] [--threads 1]

Interleaved repetitions (each round runs both, alternating which goes first), medians and their ratio; the two
models' logits are checked equal (torch.equal) before anything is reported. The offload files stay in the page
cache after the first forward, so this is the cost of reading them back per forward, not of a cold disk.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from unilens import StandardizedTransformer, load_default
from unilens.arch.loading import default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=56)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ref = load_default()
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "cpu" if i < 20 else "disk" for i in range(30)}}
    start = time.perf_counter()
    off = StandardizedTransformer(default_model_path(), device_map=device_map, offload_folder=tempfile.mkdtemp())
    load_s = time.perf_counter() - start
    ids = torch.randint(100, 10000, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    models = {"memory": ref.module_accessor.model, "offloaded": off.module_accessor.model}
    with torch.no_grad():
        outs = {k: m(ids).logits for k, m in models.items()}
        assert torch.equal(outs["memory"], outs["offloaded"]), "offloaded logits differ from in-memory ones"
        times: dict[str, list[float]] = {k: [] for k in models}
        for r in range(args.reps):
            for k in (list(models) if r % 2 == 0 else list(models)[::-1]):
                t = time.perf_counter()
                models[k](ids)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"offloaded load + load-time check: {load_s:.2f} s")
    print(f"forward of {args.tokens} tokens, {args.threads} thread(s), median of {args.reps}: in memory "
          f"{med['memory'] * 1e3:.0f} ms, 10/30 layers on disk {med['offloaded'] * 1e3:.0f} ms "
          f"({med['offloaded'] / med['memory']:.2f}x, +{(med['offloaded'] - med['memory']) / 10 * 1e3:.1f} ms "
          "per offloaded layer)")


if __name__ == "__main__":
    main()
