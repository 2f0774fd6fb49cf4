"""Zero-shot: the shipped class names and templates; a tiny CLIP whose text tower is made to
agree with colour prototypes classifies perfectly; the zeroed and random-zeroed arms; the
direct-contribution heat map against Gandelsman et al.'s computation restated, on open_clip's
own tower and on a timm trunk, with and without test-time registers; the whole segmentation
pipeline against the references restated; both tasks end to end."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ttreg

from ttreg.eval import zeroshot as Z
from ttreg.eval.cli import main
from ttreg.eval.datasets import image_folder
from ttreg.eval.metrics import binary_heatmap_scores, summarize_heatmaps
from ttreg.testing import (COLORS, OPENAI_MEAN, OPENAI_STD, planted_clip, write_binary_segmentation,
                                  write_image_folder)

CLASSES = ["red", "green", "blue"]
TEMPLATES = ["a photo of a {}.", "a {}."]


def test_shipped_class_names_and_templates():
    names = Z.load_classnames()
    assert len(names) == 1000
    assert names[:3] == ["tench", "goldfish", "great white shark"] and names[-1] == "toilet paper"
    assert len(set(names)) == 998          # OpenAI's list names two pairs alike (missile, sunglasses)
    tpl = Z.load_templates()
    assert len(tpl) == 80 == len(set(tpl)) and all(t.count("{}") == 1 for t in tpl)
    assert tpl[0] == "a bad photo of a {}." and "itap of a {}." in tpl
    wnids = [f"n{i:08d}" for i in range(1000)]
    assert Z.folder_classnames(wnids) == names
    assert Z.folder_classnames(["tabby_cat", "dog"]) == ["tabby cat", "dog"]


@pytest.fixture(scope="module")
def aligned_clip():
    from ttreg.testing import align_text_tower
    model, tok = planted_clip()
    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    protos = torch.stack([(torch.tensor(COLORS[c]).float().view(3, 1, 1).expand(3, 64, 64) / 255 - mean) / std
                          for c in CLASSES])
    align_text_tower(model, tok, CLASSES, TEMPLATES, protos)
    return model, tok, protos


def test_aligned_text_tower_reproduces_the_prototypes(aligned_clip):
    model, tok, protos = aligned_clip
    W = Z.text_classifier(model, tok, CLASSES, TEMPLATES)
    img = torch.nn.functional.normalize(model.encode_image(protos), dim=-1)
    assert torch.allclose(W, img, atol=1e-4)                  # text == image prototypes
    assert Z.classify(model, protos, W).argmax(-1).tolist() == [0, 1, 2]


def test_zero_shot_accuracy_is_perfect_when_towers_agree(aligned_clip, tmp_path):
    from ttreg.eval.arms import random_neurons
    from ttreg.eval.datasets import load_rgb, resize_center_crop, to_tensor
    model, tok, _ = aligned_clip
    write_image_folder(tmp_path / "cls", classes=CLASSES, per_class=4, noise=10.0)
    items, classes = image_folder(tmp_path / "cls")
    # folders sort as blue, green, red: map them to the class order of the prototypes
    items = [(p, CLASSES.index(classes[y])) for p, y in items]
    res = Z.evaluate_zeroshot(model, tok, items, CLASSES, [(1, 7), (3, 21)], templates=TEMPLATES,
                              control_seeds=(0, 1), print_table=False)
    assert list(res["arms"]) == ["plain", "registers", "zeroed", "random-zeroed-0", "random-zeroed-1"]
    assert res["arms"]["plain"]["top1"] == 1.0
    assert res["arms"]["registers"]["top1"] == 1.0
    assert res["arms"]["plain"]["top5"] == 1.0 and res["arms"]["plain"]["images"] == 12
    # the controls: the register neurons, then random neurons of the same layers, set to 0
    W = Z.text_classifier(model, tok, CLASSES, TEMPLATES)
    x = torch.stack([to_tensor(resize_center_crop(load_rgb(p), (64, 64)), OPENAI_MEAN, OPENAI_STD)
                     for p, _ in items])
    labels = torch.tensor([y for _, y in items])
    drawn = random_neurons(ttreg.RegisterNeurons([(1, 7), (3, 21)]), model, 1)
    for name, neurons in (("zeroed", [(1, 7), (3, 21)]), ("random-zeroed-1", drawn)):
        with ttreg.zero_neurons(model, neurons, check=False):
            want = float((Z.classify(model, x, W).argmax(-1) == labels).float().mean())
        assert res["arms"][name]["top1"] == want
    assert res["arms"]["random-zeroed-1"]["setup"]["neurons"] == [list(p) for p in drawn.neurons]
    assert res["random_zeroed"]["top1"]["n"] == 2 and "random" not in res
    table = Z.table(res)
    assert "zeroed" in table and "random zeroed (2 draws)" in table


def test_patch_similarity_heatmap_that_encodes_the_mask_is_perfect():
    grid = (4, 4)
    obj = torch.zeros(grid, dtype=torch.bool)
    obj[1:3, 1:4] = True
    text = torch.tensor([[1.0, 0.0, 0.0]])
    patches = torch.where(obj.reshape(1, 16, 1), torch.tensor([2.0, 0.1, 0.0]), torch.tensor([0.0, 1.0, 0.3]))
    heat = Z.patch_similarity(patches, text, grid)[0]
    assert heat[1, 1] == pytest.approx(float(torch.nn.functional.cosine_similarity(
        torch.tensor([2.0, 0.1, 0.0]), text[0], dim=0)))
    mask = obj.numpy().repeat(8, 0).repeat(8, 1)
    up = heat.numpy().repeat(8, 0).repeat(8, 1)
    s = summarize_heatmaps([binary_heatmap_scores(up, mask)])
    assert s == {**s, "pixel_accuracy": 1.0, "miou": 1.0, "map": 1.0}


# --- the direct-contribution heat map ------------------------------------------------------------------
@torch.no_grad()
def reference_heat(model, x, classifier, blocks):
    """Gandelsman et al.'s compute_segmentations + prs_hook, restated. ``blocks``: per layer
    ``(norm before attention, qkv weight, qkv bias, out weight, out bias, heads, layer scale)``;
    per-head, per-source contributions of the class query, an equal share of the output bias,
    stacked ``[b, l, n, h, d]``; the final norm split over ``(2L + 1) * n * h`` terms with the
    class token's mean and std; projected; summed over layers and heads; score of the predicted
    class minus the mean over classes."""
    visual = model.visual
    trunk = getattr(visual, "trunk", None)
    final = trunk.norm if trunk is not None else visual.ln_post
    proj = dict(visual.head.named_modules())["proj"].weight.T if trunk is not None else visual.proj
    seen, pre = {}, {}
    hooks = [norm.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o))
             for i, (norm, *_) in enumerate(blocks)]
    hooks.append(final.register_forward_pre_hook(lambda m, a: pre.__setitem__("x", a[0])))
    try:
        rep = model.encode_image(x)
    finally:
        for h in hooks:
            h.remove()
    per_layer = []
    for i, (_, w_in, b_in, w_out, b_out, H, ls) in enumerate(blocks):
        h = seen[i]
        B, T, D = h.shape
        dh = D // H
        q, k, v = (torch.einsum("bnc,hdc->bhnd", h, w_in[j * D:(j + 1) * D].reshape(H, dh, D))
                   + b_in[j * D:(j + 1) * D].reshape(1, H, 1, dh) for j in range(3))
        attn = ((q / dh ** 0.5) @ k.transpose(-1, -2)).softmax(-1)
        out = torch.einsum("bnmhc,dhc->bnmhd", torch.einsum("bhnm,bhmc->bnmhc", attn, v),
                           w_out.reshape(D, H, dh))[:, 0]
        per_layer.append(ls(out + b_out / (T * H)))
    att = torch.stack(per_layer, 1)                                       # [b, l, n, h, d]
    L, T, H = att.shape[1], att.shape[2], att.shape[3]
    cls = pre["x"][:, 0]
    mean = cls.mean(-1)
    std = torch.sqrt((cls ** 2).mean(-1) - mean ** 2 + final.eps)
    n_terms = (2 * L + 1) * T * H
    post = final.weight * (att - mean[:, None, None, None, None] / n_terms) / std[:, None, None, None, None] \
        + final.bias / n_terms
    projected = post @ proj
    chosen = (rep @ classifier.T).argmax(1)
    heat = projected.sum(dim=(1, 3)) @ classifier.T                       # [b, n, classes]
    return torch.stack([heat[i, :, c] - heat[i].mean(-1) for i, c in enumerate(chosen)]), chosen


def native_blocks(model):
    return [(b.ln_1, b.attn.in_proj_weight, b.attn.in_proj_bias, b.attn.out_proj.weight,
             b.attn.out_proj.bias, b.attn.num_heads, b.ls_1) for b in model.visual.transformer.resblocks]


def timm_blocks(model):
    return [(b.norm1, b.attn.qkv.weight, b.attn.qkv.bias, b.attn.proj.weight, b.attn.proj.bias,
             b.attn.num_heads, b.ls1) for b in model.visual.trunk.blocks]


@pytest.fixture(scope="module")
def native_clip():
    """open_clip's own ViT tower (nn.MultiheadAttention), 3 blocks, 4 x 4 patches, random."""
    import open_clip
    torch.manual_seed(0)
    vcfg = dict(layers=3, width=64, head_width=16, patch_size=16, image_size=64)
    tcfg = dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1)
    return open_clip.model.CLIP(32, vcfg, tcfg).eval(), open_clip.get_tokenizer("ViT-B-16")


@pytest.mark.parametrize("tower", ["native", "timm"])
@pytest.mark.parametrize("registers", [False, True])
def test_direct_heatmaps_equal_gandelsman_restated(native_clip, tower, registers):
    from ttreg.eval.direct import direct_heatmaps
    model = native_clip[0] if tower == "native" else planted_clip()[0]
    blocks = native_blocks(model) if tower == "native" else timm_blocks(model)
    grid = (4, 4) if tower == "native" else (8, 8)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    W = F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(2)), dim=-1)
    edit = ttreg.test_time_registers(model, [(1, 7), (2, 3)], check=False) if registers else \
        ttreg.zero_neurons(model, [], check=False)
    with edit:
        heat, chosen = direct_heatmaps(model, x, W)
        ref, ref_chosen = reference_heat(model, x, W, blocks)
    P = grid[0] * grid[1]
    assert ref.shape[1] == 1 + P + registers                              # the tokens the attention saw
    assert torch.equal(chosen, ref_chosen)
    assert torch.allclose(heat.reshape(3, -1), ref[:, 1:1 + P], atol=1e-5, rtol=1e-4)


def test_recomputed_attention_is_the_modules_own_output(native_clip):
    """Summed over sources (and heads), the recomputed class-token terms are exactly what each
    attention module wrote for the class token."""
    from ttreg.eval.direct import _cls_attention_output, clip_tower
    model = native_clip[0]
    tower = clip_tower(model)
    got, ins = {}, {}
    hooks = []
    for i, layer in enumerate(tower.layers):
        hooks.append(layer.attn.register_forward_pre_hook(lambda m, a, i=i: ins.__setitem__(i, a[0])))
        hooks.append(layer.attn.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i, o[0])))
    with torch.no_grad():
        model.encode_image(torch.randn(2, 3, 64, 64))
    for h in hooks:
        h.remove()
    for i, layer in enumerate(tower.layers):
        assert torch.allclose(_cls_attention_output(layer, ins[i]).sum(1), got[i][:, 0], atol=1e-5)


def test_unsupported_towers_fail_in_one_line_before_any_work(native_clip):
    import open_clip
    vcfg = dict(layers=1, width=64, head_width=16, patch_size=16, image_size=64, block_type="custom")
    custom = open_clip.model.CLIP(32, vcfg, dict(context_length=77, vocab_size=49408, width=32,
                                                 heads=2, layers=1)).eval()
    with pytest.raises(ValueError, match="does not support open_clip blocks with Attention; use --heatmap cosine"):
        Z.evaluate_zeroshot_segmentation(custom, [], [], tokenizer=native_clip[1], print_table=False)


def test_segmentation_pipeline_equals_the_references_restated(native_clip, tmp_path):
    """The plain arm of ``evaluate_zeroshot_segmentation`` (direct heat maps, no labels: the
    predicted class) equals Gandelsman's pipeline restated: heat map -> bilinear x16 -> negatives
    clipped -> Chefer et al.'s scores restated. The heat maps themselves are the module's (equal
    to the restatement to 1e-8 above): a pooled AP over 2 x 4096 smooth values moves by 1e-3 when
    float32 rounding merges or splits ties in ``1 - heat``. The cosine map is still there and
    differs."""
    from ttreg.eval.direct import direct_heatmaps
    from test_eval_metrics import chefer_scores
    from ttreg.eval.datasets import load_mask, load_rgb, resize, resize_target, to_tensor
    model, tok = native_clip
    write_binary_segmentation(tmp_path / "seg", n=4, classes=CLASSES)
    (tmp_path / "seg" / "labels.json").unlink()
    items = Z.segmentation_items(tmp_path / "seg")
    res = Z.evaluate_zeroshot_segmentation(model, items, [(1, 7)], tokenizer=tok, classnames=CLASSES,
                                           templates=TEMPLATES, print_table=False)
    assert res["config"]["heatmap"] == "direct"
    W = Z.text_classifier(model, tok, CLASSES, TEMPLATES)
    x = torch.stack([to_tensor(resize(load_rgb(i), (64, 64)), OPENAI_MEAN, OPENAI_STD) for i, _, _ in items])
    heat, chosen = direct_heatmaps(model, x, W)
    assert torch.equal(chosen, reference_heat(model, x, W, native_blocks(model))[1])
    up = F.interpolate(heat[:, None], scale_factor=16, mode="bilinear")
    up = up.clamp(min=0)[:, 0]                 # torch.clip(Res, 0, Res.max())
    ref = [chefer_scores(h, resize_target(load_mask(m), (64, 64)) > 0) for h, (_, m, _) in zip(up, items)]
    eps = np.spacing(1)
    inter, union = sum(r[2] for r in ref), sum(r[3] for r in ref)
    plain = res["arms"]["plain"]
    assert plain["pixel_accuracy"] == pytest.approx(sum(r[0] for r in ref) / (eps + sum(r[1] for r in ref)),
                                                    abs=1e-12)
    assert plain["miou"] == pytest.approx(float(np.mean(inter / (eps + union))), abs=1e-12)
    assert plain["map"] == pytest.approx(float(np.mean([r[4] for r in ref])), abs=1e-12)
    cosine = Z.evaluate_zeroshot_segmentation(model, items, [], heatmap="cosine", tokenizer=tok,
                                              classnames=CLASSES, templates=TEMPLATES, print_table=False)
    assert cosine["arms"]["plain"]["map"] != plain["map"]


def test_zeroshot_classification_command(tmp_path):
    write_image_folder(tmp_path / "cls", classes=CLASSES, per_class=2)
    (tmp_path / "tpl.txt").write_text("\n".join(TEMPLATES) + "\n")
    out = tmp_path / "zs.json"
    assert main(["zeroshot", "--model", "planted-clip", "--data", str(tmp_path / "cls"),
                 "--templates", str(tmp_path / "tpl.txt"), "--top-k", "2", "--quiet",
                 "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["task"] == "classification" and res["config"]["classes"] == 3
    assert sorted(res["neurons"]) == [[1, 7], [3, 21]]
    assert set(res["arms"]) == {"plain", "registers", "zeroed", *(f"random-zeroed-{s}" for s in range(3))}
    assert res["random_zeroed"]["top1"]["n"] == 3
    for arm in res["arms"].values():
        assert arm["images"] == 6 and 0 <= arm["top1"] <= 1 and arm["top5"] == 1.0


@pytest.mark.parametrize("model", ["planted-clip", "planted"])
def test_zeroshot_segmentation_command(tmp_path, model):
    write_binary_segmentation(tmp_path / "seg", n=4, classes=CLASSES)
    (tmp_path / "names.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp_path / "tpl.txt").write_text("\n".join(TEMPLATES) + "\n")
    out = tmp_path / "seg.json"
    assert main(["zeroshot", "--task", "segmentation", "--model", model, "--data", str(tmp_path / "seg"),
                 "--classnames", str(tmp_path / "names.txt"), "--templates", str(tmp_path / "tpl.txt"),
                 "--top-k", "2", "--controls", "1", "--quiet", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["config"]["heatmap"] == ("direct" if model == "planted-clip" else "attention")
    assert set(res["arms"]) == {"plain", "registers", "random-0"}
    for arm in res["arms"].values():
        assert arm["images"] == 4
        for k in ("miou", "pixel_accuracy", "map"):
            assert 0 <= arm[k] <= 1
    assert main(["zeroshot", "--task", "segmentation", "--model", "planted", "--heatmap", "cosine",
                 "--data", str(tmp_path / "seg"), "--quiet"]) == 2


def test_reference_geometry_is_clip_text_spans(tmp_path, planted):
    """``geometry="reference"``: the image as clip_text_span's preprocessing gives it (shorter side
    to 64 -- already 64 here -- then the central 64 x 64 crop: columns 16 to 80 of a 64 x 96 image)
    and the mask squashed to 64 x 64; ``aligned`` squashes both. Restated on 64 x 96 images."""
    import torch.nn.functional as F
    from PIL import Image
    from ttreg.eval.datasets import resize_target, to_tensor
    from ttreg.eval.metrics import binary_heatmap_scores, summarize_heatmaps
    from ttreg.eval.zeroshot import attention_heatmaps, evaluate_zeroshot_segmentation
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(2):
        arr = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)
        mask = np.zeros((64, 96), np.uint8)
        mask[10:40, 5 + 30 * i:45 + 30 * i] = 255
        Image.fromarray(arr).save(tmp_path / "images" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "masks" / f"{i}.png")
    items = Z.segmentation_items(tmp_path)
    got = {g: evaluate_zeroshot_segmentation(planted, items, [], heatmap="attention", geometry=g,
                                             print_table=False) for g in ("aligned", "reference")}
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.stack([to_tensor(Image.fromarray(np.asarray(Image.open(i).convert("RGB"))[:, 16:80]), mean, std)
                     for i, _, _ in items])
    heat = F.interpolate(attention_heatmaps(planted, x)[:, None].float(), size=(64, 64), mode="bilinear",
                         align_corners=False)[:, 0]
    masks = [resize_target(np.asarray(Image.open(m)), (64, 64)) > 0 for _, m, _ in items]
    ref = summarize_heatmaps([binary_heatmap_scores(h, m) for h, m in zip(heat, masks)])
    ours = got["reference"]["arms"]["plain"]
    assert {k: ours[k] for k in ref} == ref
    assert got["aligned"]["arms"]["plain"]["miou"] != ours["miou"]
    assert "centre-cropped" in got["reference"]["protocol"]["geometry"]
    assert got["reference"]["config"]["geometry"] == "reference"
