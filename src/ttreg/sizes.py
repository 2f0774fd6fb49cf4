"""Input sizes: reading them from the user, running a model at a size its library supports,
and how many patches a size gives.

A size is ``(height, width)`` in pixels; users write ``224``, ``"224x448"`` or ``(224, 448)``.
A model runs at another size than it was built for the way its library does it, as its adapter
knows (:meth:`~ttreg.adapters.base.Adapter.any_size`): timm's ``VisionTransformer`` and ``Eva``
as if built with ``dynamic_img_size=True`` (position embedding resampled to the grid), Hugging
Face models through ``interpolate_pos_encoding`` (their adapter passes it), models that take any
size as they are. Where a model cannot, :func:`at_size` says so in one line before any long run.
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch

Size = tuple[int, int]


def as_size(v, what: str = "size") -> Size:
    """One size: ``224``, ``"224"``, ``"224x448"`` (height x width) or ``(224, 448)``."""
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*", v)
        if not m:
            raise ValueError(f"{what} must be pixels such as 224 or 224x448, got {v!r}")
        h, w = int(m.group(1)), int(m.group(2) or m.group(1))
    elif isinstance(v, (tuple, list)) and len(v) == 2:
        h, w = v
    else:
        h = w = v
    for n in (h, w):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{what} must be whole pixels >= 1 such as 224 or 224x448, got {v!r}")
    return int(h), int(w)


def as_sizes(v, what: str = "sizes") -> list[Size]:
    """Several sizes, in order, without repeats: a list of what :func:`as_size` takes, or a
    comma-separated string (``"224,518"``); a one-line ``ValueError`` otherwise."""
    items = v.split(",") if isinstance(v, str) else v
    if isinstance(items, (int, tuple)) and not isinstance(items, bool):
        items = [items]
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"{what} must be one or more sizes such as [224, 518], got {v!r}")
    out: list[Size] = []
    for s in items:
        size = as_size(s, what)
        if size not in out:
            out.append(size)
    return out


def label(size: Size) -> str:
    """``"224x224"``: how reports and files name a size."""
    return f"{size[0]}x{size[1]}"


def num_patches(size: Size, patch_size: tuple[int, int]) -> int:
    """Patches of an image of ``size`` (what a model sees of its size: outliers per image scale
    with it, and it is what the first block can tell from its token count)."""
    return (size[0] // patch_size[0]) * (size[1] // patch_size[1])


def dynamic_size(model) -> contextlib.AbstractContextManager:
    """Within the context ``model`` (or an adapter) accepts any input size where its family can
    (:meth:`~ttreg.adapters.base.Adapter.any_size`: timm ``VisionTransformer`` and ``Eva``, also
    as an open_clip tower's trunk, as if built with ``dynamic_img_size=True``); whatever is
    switched is restored on exit, also on an exception. Other models are left alone."""
    from .adapters import wrap
    try:
        return wrap(model).any_size()
    except TypeError:
        return contextlib.nullcontext()


@contextlib.contextmanager
def at_size(adapter, size: Size | None, probe: bool = True) -> Iterator[None]:
    """The model of ``adapter`` ready to run at ``size`` for the block (nothing to do at its
    own size or for ``None``). With ``probe``, one image of that size is run through the first
    block first, so a model that cannot change its size fails here, in one line, not inside a
    long pass."""
    if size is None or tuple(size) == tuple(adapter.image_size()):
        yield
        return
    from .tracing import run_until
    with adapter.any_size():
        if not probe:
            yield
            return
        p = adapter.parameter()
        probe = torch.zeros(1, 3, *size, device=p.device, dtype=p.dtype)
        try:
            with torch.no_grad():
                run_until(adapter, probe, 0)
        except Exception as err:
            own = label(adapter.image_size())
            raise ValueError(f"{type(adapter.model).__name__} cannot run at {label(size)} px "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
                             f"use its own size {own}, or build it to take other sizes (timm: "
                             f"dynamic_img_size=True)") from None
        yield


def resize(x: torch.Tensor, size: Size) -> torch.Tensor:
    """An image batch ``(B, C, H, W)`` resized to ``size`` (bilinear, antialiased); unchanged
    when it has that size already."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    dtype = x.dtype
    out = torch.nn.functional.interpolate(x.float(), size=size, mode="bilinear", antialias=True,
                                          align_corners=False)
    return out.to(dtype)


__all__ = ["Size", "as_size", "as_sizes", "label", "num_patches", "dynamic_size",
           "at_size", "resize"]
