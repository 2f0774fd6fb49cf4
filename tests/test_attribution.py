"""Text-to-image attribution through a VLM's language model (``ttreg.attribution``), on tiny
random LLaVA, LLaVA-OneVision and Idefics3 models built offline with register neurons planted in
the tower (``ttreg.testing.vlm.planted_vlm``): the maps equal a line-by-line restatement from the
language model's eager attention weights; when the language model is made to read the planted
outlier patch, that patch carries nearly all of the plain map's mass and test-time registers take
it away; ``generate`` runs with registers installed."""
from __future__ import annotations

import pytest
import torch

import ttreg
from ttreg import testing
from ttreg.testing import vlm as testing_vlm
from ttreg.attribution import attribute_inputs, attribution

from conftest import (ANSWERS, PROMPTS, answered_rows, check_generate_with_registers,  # noqa: E402
                      check_registers_clear_the_map, eager_attentions, padded_rows)

tf = pytest.importorskip("transformers")

NEURONS = [(1, 7), (2, 21)]
FAMILIES = ["llava", "llava_onevision", "idefics3"]      # the other families: test_attribution_families.py
IMAGE = testing_vlm.VLM_IMAGE_TOKEN


@pytest.fixture(scope="module")
def vlms(planted_vlms):
    return planted_vlms


def hand_inputs(family, model, x, prompts):
    """What the processor gives, built by hand from tower-sized pixels (one view per image for
    Idefics3, the base view and one tile for LLaVA-OneVision): prompt ids + image tokens."""
    pix = testing_vlm.vlm_pixels(model, x)
    per_view = {"llava": 36, "llava_onevision": 36 + 36 + 6, "idefics3": 9, "smolvlm": 9}[family]
    ids, mask = padded_rows([[2] + [IMAGE] * per_view + p for p in prompts])
    return {"input_ids": ids, "attention_mask": mask, **pix}


@torch.no_grad()
def eager_rows(model, ids, inputs_b, query, layers):
    """Restatement: the language model's eager attention weights (``output_attentions``), head
    mean, at the rows ``query`` and the columns of the image tokens."""
    att = eager_attentions(model, input_ids=ids, attention_mask=torch.ones_like(ids), **inputs_b)
    cols = (ids[0] == IMAGE).nonzero().flatten()
    return torch.stack([att[l][0].mean(0)[query][:, cols] for l in layers], dim=1)   # (A, L, N)


def _pixels_of(inputs, b):
    return {k: v[b:b + 1] for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}


@pytest.mark.parametrize("family", FAMILIES + ["smolvlm"])
def test_attribution_equals_eager_attention_row_by_row(vlms, family):
    model, proc, x, marked = vlms(family)
    answers = ANSWERS
    inp = hand_inputs(family, model, x[:2], PROMPTS)
    a = attribute_inputs(model, inp, answers)
    assert a.weights.shape == (2, 3, 1, inp["input_ids"].eq(IMAGE).sum(1).max())
    for b, real, ids in answered_rows(inp, answers):
        query = torch.arange(len(answers[b])) + len(real) - 1       # the positions predicting them
        ref = eager_rows(model, ids, _pixels_of(inp, b), query, [0])
        n = ref.shape[-1]
        assert (a.weights[b, :len(answers[b]), :, :n] - ref).abs().max() <= 1e-5
        assert a.weights[b, len(answers[b]):].abs().sum() == 0          # answer padding
        tw = ref.mean((0, 1))                                           # (N,) mean over tokens, layers
        if family == "llava":                                           # token j = patch j
            expect = tw.reshape(6, 6)
        elif family == "llava_onevision":                               # base view + one tile, newlines
            tile = tw[36:].reshape(6, 7)[:, :6]
            expect = tw[:36].reshape(6, 6) + tile
        else:                                                           # pixel shuffle: 2x2 patches a token
            expect = tw.reshape(3, 3).repeat_interleave(2, 0).repeat_interleave(2, 1) / 4
        assert (a.map()[b] - expect).abs().max() <= 1e-5
        assert float(a.image_mass()[b]) == pytest.approx(float(tw.sum()), abs=1e-5)


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_the_public_call_takes_a_real_processor(vlms, family):
    model, proc, x, marked = vlms(family)
    ims = testing_vlm.to_pil(model, x[:2])
    a = attribution(model, proc, ims, "what is in the image", answer="a red square")
    assert a.answers == ["a red square"] * 2
    enc = proc(images=ims, text=["<image>\nwhat is in the image"] * 2, return_tensors="pt")
    answer = proc.tokenizer("a red square", add_special_tokens=False)["input_ids"]
    b = attribute_inputs(model, enc, [answer] * 2)
    assert torch.equal(a.weights, b.weights)
    assert torch.equal(attribution(model, proc, ims, "what is in the image", answer=a.answer_ids).weights, a.weights)
    assert a.tokens.valid.sum(1).tolist() == enc["input_ids"].eq(IMAGE).sum(1).tolist()
    greedy = attribution(model, proc, ims, "what is in the image", max_new_tokens=3)
    assert all(1 <= len(t) <= 3 for t in greedy.answer_ids)
    with pytest.raises(ValueError, match="one per image"):
        attribution(model, proc, ims, ["a", "b", "c"])
    with pytest.raises(ValueError, match="layers"):
        attribution(model, proc, ims, "what", answer="a", layers=[5])


@pytest.mark.parametrize("family", FAMILIES + ["smolvlm"])
def test_registers_take_the_outlier_patch_out_of_the_map(vlms, family):
    """The language model reads the planted outlier: the marked patch carries nearly all the
    plain map's mass; with test-time registers the same tokens carry about their area's share."""
    model, proc, x, marked = vlms(family)
    inp = hand_inputs(family, model, x[:4], [[8, 9, 10]] * 4)
    plain, reg = check_registers_clear_the_map(model, inp, NEURONS, marked[:4], [[20, 21]] * 4)
    if family == "llava":                                   # the outlier token is the marked patch
        assert torch.equal(plain.outlier_tokens, marked[:4])


def test_outlier_share_is_what_the_map_shows_without_reading():
    """Without the constructed reading, the plain model's attention ignores the outlier: its share
    is close to the area share (the effect is the language model's, not the bookkeeping's)."""
    model, proc, x, marked = testing_vlm.planted_vlm("llava", images=6, read=False)
    inp = hand_inputs("llava", model, x[:3], [[8, 9]] * 3)
    a = attribute_inputs(model, inp, [[20]] * 3)
    assert torch.equal(a.outlier_tokens, marked[:3])
    assert (a.mass_on(a.outlier_tokens) < 0.2).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_registers(vlms, family):
    model, proc, x, marked = vlms(family)
    check_generate_with_registers(model, hand_inputs(family, model, x[:2], [[8, 9, 10]] * 2), NEURONS)


def test_idefics3_crops_map_back_onto_the_image(vlms):
    """A 2x2 crop grid and the global view: each crop's tokens land on their quarter of the
    image, the global view's on the whole; the processor's own layout is read for real images."""
    model, proc, x, marked = vlms("idefics3")
    ad = ttreg.wrap(model)
    views = x[:5][None]                                     # one image: 4 crops + global
    ids = torch.tensor([[2] + [IMAGE] * 45 + [8]])
    inp = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": views}
    with pytest.raises(ValueError, match="crops"):
        ad.image_tokens(inp)
    tok = ad.image_tokens(inp, {"rows": [2], "cols": [2]})
    box = tok.boxes[0]
    assert tok.num_views == 5 and tok.grid == (6, 6)
    assert torch.allclose(box[9 + 0], torch.tensor([0.5, 0.0, 0.5 + 1 / 6, 1 / 6], dtype=box.dtype))   # crop (0, 1)
    assert torch.allclose(box[36 + 8], torch.tensor([2 / 3, 2 / 3, 1.0, 1.0], dtype=box.dtype))    # global, last
    assert tok.sources[0, 9 + 1].tolist() == [36 + 2, 36 + 3, 36 + 8, 36 + 9]                # view 1, patches
    a = attribute_inputs(model, inp, [[20, 21]], layout={"rows": [2], "cols": [2]})
    tw = a.token_weights()[0]
    quarters = tw[:36].reshape(2, 2, 9).sum(-1)             # each crop's mass on its quarter ...
    glob = tw[36:].reshape(3, 3).repeat_interleave(2, 0).repeat_interleave(2, 1) / 4
    m = a.map((6, 6))[0]
    for i in range(2):
        for j in range(2):
            got = m[3 * i:3 * i + 3, 3 * j:3 * j + 3].sum()
            assert float(got) == pytest.approx(float(quarters[i, j] + glob[3 * i:3 * i + 3, 3 * j:3 * j + 3].sum()),
                                               abs=1e-5)
    from PIL import Image
    wide = Image.new("RGB", (100, 60), (40, 90, 200))
    layout = ad.layout(proc, [wide])
    enc = proc(images=[[wide]], text=["<image>what"], return_tensors="pt")
    t = ad.image_tokens(enc, layout)
    assert t.num_views == layout["rows"][0] * layout["cols"][0] + 1
    assert int(t.valid.sum()) == int(enc["input_ids"].eq(IMAGE).sum())
    real = t.boxes[t.valid & ~torch.isnan(t.boxes).any(-1)]
    assert real.min() >= 0 and real.max() <= 1 + 1e-9


def test_onevision_tiles_of_a_wide_image_cover_it(vlms):
    """A wide image: base view + a grid of tiles unpadded to the image's shape, a newline per row;
    every tile token lands inside the image and the newline tokens nowhere."""
    model, proc, x, marked = vlms("llava_onevision")
    from PIL import Image
    wide = Image.new("RGB", (100, 60), (200, 90, 40))
    enc = proc(images=[wide], text=["<image>\nwhat"], return_tensors="pt")
    t = ttreg.wrap(model).image_tokens(enc)
    n = int(t.valid.sum())
    assert n == int(enc["input_ids"].eq(IMAGE).sum())
    boxes = t.boxes[0, :n]
    newline = torch.isnan(boxes).any(-1)
    rows = int(newline.sum())
    cols = (n - 36) // rows - 1
    assert newline[36:].reshape(rows, cols + 1)[:, -1].all() and not newline[:36].any()
    tiles = boxes[36:][~newline[36:]]
    assert float(tiles[:, 2].max()) == pytest.approx(1.0) and float(tiles[:, 3].max()) == pytest.approx(1.0)
    a = attribute_inputs(model, enc, [[20]])
    assert float(a.map().sum()) == pytest.approx(float(a.token_weights()[0][~newline].sum()), abs=1e-5)


def test_a_model_without_a_language_model_is_refused():
    model = testing.planted_vit()
    with pytest.raises(ValueError, match="vision-language model"):
        attribute_inputs(model, {"input_ids": torch.zeros(1, 3, dtype=torch.long)}, [[1]])


def test_inspect_draws_the_attribution_and_writes_its_numbers(tmp_path, capsys):
    from ttreg.cli import main
    paths = testing_vlm.save_planted_vlm(tmp_path / "vlm", images=1)
    out = tmp_path / "figs"
    args = ["inspect", "--model", f"hf:{paths['model']}", "--neurons", str(paths["neurons"]),
            *map(str, paths["images"]), "--out", str(out)]
    assert main(args + ["--prompt", "what is in the image", "--answer", "a red square"]) == 0
    said = capsys.readouterr().out
    assert "attribution mass on the outlier patches 100.0% -> 2.8% with registers" in said
    import json
    rep = json.loads((out / "inspect.json").read_text())
    assert rep["attribution"]["prompt"] == "what is in the image"
    for img in rep["images"]:
        at = img["attribution"]
        assert at["plain"]["answer"] == at["registers"]["answer"] == "a red square"
        assert at["plain"]["outlier_tokens"] == 1 and at["plain"]["outlier_share"] > 0.99
        assert at["registers"]["outlier_share"] < 1.5 * at["registers"]["uniform_share"]
        assert len(at["plain"]["map"]) == 6
        assert [f.rsplit("_", 1)[-1] for f in img["figures"]] == ["overview.png", "heads.png", "neurons.png"]
    # the attribution row is part of the overview figure: one figure, a row taller than without
    from PIL import Image
    with_row = Image.open(out / rep["images"][0]["figures"][0]).size
    assert main(args[:-1] + [str(tmp_path / "plain")]) == 0
    without = Image.open(tmp_path / "plain" / rep["images"][0]["figures"][0]).size
    assert with_row[1] > 1.3 * without[1] and abs(with_row[0] - without[0]) < 0.1 * without[0]
    assert "attribution" not in json.loads((tmp_path / "plain" / "inspect.json").read_text())
    capsys.readouterr()
    assert main(args + ["--answer", "a cat"]) == 2
    assert "give --prompt too" in capsys.readouterr().err
    assert main(["inspect", "--model", "planted", str(paths["images"][0]), "--out", str(tmp_path / "x"),
                 "--prompt", "what"]) == 2
    assert "vision-language model" in capsys.readouterr().err


def test_prompt_text_uses_the_chat_template_when_there_is_one(vlms):
    from ttreg.attribution import prompt_text
    model, proc, x, marked = vlms("llava")
    assert prompt_text(proc, "what is this") == "<image>\nwhat is this"
    assert prompt_text(proc, "<image> what") == "<image> what"
    with pytest.raises(ValueError, match="no chat template"):
        prompt_text(proc, "what", chat=True)
    chat = testing_vlm.tiny_vlm_processor("llava", model)
    chat.chat_template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                          "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                          "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    assert prompt_text(chat, "what is this") == "USER: <image>\nwhat is this ASSISTANT:"
    assert prompt_text(chat, "what is this", chat=False) == "<image>\nwhat is this"


def test_llava_tokens_cover_the_processors_centre_crop(vlms):
    """CLIP's processor resizes the shorter side and crops the centre: on a 100 x 60 image the
    view is the middle 60 x 60, so the patch tokens cover x in [0.2, 0.8] of the image."""
    from PIL import Image
    model, proc, x, marked = vlms("llava")
    ad = ttreg.wrap(model)
    wide = Image.new("RGB", (100, 60), (10, 120, 30))
    enc = proc(images=[wide], text=["<image>\nwhat"], return_tensors="pt")
    t = ad.image_tokens(enc, ad.layout(proc, [wide]))
    boxes = t.boxes[0]
    assert torch.allclose(boxes[0], torch.tensor([0.2, 0.0, 0.3, 1 / 6], dtype=boxes.dtype))
    assert torch.allclose(boxes[35], torch.tensor([0.7, 5 / 6, 0.8, 1.0], dtype=boxes.dtype))
    assert t.sources[0, :, 0].tolist() == list(range(36))
