"""Image batches for planted models: varied images (:func:`mixed_images`) and images whose marked
patch moves from image to image (:func:`marked_images`), for plants that follow content."""
from __future__ import annotations

import torch


def mixed_images(n: int = 8, size: int = 64, seed: int = 0) -> torch.Tensor:
    """A normalised batch of varied images: noise, gradients, stripes, blobs and flat colours."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            img = torch.randn(3, size, size, generator=g)
        elif kind == 1:
            img = torch.stack([xx, yy, xx * yy]) * 2
        elif kind == 2:
            f = 2 + 4 * torch.rand(1, generator=g)
            img = torch.sin(f * 3.14 * xx).expand(3, -1, -1) * 1.5
        elif kind == 3:
            c = torch.rand(2, generator=g) - 0.5
            img = torch.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) * 8).expand(3, -1, -1) * 3 - 1
        else:
            img = (torch.rand(3, 1, 1, generator=g) * 4 - 2).expand(3, size, size)
        out.append(img.clone())
    return torch.stack(out).float()


def marked_images(n: int = 8, size: int = 64, patch: int = 8, seed: int = 0,
                  strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, marked)``: varied images (:func:`mixed_images`) each carrying a marker -- a
    checkerboard of ``+-strength`` (green in antiphase) filling one patch of the ``patch`` grid,
    at a random place per image -- and the ``(n, num_patches)`` bool mask of the marked patch. A
    plant told ``where=marked`` fires on the marker, wherever it is: outliers that follow image
    content."""
    x = mixed_images(n, size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    cells = size // patch
    pos = torch.randint(0, cells * cells, (n,), generator=g)
    yy, xx = torch.meshgrid(torch.arange(patch), torch.arange(patch), indexing="ij")
    colours = torch.tensor([1.0, -1.0, 1.0])[:, None, None]        # no image kind has this pattern
    board = ((yy + xx) % 2 * 2 - 1).float() * strength * colours
    for i, p in enumerate(pos.tolist()):
        r, c = divmod(p, cells)
        x[i, :, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = board
    marked = torch.zeros(n, cells * cells, dtype=torch.bool)
    marked[torch.arange(n), pos] = True
    return x, marked
