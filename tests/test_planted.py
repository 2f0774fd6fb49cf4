"""The planted models of :mod:`ttreg.testing` behave as documented: the content plant's outliers
follow image content (a few per image, on the brightest patches, in photos too), later attention
uses them as a sink, models it cannot plant are refused; the adapter plant asks for images."""
import pytest
import torch

import ttreg
from ttreg.outliers import norm_ratio, outlier_mask
from ttreg.testing import content_planted_vit, plant_register_neurons

from conftest import CONTENT_REGISTER


def photos(model) -> torch.Tensor:
    from ttreg.data import iter_batches, make_transform, resolve_images
    ad = ttreg.wrap(model)
    src = resolve_images("skimage")
    return torch.cat(list(iter_batches(src, ad, 32, make_transform(ad.image_size(), *ad.mean_std()))))


def test_outliers_follow_image_content_a_few_per_image(content_model, calibration_images):
    for x, distinct in ((calibration_images, 8), (photos(content_model), 12)):
        tr = ttreg.trace(content_model, x)
        det = tr.norms[:, -1]
        count = outlier_mask(det, 1).sum(dim=1)
        assert count.min() >= 1 and count.max() <= 5, count.tolist()
        where = det[:, 1:].argmax(dim=1)
        assert len(set(where.tolist())) >= distinct, where.tolist()
        # at each image's outlier the trigger fired: the brightest patch (within the margin)
        bright = x.mean(dim=1).unfold(1, 8, 8).unfold(2, 8, 8).mean((-1, -2)).flatten(1)
        assert (bright.gather(1, where[:, None])[:, 0] >= bright.amax(1) - 0.5).all()
    # the same neurons do it everywhere: moved away, every image is clean
    with ttreg.test_time_registers(content_model, CONTENT_REGISTER):
        tr = ttreg.trace(content_model, calibration_images)
    assert norm_ratio(tr.norms[:, -1], 1, 1).max() < 2


def test_content_plant_refuses_models_it_cannot_plant():
    with pytest.raises(ValueError, match="without a pre-norm"):
        content_planted_vit(pre_norm=True)
    with pytest.raises(ValueError, match="beyond the model's 4 blocks"):
        content_planted_vit(depth=4)


def test_later_attention_uses_the_outlier_as_a_sink(content_model, calibration_images):
    L = len(content_model.blocks)
    tr = ttreg.trace(content_model, calibration_images, attention=[L - 1])
    where = tr.norms[:, -1, 1:].argmax(dim=1)
    single = outlier_mask(tr.norms[:, -1], 1).sum(dim=1) == 1
    cls = tr.cls_attention(L - 1)[:, 0].flatten(1)                    # head 0: (B, patches)
    assert (cls[single].gather(1, where[single, None]) > 0.9).all()
    with ttreg.test_time_registers(content_model, CONTENT_REGISTER):
        reg = ttreg.trace(content_model, calibration_images, attention=[L - 1])
    att = reg.attention[L - 1][:, 0, 0]                                # head 0, CLS query
    assert (att[:, -1] > 0.9).all()                                    # the register is the sink
    # the register is no larger than the trigger's (mildly large) token in block 0, and takes
    # the outlier's place once the cascade has run
    assert (reg.norms[:, 0, -1] < 1.5 * tr.norms[:, 0, 1:].amax(dim=-1)).all()
    med = reg.norms[:, -1, 1:-1].median(dim=-1).values
    assert (reg.norms[:, -1, -1] > 20 * med).all()
    assert (att[torch.arange(len(calibration_images)), 1 + where] < 0.05).all()



def test_adapter_plant_without_images_names_the_timm_plant(planted):
    """``plant_register_neurons`` (any family) needs images and where to fire; called like the
    timm position plant it says which function that is, before touching the model."""
    before = {k: v.clone() for k, v in planted.state_dict().items()}
    with pytest.raises(TypeError, match="use ttreg.testing.plant_timm_register_neurons"):
        plant_register_neurons(planted, [(1, 7, 12, 0.4)])
    assert all(torch.equal(v, planted.state_dict()[k]) for k, v in before.items())
