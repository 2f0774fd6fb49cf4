"""The state of one forward call, and what a context switched on: two context variables and one
tensor attribute, nothing on the model.

* :data:`SCOPE` -- what this context (thread, task) switched on: the edits of ``with
  ttreg.test_time_registers(...)`` blocks, the recordings of ``ttreg.trace`` and the image layout
  of a packed tower's run (:func:`ttreg.adapters.base.packed_run`). Entered and left
  only *outside* a forward (:func:`entered`, token-reset, so it nests and survives exceptions);
  hooks only read it, which ``torch.compile`` traces and guards on (a thread inside a ``with``
  block and one outside run different compiled entries).
* :data:`CALL` -- the :class:`RegisterCall` of the block running now in this context, set with a
  token by the block's pre-hook and reset by its forward hook (registered with
  ``always_call=True``, so also when the block raises). The MLP and attention hooks inside the
  block read it. ``torch.compile`` cannot trace a context-variable *set*, so while compiling the
  active edit itself answers (:func:`current`), and the per-call data ride only on the tensors.
* :data:`ATTR` -- the one attribute ttreg puts on tensors: a :class:`RegisterCall`. On a block's
  input (the hidden state with the registers appended) it is that block's call; on a block's
  output (cut back to the usual tokens) it carries the register tokens on to the next block. A
  gradient-checkpoint recomputation re-runs a block from its saved input, which still carries
  them; ``copy.deepcopy`` and pickling of the model copy none of it.

:func:`current` is the one place that answers "are registers on for this call?", compile
included.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import torch

#: what this context switched on (``with`` edits, trace recordings), innermost last
SCOPE: contextvars.ContextVar[tuple] = contextvars.ContextVar("ttreg_scope", default=())
#: the :class:`RegisterCall` of the block running now in this context
CALL: contextvars.ContextVar = contextvars.ContextVar("ttreg_call", default=None)
#: the one attribute ttreg sets on tensors
ATTR = "_ttreg_call"


class RegisterCall:
    """One block call with test-time registers (or the registers one block hands the next).

    ``edit``: the configuration that applies (it names its installation by ``edit.key``, and
    ``edit.num_registers`` is R); ``registers``: the register tokens entering the block, or
    leaving it when carried on an output, batch-first ``(B, R, D)``; ``valid``: ``(B, T)`` bool of
    the block input's real tokens when the batch is padded (None: all real); ``visible``: the
    hidden state the block received before the registers were appended (what a library that
    records a block's input should see); ``token``: to reset :data:`CALL` when the block ends;
    ``layout``: for a packed sequence of several images (``cu_seqlens``), where each image and its
    registers sit (:class:`ttreg.adapters.base.Packing`), else None.
    """

    __slots__ = ("edit", "registers", "valid", "visible", "token", "layout")

    def __init__(self, edit: Any, registers: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None, visible: torch.Tensor | None = None) -> None:
        self.edit, self.registers, self.valid, self.visible = edit, registers, valid, visible
        self.token = None
        self.layout = None

    def __repr__(self) -> str:
        r = None if self.registers is None else tuple(self.registers.shape)
        return f"RegisterCall(R={self.edit.num_registers}, registers={r}, padded={self.valid is not None})"


def tag(t: torch.Tensor, call: RegisterCall) -> torch.Tensor:
    """Put ``call`` on ``t`` (:data:`ATTR`); returns ``t``."""
    setattr(t, ATTR, call)
    return t


def tagged(t: object, key: Any = None) -> RegisterCall | None:
    """The :class:`RegisterCall` on ``t`` (only one of installation ``key``, if given), or None."""
    call = getattr(t, ATTR, None) if torch.is_tensor(t) else None
    if call is None or (key is not None and call.edit.key is not key):
        return None
    return call


def carried(t: object) -> torch.Tensor | None:
    """The register tokens a block output ``t`` carries to the next block, ``(B, R, D)``, or None."""
    call = tagged(t)
    return None if call is None else call.registers


def num_carried(t: object) -> int:
    """How many register tokens ``t`` carries (0 if none)."""
    regs = carried(t)
    return 0 if regs is None else int(regs.shape[1])


def current(sites: Any) -> RegisterCall | None:
    """The register call the module running now belongs to, for installation ``sites``, or None
    (a plain call). Eager: the block's call in :data:`CALL`. While ``torch.compile`` traces (it
    cannot set context variables), the edit active for this context applies to the whole traced
    forward: a call without per-call data (padding masks are not traced)."""
    if torch.compiler.is_compiling():
        edit = sites.active_edit()
        return None if edit is None else edit.static_call
    call = CALL.get()
    return call if call is not None and call.edit.key is sites.key else None


def in_scope(kind: type) -> Iterator[Any]:
    """The entries of :data:`SCOPE` of class ``kind``, innermost first."""
    return (e for e in reversed(SCOPE.get()) if isinstance(e, kind))


@contextlib.contextmanager
def entered(entry: Any) -> Iterator[Any]:
    """Switch ``entry`` on for this context until the block ends (also on an exception)."""
    token = SCOPE.set(SCOPE.get() + (entry,))
    try:
        yield entry
    finally:
        SCOPE.reset(token)


def in_backward() -> bool:
    """Is autograd running a backward pass in this thread now (a checkpoint recomputation)?
    Not traceable by ``torch.compile``: ask it only where an edit is active (never on a plain
    forward, which must compile without a graph break)."""
    return torch._C._current_graph_task_id() != -1


__all__ = ["ATTR", "CALL", "SCOPE", "RegisterCall", "carried", "current", "entered", "in_backward",
           "in_scope", "num_carried", "tag", "tagged"]
