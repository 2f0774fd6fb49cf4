"""LOST and CorLoc: a feature map with an obvious object, LOST's own algorithm restated at
native resolution with padding, any-size timm models, the COCO20k list, and the command end to
end on VOC- and COCO-layout folders (timm DINOv2 at native resolution included)."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch

import ttreg
from ttreg.testing import mixed_images, planted_vit
from ttreg.eval.backbone import last_layer_keys, patch_keys
from ttreg.sizes import dynamic_size
from ttreg.eval.cli import main
from ttreg.eval.datasets import coco20k_filenames, coco20k_ids, coco_boxes, voc_boxes
from ttreg.eval.lost import box_to_pixels, lost
from ttreg.testing import write_coco, write_voc
from ttreg.data import ImageError


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


def reference_lost(feats, dims, patch, image_size, k_patches=100, gram_bias=0.0):
    """valeoai/LOST object_discovery.lost + patch_scoring + detect_box, restated: degree over the
    other patches (diagonal zeroed, negatives zeroed), seed = lowest degree, expansion among the
    k lowest, box of the seed's component, scaled by the patch and clipped to the image. With
    ``gram_bias``, the bias Darcet et al. add to the affinity ``A = F F^T`` before all of it."""
    from scipy import ndimage
    A = feats @ feats.T + gram_bias
    B = A.clone()
    B.fill_diagonal_(0)
    B[B < 0] = 0
    order = torch.argsort(-(B > 0).sum(1).float(), descending=True, stable=True)
    seed = order[0]
    cand = order[:k_patches]
    M = A[cand[A[seed, cand] > 0]].sum(0)
    labels, _ = ndimage.label(M.reshape(dims).numpy() > 0)
    comp = np.argwhere(labels == labels[np.unravel_index(int(seed), dims)])
    (y0, x0), (y1, x1) = comp.min(0), comp.max(0) + 1
    pred = [patch * x0, patch * y0, patch * x1, patch * y1]
    pred[2], pred[3] = min(pred[2], image_size[1]), min(pred[3], image_size[0])
    return int(seed), np.asarray(pred)


def test_lost_at_native_resolution_with_padding_equals_the_reference():
    """An image of 50 x 67 px with 8-px patches pads to 56 x 72 (7 x 9 patches); an object in the
    bottom-right corner reaches into the padding, so the box is clipped to the image."""
    H, W, patch = 50, 67, 8
    grid = (math.ceil(H / patch), math.ceil(W / patch))
    boxes = []
    for regions in ([(4, 6, 7, 9)], [(1, 1, 3, 4), (5, 2, 7, 5)], [(0, 0, 2, 2), (3, 4, 7, 9)]):
        keys = object_keys(regions, grid, seed=len(regions))
        ref_seed, ref_box = reference_lost(keys, grid, patch, (H, W))
        res = lost(keys, grid)
        box = box_to_pixels(res["box"], (patch, patch), image_size=(H, W)).astype(np.int64)
        assert res["seed"] == ref_seed and box.tolist() == ref_box.tolist()
        boxes.append(box.tolist())
    assert boxes == [[48, 32, 67, 50],                      # clipped at 67 and 50
                     [8, 8, 32, 24], [0, 0, 16, 16]]        # the smaller object: fewest similar


def test_dynamic_size_is_timms_dynamic_img_size_and_is_undone():
    import timm
    kw = dict(pretrained=False, depth=2, embed_dim=64, num_heads=2, img_size=56)
    fixed = timm.create_model("vit_small_patch14_dinov2", **kw).eval()
    dyn = timm.create_model("vit_small_patch14_dinov2", dynamic_img_size=True, **kw).eval()
    dyn.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 3, 70, 84)
    with torch.no_grad():
        with dynamic_size(fixed):
            got = fixed.forward_features(x)
            assert ttreg.wrap(fixed).grid_size(x) == (5, 6)
        assert torch.equal(got, dyn.forward_features(x))
        assert not fixed.dynamic_img_size and fixed.patch_embed.flatten
        with pytest.raises(AssertionError):                # the fixed model again
            fixed.forward_features(x)
        with pytest.raises(RuntimeError), dynamic_size(fixed):
            raise RuntimeError("boom")
        assert not fixed.dynamic_img_size and fixed.patch_embed.strict_img_size


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
    assert all(s.boxes.dtype == np.int64 and s.path.exists() for s in samples)   # LOST's integers
    path = write_coco(tmp_path / "coco", n=3)
    data = json.loads(path.read_text())
    data["annotations"][1]["bbox"] = [2.5, 3.5, 10.4, 20.6]        # LOST rounds: 2, 4, 13, 24
    data["images"].append({"id": 99, "file_name": "x.jpg"})        # only a crowd box -> no boxes
    data["annotations"].append({"id": 99, "image_id": 99, "iscrowd": 1, "bbox": [0, 0, 5, 5]})
    path.write_text(json.dumps(data))
    coco = coco_boxes(path)
    assert [s.name for s in coco] == ["1", "2", "3", "99"] and len(coco[3].boxes) == 0
    x, y, w, h = data["annotations"][0]["bbox"]
    assert coco[0].boxes.tolist() == [[x, y, x + w, y + h]]        # the crowd box is dropped
    assert coco[1].boxes.tolist() == [[2, 4, 13, 24]]
    assert [s.name for s in coco_boxes(path, remove_empty=True)] == ["1", "2", "3"]
    assert [s.name for s in coco_boxes(path, image_ids=[3, 1])] == ["1", "3"]
    with pytest.raises(ImageError, match="lacks 1 of the 2"):
        coco_boxes(path, image_ids=[1, 12345])


def test_coco20k_list_download_cache_checks_and_local_copy(tmp_path, monkeypatch):
    names = [f"train2014/COCO_train2014_{i:012d}.jpg" for i in (560992, 396626, 7)]
    src = tmp_path / "list.txt"
    src.write_text("\n".join(names) + "\n")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    monkeypatch.setenv("TTREG_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "lost" / "coco_20k_filenames.txt"
    url = src.as_uri()
    with pytest.raises(ImageError, match="not LOST's COCO20k list") as e:
        coco20k_filenames(url=url, sha256="0" * 64, lines=3)      # wrong checksum: nothing cached
    assert "\n" not in str(e.value) and not cached.exists()
    assert coco20k_filenames(url=url, sha256=digest, lines=3) == names
    assert cached.read_bytes() == src.read_bytes()
    src.unlink()                                                   # now served from the cache
    assert coco20k_filenames(url=url, sha256=digest, lines=3) == names
    cached.unlink()
    with pytest.raises(ImageError, match="could not download .* --coco20k FILE") as e:
        coco20k_filenames(url="http://127.0.0.1:9/coco_20k_filenames.txt", timeout=2)
    assert "\n" not in str(e.value)
    local = tmp_path / "mine.txt"
    local.write_text("\n".join(names) + "\n")
    assert coco20k_filenames(local, sha256=digest, lines=3) == names
    with pytest.raises(ImageError, match="expected 19817 lines"):
        coco20k_filenames(local)                                   # not LOST's real file
    assert coco20k_ids(names) == [560992, 396626, 7]


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
    assert res["config"]["resize"] is False and res["protocol"]["deviations"] == []
    for arm in res["arms"].values():
        assert arm["images"] == 5
        hits = np.array(arm["hits"])
        assert arm["corloc"] == pytest.approx(hits.mean())
        b = np.array(arm["boxes"])
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 80).all() and (b[:, 3] <= 64).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b % 8 == 0).all()                           # 64 x 80 images: 8 x 10 patches of 8 px
    if layout == "voc":                                   # CorLoc recomputed from the boxes
        from ttreg.eval.metrics import corloc
        boxes = res["arms"]["plain"]["boxes"]
        assert corloc(boxes, [np.array([g], np.int64) for g in gts]) == res["arms"]["plain"]["corloc"]


def test_lost_timm_dinov2_native_resolution_end_to_end(tmp_path):
    """timm's DINOv2 ViT-S/14 (fixed 518 px input, random weights from a local file) runs LOST's
    protocol: 64 x 80 images pad to 70 x 84 (5 x 6 patches); boxes are whole patches clipped to
    the image."""
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    weights = tmp_path / "vits14.safetensors"
    save_file(timm.create_model("vit_small_patch14_dinov2", pretrained=False).state_dict(), str(weights))
    write_voc(tmp_path / "voc", n=3)
    spec = f"timm:vit_small_patch14_dinov2@{weights}"
    out = tmp_path / "lost.json"
    assert main(["lost", "--model", spec, "--voc", str(tmp_path / "voc"), "--top-k", "2",
                 "--search-images", "3", "--keep-boxes", "--quiet", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["input_size"] == "native, zero-padded to the patch size"
    boxes = np.array(res["arms"]["plain"]["boxes"])
    assert boxes.shape == (3, 4)
    assert np.isin(boxes[:, [0, 2]], [0, 14, 28, 42, 56, 70, 80]).all()
    assert np.isin(boxes[:, [1, 3]], [0, 14, 28, 42, 56, 64]).all()
    assert set(res["arms"]) >= {"plain", "registers"}


def test_lost_resize_is_labelled_a_deviation(tmp_path):
    write_voc(tmp_path / "voc", n=2, size=(48, 96))
    out = tmp_path / "lost.json"
    assert main(["lost", "--model", "planted", "--voc", str(tmp_path / "voc"), "--resize", "--top-k",
                 "2", "--controls", "0", "--keep-boxes", "--quiet", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["input_size"] == [64, 64] and "resized" in res["protocol"]["deviations"][0]
    b = np.array(res["arms"]["plain"]["boxes"])            # 8-px patches of a 64-px square image
    assert np.allclose(b[:, [0, 2]] % 12, 0) and np.allclose(b[:, [1, 3]] % 6, 0)   # scaled back


@pytest.mark.parametrize("family", ["dinov2", "vit"])
def test_lost_native_resolution_on_hugging_face_models(tmp_path, family):
    """Hugging Face DINOv2 always interpolates its position embeddings, ViTModel when asked
    (``interpolate_pos_encoding``, which the adapter passes): both run LOST on 48 x 72 images,
    a 6 x 9 grid of 8-px patches."""
    pytest.importorskip("transformers")
    from ttreg.testing.convert.hf import timm_to_hf_dinov2, timm_to_hf_vit
    from ttreg.eval.backbone import accepts_any_size
    from ttreg.eval.lost import evaluate_lost
    convert, kw = {"dinov2": (timm_to_hf_dinov2, dict(init_values=1e-5)), "vit": (timm_to_hf_vit, {})}[family]
    model = convert(planted_vit(**kw))
    assert accepts_any_size(model)
    write_voc(tmp_path / "voc", n=2, size=(48, 72))
    res = evaluate_lost(model, voc_boxes(tmp_path / "voc"), [(1, 7), (3, 21)], control_seeds=(),
                        keep_boxes=True, print_table=False)
    b = np.array(res["arms"]["registers"]["boxes"])
    assert b.shape == (2, 4) and (b % 8 == 0).all() and (b[:, 2] <= 72).all() and (b[:, 3] <= 48).all()


def test_fixed_size_models_need_resize(capsys):
    import open_clip
    from ttreg.testing.convert.open_clip import TINY_TEXT_CFG
    from ttreg.eval.lost import evaluate_lost
    clip = open_clip.model.CLIP(16, dict(layers=1, width=32, head_width=16, patch_size=16,
                                         image_size=32), TINY_TEXT_CFG).eval()
    with pytest.raises(ValueError, match="pass --resize"):
        evaluate_lost(clip, [], [])


def _need_builtin():
    try:
        from ttreg.builtin import onnx_path
        onnx_path()
    except Exception as e:  # pragma: no cover - the built-in model is optional here
        pytest.skip(f"built-in model unavailable: {e}")


def test_builtin_model_lost_at_native_resolution(tmp_path):
    """LOST on the real model at full resolution (LOST's protocol): 64 x 80 images pad to a
    5 x 6 grid of 14-px patches; boxes come back in pixels of the original image."""
    _need_builtin()
    write_voc(tmp_path / "voc", n=2)
    out = tmp_path / "lost.json"
    assert main(["lost", "--model", "builtin:dinov2_vits14", "--voc", str(tmp_path / "voc"),
                 "--keep-boxes", "--quiet", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["neurons"] == [] and set(res["arms"]) == {"plain", "registers"}
    boxes = np.array(res["arms"]["plain"]["boxes"])
    assert boxes.shape == (2, 4)
    assert np.isin(boxes[:, [0, 2]], [0, 14, 28, 42, 56, 70, 80]).all()
    assert np.isin(boxes[:, [1, 3]], [0, 14, 28, 42, 56, 64]).all()


def lost_reference_qkv(model, x, layer):
    """valeoai/LOST main_lost.py, restated: a forward hook on ``blocks[layer].attn.qkv``, the
    output reshaped to (3, B, heads, T, d), and each of q, k, v back to (B, T, heads * d)."""
    box = {}
    h = model.blocks[layer].attn.qkv.register_forward_hook(lambda m, i, o: box.update(qkv=o))
    try:
        model.forward_features(x)
    finally:
        h.remove()
    B, T, _ = box["qkv"].shape
    nh = model.blocks[layer].attn.num_heads
    qkv = box["qkv"].reshape(B, T, 3, nh, -1).permute(2, 0, 3, 1, 4)
    return {name: qkv[i].transpose(1, 2).reshape(B, T, -1) for i, name in enumerate(("query", "key", "value"))}


def test_gram_bias_changes_the_mask_as_the_reference():
    """A bias shifts which similarities count as positive: on unit features (background +e0,
    object -e0 + e1, so background-object similarity -1/sqrt(2)) a bias of +0.8 makes everything
    similar and the box the whole grid; the reference restated with the bias agrees."""
    keys = torch.nn.functional.normalize(object_keys([(2, 3, 5, 7)]), dim=-1)
    for b, box in ((0.0, (2, 3, 5, 7)), (-0.5, (2, 3, 5, 7)), (0.8, (0, 0, 8, 8))):
        res = lost(keys, (8, 8), gram_bias=b)
        ref_seed, ref_box = reference_lost(keys, (8, 8), 8, (64, 64), gram_bias=b)
        assert res["box"] == box and res["seed"] == ref_seed
        assert (box_to_pixels(res["box"], (8, 8), image_size=(64, 64)) == ref_box).all()


def authors_sweep_reference(model, samples, layers, features, biases):
    """The test-time-register authors' LOST sweep, restated from their README on top of LOST's
    main_lost.py: for each block and each of q/k/v (LOST's hook on that block's ``qkv``, CLS and
    registers cut off), L2-normalise every patch's features, add each bias to the Gram matrix, run
    LOST, score CorLoc; report every configuration and the best."""
    from ttreg.eval.lost import _load
    from ttreg.eval.metrics import corloc_hits
    boxes = {}
    for s in samples:
        x, _, (H, W) = _load(s, (64, 64), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (8, 8), False)
        x = x[None]
        grid = (x.shape[-2] // 8, x.shape[-1] // 8)
        with torch.no_grad(), dynamic_size(model):
            for l in layers:
                qkv = lost_reference_qkv(model, x, l)
                for f in features:
                    feats = torch.nn.functional.normalize(qkv[f][0, model.num_prefix_tokens:], dim=-1)
                    for b in biases:
                        _, box = reference_lost(feats, grid, 8, (H, W), gram_bias=b)
                        boxes.setdefault((l, f, b), []).append(box)
    gts = [s.boxes for s in samples]
    return {k: float(corloc_hits(v, gts).mean()) for k, v in boxes.items()}


def test_authors_sweep_equals_its_restatement(tmp_path):
    from ttreg.eval.lost import LostConfig, evaluate_lost
    model = planted_vit(reg_tokens=1)
    write_voc(tmp_path / "voc", n=4, size=(48, 72))
    samples = voc_boxes(tmp_path / "voc")
    biases = (-0.6, -0.2, 0.0)
    res = evaluate_lost(model, samples, [(1, 7), (3, 21)], control_seeds=(), features=("key", "value"),
                        layers=(-2, -1), normalize=True, gram_bias=biases, print_table=False)
    ref = authors_sweep_reference(model, samples, (4, 5), ("key", "value"), biases)
    sweep = res["arms"]["plain"]["sweep"]
    assert len(sweep) == 12 == len(res["config"]["configurations"])
    assert len(set(sweep.values())) >= 3                       # the sweep matters here
    assert sweep == {LostConfig(f, l, True, b).label(): v for (l, f, b), v in ref.items()}
    best = max(ref.values())
    assert res["arms"]["plain"]["corloc"] == best
    first = next(k for k, v in ref.items() if v == best)        # ties go to the first in order
    assert res["arms"]["plain"]["best"] == LostConfig(first[1], first[0], True, first[2]).label()
    assert "chosen on the evaluated images" in res["protocol"]["selection"]
    assert res["arms"]["registers"]["setup"]["preset"] == "paper"


def test_sweep_command_and_register_count_ablation(tmp_path, capsys):
    write_voc(tmp_path / "voc", n=3)
    out = tmp_path / "lost.json"
    assert main(["lost", "--model", "planted", "--voc", str(tmp_path / "voc"), "--top-k", "2",
                 "--authors-sweep", "--layers", "-1", "--num-registers", "0,1,2", "--preset", "official",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    table = capsys.readouterr().out
    assert set(res["arms"]) == {"plain", "registers-R1", "registers-R2"}     # one row per count
    assert [res["arms"][a]["setup"]["num_registers"] for a in ("plain", "registers-R1", "registers-R2")] == [0, 1, 2]
    assert res["config"]["features"] == ["key", "query", "value"] and res["config"]["layers"] == [5]
    assert res["config"]["gram_bias"] == [round(-1 + 0.1 * i, 1) for i in range(11)]
    assert len(res["arms"]["plain"]["sweep"]) == 33
    assert all(v["corloc"] == max(v["sweep"].values()) for v in res["arms"].values())
    assert "best of 33 configurations per arm, chosen on the evaluated images" in table
    assert "official" in table and "CorLoc % of every configuration" in table
    assert main(["lost", "--model", "planted", "--voc", str(tmp_path / "voc"), "--layers", "9",
                 "--quiet"]) == 2
    assert "layer 9 does not exist: the model has 6 blocks" in capsys.readouterr().err
