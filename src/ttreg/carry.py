"""How test-time register tokens travel between blocks: on the tensor a block returns.

Inside a block the hidden state is ``[prefix][patches][registers]``. Between blocks -- where
``forward_intermediates``, ``output_hidden_states``, final norms and pooling heads look -- it
must keep its usual shape, so a block's output is cut back to ``[prefix][patches]`` and the
register tokens ride along as an attribute of that very tensor, tagged with the installation
that made them. The next block finds them on its input. Nothing about one forward pass is
stored on the model, so

* two threads running the same model never see each other's registers;
* gradient checkpointing recomputes a block from its saved input, which still carries the
  registers it had (non-reentrant checkpointing keeps the input object; re-entrant
  checkpointing detaches it, which drops them -- the next block then raises instead of guessing);
* ``copy.deepcopy`` and pickling copy no per-call state;
* ``torch.compile`` and ``torch.export`` trace it as ordinary data flow (no graph break).

This module only reads and writes that attribute; :mod:`ttreg.registers` decides when
registers exist and :mod:`ttreg.trace` reads them for norms.
"""
from __future__ import annotations

from typing import Any

import torch

#: attribute of a block's (cut) output: ``(owner, registers)``, registers batch-first ``(B, R, D)``
ATTR = "_ttreg_registers"


def attach(visible: torch.Tensor, registers: torch.Tensor, owner: Any) -> torch.Tensor:
    """Mark ``visible`` (a block output without its registers) as carrying ``registers`` made by
    ``owner``; returns ``visible``."""
    setattr(visible, ATTR, (owner, registers))
    return visible


def carried(x: object, owner: Any = None) -> torch.Tensor | None:
    """The registers ``x`` carries, batch-first ``(B, R, D)`` -- only ``owner``'s if given -- or
    None."""
    got = getattr(x, ATTR, None) if torch.is_tensor(x) else None
    if got is None or (owner is not None and got[0] is not owner):
        return None
    return got[1]


def num_carried(x: object) -> int:
    """How many register tokens ``x`` carries (0 if none)."""
    regs = carried(x)
    return 0 if regs is None else int(regs.shape[1])
