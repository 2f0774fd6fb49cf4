"""Mergeable statistics: sums, counts and maxima declared with their reduction.

The model is torchmetrics' ``Metric.add_state(name, default, dist_reduce_fx="sum")`` (without
depending on it): a statistic of calibration is a dataclass deriving from
:class:`MergeableStats` whose every field is declared with :func:`state` and a reduction,
``"sum"`` or ``"max"``. Two things combine such statistics, and both read that one declaration
through one code path (:meth:`MergeableStats._reduce`):

* :meth:`~MergeableStats.merge`, in process: shards, or input sizes, one after the other;
* :meth:`~MergeableStats.all_reduce`, over the ranks of ``torch.distributed``
  (:func:`ttreg.distributed.all_reduce_`).

Tensor states are reduced as they are; whole-number states (image counts, bytes) travel in one
float64 tensor per reduction (exact up to 2**53) and come back as ``int``. So ``torchrun`` gives
the single-process numbers: counts exactly, sums up to the order of float additions.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch

from .distributed import all_reduce_

#: the reductions a state may declare, as done in one process (``torch.distributed`` does the
#: same with ``ReduceOp.SUM`` / ``ReduceOp.MAX``)
REDUCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sum": torch.add, "max": torch.maximum}


def state(reduce: str = "sum", default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field of a :class:`MergeableStats`: a statistic and how shards of it
    combine (``"sum"`` or ``"max"``); ``default`` as for :func:`dataclasses.field`."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}, got {reduce!r}")
    return dataclasses.field(default=default, metadata={"reduce": reduce})


class MergeableStats:
    """Base of a dataclass of statistics whose fields are all declared with :func:`state`."""

    @classmethod
    def reductions(cls) -> dict[str, str]:
        """``{field: reduction}``, in field order."""
        out = {}
        for f in dataclasses.fields(cls):
            if "reduce" not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name} is not declared with ttreg.stats.state")
            out[f.name] = f.metadata["reduce"]
        return out

    def _reduce(self, combine: Callable[[str, list[torch.Tensor]], list[torch.Tensor]]) -> dict[str, Any]:
        """The one path of :meth:`merge` and :meth:`all_reduce`: per declared reduction, the
        tensor states in field order and then the whole-number ones packed in one float64
        tensor go to ``combine(reduction, tensors)``, which returns them reduced; the reduced
        values, by field name."""
        out: dict[str, Any] = {}
        decl = self.reductions()
        for op in dict.fromkeys(decl.values()):
            names = [n for n, o in decl.items() if o == op]
            tensors = [n for n in names if torch.is_tensor(getattr(self, n))]
            whole = [n for n in names if n not in tensors]
            parts = [getattr(self, n) for n in tensors]
            if whole:
                parts.append(torch.tensor([float(getattr(self, n)) for n in whole], dtype=torch.float64))
            reduced = combine(op, parts)
            out.update(zip(tensors, reduced))
            if whole:
                out.update((n, int(v)) for n, v in zip(whole, reduced[-1].tolist()))
        return out

    def merge(self, other: "MergeableStats") -> "MergeableStats":
        """These statistics and ``other``'s combined, each state by its reduction (a new object)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(self).__name__} with {type(other).__name__}")
        theirs: dict[str, list[torch.Tensor]] = {}
        other._reduce(lambda op, parts: theirs.setdefault(op, parts))
        return type(self)(**self._reduce(
            lambda op, parts: [REDUCTIONS[op](a, b) for a, b in zip(parts, theirs[op])]))

    def all_reduce(self) -> "MergeableStats":
        """Combine over all ranks of the default ``torch.distributed`` group, in place, each
        state by its reduction; nothing in one process. Returns ``self``."""
        def collective(op: str, parts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            all_reduce_(parts, op=op)
            return list(parts)
        for name, value in self._reduce(collective).items():
            setattr(self, name, value)
        return self


__all__ = ["MergeableStats", "REDUCTIONS", "state"]
