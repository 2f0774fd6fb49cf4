"""Tiny data sets in the real on-disk layouts (PASCAL VOC, COCO, an image folder per class,
segmentation masks, depth maps), written from seeded random images, so every ``ttreg eval``
experiment runs without downloads."""
from __future__ import annotations

from typing import Sequence

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220),
          "yellow": (230, 210, 40), "purple": (150, 50, 190)}


def _save(arr, path, quality: int = 95) -> None:
    from PIL import Image
    from pathlib import Path
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype("uint8"))
    im.save(path, quality=quality) if str(path).lower().endswith((".jpg", ".jpeg")) else im.save(path)


def _background(rng, h: int, w: int):
    import numpy as np
    base = rng.integers(60, 140, size=3)
    return np.clip(base + rng.normal(0, 12, size=(h, w, 3)), 0, 255)


def _object_image(rng, h: int, w: int):
    """A noisy background with one bright rectangle; returns (image, box x1, y1, x2, y2)."""
    bw, bh = int(rng.integers(w // 3, w // 2 + 1)), int(rng.integers(h // 3, h // 2 + 1))
    x1, y1 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
    img = _background(rng, h, w)
    img[y1:y1 + bh, x1:x1 + bw] = COLORS[list(COLORS)[int(rng.integers(len(COLORS)))]]
    return img, (x1, y1, x1 + bw, y1 + bh)


def write_voc(root, n: int = 6, size: tuple[int, int] = (64, 80), seed: int = 0, split: str = "trainval"):
    """A Pascal-VOC-layout folder of ``n`` images (h, w = ``size``), one box each; returns the
    boxes as LOST reads them (0-based, continuous)."""
    import numpy as np
    from pathlib import Path
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    ids, boxes = [], []
    for i in range(n):
        img, (x1, y1, x2, y2) = _object_image(rng, *size)
        name = f"{2007_000000 + i:06d}"
        _save(img, root / "JPEGImages" / f"{name}.jpg")
        xml = (f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename>"
               f"<size><width>{size[1]}</width><height>{size[0]}</height><depth>3</depth></size>"
               f"<object><name>thing</name><difficult>0</difficult><truncated>0</truncated>"
               f"<bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
               f"</bndbox></object></annotation>")
        (root / "Annotations" / f"{name}.xml").write_text(xml)
        ids.append(name)
        boxes.append([float(x1), float(y1), float(x2), float(y2)])
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return boxes


def write_coco(root, n: int = 6, size: tuple[int, int] = (64, 80), seed: int = 1):
    """A COCO-style folder: ``root/annotations.json`` + ``root/images/``; returns the JSON path."""
    import json
    import numpy as np
    from pathlib import Path
    root = Path(root)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(n):
        img, (x1, y1, x2, y2) = _object_image(rng, *size)
        fn = f"COCO_train2014_{i:012d}.jpg"
        _save(img, root / "images" / fn)
        images.append({"id": i + 1, "file_name": fn, "height": size[0], "width": size[1]})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    anns.append({"id": n + 1, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [0, 0, 5, 5]})
    path = root / "annotations.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def color_image(rng, name: str, size: int = 64, noise: float = 20.0):
    """An image of one colour from :data:`COLORS` with Gaussian noise."""
    import numpy as np
    return np.clip(np.asarray(COLORS[name], dtype=float) + rng.normal(0, noise, (size, size, 3)), 0, 255)


def write_image_folder(root, classes: Sequence[str] = ("red", "green", "blue"), per_class: int = 8,
                       size: int = 64, seed: int = 0, noise: float = 20.0) -> list[str]:
    """ImageFolder layout ``root/<class>/<i>.png``: each class is a noisy colour."""
    import numpy as np
    from pathlib import Path
    rng = np.random.default_rng(seed)
    for c in classes:
        for i in range(per_class):
            _save(color_image(rng, c, size, noise), Path(root) / c / f"{c}_{i}.png")
    return list(classes)


def write_segmentation(root, n: int = 12, size: int = 64, seed: int = 0, subdir: str = "masks"):
    """``root/images/*.png`` + ``root/<subdir>/*.png``: background (class 0) with a red (1) and a
    blue (2) rectangle, and a 255 (ignore) border row."""
    import numpy as np
    from pathlib import Path
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = _background(rng, size, size)
        mask = np.zeros((size, size), dtype=np.uint8)
        for cls, col in ((1, "red"), (2, "blue")):
            h, w = int(rng.integers(size // 4, size // 2)), int(rng.integers(size // 4, size // 2))
            y, x = int(rng.integers(0, size - h)), int(rng.integers(0, size - w))
            img[y:y + h, x:x + w] = COLORS[col]
            mask[y:y + h, x:x + w] = cls
        mask[0] = 255
        _save(img, Path(root) / "images" / f"img{i:03d}.png")
        _save(mask, Path(root) / subdir / f"img{i:03d}.png")


def write_depth(root, n: int = 12, size: int = 64, seed: int = 0):
    """``root/images/*.png`` + ``root/depth/*.npy`` (metres): depth grows with brightness."""
    import numpy as np
    from pathlib import Path
    rng = np.random.default_rng(seed)
    (Path(root) / "depth").mkdir(parents=True, exist_ok=True)
    yy = np.linspace(0, 1, size)[:, None] * np.ones((1, size))
    for i in range(n):
        ramp = (yy if i % 2 else yy.T) * 200 + 30
        img = np.clip(ramp[..., None] + rng.normal(0, 5, (size, size, 3)), 0, 255)
        _save(img, Path(root) / "images" / f"d{i:03d}.png")
        np.save(Path(root) / "depth" / f"d{i:03d}.npy", (1 + img.mean(-1) / 255 * 4).astype(np.float32))


def write_binary_segmentation(root, n: int = 6, size: int = 64, seed: int = 0,
                              classes: Sequence[str] = ("red", "green", "blue")):
    """ImageNet-segmentation style: ``root/images``, ``root/masks`` (255 = object) and
    ``root/labels.json`` (``{stem: class name}``): one coloured rectangle per image."""
    import json
    import numpy as np
    from pathlib import Path
    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(n):
        c = classes[i % len(classes)]
        img = _background(rng, size, size)
        mask = np.zeros((size, size), dtype=np.uint8)
        h, w = int(rng.integers(size // 3, size // 2 + 1)), int(rng.integers(size // 3, size // 2 + 1))
        y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        img[y:y + h, x:x + w] = COLORS[c]
        mask[y:y + h, x:x + w] = 255
        _save(img, Path(root) / "images" / f"seg{i:03d}.png")
        _save(mask, Path(root) / "masks" / f"seg{i:03d}.png")
        labels[f"seg{i:03d}"] = c
    (Path(root) / "labels.json").write_text(json.dumps(labels))
