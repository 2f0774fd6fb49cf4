"""Neuron sets on the Hugging Face Hub, offline: a saved folder, a pre-filled Hub cache with
``HF_HUB_OFFLINE``, one-line failures, and what ``push_to_hub`` uploads."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import ttreg

hub = pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def calibrated(planted, images):
    """A calibrated neuron set (with before/after statistics) and its attention bias."""
    rn = ttreg.calibrate(planted, images).neurons
    rn.provenance.update(model_spec="timm:vit_small_patch14_dinov2.lvd142m", images="my_photos/")
    rn.attention_bias = ttreg.fit_attention_bias(planted, rn, images[:4])
    return rn


def _same(a: ttreg.RegisterNeurons, b: ttreg.RegisterNeurons) -> bool:
    return (a.to_dict() == b.to_dict() and torch.equal(a.attention_bias.key, b.attention_bias.key)
            and torch.equal(a.attention_bias.value, b.attention_bias.value))


def test_folder_round_trip_and_model_card(calibrated, tmp_path):
    folder = calibrated.save_pretrained(tmp_path / "set", repo_id="me/dinov2-s-neurons")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "register_neurons.bias.safetensors", "register_neurons.json"]
    assert _same(ttreg.RegisterNeurons.from_pretrained(folder), calibrated)
    card = (folder / "README.md").read_text()
    before = calibrated.statistics["heldout_before"]["mean_norm_ratio"]
    after = calibrated.statistics["heldout_after"]["mean_norm_ratio"]
    assert card.startswith("---\nlibrary_name: ttreg\n") and "base_model: timm/vit_small_patch14_dinov2.lvd142m" in card
    assert f"| {before:.2f} | {after:.2f} |" in card and "my_photos/" in card
    assert "layer 1: 7; layer 3: 21" in card and "6 layers x 4 heads x 24" in card
    assert "from_pretrained('me/dinov2-s-neurons')" in card and 'form="bias"' in card
    assert "**Input sizes:** calibrated at 64x64 px, measured at 64x64 px" in card


def _fill_cache(cache: Path, repo: str, folder: Path) -> None:
    """The Hub cache layout hf_hub_download reads offline: refs/main -> snapshots/<commit>/files."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, root / "snapshots" / COMMIT)


def test_from_a_prefilled_hub_cache_offline(calibrated, planted, tmp_path, monkeypatch):
    calibrated.save_pretrained(tmp_path / "set")
    cache = tmp_path / "hub"
    _fill_cache(cache, "me/neurons", tmp_path / "set")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(cache))      # what HF_HOME would set
    assert _same(ttreg.RegisterNeurons.from_pretrained("me/neurons"), calibrated)
    assert _same(ttreg.RegisterNeurons.from_pretrained("hf:me/neurons", cache_dir=cache), calibrated)
    from ttreg.cli_common import load_neurons
    got = load_neurons("hf:me/neurons", planted)                          # the CLI's --neurons
    assert _same(got, calibrated)
    # a cached set for another model is refused like a neuron file
    from ttreg.testing import planted_vit
    with pytest.raises(ttreg.ModelMismatchError, match="other weights"):
        load_neurons("hf:me/neurons", planted_vit(seed=3))


def test_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(ttreg.ModelLoadError, match=r"^could not download the neuron set hf:me/missing — "
                                                   r"no network\? pass a local path") as e:
        ttreg.RegisterNeurons.from_pretrained("me/missing")
    assert "\n" not in str(e.value)
    from ttreg.cli import main
    assert main(["export", "--model", "planted", "--neurons", "hf:me/missing",
                 "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ttreg: error: could not download the neuron set")
    assert not (tmp_path / "m.onnx").exists()


def test_push_to_hub_uploads_the_folder(calibrated, monkeypatch):
    seen = {}

    def create_repo(self, repo_id, **kw):
        seen["created"] = repo_id

    def upload_folder(self, repo_id, folder_path, **kw):
        seen["files"] = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        seen["repo"] = repo_id
        return type("Info", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()
    monkeypatch.setattr(hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(hub.HfApi, "upload_folder", upload_folder)
    url = calibrated.push_to_hub("me/set")
    assert url.endswith("me/set/commit/1") and seen["created"] == seen["repo"] == "me/set"
    assert sorted(seen["files"]) == ["README.md", "register_neurons.bias.safetensors", "register_neurons.json"]
    assert b"from_pretrained('me/set')" in seen["files"]["README.md"]

    def offline(self, repo_id, **kw):
        raise ConnectionError("Network is unreachable")
    monkeypatch.setattr(hub.HfApi, "create_repo", offline)
    with pytest.raises(ValueError, match=r"^could not upload the neuron set to hf:me/set — no network"):
        calibrated.push_to_hub("me/set")


def _fake_hub(monkeypatch, folder: Path) -> list[str]:
    """``hf_hub_download`` served from ``folder`` (a snapshot), no network; returns the names asked."""
    asked: list[str] = []

    def download(repo_id, filename, **kw):
        asked.append(filename)
        p = folder / filename
        if not p.is_file():
            raise hub.errors.EntryNotFoundError(f"{filename} is not in {repo_id}")
        return str(p)
    monkeypatch.setattr(hub, "hf_hub_download", download)
    return asked


@pytest.mark.parametrize("name", ["../../evil.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""])
def test_hub_bias_name_is_checked_before_it_is_downloaded(calibrated, tmp_path, monkeypatch, name):
    folder = calibrated.save_pretrained(tmp_path / "snap")
    data = json.loads((folder / "register_neurons.json").read_text())
    data["attention_bias"]["file"] = name
    (folder / "register_neurons.json").write_text(json.dumps(data))
    asked = _fake_hub(monkeypatch, folder)
    with pytest.raises(ttreg.ModelLoadError, match=r"attention_bias.file must name a file beside it") as e:
        ttreg.RegisterNeurons.from_pretrained("me/set")
    assert asked == ["register_neurons.json"] and "\n" not in str(e.value)


def test_hub_bias_size_is_checked_before_it_is_read(calibrated, tmp_path, monkeypatch):
    folder = calibrated.save_pretrained(tmp_path / "snap")
    asked = _fake_hub(monkeypatch, folder)
    assert _same(ttreg.RegisterNeurons.from_pretrained("me/set"), calibrated)
    assert asked == ["register_neurons.json", "register_neurons.bias.safetensors"]
    bias = folder / "register_neurons.bias.safetensors"
    size = bias.stat().st_size
    monkeypatch.setattr(ttreg.register_neurons, "MAX_BIAS_FILE_BYTES", size - 1)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    with pytest.raises(ValueError, match=rf"{bias} is {size} bytes; no ttreg attention-bias file is over"):
        ttreg.RegisterNeurons.from_pretrained("me/set")
    assert str(bias) not in opened
