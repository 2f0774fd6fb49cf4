"""Task models on a supported ViT: the fingerprint compares the backbone, a pipeline runs with
registers, and what ttreg cannot take is refused in one line. (Search, registers in both forms,
attention maps and output shapes of each task model are rows of tests/test_families.py.)"""
from __future__ import annotations

import pytest
import torch

import ttreg
from ttreg.plant import marked_images, plant_register_neurons
from ttreg.register_neurons import ModelMismatchError

tf = pytest.importorskip("transformers")

SIZE, PATCH, DEPTH, WIDTH = 48, 8, 4, 64
PLANTS = [(1, 7, 0.5), (2, 21, 12.0)]
NEURONS = [(1, 7), (2, 21)]
DINOV2 = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=2, image_size=SIZE,
              patch_size=PATCH, mlp_ratio=2)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def depth_anything() -> torch.nn.Module:
    bb = tf.Dinov2Config(**DINOV2, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    cfg = tf.DepthAnythingConfig(backbone_config=bb, reassemble_hidden_size=WIDTH, patch_size=PATCH,
                                 neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=16, head_hidden_size=8)
    return tf.DepthAnythingForDepthEstimation(cfg).eval()


@pytest.fixture(scope="module")
def planted():
    """A planted bare Dinov2Model, the images and the neuron set found on it."""
    torch.manual_seed(0)
    bare = tf.Dinov2Model(tf.Dinov2Config(**DINOV2)).eval()
    images, marked = marked_images(6, SIZE, PATCH)
    plant_register_neurons(bare, PLANTS, images, marked)
    return bare, images, ttreg.find_register_neurons(bare, images, top_k=2)


def test_a_set_found_on_bare_dinov2_applies_to_task_models_with_its_weights(planted):
    bare, x, found = planted
    assert sorted(found.neurons) == NEURONS
    da = depth_anything()
    da.backbone.load_state_dict(bare.state_dict())                  # same backbone weights
    cls = tf.Dinov2ForImageClassification(tf.Dinov2Config(**DINOV2, num_labels=3)).eval()
    cls.dinov2.load_state_dict(bare.state_dict())
    with torch.no_grad(), ttreg.test_time_registers(bare, found):
        want = ttreg.trace(bare, x).norms
        want_tokens = bare(pixel_values=x).last_hidden_state
    with torch.no_grad(), ttreg.test_time_registers(da, found):
        got_tokens = ttreg.wrap(da).run(x)["last_hidden_state"]    # what an export writes
    assert (got_tokens - want_tokens).abs().max() <= 1e-5
    for model in (da, da.backbone, cls):
        assert ttreg.wrap(model).architecture() == ttreg.wrap(bare).architecture()
        with torch.no_grad(), ttreg.test_time_registers(model, found):   # the fingerprint check passes
            got = ttreg.trace(model, x).norms
        assert got.shape == (len(x), DEPTH, 1 + (SIZE // PATCH) ** 2 + 1)
        assert (got - want).abs().max() <= 1e-5                    # the same backbone, the same numbers
    # and back: a set found on the depth model applies to the bare backbone
    back = ttreg.find_register_neurons(da, x, top_k=2)
    assert back.neurons == found.neurons
    back.check_model(bare)


def test_a_set_from_another_backbone_is_refused(planted):
    _, x, found = planted
    torch.manual_seed(1)
    other = depth_anything()                                        # other backbone weights
    with pytest.raises(ModelMismatchError, match="other weights") as e:
        ttreg.add_test_time_registers(other, found)
    assert "\n" not in str(e.value)
    assert not ttreg.registers.installed(other)


def test_depth_pipeline_runs_with_registers(planted, tmp_path):
    from PIL import Image
    bare, x, found = planted
    da = depth_anything()
    da.backbone.load_state_dict(bare.state_dict())
    da.save_pretrained(tmp_path / "depth")
    tf.DPTImageProcessor(size={"height": SIZE, "width": SIZE}, keep_aspect_ratio=False,
                         ensure_multiple_of=PATCH, do_pad=False).save_pretrained(tmp_path / "depth")
    pipe = tf.pipeline("depth-estimation", model=str(tmp_path / "depth"), device="cpu")
    pics = [Image.fromarray((x[i].permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy()) for i in range(2)]
    plain = pipe(pics)
    with ttreg.test_time_registers(pipe.model, found) as h:
        assert type(h.adapter).__name__ == "HFTaskAdapter"
        got = pipe(pics)
        tr = ttreg.trace(pipe.model, x[:2])
    assert ttreg.registers.installed(pipe.model) == []
    for p, g in zip(plain, got):
        assert g["predicted_depth"].shape == p["predicted_depth"].shape and g["depth"].size == p["depth"].size
        assert not torch.equal(g["predicted_depth"], p["predicted_depth"])   # the registers did something
    ratio = tr.norms[:, -1, 1:-1].amax(-1) / tr.norms[:, -1, 1:-1].median(-1).values
    assert (ratio < 3).all() and tr.num_registers == 1              # the outlier is gone


def test_dpt_without_a_supported_backbone_is_refused_in_one_line():
    cfg = tf.DPTConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                       image_size=SIZE, patch_size=PATCH, neck_hidden_sizes=[16, 32, 64, 64],
                       fusion_hidden_size=16, backbone_out_indices=[0, 1, 1, 1])
    with pytest.raises(TypeError) as e:
        ttreg.wrap(tf.DPTForDepthEstimation(cfg))
    msg = str(e.value)
    assert "\n" not in msg and "DPTForDepthEstimation" in msg and "DINOv2 backbone_config" in msg
    assert "dpt (DPTModel)" in msg and "docs/families.md" in msg


@pytest.mark.parametrize("form", ["token", "bias"])
def test_task_model_exports_its_backbone_with_registers(planted, tmp_path, form):
    pytest.importorskip("onnxruntime")
    bare, x, found = planted
    da = depth_anything()
    da.backbone.load_state_dict(bare.state_dict())
    bias = ttreg.fit_attention_bias(da, found, x) if form == "bias" else None
    rep = ttreg.export_onnx(da, found, tmp_path / "depth.onnx", form=form, bias=bias)
    assert rep.checks and rep.max_abs_diff <= 1e-4                  # onnxruntime == eager, checked
    assert rep.outputs == ["last_hidden_state", *(f"feature_map_{i}" for i in range(4))]


@pytest.mark.parametrize("name", ["CLIP", "Siglip", "Dinov2WithRegisters"])
def test_more_classification_heads_take_registers_in_their_encoder(name):
    hfv = dict(hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=DEPTH, num_attention_heads=2,
               image_size=SIZE, patch_size=PATCH)
    text = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    if name == "Dinov2WithRegisters":
        cfg = tf.Dinov2WithRegistersConfig(**DINOV2, num_labels=3)
    else:
        cfg = getattr(tf, f"{name}Config")(vision_config=hfv, text_config=text, num_labels=3)
    torch.manual_seed(0)
    model = getattr(tf, f"{name}ForImageClassification")(cfg).eval()
    ad = ttreg.wrap(model)
    inner = {"CLIP": "HFCLIPVisionAdapter", "Siglip": "HFSiglipVisionAdapter",
             "Dinov2WithRegisters": "HFDinov2Adapter"}[name]
    assert type(ad).__name__ == "HFTaskAdapter" and type(ad.inner).__name__ == inner
    x = marked_images(2, SIZE, PATCH)[0]
    with torch.no_grad():
        ref = model(pixel_values=x, output_hidden_states=True)
        with ttreg.test_time_registers(model, [(1, 3), (2, 5)], check=False):
            got = model(pixel_values=x, output_hidden_states=True)
    assert got.logits.shape == ref.logits.shape == (2, 3) and not torch.equal(got.logits, ref.logits)
    assert [h.shape for h in got.hidden_states] == [h.shape for h in ref.hidden_states]
