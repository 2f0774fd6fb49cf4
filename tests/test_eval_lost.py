"""LOST and CorLoc: a feature map with an obvious object, the key extraction, and the command
end to end on VOC- and COCO-layout folders."""
import json

import numpy as np
import pytest
import torch

import ttreg
from ttreg.testing import mixed_images, planted_vit
from ttreg.eval.backbone import last_layer_keys, patch_keys
from ttreg.eval.cli import main
from ttreg.eval.datasets import coco_boxes, voc_boxes
from ttreg.eval.lost import box_to_pixels, lost
from ttreg.eval.synthetic import write_coco, write_voc


def object_keys(regions, grid=(8, 8), dim=16, seed=0):
    """Background keys along +e0, object keys along -e0 + e1 (small noise everywhere)."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    keys = torch.zeros(h, w, dim)
    keys[..., 0] = 1.0
    for r0, c0, r1, c1 in regions:
        keys[r0:r1, c0:c1, 0] = -1.0
        keys[r0:r1, c0:c1, 1] = 1.0
    keys += 0.05 * torch.randn(h, w, dim, generator=g)
    return keys.reshape(h * w, dim)


def test_lost_finds_the_obvious_object():
    res = lost(object_keys([(2, 3, 5, 7)]), (8, 8))
    r, c = divmod(res["seed"], 8)
    assert 2 <= r < 5 and 3 <= c < 7                      # the seed has the lowest degree
    expected = np.zeros((8, 8), bool)
    expected[2:5, 3:7] = True
    assert (res["mask"] == expected).all()
    assert res["box"] == (2, 3, 5, 7)
    assert len(res["seed_set"]) == 12                       # the object's 12 patches
    # patches of 8 px; image resized from 128 x 64 (h x w) to 64 x 64: x halves, y doubles
    assert box_to_pixels(res["box"], (8, 8)).tolist() == [24, 16, 56, 40]
    assert box_to_pixels(res["box"], (8, 8), scale=(2.0, 0.5), image_size=(128, 64)).tolist() \
        == [12, 32, 28, 80]


def test_lost_box_is_the_seed_component_only():
    # two disjoint objects alike: the mask has both, the box only the seed's (first in raster order)
    res = lost(object_keys([(1, 1, 4, 5), (6, 6, 8, 8)]), (8, 8), k_patches=1000)
    assert res["mask"][6:8, 6:8].all()
    assert res["box"] == (1, 1, 4, 5)
    assert res["component"].sum() == 12


def test_patch_keys_exclude_prefix_and_test_time_registers():
    model = planted_vit(reg_tokens=2)              # CLS + 2 trained registers
    x = mixed_images(2)
    with torch.no_grad():
        full = last_layer_keys(model, x)
        keys, grid = patch_keys(model, x)
    assert full.shape == (2, 3 + 64, 96) and keys.shape == (2, 64, 96) and grid == (8, 8)
    assert torch.equal(keys, full[:, 3:])
    with torch.no_grad(), ttreg.test_time_registers(model, [(1, 7), (3, 21)], check=False):
        full_r = last_layer_keys(model, x)
        keys_r, _ = patch_keys(model, x)
    assert full_r.shape == (2, 3 + 64 + 1, 96)
    assert torch.equal(keys_r, full_r[:, 3:67])
    assert not torch.allclose(keys_r, keys)                      # the edit reaches the keys


def test_voc_and_coco_readers(tmp_path):
    boxes = write_voc(tmp_path / "voc", n=3)
    samples = voc_boxes(tmp_path / "voc")
    assert [s.boxes.tolist() for s in samples] == [[b] for b in boxes]
    assert all(s.path.exists() for s in samples)
    coco = coco_boxes(write_coco(tmp_path / "coco", n=3))
    assert len(coco) == 3 and all(len(s.boxes) == 1 for s in coco)   # the crowd box is dropped
    data = json.loads((tmp_path / "coco" / "annotations.json").read_text())
    x, y, w, h = data["annotations"][0]["bbox"]
    assert coco[0].boxes.tolist() == [[x, y, x + w, y + h]]


@pytest.mark.parametrize("layout", ["voc", "coco"])
def test_lost_command_end_to_end(tmp_path, layout):
    if layout == "voc":
        gts = write_voc(tmp_path / "data", n=5)
        data = ["--voc", str(tmp_path / "data")]
    else:
        data = ["--coco", str(write_coco(tmp_path / "data", n=5))]
    out = tmp_path / "lost.json"
    assert main(["lost", "--model", "planted", *data, "--top-k", "2", "--keep-boxes", "--quiet",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert sorted(res["neurons"]) == [[1, 7], [3, 21]]
    assert set(res["arms"]) == {"plain", "registers", "random-0"}
    for arm in res["arms"].values():
        assert arm["images"] == 5
        hits = np.array(arm["hits"])
        assert arm["corloc"] == pytest.approx(hits.mean())
        b = np.array(arm["boxes"])
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 80).all() and (b[:, 3] <= 64).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    if layout == "voc":                                   # CorLoc recomputed from the boxes
        from ttreg.eval.metrics import corloc
        boxes = res["arms"]["plain"]["boxes"]
        assert corloc(boxes, [np.array([g]) for g in gts]) == res["arms"]["plain"]["corloc"]


def _need_builtin():
    try:
        from ttreg.builtin import onnx_path
        onnx_path()
    except Exception as e:  # pragma: no cover - the built-in model is optional here
        pytest.skip(f"built-in model unavailable: {e}")


def test_builtin_model_lost_at_native_resolution(tmp_path):
    """LOST on the real model at full resolution (LOST's protocol): 64 x 80 images crop to a
    4 x 5 grid of 14-px patches; boxes come back in pixels of the original image."""
    _need_builtin()
    write_voc(tmp_path / "voc", n=2)
    out = tmp_path / "lost.json"
    assert main(["lost", "--model", "builtin:dinov2_vits14", "--voc", str(tmp_path / "voc"), "--native",
                 "--keep-boxes", "--quiet", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["neurons"] == [] and set(res["arms"]) == {"plain", "registers"}
    boxes = np.array(res["arms"]["plain"]["boxes"])
    assert boxes.shape == (2, 4)
    assert (boxes % 14 == 0).all() and (boxes[:, 2] <= 70).all() and (boxes[:, 3] <= 56).all()
