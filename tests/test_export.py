"""ONNX export with test-time registers: onnxruntime equals eager PyTorch on other batch sizes and
sizes, for both forms; files are written atomically; ``ttreg export`` end to end."""
from __future__ import annotations

import os

import pytest
import torch

import ttreg
from ttreg.testing import mixed_images, planted_vit

from conftest import all_hooks

ort = pytest.importorskip("onnxruntime")

RN = {1: [7], 3: [21]}


def _model(family: str):
    if family == "timm":
        return planted_vit()
    if family == "hf_dinov2":
        pytest.importorskip("transformers")
        from ttreg.testing.convert.hf import timm_to_hf_dinov2
        return timm_to_hf_dinov2(planted_vit(init_values=1e-5))
    pytest.importorskip("open_clip")
    from ttreg.testing.convert.open_clip import timm_to_open_clip
    return timm_to_open_clip(planted_vit(pre_norm=True, class_token=True, global_pool="token",
                                         act_layer="quick_gelu", num_classes=32))


def _run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {"pixel_values": x.numpy()})]


@pytest.mark.parametrize("family, form", [
    ("timm", "token"), ("timm", "bias"),
    ("hf_dinov2", "bias"),                              # dynamic height and width
    ("open_clip", "bias"),                              # nn.MultiheadAttention's bias_k
    pytest.param("hf_dinov2", "token", marks=pytest.mark.slow),
    pytest.param("open_clip", "token", marks=pytest.mark.slow),
])
def test_onnx_equals_eager(tmp_path, family, form):
    model = _model(family)
    ad = ttreg.wrap(model)
    rn = ttreg.RegisterNeurons.from_dict(RN, model=model)
    if form == "bias":
        rn.attention_bias = ttreg.fit_attention_bias(model, rn, mixed_images(4))
    out = tmp_path / "m.onnx"
    report = ttreg.export_onnx(model, rn, out, form=form)
    assert report.form == form and out.is_file() and all_hooks(model) == 0
    assert [c["batch"] for c in report.checks][:2] == [1, 3] and report.max_abs_diff <= 1e-4
    for c in report.checks:          # relative to the features' scale, as reported
        assert c["scale"] > 0 and 0 <= c["relative_diff"] <= 1e-5
        assert c["relative_diff"] * c["scale"] <= c["max_abs_diff"] * (1 + 1e-6)
    assert report.relative_diff <= 1e-5 and report.tolerance == 1e-4
    assert "relative error" in report.summary() and "tolerance 0.0001" in report.summary()
    assert report.dynamic_size == (family == "hf_dinov2")
    assert os.listdir(tmp_path) == ["m.onnx"]                   # no temporary file left
    # independently: another batch size (and, where the family allows, another size)
    sizes = [(5, 64, 64)] + ([(2, 48, 80)] if report.dynamic_size else [])
    for b, h, w in sizes:
        x = mixed_images(b, size=max(h, w), seed=b)[..., :h, :w].contiguous()
        got = _run_onnx(out, x)
        with torch.no_grad():
            plain = ttreg.export.named_outputs(ad.run(x))
            with ttreg.test_time_registers(model, rn, form=form):
                want = ttreg.export.named_outputs(ad.run(x))
        assert len(got) == len(want) == len(report.outputs)
        for g, (name, w_) in zip(got, want.items()):
            assert g.shape == w_.shape == plain[name].shape, name          # no token in any output
            assert (g - w_).abs().max() <= 1e-4, name
        assert max((g - p).abs().max() for g, p in zip(got, plain.values())) > 1e-3  # registers are in


def test_plain_export_and_refusals(tmp_path, monkeypatch):
    model = planted_vit()
    out = tmp_path / "plain.onnx"
    ttreg.export_onnx(model, {}, out, num_registers=0, check=False)
    x = mixed_images(2)
    with torch.no_grad():
        assert (_run_onnx(out, x)[0] - model.forward_features(x)).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="ending in .onnx"):
        ttreg.export_onnx(model, RN, tmp_path / "m.txt")
    with pytest.raises(ValueError, match="cannot keep height and width dynamic"):
        ttreg.export_onnx(model, RN, tmp_path / "m.onnx", dynamic_size=True)
    link = tmp_path / "link.onnx"
    link.symlink_to(out)
    with pytest.raises(OSError, match="symbolic link"):
        ttreg.export_onnx(model, RN, link, check=False)
    assert link.is_symlink() and link.resolve() == out
    # a graph that fails the onnxruntime check is not written
    with pytest.raises(RuntimeError, match="of the features' scale .* nothing was written"):
        ttreg.export_onnx(model, RN, tmp_path / "bad.onnx", check=False, tolerance=1e-15)
    assert sorted(os.listdir(tmp_path)) == ["link.onnx", "plain.onnx"] and all_hooks(model) == 0
    for bad in (0, -1e-5, 1.5, True, "1e-5"):
        with pytest.raises(ValueError, match="tolerance must be a relative error"):
            ttreg.export_onnx(model, RN, tmp_path / "bad.onnx", tolerance=bad)


def test_export_restores_every_modules_own_mode(tmp_path):
    model = planted_vit().train()
    model.blocks.eval()                  # a training model whose blocks are in eval mode
    before = {name: m.training for name, m in model.named_modules()}
    assert before[""] and not before["blocks"] and not before["blocks.0.attn"]
    ttreg.export_onnx(model, RN, tmp_path / "m.onnx", check=False)
    assert {name: m.training for name, m in model.named_modules()} == before


def test_cli_export(tmp_path, capsys):
    from ttreg.cli import main
    neurons = tmp_path / "n.json"
    ttreg.RegisterNeurons.from_dict(RN, model=planted_vit()).save(neurons)
    out = tmp_path / "m.onnx"
    assert main(["export", "--model", "planted", "--neurons", str(neurons), "--out", str(out),
                 "--form", "bias"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no attention bias; pass --images" in err and not out.exists()
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image
    for i, im in enumerate(mixed_images(3, seed=7)):
        Image.fromarray((im.permute(1, 2, 0).clamp(-1, 1) * 127 + 128).byte().numpy()).save(imgs / f"{i}.png")
    assert main(["export", "--model", "planted", "--neurons", str(neurons), "--out", str(out),
                 "--form", "bias", "--images", str(imgs), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "fitting the attention bias" in text and "bias form" in text and "relative error" in text
    assert main(["export", "--model", "planted", "--neurons", str(neurons), "--out", str(out),
                 "--tolerance", "1e-15", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "of the features' scale" in err and "--tolerance" in err
    assert main(["export", "--model", "planted", "--neurons", str(neurons), "--out", str(out),
                 "--tolerance", "0"]) == 2
    assert main(["export", "--model", "planted", "--neurons", str(neurons), "--out",
                 str(tmp_path / "m.pt")]) == 2
    assert "ending in .onnx" in capsys.readouterr().err
