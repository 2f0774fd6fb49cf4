"""Statistics as each of two ranks might hold them, and, run as a script, one of two gloo ranks
(RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment) that all-reduces them and,
on rank 0, saves what came back into the file given (test_stats compares it with ``merge``)."""
import sys

import torch

from ttreg.bias import BiasStats
from ttreg.calibration import HeldoutSums
from ttreg.neurons import SearchStats
from ttreg.stats import MergeableStats


def as_dict(s: MergeableStats) -> dict:
    return {name: getattr(s, name) for name in s.reductions()}


def stats_of_rank(rank: int) -> dict[str, MergeableStats]:
    """Statistics as rank ``rank`` of two might hold them (different on each rank)."""
    g = torch.Generator().manual_seed(rank)
    r = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    search = SearchStats(r(3, 5), 4 + rank, 3 - rank, r(6).round(), r(6), r(6), r(6), r(6),
                         activation_bytes=1000 * (rank + 1), memory_budget=7 + rank)
    bias = BiasStats(r(2, 3, 4), r(2, 3, 5), torch.tensor([2.0, 3.0], dtype=torch.float64) + rank,
                     5 + 2 * rank)
    held = HeldoutSums(r(2).round(), r(2).round(), r(2), r(2))
    return {"search": search, "bias": bias, "heldout": held}


if __name__ == "__main__":
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {name: as_dict(s.all_reduce()) for name, s in stats_of_rank(rank).items()}
    if rank == 0:
        torch.save(out, sys.argv[1])
    dist.destroy_process_group()
