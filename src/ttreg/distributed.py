"""``torch.distributed`` for calibration: which images a rank reads, and summing what it measured.

Every statistic of calibration is a sum or a count (the search's :class:`~ttreg.SearchStats`, the
held-out sweep's, the attention-bias fit's; each declares its reductions, :mod:`ttreg.stats`),
so under ``torchrun`` each rank reads every world-size-th image of the one
:class:`~ttreg.data.ImageSet` (:func:`shard_for_rank`) and the sums are all-reduced: every rank
then holds the single-process numbers. Nothing here does anything in a single process.

Ranks must make the same collective calls in the same order, so every decision taken between
two reductions depends only on reduced numbers (never on a rank's own share).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence

import torch


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default group; ``(0, 1)`` outside ``torch.distributed``."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True in a single process and on rank 0 (the rank that writes files and prints)."""
    return world()[0] == 0


@contextlib.contextmanager
def launched() -> Iterator[bool]:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) with no process group yet:
    join the group the environment names (gloo: calibration reduces small CPU tensors) for the
    block and leave it afterwards; yields whether this is a multi-process run."""
    import torch.distributed as dist
    if world()[1] > 1 or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        yield world()[1] > 1
        return
    dist.init_process_group("gloo")
    try:
        yield True
    finally:
        dist.destroy_process_group()


def local_device(device: str) -> str:
    """``device`` for this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under ``torchrun``."""
    if device == "cuda" and world()[1] > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _reduce_device() -> torch.device:
    """Where a collective's tensors must live: NCCL reduces CUDA tensors only."""
    import torch.distributed as dist
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(tensors: Sequence[torch.Tensor], op: str = "sum") -> None:
    """Sum (``op="max"``: maximum) each tensor over all ranks, in place; nothing in one process.
    CPU tensors work under every backend (they are moved for NCCL and back)."""
    import torch.distributed as dist
    if world()[1] == 1:
        return
    red = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    dev = _reduce_device()
    for t in tensors:
        if t.device == dev:
            dist.all_reduce(t, op=red)
        else:
            moved = t.to(dev)
            dist.all_reduce(moved, op=red)
            t.copy_(moved.to(t.device))


def all_gather(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in one process."""
    import torch.distributed as dist
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def shard(images):
    """This rank's share of ``images`` as an :class:`~ttreg.data.ImageSet` (anything
    :func:`ttreg.data.image_set` takes): every world-size-th image, starting at the rank.
    The whole set in one process."""
    from .data import image_set
    return image_set(images).shard(*world())


def shared_image_set(images, strict: bool = False):
    """:func:`ttreg.data.image_set`, with image files resolved by :func:`resolve` (the check
    that they decode shared out over the ranks): the same set on every rank."""
    from .data import image_set
    return image_set(images, strict, resolve=resolve)


def shard_for_rank(images, strict: bool = False):
    """This rank's share of any image input, as an :class:`~ttreg.data.ImageSet` (see
    :func:`shared_image_set`); the whole set in one process."""
    return shared_image_set(images, strict).shard(*world())


def resolve(images, strict: bool = False):
    """:func:`ttreg.data.resolve_images`, with the check that every file decodes shared out:
    each rank decodes every world-size-th file and the ranks exchange what they skipped, so
    every rank holds the same list a single process would, having read only its share.
    With ``strict``, every rank raises the error of the first unreadable file."""
    from .data import ImageError, build_source, check_entries, list_entries, resolve_images
    rank, size = world()
    if size == 1:
        return resolve_images(images, strict=strict)
    entries = list_entries(images)
    verdicts = all_gather(check_entries(entries, range(rank, len(entries), size)))
    bad = {i: reason for v in verdicts for i, reason in v.items()}
    if strict and bad:
        raise ImageError(bad[min(bad)])
    return build_source(images, entries, bad)


__all__ = ["world", "is_main", "launched", "local_device", "all_reduce_", "all_gather", "shard",
           "shared_image_set", "shard_for_rank", "resolve"]
