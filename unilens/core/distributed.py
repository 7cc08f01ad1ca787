"""Data parallel on torch.distributed: the rank / world of an initialized process group, deterministic splits of
work, object gathers, a progress count summed over ranks, and the ``torchrun`` set-up of the CLI.

unilens never starts processes: launch with ``torchrun --nproc-per-node N ...`` (or initialize a process group
yourself); every function here is a no-op answer ``(rank 0, world 1)`` when no process group is initialized, so
the same code runs in one process. gloo on CPU, nccl on GPU (`backend_for`).
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "rank_world",
    "is_distributed",
    "split_range",
    "broadcast_object",
    "all_gather_objects",
    "barrier",
    "RankProgress",
    "init_from_env",
    "backend_for",
    "distributed_pairs",
]


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when none is initialized.

    Example:
        >>> rank_world()  # no process group in a plain Python process
        (0, 1)
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialized.

    Example:
        >>> is_distributed()
        False
    """
    return rank_world()[1] > 1


def split_range(n: int, rank: int, world: int) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` of ``world`` owns: blocks in rank order concatenate to
    ``range(n)``; sizes differ by at most one (the first ``n % world`` ranks get one more).

    Example:
        >>> [list(split_range(5, r, 2)) for r in range(2)]
        [[0, 1, 2], [3, 4]]
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} ranks.")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _object_device() -> torch.device | None:
    """Device the object collectives need: the current CUDA device under nccl, else CPU (None)."""
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return None


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects); ``obj`` itself in one process.

    Example:
        >>> broadcast_object({"done": [0, 2]})
        {'done': [0, 2]}
    """
    if not is_distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_object_device())
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank; ``[obj]`` in one process.

    Example:
        >>> all_gather_objects(3)
        [3]
    """
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op in one process).

    Example:
        >>> barrier()
    """
    if is_distributed():
        import torch.distributed as dist

        dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)


_CALLS = {"n": 0}  # per-process call counter: every rank makes the same calls, so keys match across ranks


class RankProgress:
    """A progress bar whose count is summed over ranks: every rank calls ``update(n)``; only rank 0 draws a bar
    (tqdm), reading the sum from the process group's key-value store (no collective, so ranks never wait on each
    other for it). ``finish()`` on rank 0 keeps the bar moving until every rank has finished.

    Example:
        >>> bar = RankProgress(total=10, initial=0, enabled=False, desc="work")
        >>> bar.update(4); bar.finish(); bar.count
        4
    """

    def __init__(self, total: int, initial: int, enabled: bool, desc: str, unit: str = "tok", poll_s: float = 0.25):
        self.rank, self.world = rank_world()
        self.count = 0
        self.poll_s = poll_s
        self.initial = initial
        self._store = None
        if self.world > 1:
            import torch.distributed as dist

            _CALLS["n"] += 1
            self._key = f"unilens/progress/{_CALLS['n']}"
            self._store = dist.distributed_c10d._get_default_store()
        self.bar = None
        if enabled and self.rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, unit_scale=True, desc=desc, smoothing=0.1)

    def _sum(self) -> int:
        return int(self._store.add(f"{self._key}/count", 0))

    def _refresh(self) -> None:
        if self.bar is not None:
            self.bar.n = self.initial + (self._sum() if self._store is not None else self.count)
            self.bar.refresh()

    def update(self, n: int) -> None:
        self.count += n
        if self._store is not None:
            self._store.add(f"{self._key}/count", n)
        self._refresh()

    def finish(self) -> None:
        """Mark this rank finished; on rank 0, draw the others' progress until they have all finished."""
        if self._store is not None:
            self._store.add(f"{self._key}/finished", 1)
            if self.bar is not None:
                while int(self._store.add(f"{self._key}/finished", 0)) < self.world:
                    self._refresh()
                    time.sleep(self.poll_s)  # display only: the caller synchronizes with a collective afterwards
        self._refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def backend_for(device: str | torch.device | None = None) -> str:
    """``"nccl"`` when ranks run on CUDA devices, else ``"gloo"`` (CPU).

    Example:
        >>> backend_for("cpu")
        'gloo'
    """
    if device is None:
        return "nccl" if torch.cuda.is_available() else "gloo"
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_from_env() -> bool:
    """Initialize the default process group from ``torchrun``'s environment (``WORLD_SIZE``, ``RANK``,
    ``MASTER_ADDR``...), with nccl when CUDA is available (each rank on ``cuda:LOCAL_RANK``) and gloo otherwise.
    Returns True when it initialized one (the caller destroys it), False when there is no ``torchrun`` environment
    or a group already exists.

    Example:
        >>> init_from_env()  # a plain process: nothing to do
        False
    """
    import torch.distributed as dist

    if dist.is_initialized() or "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ:
        return False
    backend = backend_for()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def distributed_pairs(
    fn: Callable[..., torch.Tensor], clean: Sequence[str], corrupted: Sequence[str], **kwargs: Any
) -> torch.Tensor:
    """Run ``fn(clean=..., corrupted=..., **kwargs)`` (a per-pair function returning ``(pairs, ...)``) on this
    rank's contiguous block of prompt pairs and concatenate every rank's result in pair order, on every rank.

    Example:
        >>> double = lambda clean, corrupted: torch.tensor([[2.0 * len(c)] for c in clean])
        >>> distributed_pairs(double, ["ab", "abc"], ["xy", "xyz"])  # one process: all pairs here
        tensor([[4.],
                [6.]])
    """
    if len(clean) != len(corrupted):
        raise ValueError(f"{len(clean)} clean prompts but {len(corrupted)} corrupted ones: pass one of each per pair.")
    rank, world = rank_world()
    mine = split_range(len(clean), rank, world)
    local = fn(clean=list(clean[mine.start : mine.stop]), corrupted=list(corrupted[mine.start : mine.stop]),
               **kwargs) if len(mine) else None  # fmt: skip
    device = local.device if local is not None else None
    parts = all_gather_objects(None if local is None else local.detach().cpu())
    out = torch.cat([p for p in parts if p is not None])  # (pairs, ...) in pair order
    return out if device is None else out.to(device)
