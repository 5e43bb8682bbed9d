"""Processes and their share of the work: ``torchrun`` ranks, ``--shard i/n`` job arrays, or one process.

Training and the dataset-scale commands (pseudo masks, predictions, seeds) use the same helpers:

* :func:`init_distributed` joins the process group when launched by ``torchrun`` and picks the GPU of the
  process's ``LOCAL_RANK``; :class:`DistInfo` says who this process is.
* :func:`run_once` runs start-up work (listing, label reading, checks, hashing) on rank 0 only and hands the
  result to every rank; an error there stops every rank with the same one-line message.
* :class:`Shard` is an independent job's share of a list (``--shard 1/4``: the second of four jobs, e.g. a
  Slurm job array); :func:`launch_share` adds the ranks of a ``torchrun`` launch inside one job.

Shares are strided over the list (item ``j`` belongs to share ``j % count``), so they depend only on the
list order and the share count, never on timing, and neighbouring (similar-sized) images spread evenly.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import WeakclipError

T = TypeVar("T")


@dataclass
class DistInfo:
    """This process in its launch: global ``rank`` of ``world_size``, ``local_rank`` on its machine."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout: datetime.timedelta | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise one process.

    GPUs use NCCL, the GPU being the one of ``LOCAL_RANK``; CPUs use gloo. ``timeout`` bounds every
    collective (torch's default, 10 to 30 minutes, when None): inference passes a long one, since ranks
    wait for the slowest at the end.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise WeakclipError(f"LOCAL_RANK {local}: this machine has {torch.cuda.device_count()} GPU(s); "
                                f"start at most that many processes per node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        kwargs = {"timeout": timeout} if timeout is not None else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **kwargs)
    return DistInfo(rank, world, local, device)


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def all_reduce_sum(t: Tensor, info: DistInfo) -> Tensor:
    """Sum ``t`` over the ranks, in place (returns it)."""
    if info.world_size > 1:
        dist.all_reduce(t)
    return t


def broadcast_object(obj: T, info: DistInfo) -> T:
    """Rank 0's ``obj`` on every rank (any picklable object; the other ranks' ``obj`` is ignored)."""
    if info.world_size == 1:
        return obj
    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_once(fn: Callable[[], T], info: DistInfo) -> T:
    """``fn()`` run on rank 0 only, its result returned on every rank.

    A :class:`WeakclipError` raised by ``fn`` is raised on every rank with the same message, so a bad input
    found at start-up stops the whole launch with one line instead of leaving ranks waiting.
    """
    result: tuple[bool, object] | None = None
    if info.is_main:
        try:
            result = (True, fn())
        except WeakclipError as exc:
            if info.world_size == 1:
                raise
            result = (False, str(exc))
    ok, value = broadcast_object(result, info)
    if not ok:
        raise WeakclipError(value)
    return value


def local_world_size() -> int:
    """Processes of this launch on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def available_cores() -> int:
    """CPU cores this process may use: its affinity mask (what Slurm or taskset grant) shared evenly by
    the processes of the launch on this machine."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(1, cores // local_world_size())


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count`` of a list (0-based): items ``index``, ``index + count``, ..."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise WeakclipError(f"--shard {self.index}/{self.count}: expected i/n with 0 <= i < n")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` (as given to ``--shard``) -> Shard(i, n)."""
        index, sep, count = text.partition("/")
        if not sep or not index.strip().isdigit() or not count.strip().isdigit():
            raise WeakclipError(f"--shard {text}: expected i/n, e.g. 0/4 for the first of four jobs")
        return cls(int(index), int(count))

    def take(self, items: Sequence[T]) -> list[T]:
        """This share of ``items``: deterministic, disjoint from the other shares, together all of them."""
        return list(items[self.index :: self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def launch_share(info: DistInfo) -> Shard:
    """The share of this rank among the ranks of its launch."""
    return Shard(info.rank, info.world_size)
