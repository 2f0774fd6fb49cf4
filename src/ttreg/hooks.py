"""Scoped PyTorch hooks: every hook and temporary attribute is undone when its context ends.

Modelled on baukit's ``Trace``: a ``HookSet`` is a context manager; on exit -- also when an
exception escapes -- all hooks it registered are removed and all attributes it changed are
restored, in reverse order.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn


class HookSet:
    """A bag of forward hooks, pre-hooks and temporary attribute changes, undone together."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._restore: list[tuple[object, str, Any]] = []

    def forward(self, module: nn.Module, fn: Callable, *, prepend: bool = False) -> None:
        """``fn(module, args, output)``; a non-None return value replaces the output."""
        self._handles.append(module.register_forward_hook(fn, prepend=prepend))

    def pre(self, module: nn.Module, fn: Callable, *, prepend: bool = False,
            with_kwargs: bool = False) -> None:
        """``fn(module, args[, kwargs])``; a non-None return value replaces the input."""
        self._handles.append(
            module.register_forward_pre_hook(fn, prepend=prepend, with_kwargs=with_kwargs))

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
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self._handles)
