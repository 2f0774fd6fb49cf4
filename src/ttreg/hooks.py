"""Scoped PyTorch hooks: every hook and temporary attribute is undone when its context ends.

Modelled on baukit's ``Trace``: a ``HookSet`` is a context manager; on exit -- also when an
exception escapes -- all hooks it registered are removed and all attributes it changed are
restored, in reverse order. Inside, its hooks act only on the entering context's forwards (the set is an entry of
:data:`ttreg.calls.SCOPE`).
Long-lived hooks (test-time registers) are :class:`OwnedHook` objects, findable on any model.
A pass that needs only the first blocks ends the forward early with :class:`StopForward`
(baukit's ``stop=True``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch.nn as nn

from .calls import SCOPE, entered


class OwnedHook:
    """Base class of ttreg's long-lived hooks (test-time registers).

    They are small callable objects rather than closures: ``copy.deepcopy`` and pickling of a
    model copy them together with the modules they refer to, and :func:`owned_hooks` can find
    them on any model -- also on a copy whose installing handle is gone.
    """

    def __call__(self, *args):  # pragma: no cover - overridden
        raise NotImplementedError


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the blocks a pass needs have run; caught
    around the run (:func:`ttreg.trace.run_until`), never seen by a caller."""


def stop_forward(*args) -> None:
    """A forward hook that ends the forward pass (:class:`StopForward`)."""
    raise StopForward


_HOOK_DICTS = (("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
               ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")))


def owned_hooks(model: nn.Module, kind: type = OwnedHook) -> Iterator[tuple[nn.Module, int, Any]]:
    """``(module, hook id, hook)`` for every hook of class ``kind`` in ``model``'s tree."""
    for mod in model.modules():
        for name, _ in _HOOK_DICTS:
            for hid, hook in list(getattr(mod, name).items()):
                if isinstance(hook, kind):
                    yield mod, hid, hook


def remove_owned_hooks(model: nn.Module, kind: type = OwnedHook, where=lambda hook: True) -> int:
    """Remove every hook of class ``kind`` (for which ``where(hook)`` is true) from ``model``'s
    tree; return how many were removed."""
    n = 0
    for mod in model.modules():
        for name, extras in _HOOK_DICTS:
            hooks = getattr(mod, name)
            for hid in [h for h, hook in hooks.items() if isinstance(hook, kind) and where(hook)]:
                del hooks[hid]
                for extra in extras:
                    getattr(mod, extra, {}).pop(hid, None)
                n += 1
    return n


class HookSet:
    """A bag of forward hooks, pre-hooks and temporary attribute changes, undone together.

    Used as a context manager (``with HookSet() as hooks: ...``), the hooks added inside act only
    on forwards run in that context -- the entering thread -- like ``torch.no_grad()``: another
    thread running the same model meanwhile is not recorded or edited. (Attribute changes, such
    as switching attention to its explicit path, are seen by every thread.) A set that is never
    entered (a handle kept by the caller) acts on every forward until ``remove()``.
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._restore: list[tuple[object, str, Any]] = []
        self._scope = None

    def _scoped(self, fn: Callable) -> Callable:
        if self._scope is None:
            return fn

        def hook(*args):
            if any(e is self for e in SCOPE.get()):
                return fn(*args)
            return None
        return hook

    def forward(self, module: nn.Module, fn: Callable, *, prepend: bool = False,
                with_kwargs: bool = False, always_call: bool = False) -> None:
        """``fn(module, args[, kwargs], output)``; a non-None return value replaces the output.
        ``always_call``: also run when the forward raises (to undo what a pre-hook began)."""
        self._handles.append(module.register_forward_hook(self._scoped(fn), prepend=prepend,
                                                          with_kwargs=with_kwargs,
                                                          always_call=always_call))

    def pre(self, module: nn.Module, fn: Callable, *, prepend: bool = False,
            with_kwargs: bool = False) -> None:
        """``fn(module, args[, kwargs])``; a non-None return value replaces the input."""
        self._handles.append(
            module.register_forward_pre_hook(self._scoped(fn), prepend=prepend, with_kwargs=with_kwargs))

    def set_attr(self, obj: object, name: str, value: Any) -> None:
        """Set ``obj.name = value`` until the set is removed."""
        self._restore.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._restore:
            obj, name, old = self._restore.pop()
            setattr(obj, name, old)

    def __enter__(self) -> "HookSet":
        self._scope = entered(self)
        self._scope.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.remove()
        finally:
            if self._scope is not None:
                self._scope.__exit__(None, None, None)

    def __len__(self) -> int:
        return len(self._handles)
