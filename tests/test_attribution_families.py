"""Text-to-image attribution for PaliGemma, Gemma 3 and InternVL (``ttreg.attribution``), on
tiny random models built offline with register neurons planted in the tower
(``ttreg.testing.vlm.planted_vlm``):

* the attribution equals a line-by-line restatement from the language model's eager attention
  weights (PaliGemma's prefix-LM mask and Gemma 3's bidirectional image blocks included: the
  restatement runs the model's own masks, the PaliGemma one through the processor's ``suffix``);
* each image token is placed on the patches the model actually feeds it (found by pushing
  one-hot patch features through Gemma 3's pooling and InternVL's pixel shuffle);
* with the language model written to read the planted outlier, the outlier's token carries
  nearly all of the plain map and test-time registers bring it to its area share;
* InternVL's tiles and thumbnail land on their parts of the image; Gemma 3's pan-and-scan is
  refused in one line; ``generate`` runs with registers installed.
"""
from __future__ import annotations

import pytest
import torch

import ttreg
from ttreg.testing import vlm as testing_vlm
from ttreg.attribution import attribute_inputs, attribution

from conftest import (ANSWERS, PROMPTS, answered_rows, check_generate_with_registers,  # noqa: E402
                      check_registers_clear_the_map, eager_attentions, padded_rows)

tf = pytest.importorskip("transformers")

NEURONS = [(1, 7), (2, 21)]
FAMILIES = ["paligemma", "gemma3", "internvl"]
IMAGE = testing_vlm.VLM_IMAGE_TOKEN
#: image tokens per image of the tiny models (36 patches: one each; pooled 3x3; shuffled 2x2)
PER_VIEW = {"paligemma": 36, "gemma3": 4, "internvl": 9}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlms(planted_vlms):
    return planted_vlms


def _image_run(family: str) -> list[int]:
    n = PER_VIEW[family]
    if family == "gemma3":
        return [IMAGE - 1] + [IMAGE] * n + [IMAGE - 2]           # <start_of_image> ... <end_of_image>
    if family == "internvl":
        return [IMAGE - 1] + [IMAGE] * n + [IMAGE - 2]           # <img> ... </img>
    return [IMAGE] * n                                            # PaliGemma: the tokens, then <bos>


def hand_inputs(family, model, x, prompts):
    """What the processor gives for tower-sized images, built by hand: image tokens, <bos>,
    prompt; ``token_type_ids`` as each family's processor sets them (PaliGemma: 0 on the
    prefix; Gemma 3: 1 on the image tokens)."""
    ids, mask = padded_rows([_image_run(family) + [2] + p for p in prompts])
    out = {"input_ids": ids, "attention_mask": mask, **testing_vlm.vlm_pixels(model, x)}
    if family == "paligemma":
        out["token_type_ids"] = torch.zeros_like(ids)
    if family == "gemma3":
        out["token_type_ids"] = (ids == IMAGE).long()
    return out


@torch.no_grad()
def fed_patches(family, model) -> torch.Tensor:
    """``(tokens, 36)`` bool: which tower patches reach each image token of one view, found by
    running the model's own image path on a tower output whose patch ``p`` is ``p + 1`` in one
    channel (and 0 elsewhere) and reading what its pooling / pixel shuffle makes of them."""
    inner = model.model
    P = 36
    start = 1 if family == "internvl" else 0                      # InternViT's CLS, dropped later
    fake = torch.zeros(P, start + P, int(model.config.vision_config.hidden_size))
    fake[torch.arange(P), start + torch.arange(P), 0] = 1.0       # view p: only patch p lit
    seen = {}
    if family == "gemma3":
        mod = inner.multi_modal_projector.avg_pool
        h = mod.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
        try:
            inner.multi_modal_projector(fake)
        finally:
            h.remove()
        lit = seen["x"][:, 0].flatten(1)                          # (views = patches, tokens)
        return (lit > 0).T
    if family == "internvl":
        mod = inner.multi_modal_projector
        h = mod.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
        tower = inner.vision_tower
        t = tower.register_forward_hook(lambda m, a, out: type(out)(last_hidden_state=fake))
        try:
            inner.get_image_features(torch.zeros(P, 3, 48, 48), vision_feature_layer=-1,
                                     vision_feature_select_strategy="default")
        finally:
            h.remove()
            t.remove()
        lit = seen["x"].abs().sum(-1)                             # (views = patches, tokens)
        return (lit > 0).T
    return torch.eye(P, dtype=torch.bool)                         # PaliGemma: token j = patch j


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_sit_on_the_patches_the_model_feeds_them(vlms, family):
    model, proc, x, marked = vlms(family)
    inp = hand_inputs(family, model, x[:1], [[8]])
    tok = ttreg.wrap(model).image_tokens(inp)
    fed = fed_patches(family, model)
    got = torch.zeros_like(fed)
    for t in range(PER_VIEW[family]):
        got[t, tok.sources[0, t]] = True
    assert torch.equal(got, fed)
    assert tok.grid == (6, 6) and tok.num_views == 1
    # the boxes: each token's footprint is the union of its patches' cells
    cells = ttreg.adapters.hf.patch_boxes(6, 6)
    for t in range(PER_VIEW[family]):
        c = cells[fed[t]]
        want = torch.cat([c[:, :2].amin(0), c[:, 2:].amax(0)])
        assert torch.allclose(tok.boxes[0, t], want.to(tok.boxes.dtype))


@pytest.mark.parametrize("family", FAMILIES)
def test_attribution_equals_eager_attention_row_by_row(vlms, family):
    model, proc, x, marked = vlms(family)
    answers = ANSWERS
    inp = hand_inputs(family, model, x[:2], PROMPTS)
    a = attribute_inputs(model, inp, answers)
    N = PER_VIEW[family]
    assert a.weights.shape == (2, 3, 1, N)
    fed = fed_patches(family, model).double()                     # (tokens, 36)
    for b, real, ids in answered_rows(inp, answers):
        extra = {"pixel_values": inp["pixel_values"][b:b + 1]}
        if family == "paligemma":                                 # the answer: the causal suffix
            extra["token_type_ids"] = torch.cat([torch.zeros(len(real)), torch.ones(len(answers[b]))]).long()[None]
        if family == "gemma3":                                    # image tokens 1, text 0
            extra["token_type_ids"] = (ids == IMAGE).long()
        att = eager_attentions(model, input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
        query = torch.arange(len(answers[b])) + len(real) - 1       # the positions predicting them
        cols = (ids[0] == IMAGE).nonzero().flatten()
        ref = att[0][0].mean(0)[query][:, cols]                    # (A, N): head mean, layer 0
        assert (a.weights[b, :len(answers[b]), 0] - ref).abs().max() <= 1e-5
        assert a.weights[b, len(answers[b]):].abs().sum() == 0
        tw = ref.mean(0).double()                                  # (N,) mean over answer tokens
        expect = (tw[:, None] * fed / fed.sum(1, keepdim=True)).sum(0).reshape(6, 6)
        assert (a.map()[b].double() - expect).abs().max() <= 1e-5
        assert float(a.image_mass()[b]) == pytest.approx(float(tw.sum()), abs=1e-5)


def test_paligemma_answer_is_the_causal_suffix_as_the_processor_marks_it():
    """The public call on the real processor equals the eager attention of the processor's own
    ``suffix`` encoding (token_type_ids 1 on the answer): the prompt does not see the answer.
    Marking the answer as prefix instead (0) changes the rows: the difference is real (a
    language model left random here, so that its attention spreads over the tokens)."""
    model, proc, x, marked = testing_vlm.planted_vlm("paligemma", images=2, read=False)
    ims = testing_vlm.to_pil(model, x[:2])
    a = attribution(model, proc, ims, "what is in the image", answer="a red square")
    enc = proc(images=ims, text=["<image>what is in the image"] * 2, suffix=["a red square"] * 2,
               return_tensors="pt")
    ids = enc["input_ids"]
    assert enc["token_type_ids"][0].tolist().count(1) == 4      # "a red square" </s>
    att = eager_attentions(model, input_ids=ids, attention_mask=enc["attention_mask"],
                          pixel_values=enc["pixel_values"], token_type_ids=enc["token_type_ids"])
    first = int(enc["token_type_ids"][0].argmax())                # the first answer token
    query = torch.arange(3) + first - 1
    cols = (ids[0] == IMAGE).nonzero().flatten()
    ref = att[0].mean(1)[:, query][:, :, cols]                     # (B, A, N)
    assert (a.weights[:, :, 0] - ref).abs().max() <= 1e-5
    assert a.answers == ["a red square"] * 2
    prefix = dict(enc, token_type_ids=torch.zeros_like(enc["token_type_ids"]))
    wrong = eager_attentions(model, **{k: v for k, v in prefix.items() if k != "labels"})
    assert (wrong[0].mean(1)[:, query][:, :, cols] - ref).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_registers_take_the_outlier_out_of_the_map(vlms, family):
    """The language model reads the planted outlier: the token carrying the marked patch holds
    nearly all the plain map's mass; with test-time registers about its area's share."""
    model, proc, x, marked = vlms(family)
    inp = hand_inputs(family, model, x[:4], [[8, 9, 10]] * 4)
    plain, reg = check_registers_clear_the_map(model, inp, NEURONS, marked[:4], [[20, 21]] * 4, peak=0.5)
    out = plain.outlier_tokens
    assert out.sum(1).tolist() == [1] * 4                        # one token carries the marker ...
    fed = fed_patches(family, model)                             # ... the one the marked patch feeds
    assert torch.equal(out, (fed[None].float() @ marked[:4, :, None].float())[..., 0] > 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_public_call_takes_a_real_processor(vlms, family):
    model, proc, x, marked = vlms(family)
    ims = testing_vlm.to_pil(model, x[:2])
    a = attribution(model, proc, ims, "where is the marker", answer="a small square")
    assert a.answers == ["a small square"] * 2
    assert a.tokens.valid.sum(1).tolist() == [PER_VIEW[family]] * 2
    assert (a.mass_on(a.outlier_tokens) > 0.99).all()
    with ttreg.test_time_registers(model, NEURONS):
        r = attribution(model, proc, ims, "where is the marker", answer=a.answer_ids[0])
    assert (r.mass_on(a.outlier_tokens) < 1.5 * a.outlier_tokens.sum(1) / PER_VIEW[family]).all()
    greedy = attribution(model, proc, ims, "where is the marker", max_new_tokens=3)
    assert all(1 <= len(t) <= 3 for t in greedy.answer_ids)


def test_internvl_tiles_and_thumbnail_land_on_the_image(vlms):
    """A wide image: the processor cuts a grid of tiles (the image squashed onto it) and adds
    the thumbnail; each tile's tokens land on its part of the image, the thumbnail's on all of
    it, and the map holds all the mass on the image tokens."""
    from PIL import Image
    model, proc, x, marked = vlms("internvl")
    ad = ttreg.wrap(model)
    wide = Image.new("RGB", (100, 48), (200, 90, 40))
    enc = proc(images=[wide], text=["<IMG_CONTEXT>\nwhat"], return_tensors="pt")
    layout = ad.layout(proc, [wide])
    V = len(enc["pixel_values"])
    assert V == 3 and len(layout["view_boxes"]) == 3              # 2x1 tiles + thumbnail
    with pytest.raises(ValueError, match="tiles"):
        ad.image_tokens(enc)
    t = ad.image_tokens(enc, layout)
    assert t.num_views == 3 and int(t.valid.sum()) == int(enc["input_ids"].eq(IMAGE).sum()) == 27
    boxes = t.boxes[0]
    assert float(boxes[:9, 2].max()) == pytest.approx(0.5) and float(boxes[9:18, 0].min()) == pytest.approx(0.5)
    assert torch.allclose(boxes[18:, [0, 1]].amin(0), torch.zeros(2, dtype=boxes.dtype))
    assert torch.allclose(boxes[18:, [2, 3]].amax(0), torch.ones(2, dtype=boxes.dtype))
    assert t.sources[0, 9].tolist() == [36 + s for s in t.sources[0, 0].tolist()]   # view 1's patches
    a = attribution(model, proc, [wide], "what", answer="a")
    assert float(a.map().sum()) == pytest.approx(float(a.image_mass()[0]), abs=1e-5)


def test_gemma3_pan_and_scan_is_refused_in_one_line(vlms):
    from PIL import Image
    model, proc, x, marked = vlms("gemma3")
    proc = testing_vlm.tiny_vlm_processor("gemma3", model)
    proc.image_processor.do_pan_and_scan = True
    with pytest.raises(ValueError, match="pan-and-scan") as err:
        attribution(model, proc, [Image.new("RGB", (48, 48))], "what", answer="a")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_registers(vlms, family):
    model, proc, x, marked = vlms(family)
    check_generate_with_registers(model, hand_inputs(family, model, x[:2], [[8, 9, 10]] * 2), NEURONS)
