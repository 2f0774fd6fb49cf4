"""``ttreg.load_model``: spec strings, one-line errors (offline, no network needed), local files
and the built-in model's cache."""
from __future__ import annotations

import pytest
import torch

import ttreg
from ttreg import builtin, models
from ttreg.models import ModelLoadError

DOWNLOAD = "no network? pass a local path"


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub: offline mode as a user sets it, and an empty hub cache."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)   # only the env var says offline
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return constants




@pytest.mark.parametrize("spec, start", [
    ("tf:resnet50", "unknown model kind 'tf'; model specs: timm:NAME"),
    ("no/such/path", "no such file or folder 'no/such/path'; model specs: timm:NAME"),
    ("hf:", "empty model name in 'hf:'"),
    ("builtin:dinov2_vitg14", "unknown built-in model 'dinov2_vitg14'; built-in models: builtin:dinov2_vits14 (timm), builtin:dinov2_vits14-hf (transformers)"),
])
def test_bad_specs_are_one_line(spec, start):
    with pytest.raises(ModelLoadError) as e:
        ttreg.load_model(spec)
    assert one_line(e).startswith(start)


def test_every_kind_is_listed():
    with pytest.raises(ModelLoadError) as e:
        ttreg.load_model("foo:bar")
    for kind in ("timm:", "hf:", "open_clip:", "builtin:", "local path"):
        assert kind in one_line(e)


def test_timm_errors(offline, tmp_path):
    pytest.importorskip("timm")
    with pytest.raises(ModelLoadError) as e:
        ttreg.load_model("timm:vit_nonexistent_patch99")
    assert one_line(e).startswith("timm ") and "has no model 'vit_nonexistent_patch99'" in str(e.value)
    with pytest.raises(ModelLoadError) as e:
        ttreg.load_model(f"timm:vit_tiny_patch16_224@{tmp_path / 'missing.safetensors'}")
    assert one_line(e).startswith("no such checkpoint file:")


def test_timm_download_failure_offline(offline):
    pytest.importorskip("timm")
    with pytest.raises(ModelLoadError) as e:
        ttreg.load_model("timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    msg = one_line(e)
    assert msg.startswith("could not download timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k — ")
    assert DOWNLOAD in msg
    assert offline.HF_HUB_OFFLINE is False      # our offline switch was undone


def test_hf_download_failure_offline(offline):
    pytest.importorskip("transformers")
    with pytest.raises(ModelLoadError) as e:
        ttreg.load_model("hf:ttreg-tests/no-such-model")
    assert one_line(e).startswith(f"could not download hf:ttreg-tests/no-such-model — {DOWNLOAD}")


def test_open_clip_download_failure_offline(offline):
    pytest.importorskip("open_clip")
    with pytest.raises(ModelLoadError) as e:
        ttreg.load_model("open_clip:ViT-B-16/laion2b_s34b_b88k")
    assert one_line(e).startswith(f"could not download open_clip:ViT-B-16/laion2b_s34b_b88k — {DOWNLOAD}")


def test_unreachable_hub_switches_to_offline(monkeypatch, tmp_path):
    """No env var, but the hub cannot be reached: fail at once from the cache, don't retry."""
    constants = pytest.importorskip("huggingface_hub.constants")
    errors = pytest.importorskip("huggingface_hub.errors")
    pytest.importorskip("transformers")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from ttreg import loading
    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=3.0: False)
    seen = []

    def from_pretrained(name, **kw):  # what transformers raises offline with an empty cache
        seen.append(constants.HF_HUB_OFFLINE)
        try:
            raise errors.LocalEntryNotFoundError("cannot find the requested files in the local cache")
        except FileNotFoundError as cause:
            raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from cause
    import transformers
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)  # loaded first
    with pytest.raises(ModelLoadError) as e:
        ttreg.load_model("hf:org/model")
    assert seen == [True] and constants.HF_HUB_OFFLINE is False
    assert one_line(e).startswith(f"could not download hf:org/model — {DOWNLOAD} (We couldn't connect")


def test_other_failures_are_not_called_downloads(monkeypatch):
    transformers = pytest.importorskip("transformers")

    def from_pretrained(name, **kw):
        raise ValueError("Unrecognized model in org/model. Should have a `model_type` key\nmore")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    with pytest.raises(ModelLoadError) as e:
        ttreg.load_model("hf:org/model")
    assert one_line(e) == "could not load hf:org/model: Unrecognized model in org/model. Should have a `model_type` key"


def test_local_hf_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64, image_size=56, patch_size=14)
    torch.manual_seed(0)
    src = transformers.Dinov2Model(cfg).eval()
    src.save_pretrained(tmp_path / "tiny")
    for spec in (str(tmp_path / "tiny"), f"hf:{tmp_path / 'tiny'}"):
        model, tf = ttreg.load_model(spec)
        assert type(model).__name__ == "Dinov2Model" and not model.training
        x = torch.randn(1, 3, 56, 56)
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values=x).last_hidden_state,
                                       src(pixel_values=x).last_hidden_state)
    from PIL import Image
    assert tf(Image.new("RGB", (80, 60))).shape == (3, 56, 56)   # no processor saved: adapter size


def test_builtin_spec_and_cache_reuse(cache, monkeypatch):
    model, tf = ttreg.load_model("builtin:dinov2_vits14")
    path = builtin.cache_path()
    assert path.is_file() and path.parent == cache
    assert not list(cache.glob("*.tmp"))
    mtime = path.stat().st_mtime_ns

    def no_onnx(*a, **k):
        raise AssertionError("the ONNX was read although the cache exists")
    monkeypatch.setattr(builtin, "read_onnx_weights", no_onnx)
    again, _ = ttreg.load_model("builtin:dinov2_vits14")
    assert path.stat().st_mtime_ns == mtime
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    from PIL import Image
    assert tf(Image.new("RGB", (300, 200))).shape == (3, 224, 224)
    hf, _ = ttreg.load_model("builtin:dinov2_vits14-hf")
    assert type(hf).__name__ == "Dinov2Model"
    assert type(ttreg.load_model("builtin:dinov2_vits14", library="hf")[0]).__name__ == "Dinov2Model"
    with pytest.raises(ModelLoadError):
        ttreg.load_model("builtin:dinov2_vits14-hf", library="timm")


def test_saved_model_folder_round_trip(cache, tmp_path):
    model, _ = ttreg.load_model("builtin:dinov2_vits14")
    with torch.no_grad():
        model.blocks[3].mlp.fc2.weight[:, 5] += 1.0            # an edited model, e.g. planted
    path = models.save_model(model, tmp_path / "edited")
    assert path == tmp_path / "edited" / "model.safetensors"
    back, tf = ttreg.load_model(str(tmp_path / "edited"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(back.forward_features(x), model.forward_features(x))
    assert tuple(back.pretrained_cfg["input_size"]) == (3, 224, 224)
    # the cache file itself is a ttreg file too, loadable in either library
    assert type(ttreg.load_model(str(builtin.cache_path()), library="hf")[0]).__name__ == "Dinov2Model"


def test_plain_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelLoadError) as e:
        ttreg.load_model(str(tmp_path / "w.safetensors"))
    assert "not a model saved by ttreg" in one_line(e)
    assert "timm:NAME@" in str(e.value)


@pytest.mark.parametrize("spec, needle", [
    ("timm:vit_tiny_patch16_224@/etc/passwd", "/etc/passwd is not a weights file"),
    ("timm:NAME@/etc/passwd", "/etc/passwd is not a weights file"),
    ("timm:@/etc/passwd", "empty model name in 'timm:@/etc/passwd'"),
    ("timm:vit_tiny_patch16_224@", "nothing after '@' in 'timm:vit_tiny_patch16_224@'"),
    ("timm:vit_tiny_patch16_224@{tmp}/empty.bin", "empty.bin is not a weights file"),
    ("open_clip:ViT-B-32@/etc/passwd", "/etc/passwd is not a weights file"),
    ("open_clip:@/etc/passwd", "empty architecture in 'open_clip:@/etc/passwd'"),
    ("open_clip:ViT-B-32/", "nothing after '/' in 'open_clip:ViT-B-32/'"),
])
def test_malformed_specs_say_what_a_spec_looks_like(offline, tmp_path, spec, needle):
    """Not a loader's "list index out of range": one line, the form of a spec."""
    pytest.importorskip("timm")
    pytest.importorskip("open_clip")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError) as e:
        ttreg.load_model(spec.format(tmp=tmp_path))
    msg = one_line(e)
    assert needle in msg, msg
    kind = spec.split(":")[0]
    assert msg.endswith({"timm": "a timm spec looks like timm:NAME or timm:NAME@/path/weights.safetensors",
                         "open_clip": "an open_clip spec looks like open_clip:ARCH/PRETRAINED, "
                                      "open_clip:ARCH@/path/file.bin or open_clip:hf-hub:ORG/NAME"}[kind])


def test_weights_files_are_recognised_by_their_first_bytes(offline, tmp_path):
    """A real checkpoint after '@' (safetensors, torch.save's zip and legacy formats) loads."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, num_classes=0)
    sd = ref.state_dict()
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    torch.save(sd, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    for f in ("w.safetensors", "w.pth", "legacy.pth"):
        assert models._weights_file("timm:x", str(tmp_path / f), "form") == tmp_path / f
