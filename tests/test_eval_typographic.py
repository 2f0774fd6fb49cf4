"""Typographic attacks: the text goes exactly where the mask says; patch masks by hand; the
experiment and the command end to end on a tiny CLIP."""
import json

import numpy as np
import torch
import pytest
from PIL import Image

from ttreg.eval.cli import main
from ttreg.testing import write_image_folder
from ttreg.eval.typographic import patch_mask, render_text


def noise_image(h=64, w=96, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("position", ["random", "center", (5, 7)])
def test_text_is_rendered_exactly_inside_the_mask(position):
    im = noise_image()
    adv, mask = render_text(im, "goldfish", position=position, rng=np.random.default_rng(3))
    a, b = np.asarray(adv), np.asarray(im)
    changed = (a != b).any(-1)
    assert mask.shape == (64, 96) and mask.any()
    assert not (changed & ~mask).any()                     # nothing outside the mask changes
    assert changed[mask].mean() > 0.99                     # the label covers the mask
    ys, xs = np.nonzero(mask)
    box = a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    assert mask.sum() == box.shape[0] * box.shape[1]       # the mask is one rectangle
    dark = (box.max(-1) < 100).mean()
    assert 0.05 < dark < 0.6                               # black glyphs on a white label
    if position == (5, 7):
        assert (xs.min(), ys.min()) == (5, 7)
    if position == "center":
        assert abs((xs.min() + xs.max()) / 2 - 47.5) <= 1 and abs((ys.min() + ys.max()) / 2 - 31.5) <= 1


def test_long_text_shrinks_to_fit():
    im = noise_image(32, 32)
    _, mask = render_text(im, "a very long class name indeed", position="center")
    assert mask.shape == (32, 32) and mask.any()


def test_patch_mask_by_hand():
    m = np.zeros((2, 16, 24), bool)
    m[0, 9, 17] = True                                     # one pixel -> patch (1, 2)
    m[1, 0:8, 0:16] = True                                 # two whole patches
    pm = patch_mask(m, (8, 8))
    assert pm.shape == (2, 6)
    assert pm[0].tolist() == [False, False, False, False, False, True]
    assert pm[1].tolist() == [True, True, False, False, False, False]


@pytest.fixture(scope="module")
def clip_model():
    from ttreg.testing import planted_clip
    return planted_clip()


def test_typographic_experiment(tmp_path, clip_model):
    from ttreg.eval.datasets import image_folder
    from ttreg.eval.typographic import evaluate_typographic
    model, tok = clip_model
    write_image_folder(tmp_path / "cls", per_class=3)
    items, classes = image_folder(tmp_path / "cls")
    res = evaluate_typographic(model, tok, items, classes, [(1, 7), (3, 21)], templates=["a {}."],
                               control_seeds=(0, 1), print_table=False)
    assert list(res["arms"]) == ["clean", "plain", "registers", "random-0", "random-1", "zeroed",
                                 "random-values-0", "random-values-1", "pixel ablation"]
    assert res["arms"]["random-values-1"]["setup"]["replaced_on"] == "text patches"
    assert res["random_values"]["attack_success"]["n"] == 2
    assert res["arms"]["zeroed"]["setup"]["kind"] == "zeroed" and res["arms"]["zeroed"]["setup"]["shift_to"] is None
    assert res["arms"]["clean"]["attack_success"] is None
    for name, arm in res["arms"].items():
        assert arm["images"] == 9 and 0 <= arm["accuracy"] <= 1
        if name != "clean":
            assert 0 <= arm["attack_success"] <= 1
    assert res["random"]["attack_success"]["n"] == 2
    from ttreg.eval.typographic import table
    lines = table(res).splitlines()
    assert [l.split("  ")[0] for l in lines[3:]] == [
        "clean", "plain", "register neurons -> text", "random neurons -> text (2 draws)",
        "register neurons zeroed", "random register-neuron values on text (2 draws)", "pixel ablation"]
    # the written class is never the true one: success and accuracy cannot both be 1
    for arm in list(res["arms"].values())[1:]:
        assert arm["attack_success"] + arm["accuracy"] <= 1 + 1e-9
    # the shift edit changes the model's input-side computation on the text patches only:
    # with no register neurons it is the plain model exactly
    empty = evaluate_typographic(model, tok, items, classes, [], templates=["a {}."],
                                 control_seeds=(), print_table=False)
    assert empty["arms"]["registers"]["attack_success"] == empty["arms"]["plain"]["attack_success"]


def test_random_values_replace_the_register_neurons_on_the_text_patches_only(clip_model):
    """The rebuttal's control restated by hand on the neuron site: on the text patches each
    register neuron gets mean + std * z (that image's mean and std of the neuron over its tokens,
    z from the seeded generator in forward order); every other token and neuron is untouched;
    the same seed gives the same draws."""
    from ttreg.adapters import wrap
    from ttreg.eval.typographic import random_values
    model, _ = clip_model
    ad = wrap(model)
    x = torch.randn(2, 3, *ad.image_size())
    P = ad.grid_size(x)[0] * ad.grid_size(x)[1]
    text = torch.zeros(2, P, dtype=torch.bool)
    text[0, 3:6], text[1, 10] = True, True
    neurons = [(1, 7), (1, 9), (3, 21)]
    seen = {}

    def record(layer):                 # a forward hook sees the input after every pre-hook's edit
        def hook(module, args, output):
            seen.setdefault(layer, []).append(args[0].detach().clone())
        return hook
    hs = [ad.down_proj(l).register_forward_hook(record(l)) for l in (1, 3)]
    try:
        with torch.no_grad():
            model.encode_image(x) if hasattr(model, "encode_image") else model(x)
            with random_values(model, neurons, text, seed=5):
                model.encode_image(x) if hasattr(model, "encode_image") else model(x)
    finally:
        for h in hs:
            h.remove()
    g = torch.Generator().manual_seed(5)
    for layer, idx in ((1, [7, 9]), (3, [21])):
        plain_in, edited_in = seen[layer]
        # what reached the site in the edited pass before the edit: its own plain-run input for
        # layer 1 (nothing edited earlier); for layer 3 the input of the edited pass itself
        before = plain_in if layer == 1 else None
        T = edited_in.shape[1]
        where = torch.cat([torch.zeros(2, T - P, dtype=torch.bool), text], 1)
        k = torch.tensor(idx)
        other = torch.ones(edited_in.shape[-1], dtype=torch.bool)
        other[k] = False
        if before is not None:
            v = before[..., k].float()
            z = torch.randn(v.shape, generator=g)
            want = torch.where(where[..., None], v.mean(1, keepdim=True) + v.std(1, keepdim=True) * z, v)
            assert torch.allclose(edited_in[..., k], want, atol=1e-5)
            assert torch.equal(edited_in[..., other], before[..., other])
        else:
            assert not torch.equal(edited_in[..., k][where], plain_in[..., k][where])
        assert float(edited_in[..., k][where].std()) > 0


def test_typographic_command(tmp_path):
    write_image_folder(tmp_path / "cls", per_class=2)
    out = tmp_path / "typo.json"
    (tmp_path / "tpl.txt").write_text("a photo of a {}.\n")
    assert main(["typographic", "--model", "planted-clip", "--data", str(tmp_path / "cls"),
                 "--templates", str(tmp_path / "tpl.txt"), "--top-k", "2", "--controls", "1",
                 "--quiet", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["arms"]) == {"clean", "plain", "registers", "random-0", "zeroed", "random-values-0",
                                "pixel ablation"}
    assert res["arms"]["registers"]["setup"]["shift_to"] == "text patches"
    assert res["arms"]["registers"]["setup"]["num_registers"] == 0
