"""Images in, robustly: folders, list files, paths, PIL images or tensors -> normalised batches.

Every input is made one :class:`ImageSet` at the boundary (:func:`image_set`; under
``torch.distributed``, :func:`ttreg.distributed.shared_image_set`): files or tensor batches, with
a length, subsets, one share per rank and batches, so the search, the held-out sweep, the
attention-bias fit and the sizes never ask again what they were given.

Every failure a user can hit becomes an :class:`ImageError` with a one-line message; unreadable
files are skipped and listed unless ``strict`` is set.

Pixel values are read faithfully, scaled by the range of their type and never stretched per
image: 8-bit as is; 16-bit (and 32-bit integer, as Pillow stores 16-bit files) divided by
65535/255, values outside 0..65535 clipped; floats in [0, 1] as such, and a float image with
any value outside [0, 1] (or NaN) is refused with a one-line reason, since its scale is unknown.
Files more elongated than :data:`MAX_ASPECT` are refused (a 60000x1 PNG would need gigabytes in
a resize-then-crop transform), and :func:`make_transform` takes the crop's region straight from
the source, so its memory is bounded by the output size whatever the aspect ratio.
"""
from __future__ import annotations

import bisect
import contextlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .register_neurons import as_index

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
#: images larger than this many pixels (20000x20000) are refused before they are decoded: ttreg's
#: decompression-bomb guard, which replaces Pillow's (``PIL.Image.MAX_IMAGE_PIXELS``, about
#: 89.5 MP by default, which would refuse a 100 MP camera photo) while ttreg opens a file
MAX_SIDE = 20_000
MAX_PIXELS = MAX_SIDE * MAX_SIDE
#: images more elongated than this (long side / short side) are refused: resizing the short
#: side to a model's input size would make a huge intermediate in timm's and HF's transforms
MAX_ASPECT = 100
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


@dataclass(frozen=True, eq=False)
class ImageSet:
    """The images of one call, normalised once at the boundary (:func:`image_set`): image files
    or PIL images (``source``, an :class:`ImageSource`, decoded batch by batch so memory stays
    flat), or tensor batches ``(N, C, H, W)`` (``parts``, kept apart so that no batch spans two
    of them). The search, the held-out sweep, the attention-bias fit and the sizes take one;
    it has a length, :meth:`subset`, :meth:`shard` (one rank's share) and :meth:`batches`."""

    source: ImageSource | None = None
    parts: tuple[torch.Tensor, ...] = ()

    def __len__(self) -> int:
        if self.source is not None:
            return len(self.source)
        return sum(int(t.shape[0]) for t in self.parts)

    @property
    def skipped(self) -> list[Skipped]:
        """The files that could not be read (none for tensors)."""
        return [] if self.source is None else self.source.skipped

    def subset(self, indices) -> "ImageSet":
        """The images at ``indices`` (of the whole set), in that order."""
        indices = [int(i) for i in indices]
        if self.source is not None:
            return ImageSet(self.source.subset(indices))
        offsets = [0]
        for t in self.parts:
            offsets.append(offsets[-1] + int(t.shape[0]))
        runs: list[tuple[int, list[int]]] = []   # consecutive indices into one part: one tensor
        for i in indices:
            if not 0 <= i < offsets[-1]:
                raise IndexError(f"image {i} is out of range for a set of {offsets[-1]} images")
            p = bisect.bisect_right(offsets, i) - 1
            if not runs or runs[-1][0] != p:
                runs.append((p, []))
            runs[-1][1].append(i - offsets[p])
        parts = [self.parts[p][local] for p, local in runs]
        return ImageSet(parts=tuple(parts))

    def __getitem__(self, indices) -> "ImageSet":
        """``images[indices]``: :meth:`subset`, as a tensor batch indexes by a list."""
        return self.subset(indices)

    def shard(self, rank: int, world_size: int) -> "ImageSet":
        """Rank ``rank``'s share of ``world_size``: every ``world_size``-th image, from the
        rank (possibly none); the set itself when there is one rank."""
        if world_size == 1:
            return self
        return self.subset(range(rank, len(self), world_size))

    def batches(self, adapter, batch_size: int, transform: Callable | None = None,
                size: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
        """``(B, C, H, W)`` batches on the model's device and dtype (see :func:`iter_batches`
        for ``transform`` and ``size``); none for an empty set."""
        check_batch_size(batch_size)
        p = adapter.parameter()
        if size is not None:
            from .sizes import resize
            fit = lambda x: resize(x, size)  # noqa: E731
        else:
            fit = lambda x: x  # noqa: E731
        for t in self.parts:
            for i in range(0, len(t), batch_size):
                yield fit(check_finite(t[i:i + batch_size])).to(p.device, p.dtype)
        src = self.source
        if src is None:
            return
        if transform is None and size is not None:
            transform = make_transform(size, *adapter.mean_std())
        tf = transform or default_transform(adapter)
        for i in range(0, len(src.items), batch_size):
            x = torch.stack([tf(src.image(j)) for j in range(i, min(i + batch_size, len(src.items)))])
            yield fit(check_finite(x)).to(p.device, p.dtype)

    def input_size(self, adapter, transform: Callable | None = None) -> tuple[int, int]:
        """The size ``(H, W)`` the images reach the model at when no size is asked for: a
        tensor batch's own, else what ``transform`` (or the model's default one) makes of the
        first image."""
        if self.source is None:
            return tuple(int(v) for v in self.parts[0].shape[-2:])
        tf = transform or default_transform(adapter)
        return tuple(int(v) for v in tf(self.source.image(0)).shape[-2:])


def display_name(path: str | os.PathLike) -> str:
    """A file name fit for printing, JSON and figure titles: bytes that are not UTF-8 (kept by
    Python as surrogate escapes) are shown as U+FFFD."""
    text = os.fspath(path)
    if isinstance(text, bytes):
        return text.decode("utf-8", "replace")
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    root = Path(folder)
    if not root.exists():
        raise ImageError(f"no such folder: {display_name(root)}")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ImageError(f"{display_name(root)}: permission denied (cannot list the folder)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ImageError(f"{display_name(root)} holds no files; point --images at a folder of images")
    return files


def read_list_file(path: str | os.PathLike) -> list[Path]:
    """Paths listed in a text file, one a line, relative to the file's folder; blank lines and
    lines starting with ``#`` (after any indentation) are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8", errors="surrogateescape")
    except PermissionError:
        raise ImageError(f"{display_name(p)}: permission denied") from None
    entries = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            entries.append(Path(line) if os.path.isabs(line) else p.parent / line)
    if not entries:
        raise ImageError(f"{display_name(p)} lists no images")
    return entries


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
    """An image array to 8-bit RGB, scaled by its type's range (see the module docstring)."""
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.floating):
        a = arr.astype(np.float64)
        if not np.isfinite(a).all() or a.min(initial=0) < 0 or a.max(initial=0) > 1:
            finite = a[np.isfinite(a)]
            what = f"spans {finite.min():g} to {finite.max():g}" if finite.size else "has no finite value"
            if 0 < finite.size < a.size:
                what += " and holds NaN or infinity"
            raise ImageError(f"a float image must hold values in [0, 1] (this one {what}); "
                             "scale it to [0, 1] or save it as an 8- or 16-bit image")
        arr = np.rint(a * 255).astype(np.uint8)
    elif arr.dtype != np.uint8:  # 16-bit, or 32-bit integers holding 16-bit data
        a = np.clip(arr.astype(np.float64), 0, 65535)
        arr = np.rint(a * (255 / 65535)).astype(np.uint8)
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
        raise ImageError(f"no such file: {display_name(p)}")
    if p.is_dir():
        raise ImageError(f"{display_name(p)} is a folder, not an image")
    name = display_name(p)
    try:
        with _pillow_limit(), Image.open(p) as im:
            size = (im.width, im.height)
            if im.width * im.height <= MAX_PIXELS:
                im.load()
                decoded = im  # pixels loaded: usable after the file is closed
    except PermissionError:
        raise ImageError(f"{display_name(p)}: permission denied (cannot read the file)") from None
    except UnidentifiedImageError:
        raise ImageError(f"{display_name(p)}: not an image file (or a format Pillow cannot read)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):   # far over MAX_PIXELS
        raise ImageError(f"{name}: too large (over {MAX_SIDE}x{MAX_SIDE} = {MAX_PIXELS} pixels); "
                         "downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{display_name(p)}: corrupt or truncated image ({e})") from None
    if size[0] * size[1] > MAX_PIXELS:
        raise ImageError(f"{name}: {size[0]}x{size[1]} is too large (over {MAX_SIDE}x{MAX_SIDE} = "
                         f"{MAX_PIXELS} pixels); downscale it first")
    if max(size) > MAX_ASPECT * max(1, min(size)):
        raise ImageError(f"{name}: {size[0]}x{size[1]} is too elongated (over {MAX_ASPECT}:1); "
                         "crop it first")
    try:
        return to_rgb(decoded)
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from None


_PILLOW_LIMIT = threading.Lock()


@contextlib.contextmanager
def _pillow_limit() -> Iterator[None]:
    """Pillow's decompression-bomb limit set to :data:`MAX_PIXELS` for one open-and-decode
    (restored afterwards; one at a time): Pillow warns above its limit and refuses above twice
    it, so its warning is silenced here and ttreg's own size check (with the image's width and
    height) decides; only an image over twice the limit is refused by Pillow itself."""
    from PIL import Image
    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        before = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = before


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


def _expand(entry) -> list:
    """One path argument -> the image paths it stands for (a folder is searched recursively, a
    .txt/.lst/.list file is read as a list); anything else is returned as is."""
    if isinstance(entry, (str, os.PathLike)):
        p = Path(entry)
        if p.is_dir():
            return list_image_files(p)
        if p.is_file() and p.suffix.lower() in (".txt", ".lst", ".list"):
            return read_list_file(p)
    return [entry]


def list_entries(images) -> list[tuple]:
    """The images an input stands for, in order, as ``(entry, name or None)`` pairs -- a path
    (not decoded yet) or an RGB PIL image -- for a folder, a list file (one path per line),
    ``"skimage"``, or a list of paths, folders or PIL images. A missing path, an empty list or
    an entry of another type is an :class:`ImageError`."""
    from PIL import Image
    if isinstance(images, (str, os.PathLike)):
        if str(images) in ("skimage", "skimage:"):
            return [(im, f"skimage:{name}") for name, im in skimage_photos()]
        p = Path(images)
        if not (p.is_dir() or p.is_file()):
            raise ImageError(f"no such file or folder: {display_name(p)}")
        found: list = _expand(p)
    else:
        if torch.is_tensor(images):
            raise ImageError("a tensor batch goes to iter_batches directly, not resolve_images")
        found = [e for entry in images for e in _expand(entry)]
        if not found:
            raise ImageError("no images given (an empty list); give image files, a folder or a batch")
    out = []
    for e in found:
        if isinstance(e, Image.Image):
            out.append((to_rgb(e), None))
        elif isinstance(e, (str, os.PathLike)):
            out.append((Path(e), display_name(e)))
        else:
            raise ImageError(f"cannot read an image from {type(e).__name__}; give paths, PIL images "
                             "or a tensor batch")
    return out


def check_entries(entries: list[tuple], indices, strict: bool = False) -> dict[int, str]:
    """Decode the files among ``entries[i]`` for ``i`` in ``indices``; ``{i: reason}`` for the
    unreadable ones (with ``strict``, the first raises its :class:`ImageError`)."""
    bad = {}
    for i in indices:
        e = entries[i][0]
        if isinstance(e, Path):
            try:
                load_image(e)  # check it decodes; decoded again when used
            except ImageError as err:
                if strict:
                    raise
                bad[i] = str(err)
    return bad


def build_source(images, entries: list[tuple], bad: dict[int, str]) -> ImageSource:
    """The :class:`ImageSource` of ``entries`` without the unreadable ones (``bad``, listed as
    skipped); no readable image at all is an :class:`ImageError`."""
    src = ImageSource()
    for i, (e, name) in enumerate(entries):
        if i in bad:
            src.skipped.append(Skipped(name, bad[i]))
            continue
        src.items.append(e)
        src.names.append(name if name is not None else f"image{len(src.names)}")
    if not src.items:
        where = display_name(images) if isinstance(images, (str, os.PathLike)) else "the inputs"
        raise ImageError(f"no readable images in {where}"
                         + (f" ({len(src.skipped)} skipped: {src.skipped[0].reason})" if src.skipped else ""))
    return src


def resolve_images(images, strict: bool = False) -> ImageSource:
    """Turn a folder, a list file (one path per line), ``"skimage"``, or a list of paths,
    folders or PIL images into an :class:`ImageSource`. Bad files are skipped (or raise with
    ``strict``); no images at all is an :class:`ImageError`. (Under ``torch.distributed``,
    :func:`ttreg.distributed.resolve` shares the decoding check out over the ranks.)"""
    entries = list_entries(images)
    return build_source(images, entries, check_entries(entries, range(len(entries)), strict))


def check_batch_size(batch_size) -> int:
    """``batch_size`` as a whole number >= 1; a one-line ``ValueError`` otherwise."""
    if as_index(batch_size, "batch_size") < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


def check_images_given(images) -> None:
    """Refuse an empty batch or list before any work (one line)."""
    n = count_images(images)
    if n == 0:
        raise ImageError("no images given (an empty batch or list); give at least one image")


class CenterCropTransform:
    """PIL image -> normalised ``(3, H, W)`` float tensor: the shorter side resized (bicubic) so
    the image covers ``size``, the centre ``size`` crop, values scaled to [0, 1], then
    ``(x - mean) / std`` per channel. Its repr says exactly that."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)   # whatever the default dtype
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, im) -> torch.Tensor:
        from PIL import Image
        h, w = self.size
        # the centre crop of the resized image, taken straight from the source region (Pillow's
        # ``box``): the same pixels as resize-then-crop, without the full-size intermediate
        scale = max(h / im.height, w / im.width)
        nh, nw = max(h, round(im.height * scale)), max(w, round(im.width * scale))
        top, left = (nh - h) // 2, (nw - w) // 2
        sx, sy = im.width / nw, im.height / nh
        im = im.resize((w, h), Image.BICUBIC,
                       box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self._mean) / self._std

    def __repr__(self) -> str:
        h, w = self.size
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        return (f"CenterCropTransform(resize the shorter side (bicubic) to cover {h}x{w}, centre "
                f"crop {h}x{w}, scale to [0, 1], normalise mean={fmt(self.mean)} std={fmt(self.std)})")


def make_transform(size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Resize the shorter side, center-crop to ``size``, to a normalised float tensor
    (a :class:`CenterCropTransform`)."""
    return CenterCropTransform(size, mean, std)


def default_transform(adapter) -> Callable:
    mean, std = adapter.mean_std()
    return make_transform(adapter.image_size(), mean, std)


def check_finite(x: torch.Tensor, what: str = "input") -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise ImageError(f"{what} contains NaN or infinite values; check the images or preprocessing")
    return x


def _as_batch(t: torch.Tensor) -> torch.Tensor:
    """A tensor image ``(C, H, W)`` or batch ``(N, C, H, W)`` as a non-empty batch."""
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4:
        raise ImageError(f"expected an image batch (N, C, H, W), got shape {tuple(t.shape)}")
    check_images_given(t)
    return t


def image_set(images, strict: bool = False, resolve: Callable | None = None) -> ImageSet:
    """Any image input as an :class:`ImageSet`, the one place that asks what it is: a tensor
    ``(N, C, H, W)`` (or one image ``(C, H, W)``), a list of such tensors, an
    :class:`ImageSource`, or anything :func:`resolve_images` takes (resolved by ``resolve``,
    default :func:`resolve_images`, with ``strict``). An :class:`ImageSet` is returned as is."""
    if isinstance(images, ImageSet):
        return images
    if isinstance(images, ImageSource):
        return ImageSet(images)
    if torch.is_tensor(images):
        return ImageSet(parts=(_as_batch(images),))
    if isinstance(images, (list, tuple)) and images and all(torch.is_tensor(t) for t in images):
        return ImageSet(parts=tuple(_as_batch(t) for t in images))
    return ImageSet((resolve or resolve_images)(images, strict=strict))


def iter_batches(images, adapter, batch_size: int = 16, transform: Callable | None = None,
                 strict: bool = False, size: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
    """Yield ``(B, C, H, W)`` batches on the model's device and dtype.

    ``images``: a tensor ``(N, C, H, W)``, an iterable of such tensors, an :class:`ImageSet`,
    or anything :func:`resolve_images` takes. ``size`` ``(H, W)``: bring every batch to that
    size -- image files without a ``transform`` by the default resize and centre crop at that
    size, tensors (and what a ``transform`` gives) by resizing (:func:`ttreg.sizes.resize`).
    A ``transform`` applies to image files and PIL images, not to tensors.
    """
    yield from image_set(images, strict).batches(adapter, batch_size, transform, size)


def batches_with_progress(batches: Iterator[torch.Tensor], images, batch_size: int, desc: str,
                          progress: bool) -> Iterator[torch.Tensor]:
    """``batches`` (from :func:`iter_batches` over ``images``), behind a progress bar if asked."""
    if not progress:
        return batches
    from tqdm.auto import tqdm
    total = count_images(images)
    return tqdm(batches, total=None if total is None else -(-total // batch_size), desc=desc, unit="batch")


def shard_batches(images, adapter, batch_size: int, transform: Callable | None = None,
                  strict: bool = False, progress: bool = False, desc: str = "",
                  size: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
    """:func:`iter_batches` over one rank's share of the images, which may be empty (a rank of
    a ``torch.distributed`` run with fewer images than ranks): then no batch at all."""
    images = image_set(images, strict)
    if len(images) == 0:
        return iter(())
    return batches_with_progress(images.batches(adapter, batch_size, transform, size),
                                 images, batch_size, desc, progress)


def count_images(images) -> int | None:
    if torch.is_tensor(images):
        return images.shape[0] if images.dim() == 4 else 1
    if isinstance(images, (ImageSource, ImageSet)):
        return len(images)
    if isinstance(images, (list, tuple)):
        if images and all(torch.is_tensor(t) for t in images):
            return sum(t.shape[0] for t in images)
        return len(images)
    return None
