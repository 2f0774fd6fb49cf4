"""Zero-shot: the shipped class names and templates; a tiny CLIP whose text tower is made to
agree with colour prototypes classifies perfectly; heat maps that encode the mask score
perfectly; both tasks end to end."""
import json

import pytest
import torch

from ttreg.eval import zeroshot as Z
from ttreg.eval.cli import main
from ttreg.eval.datasets import image_folder
from ttreg.eval.metrics import binary_heatmap_scores, summarize_heatmaps
from ttreg.eval.synthetic import (COLORS, OPENAI_MEAN, OPENAI_STD, planted_clip, write_binary_segmentation,
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
    from ttreg.eval.synthetic import align_text_tower
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
    model, tok, _ = aligned_clip
    write_image_folder(tmp_path / "cls", classes=CLASSES, per_class=4, noise=10.0)
    items, classes = image_folder(tmp_path / "cls")
    # folders sort as blue, green, red: map them to the class order of the prototypes
    items = [(p, CLASSES.index(classes[y])) for p, y in items]
    res = Z.evaluate_zeroshot(model, tok, items, CLASSES, [(1, 7), (3, 21)], templates=TEMPLATES,
                              control_seeds=(0,), print_table=False)
    assert res["arms"]["plain"]["top1"] == 1.0
    assert res["arms"]["registers"]["top1"] == 1.0
    assert res["arms"]["plain"]["top5"] == 1.0 and res["arms"]["plain"]["images"] == 12
    assert res["random"]["top1"]["mean"] == 1.0


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
    assert res["config"]["heatmap"] == ("text" if model == "planted-clip" else "attention")
    assert set(res["arms"]) == {"plain", "registers", "random-0"}
    for arm in res["arms"].values():
        assert arm["images"] == 4
        for k in ("miou", "pixel_accuracy", "map"):
            assert 0 <= arm[k] <= 1
