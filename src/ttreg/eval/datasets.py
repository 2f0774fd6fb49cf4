"""Datasets on disk, in the layouts the paper's benchmarks ship in, read into plain lists.

* boxes: Pascal VOC (``JPEGImages/``, ``Annotations/*.xml``, optional ``ImageSets/Main/<split>.txt``)
  and COCO-style JSON (``images`` + ``annotations`` with ``bbox`` as x, y, w, h), for LOST, with
  LOST's COCO20k image list (downloaded from the LOST repository and checked, or a local copy);
* classes: ImageFolder (``root/<class>/<image>``, or ``root/{train,val}/<class>/<image>``);
* dense targets: image and target folders matched by file stem (segmentation masks as PNG/NPY
  class indices, depth maps as NPY metres or 16-bit PNG), optionally under ``train/`` and
  ``val/``; the ADE20k layout (``images/{training,validation}``, ``annotations/...``) too;
* plus the image geometry the dense experiments share (resize, centre crop, normalise).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
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
    continuous: a box covering a W-pixel-wide image is 0..W). Integer boxes are kept as
    integers (LOST compares integer boxes, see :func:`ttreg.eval.metrics.box_iou`)."""

    path: Path
    boxes: np.ndarray
    name: str = ""
    labels: tuple[str, ...] = ()          # the class of each box, where the annotations name it


def _box_array(boxes: list) -> np.ndarray:
    """``(M, 4)``: int64 when every coordinate is a whole number (LOST's case), else float64."""
    a = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return a.astype(np.int64) if np.all(a == np.round(a)) else a


def _voc_objects(xml_path: Path, remove_hards: bool) -> tuple[str | None, np.ndarray, tuple[str, ...]]:
    root = ET.parse(xml_path).getroot()
    filename = root.findtext("filename")
    boxes, labels = [], []
    for obj in root.iter("object"):
        if remove_hards and (obj.findtext("difficult", "0").strip() == "1"
                             or obj.findtext("truncated", "0").strip() == "1"):
            continue
        bb = obj.find("bndbox")
        if bb is None:
            continue
        x1, y1, x2, y2 = (float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([x1 - 1, y1 - 1, x2, y2])      # 1-based inclusive -> 0-based continuous
        labels.append((obj.findtext("name") or "").strip())
    return filename, _box_array(boxes), tuple(labels)


def voc_boxes(root, split: str | None = "trainval", remove_hards: bool = False) -> list[BoxSample]:
    """Images with boxes from a Pascal VOC folder (VOC2007 / VOC2012 layout), as LOST reads them.

    ``split``: the image list ``ImageSets/Main/<split>.txt`` if that file exists; otherwise (or
    with None) every ``Annotations/*.xml``. ``remove_hards`` (LOST's ``--no_hard``) drops
    difficult and truncated objects and then the images left without objects; otherwise every
    image counts (one without boxes is a miss).
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
        filename, boxes, labels = _voc_objects(ann / f"{i}.xml", remove_hards)
        if remove_hards and not len(boxes):
            continue
        path = root / "JPEGImages" / (filename or f"{i}.jpg")
        if not path.exists():
            path = root / "JPEGImages" / f"{i}.jpg"
        out.append(BoxSample(path, boxes, i, labels))
    if not out:
        raise ImageError(f"no annotated images in {root}")
    return out


def coco_boxes(json_path, image_root=None, remove_iscrowd: bool = True, remove_empty: bool = False,
               image_ids=None) -> list[BoxSample]:
    """Images with boxes from a COCO-style JSON (e.g. ``instances_train2014.json``), as LOST
    reads them (``extract_gt_COCO``): crowd boxes dropped, coordinates rounded to integers;
    images in id order. ``image_ids``: keep only these images (COCO20k, see
    :func:`coco20k_ids`). An image left without boxes counts as a miss unless ``remove_empty``.
    ``image_root``: where the ``file_name``s live (default: ``images/`` beside the JSON if it
    exists, else its folder)."""
    jp = Path(json_path)
    data = json.loads(jp.read_text())
    if image_root is None:
        image_root = jp.parent / "images" if (jp.parent / "images").is_dir() else jp.parent
    image_root = Path(image_root)
    keep = None if image_ids is None else {int(i) for i in image_ids}
    names = {c["id"]: str(c.get("name", c["id"])) for c in data.get("categories", [])}
    by_image: dict = {}
    labels: dict = {}
    for a in data.get("annotations", []):
        if remove_iscrowd and a.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        by_image.setdefault(a["image_id"], []).append([round(x), round(y), round(x + w), round(y + h)])
        labels.setdefault(a["image_id"], []).append(names.get(a.get("category_id"), ""))
    out = []
    for im in sorted(data.get("images", []), key=lambda im: im["id"]):
        if keep is not None and int(im["id"]) not in keep:
            continue
        boxes = by_image.get(im["id"], [])
        if remove_empty and not boxes:
            continue
        out.append(BoxSample(image_root / im["file_name"], _box_array(boxes), str(im["id"]),
                             tuple(labels.get(im["id"], []))))
    if keep is not None:
        missing = len(keep - {int(im["id"]) for im in data.get("images", [])})
        if missing:
            raise ImageError(f"{jp} lacks {missing} of the {len(keep)} listed images "
                             "(COCO20k needs COCO's instances_train2014.json)")
    if not out:
        raise ImageError(f"no annotated images in {jp}")
    return out


# COCO20k: the 19,817 train2014 images LOST evaluates on, listed in its repository. Not shipped
# here (it is LOST's file); downloaded once from the commit that added it and checked.
COCO20K_URL = ("https://raw.githubusercontent.com/valeoai/LOST/"
               "72f762fcf7e0913f565f964b368cf8b917e98806/datasets/coco_20k_filenames.txt")
COCO20K_SHA256 = "74637e9b4f93f2ebef9b1f664aff53edd1f41ef08dad97bd22ce8e455052b335"
COCO20K_LINES = 19817


def _check_list(data: bytes, what: str, sha256: str, lines: int) -> list[str]:
    names = [l for l in data.decode("utf-8").splitlines() if l.strip()]
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256 or len(names) != lines:
        raise ImageError(f"{what} is not LOST's COCO20k list ({len(names)} lines, sha256 "
                         f"{digest[:12]}...; expected {lines} lines, {sha256[:12]}...)")
    return names


def coco20k_filenames(path=None, *, url: str = COCO20K_URL, sha256: str = COCO20K_SHA256,
                      lines: int = COCO20K_LINES, timeout: float = 30.0) -> list[str]:
    """LOST's COCO20k list (``train2014/COCO_train2014_<id>.jpg`` per line).

    ``path``: a local copy; otherwise the cached download (``<ttreg cache>/lost/`` -- see
    :func:`ttreg.builtin.cache_dir`; ``$TTREG_CACHE`` overrides), fetched from ``url`` the first
    time. Either way the bytes must have ``sha256`` and ``lines`` lines; a download is cached
    only once it passes. Without network: one :class:`ImageError` line saying what to pass."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ImageError(f"no COCO20k list at {p}")
        return _check_list(p.read_bytes(), str(p), sha256, lines)
    from ..builtin import cache_dir
    cached = cache_dir() / "lost" / "coco_20k_filenames.txt"
    if cached.is_file():
        return _check_list(cached.read_bytes(), str(cached), sha256, lines)
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
    except Exception as e:  # no network, proxy, HTTP error: all say the same
        raise ImageError(f"could not download the COCO20k list from {url} ({type(e).__name__}); "
                         "no network? pass a local copy of LOST's datasets/coco_20k_filenames.txt "
                         "with --coco20k FILE") from None
    names = _check_list(data, url, sha256, lines)
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".coco20k.", dir=cached.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, cached)
    return names


def coco20k_ids(names) -> list[int]:
    """COCO image ids of list entries such as ``train2014/COCO_train2014_000000560992.jpg``
    (LOST's ``select_coco_20k``: the number after the last ``_``)."""
    return [int(str(n).rsplit("_", 1)[-1].split(".")[0]) for n in names]


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
