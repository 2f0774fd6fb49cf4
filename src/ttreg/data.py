"""Images in, robustly: folders, list files, paths, PIL images or tensors -> normalised batches.

Every failure a user can hit becomes an :class:`ImageError` with a one-line message; unreadable
files are skipped and listed unless ``strict`` is set.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
#: images larger than this many pixels are refused (decompression-bomb guard)
MAX_PIXELS = 20_000 * 20_000
#: scikit-image's bundled photos that need no download
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "horse",
                  "hubble_deep_field", "immunohistochemistry", "moon", "page", "text",
                  "motorcycle_left", "retina", "cat", "colorwheel", "grass", "gravel",
                  "brick", "logo")


class ImageError(ValueError):
    """An input image or image source that cannot be used; the message says why in one line."""


@dataclass
class Skipped:
    path: str
    reason: str


@dataclass
class ImageSource:
    """Resolved image inputs: items are paths (decoded when used, so memory stays flat) or PIL
    images; ``skipped`` lists the files that could not be read."""

    items: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int):
        """Item ``i`` as an RGB PIL image."""
        item = self.items[i]
        return load_image(item) if isinstance(item, (str, os.PathLike)) else item

    def subset(self, indices) -> "ImageSource":
        return ImageSource([self.items[i] for i in indices], [self.names[i] for i in indices])


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    root = Path(folder)
    if not root.exists():
        raise ImageError(f"no such folder: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ImageError(f"{root} holds no files; point --images at a folder of images")
    return files


def skimage_photos(names: Sequence[str] | None = None) -> list:
    """The real photos bundled with scikit-image (no download), as RGB PIL images."""
    from PIL import Image
    try:
        from skimage import data as skdata
    except ImportError:
        raise ImageError("scikit-image is not installed: pip install scikit-image") from None
    out = []
    for name in names or SKIMAGE_PHOTOS:
        fn = getattr(skdata, name, None)
        if fn is None:
            continue
        try:
            arr = fn()
        except Exception:  # some need a download (pooch); skip them
            continue
        out.append((name, Image.fromarray(_to_uint8_rgb(np.asarray(arr)))))
    return out


def _to_uint8_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        lo, hi = np.nanmin(a), np.nanmax(a)
        arr = ((a - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    return arr


def load_image(path: str | os.PathLike):
    """Open any image file as 8-bit RGB; raise :class:`ImageError` with a one-line reason."""
    from PIL import Image, UnidentifiedImageError
    p = Path(path)
    if not p.exists():
        raise ImageError(f"no such file: {p}")
    if p.is_dir():
        raise ImageError(f"{p} is a folder, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(f"{p}: {im.width}x{im.height} is too large "
                                     f"(over {MAX_PIXELS} pixels); downscale it first")
                im.load()
                return to_rgb(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image file (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{p}: too large to decode safely; downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{p}: corrupt or truncated image ({e})") from None


def to_rgb(im):
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1) -> RGB, alpha composited on white."""
    from PIL import Image
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_to_uint8_rgb(np.asarray(im)))
    return im.convert("RGB")


def resolve_images(images, strict: bool = False) -> ImageSource:
    """Turn a folder, a list file (one path per line), ``"skimage"``, a list of paths or PIL
    images into an :class:`ImageSource`. Bad files are skipped (or raise with ``strict``)."""
    from PIL import Image
    src = ImageSource()
    if isinstance(images, (str, os.PathLike)):
        p = Path(images)
        if str(images) in ("skimage", "skimage:"):
            for name, im in skimage_photos():
                src.items.append(im)
                src.names.append(f"skimage:{name}")
            return src
        if p.is_dir():
            entries: list = list_image_files(p)
        elif p.is_file() and p.suffix.lower() in (".txt", ".lst", ".list"):
            base = p.parent
            entries = [Path(line.strip()) if os.path.isabs(line.strip()) else base / line.strip()
                       for line in p.read_text().splitlines() if line.strip() and not line.startswith("#")]
            if not entries:
                raise ImageError(f"{p} lists no images")
        elif p.is_file():
            entries = [p]
        else:
            raise ImageError(f"no such file or folder: {p}")
    else:
        entries = list(images)
    for e in entries:
        if isinstance(e, Image.Image):
            src.items.append(to_rgb(e))
            src.names.append(f"image{len(src.names)}")
            continue
        try:
            load_image(e)  # check it decodes; decoded again when used
            src.items.append(Path(e))
            src.names.append(str(e))
        except ImageError as err:
            if strict:
                raise
            src.skipped.append(Skipped(str(e), str(err)))
    if not src.items:
        where = images if isinstance(images, (str, os.PathLike)) else "the inputs"
        raise ImageError(f"no readable images in {where}"
                         + (f" ({len(src.skipped)} skipped: {src.skipped[0].reason})" if src.skipped else ""))
    return src


def make_transform(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Resize the shorter side, center-crop to ``size``, to a normalised float tensor."""
    from PIL import Image
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    h, w = size

    def transform(im) -> torch.Tensor:
        scale = max(h / im.height, w / im.width)
        nh, nw = max(h, round(im.height * scale)), max(w, round(im.width * scale))
        im = im.resize((nw, nh), Image.BICUBIC)
        top, left = (nh - h) // 2, (nw - w) // 2
        im = im.crop((left, top, left + w, top + h))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - mean_t) / std_t

    return transform


def default_transform(adapter) -> Callable:
    mean, std = adapter.mean_std()
    return make_transform(adapter.image_size(), mean, std)


def check_finite(x: torch.Tensor, what: str = "input") -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise ImageError(f"{what} contains NaN or infinite values; check the images or preprocessing")
    return x


def iter_batches(images, adapter, batch_size: int = 16, transform: Callable | None = None,
                 strict: bool = False) -> Iterator[torch.Tensor]:
    """Yield ``(B, C, H, W)`` batches on the model's device and dtype.

    ``images``: a tensor ``(N, C, H, W)``, an iterable of such tensors, or anything
    :func:`resolve_images` takes.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    p = adapter.parameter()
    if torch.is_tensor(images):
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4:
            raise ImageError(f"expected an image batch (N, C, H, W), got shape {tuple(images.shape)}")
        for i in range(0, len(images), batch_size):
            yield check_finite(images[i:i + batch_size]).to(p.device, p.dtype)
        return
    if isinstance(images, (list, tuple)) and images and all(torch.is_tensor(t) for t in images):
        for t in images:
            yield from iter_batches(t, adapter, batch_size)
        return
    src = images if isinstance(images, ImageSource) else resolve_images(images, strict=strict)
    tf = transform or default_transform(adapter)
    for i in range(0, len(src.items), batch_size):
        x = torch.stack([tf(src.image(j)) for j in range(i, min(i + batch_size, len(src.items)))])
        yield check_finite(x).to(p.device, p.dtype)


def batches_with_progress(batches: Iterator[torch.Tensor], images, batch_size: int, desc: str,
                          progress: bool) -> Iterator[torch.Tensor]:
    """``batches`` (from :func:`iter_batches` over ``images``), behind a progress bar if asked."""
    if not progress:
        return batches
    from tqdm.auto import tqdm
    total = count_images(images)
    return tqdm(batches, total=None if total is None else -(-total // batch_size), desc=desc, unit="batch")


def count_images(images) -> int | None:
    if torch.is_tensor(images):
        return images.shape[0] if images.dim() == 4 else 1
    if isinstance(images, ImageSource):
        return len(images.items)
    if isinstance(images, (list, tuple)):
        if images and all(torch.is_tensor(t) for t in images):
            return sum(t.shape[0] for t in images)
        return len(images)
    return None
