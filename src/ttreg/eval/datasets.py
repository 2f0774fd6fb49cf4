"""Datasets on disk, in the layouts the paper's benchmarks ship in, read into plain lists.

* boxes: Pascal VOC (``JPEGImages/``, ``Annotations/*.xml``, optional ``ImageSets/Main/<split>.txt``)
  and COCO-style JSON (``images`` + ``annotations`` with ``bbox`` as x, y, w, h), for LOST;
* classes: ImageFolder (``root/<class>/<image>``, or ``root/{train,val}/<class>/<image>``);
* dense targets: image and target folders matched by file stem (segmentation masks as PNG/NPY
  class indices, depth maps as NPY metres or 16-bit PNG), optionally under ``train/`` and
  ``val/``; the ADE20k layout (``images/{training,validation}``, ``annotations/...``) too;
* plus the image geometry the dense experiments share (resize, centre crop, normalise).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..data import IMAGE_SUFFIXES, ImageError, load_image


# --- geometry -----------------------------------------------------------------------------------
def resize(im, size: tuple[int, int]):
    """Resize a PIL image to ``size`` = (h, w) (aspect not kept; boxes scale per axis)."""
    from PIL import Image
    return im.resize((size[1], size[0]), Image.BICUBIC)


def resize_center_crop(im, size: tuple[int, int]):
    """Resize the shorter side to fit ``size`` = (h, w), then crop the centre (as
    :func:`ttreg.data.make_transform`, without normalising)."""
    from PIL import Image
    h, w = size
    scale = max(h / im.height, w / im.width)
    nh, nw = max(h, round(im.height * scale)), max(w, round(im.width * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    top, left = (nh - h) // 2, (nw - w) // 2
    return im.crop((left, top, left + w, top + h))


def to_tensor(im, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """PIL RGB -> normalised ``(3, H, W)`` float tensor."""
    x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def resize_target(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize (pixel centres) of a 2-D label or depth map to ``size`` = (h, w)."""
    a = np.asarray(arr)
    h, w = size
    rows = np.minimum(((np.arange(h) + 0.5) * a.shape[0] / h).astype(np.int64), a.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * a.shape[1] / w).astype(np.int64), a.shape[1] - 1)
    return a[rows[:, None], cols[None, :]]


# --- boxes (LOST) -----------------------------------------------------------------------------------
@dataclass
class BoxSample:
    """One image with ground-truth boxes ``(M, 4)`` as x1, y1, x2, y2 in pixels (0-based,
    continuous: a box covering a W-pixel-wide image is 0..W)."""

    path: Path
    boxes: np.ndarray
    name: str = ""


def _voc_objects(xml_path: Path, remove_hards: bool) -> tuple[str | None, np.ndarray]:
    root = ET.parse(xml_path).getroot()
    filename = root.findtext("filename")
    boxes = []
    for obj in root.iter("object"):
        if remove_hards and (obj.findtext("difficult", "0").strip() == "1"
                             or obj.findtext("truncated", "0").strip() == "1"):
            continue
        bb = obj.find("bndbox")
        if bb is None:
            continue
        x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 - 1, y1 - 1, x2, y2])      # 1-based inclusive -> 0-based continuous
    return filename, np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def voc_boxes(root, split: str | None = "trainval", remove_hards: bool = False) -> list[BoxSample]:
    """Images with boxes from a Pascal VOC folder (VOC2007 / VOC2012 layout).

    ``split``: the image list ``ImageSets/Main/<split>.txt`` if that file exists; otherwise (or
    with None) every ``Annotations/*.xml``. Images without objects are left out.
    """
    root = Path(root)
    ann = root / "Annotations"
    if not ann.is_dir():
        raise ImageError(f"{root} is not a VOC folder: no Annotations/ in it")
    listing = root / "ImageSets" / "Main" / f"{split}.txt" if split else None
    if listing is not None and listing.is_file():
        ids = [l.split()[0] for l in listing.read_text().splitlines() if l.strip()]
    else:
        ids = sorted(p.stem for p in ann.glob("*.xml"))
    out = []
    for i in ids:
        filename, boxes = _voc_objects(ann / f"{i}.xml", remove_hards)
        if not len(boxes):
            continue
        path = root / "JPEGImages" / (filename or f"{i}.jpg")
        if not path.exists():
            path = root / "JPEGImages" / f"{i}.jpg"
        out.append(BoxSample(path, boxes, i))
    if not out:
        raise ImageError(f"no annotated images in {root}")
    return out


def coco_boxes(json_path, image_root=None, remove_iscrowd: bool = True) -> list[BoxSample]:
    """Images with boxes from a COCO-style JSON (e.g. COCO20k). ``image_root``: where the
    ``file_name``s live (default: ``images/`` beside the JSON if it exists, else its folder)."""
    jp = Path(json_path)
    data = json.loads(jp.read_text())
    if image_root is None:
        image_root = jp.parent / "images" if (jp.parent / "images").is_dir() else jp.parent
    image_root = Path(image_root)
    by_image: dict = {}
    for a in data.get("annotations", []):
        if remove_iscrowd and a.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        by_image.setdefault(a["image_id"], []).append([x, y, x + w, y + h])
    out = []
    for im in data.get("images", []):
        boxes = by_image.get(im["id"])
        if boxes:
            out.append(BoxSample(image_root / im["file_name"], np.asarray(boxes, dtype=np.float64),
                                 str(im["id"])))
    if not out:
        raise ImageError(f"no annotated images in {jp}")
    return out


# --- classes ---------------------------------------------------------------------------------------
def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def image_folder(root) -> tuple[list[tuple[Path, int]], list[str]]:
    """``[(path, class index)], classes`` from ``root/<class>/<images>`` (classes sorted, as
    torchvision's ImageFolder)."""
    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ImageError(f"{root} has no class folders (expected root/<class>/<image>)")
    items = [(p, i) for i, c in enumerate(classes) for p in _images_in(root / c)]
    if not items:
        raise ImageError(f"no images under {root}")
    return items, classes


def image_folder_splits(root) -> tuple[list, list | None, list[str]]:
    """``(train items, val items or None, classes)``: ``root/train`` + ``root/val`` when both
    exist (same classes), else everything as train."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        tr, classes = image_folder(root / "train")
        va, vclasses = image_folder(root / "val")
        if vclasses != classes:
            raise ImageError(f"{root}/train and {root}/val have different class folders")
        return tr, va, classes
    items, classes = image_folder(root)
    return items, None, classes


def split_indices(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified random split: ``(train indices, val indices)``; every class keeps at least
    one training example."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        nv = min(int(round(len(idx) * val_fraction)), len(idx) - 1)
        va.append(idx[:nv])
        tr.append(idx[nv:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


# --- dense targets ------------------------------------------------------------------------------------
TARGET_SUFFIXES = {".png", ".npy", ".tif", ".tiff", ".bmp"}


def paired_files(images_dir, targets_dir) -> list[tuple[Path, Path]]:
    """Images matched with targets by file stem (images without a target are left out)."""
    images_dir, targets_dir = Path(images_dir), Path(targets_dir)
    targets = {p.stem: p for p in sorted(targets_dir.rglob("*")) if p.suffix.lower() in TARGET_SUFFIXES}
    pairs = [(p, targets[p.stem]) for p in _images_in(images_dir) if p.stem in targets]
    if not pairs:
        raise ImageError(f"no image in {images_dir} has a target with the same name in {targets_dir}")
    return pairs


def dense_splits(root, target_dir: str) -> tuple[list, list | None]:
    """``(train pairs, val pairs or None)`` for ``root/images`` + ``root/<target_dir>``, in one of:
    ``root/{train,val}/{images,<target_dir>}``; ADE20k's ``root/images/{training,validation}`` +
    ``root/annotations/{training,validation}``; or plain ``root/images`` + ``root/<target_dir>``."""
    root = Path(root)
    if (root / "train" / "images").is_dir():
        tr = paired_files(root / "train" / "images", root / "train" / target_dir)
        va = paired_files(root / "val" / "images", root / "val" / target_dir) \
            if (root / "val" / "images").is_dir() else None
        return tr, va
    if (root / "images" / "training").is_dir():
        tdir = root / ("annotations" if (root / "annotations").is_dir() else target_dir)
        return (paired_files(root / "images" / "training", tdir / "training"),
                paired_files(root / "images" / "validation", tdir / "validation"))
    return paired_files(root / "images", root / target_dir), None


def load_mask(path) -> np.ndarray:
    """A label map ``(H, W)`` int64: PNG/BMP/TIFF pixel values (palette indices for mode P),
    or a ``.npy`` array."""
    from PIL import Image
    p = Path(path)
    if p.suffix.lower() == ".npy":
        return np.load(p).astype(np.int64)
    with Image.open(p) as im:
        if im.mode not in ("L", "P", "I", "I;16", "1"):
            im = im.convert("L")
        return np.asarray(im).astype(np.int64)


def load_depth(path, png_scale: float = 1000.0) -> np.ndarray:
    """A depth map ``(H, W)`` float32 in metres: ``.npy`` as stored, 16-bit PNG divided by
    ``png_scale`` (NYUd PNGs store millimetres)."""
    from PIL import Image
    p = Path(path)
    if p.suffix.lower() == ".npy":
        return np.load(p).astype(np.float32)
    with Image.open(p) as im:
        return np.asarray(im).astype(np.float32) / png_scale


def load_rgb(path):
    """An image file as RGB PIL (ttreg's robust loader)."""
    return load_image(path)
