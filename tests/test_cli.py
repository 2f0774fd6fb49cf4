"""The command line end to end (subprocess), and every bad input a user can hit."""
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ttreg.cli import main

from conftest import default_sigint

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ttreg", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def photo(size=(96, 80), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([xx * 255 / size[0], yy * 255 / size[1], (xx + yy) % 255], -1)
    return Image.fromarray((base * 0.7 + rng.integers(0, 70, base.shape)).astype(np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    (d / "sub").mkdir()
    for i in range(10):
        photo(seed=i).save(d / ("sub" if i % 2 else ".") / f"img{i}.png")
    return d


def assert_png(path: Path, min_size=(200, 150)):
    im = Image.open(path)
    assert im.format == "PNG" and im.width >= min_size[0] and im.height >= min_size[1]
    arr = np.asarray(im.convert("RGB")).astype(float)
    assert arr.std() > 10, f"{path} looks blank"
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 50


def test_calibrate_then_inspect_subprocess(folder, tmp_path):
    out = tmp_path / "n.json"
    r = run("calibrate", "--model", "planted", "--images", str(folder), "--out", str(out),
            "--report", str(tmp_path / "report.json"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "emergence layer: 3" in r.stdout and "register neurons: 2 (layer 1: 1, layer 3: 1)" in r.stdout
    assert "-> 1." in r.stdout  # held-out ratio after registers is about 1
    spec = json.loads(out.read_text())
    assert sorted((n["layer"], n["neuron"]) for n in spec["neurons"]) == [(1, 7), (3, 21)]
    assert spec["num_images"] == 8 and spec["hyperparameters"]["top_k"] == 2
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["heldout_before"]["mean_norm_ratio"] >= 5 and rep["heldout_after"]["mean_norm_ratio"] <= 2
    assert [s["k"] for s in rep["sweep"]][0] == 1

    figs = tmp_path / "figs"
    r = run("inspect", "--model", "planted", "--neurons", str(out), "--out", str(figs),
            str(folder / "img0.png"), str(folder / "sub" / "img1.png"))
    assert r.returncode == 0, r.stderr
    data = json.loads((figs / "inspect.json").read_text())
    assert len(data["images"]) == 2
    for im in data["images"]:
        assert im["plain"]["norm_ratio"][-1] >= 5 and im["registers"]["norm_ratio"][-1] <= 2
        assert im["registers"]["register_norm"][-1] > 5 * im["registers"]["median_patch_norm"][-1]
        assert len(im["plain"]["norm_map"]) == 8 and 0 < im["plain"]["cls_attention_top5_mass"] <= 1
    pngs = sorted(figs.glob("*.png"))
    assert len(pngs) == 6
    for p in pngs:
        assert_png(p)


def test_help_texts_are_accurate(capsys):
    for cmd in ([], ["inspect"], ["demo"]):
        with pytest.raises(SystemExit) as e:
            main([*cmd, "--help"])
        assert e.value.code == 0
    assert "offline" in capsys.readouterr().out
    r = run("calibrate", "--help")
    assert r.returncode == 0
    for flag in ("--model", "--images", "--out", "--threshold", "--top-layer", "--top-k", "--strict",
                 "--device", "--batch-size", "--heldout"):
        assert flag in r.stdout


# --- bad input, table-driven ------------------------------------------------------------------

def _png_bytes(im):
    import io
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


def _huge_png_header(w=30000, h=30000) -> bytes:
    """A PNG whose header claims w x h pixels (the data is a stub): must be refused, not decoded."""
    raw = bytearray(_png_bytes(Image.new("L", (1, 1))))
    ihdr = raw[12:29]
    ihdr[4:8] = struct.pack(">I", w)
    ihdr[8:12] = struct.pack(">I", h)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(raw)


def _write(path: Path, maker):
    data = maker()
    if isinstance(data, Image.Image):
        data.save(path)
    else:
        path.write_bytes(data)


GOOD = photo()
CASES = [
    # name, file name, maker, expected: "ok" or the message the skip/error must contain
    ("corrupt", "bad.jpg", lambda: os.urandom(2000), "not an image file"),
    ("truncated", "trunc.png", lambda: _png_bytes(photo((200, 200)))[:900], "corrupt or truncated"),
    ("grayscale", "gray.png", lambda: GOOD.convert("L"), "ok"),
    ("rgba", "rgba.png", lambda: GOOD.convert("RGBA"), "ok"),
    ("palette", "pal.png", lambda: GOOD.convert("P"), "ok"),
    ("cmyk", "cmyk.jpg", lambda: GOOD.convert("CMYK"), "ok"),
    ("16-bit", "deep.png", lambda: Image.fromarray((np.asarray(GOOD.convert("L")).astype(np.uint16) * 257)), "ok"),
    ("1x1", "dot.png", lambda: Image.new("RGB", (1, 1), (200, 10, 10)), "ok"),
    ("very large", "huge.png", _huge_png_header, "too large"),
    ("non-image", "notes.txt", lambda: b"hello, not a picture\n", "not an image file"),
]


@pytest.mark.parametrize("name,fname,maker,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_images_table(tmp_path, capsys, name, fname, maker, expect):
    d = tmp_path / "in"
    d.mkdir()
    _write(d / fname, maker)
    out = tmp_path / "out" / "n.json"
    code = main(["calibrate", "--model", "planted", "--images", str(d), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    if expect == "ok":
        assert code == 0, err
        assert out.exists()
        return
    # alone in the folder: a one-line error that names the reason; nothing written
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and expect in lines[0] and "no readable images" in lines[0]
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))
    # next to good images: skipped and listed; --strict fails instead
    photo(seed=1).save(d / "good1.png")
    photo(seed=2).save(d / "good2.png")
    code = main(["calibrate", "--model", "planted", "--images", str(d), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0 and f"skipped {d / fname}" in err and expect in err
    out.unlink()
    code = main(["calibrate", "--model", "planted", "--images", str(d), "--out", str(out), "--quiet",
                 "--strict"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and expect in err and len(err.splitlines()) == 1 and not out.exists()


def _one_line_error(capsys, argv, *needles):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _one_line_error(capsys, ["calibrate", "--model", "planted", "--images", str(tmp_path / "empty"),
                             "--out", str(tmp_path / "n.json")], "holds no files")
    assert not (tmp_path / "n.json").exists()


def test_missing_file_and_folder(tmp_path, capsys):
    _one_line_error(capsys, ["calibrate", "--model", "planted", "--images", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "n.json")], "no such file or folder")
    _one_line_error(capsys, ["inspect", "--model", "planted", "--out", str(tmp_path / "f"),
                             str(tmp_path / "missing.png")], "no such file")
    _one_line_error(capsys, ["inspect", "--model", "planted", "--neurons", str(tmp_path / "x.json"),
                             "--out", str(tmp_path / "f"), str(tmp_path / "missing.png")])


def test_unknown_model_spec(tmp_path, capsys):
    _one_line_error(capsys, ["calibrate", "--model", "nosuchkind:thing", "--images", "skimage",
                             "--out", str(tmp_path / "n.json")], "nosuchkind")


def test_neuron_file_for_another_model(tmp_path, capsys, folder):
    from ttreg.testing import planted_vit
    import ttreg
    other = planted_vit(embed_dim=128)
    rn = ttreg.RegisterNeurons.from_dict({3: [21]}, model=other)
    rn.save(tmp_path / "other.json")
    _one_line_error(capsys, ["inspect", "--model", "planted", "--neurons", str(tmp_path / "other.json"),
                             "--out", str(tmp_path / "f"), str(folder / "img0.png")],
                    "another architecture")
    assert not (tmp_path / "f").exists()
    (tmp_path / "junk.json").write_text("{not json")
    _one_line_error(capsys, ["inspect", "--model", "planted", "--neurons", str(tmp_path / "junk.json"),
                             "--out", str(tmp_path / "f"), str(folder / "img0.png")], "not valid JSON")


def test_nan_tensor_input():
    import ttreg
    from ttreg.testing import planted_vit
    x = torch.zeros(2, 3, 64, 64)
    x[1, 0, 5, 5] = float("nan")
    with pytest.raises(ttreg.ImageError, match="NaN"):
        ttreg.find_register_neurons(planted_vit(), x)


def test_bad_arguments(tmp_path, capsys):
    _one_line_error(capsys, ["calibrate", "--model", "planted", "--images", "skimage",
                             "--out", str(tmp_path / "n.json"), "--threshold", "high"], "--threshold")
    _one_line_error(capsys, ["calibrate", "--model", "planted", "--images", "skimage",
                             "--out", str(tmp_path / "n.json"), "--batch-size", "0"], "--batch-size")
    _one_line_error(capsys, ["calibrate", "--model", "planted", "--images", "skimage",
                             "--out", str(tmp_path / "n.json"), "--detection-layer", "40"], "out of range")
    _one_line_error(capsys, ["calibrate", "--model", "planted", "--images", "skimage",
                             "--out", str(tmp_path / "n.json"), "--device", "cuda:7"], "not available")


def test_ctrl_c_during_calibration_writes_nothing(tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(300):
        photo(size=(64, 64), seed=i).save(d / f"{i}.png")
    out = tmp_path / "n.json"
    p = subprocess.Popen([sys.executable, "-m", "ttreg", "calibrate", "--model", "planted", "--images",
                          str(d), "--out", str(out), "--batch-size", "1", "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=default_sigint)
    line = p.stdout.readline()  # "calibrating ..." once the work has started
    assert "calibrating" in line
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted; nothing was written" in err
    assert list(tmp_path.glob("n.json*")) == [] and not any(x.name.startswith(".n.json") for x in tmp_path.iterdir())


def test_calibrate_measures_a_given_set_and_reads_list_files(tmp_path, capsys, folder):
    import ttreg
    from ttreg.testing import planted_vit
    ttreg.RegisterNeurons.from_dict({1: [7], 3: [21]}, model=planted_vit()).save(tmp_path / "given.json")
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\n" + "\n".join(str(p) for p in sorted(folder.rglob("*.png"))[:6]) + "\n")
    out = tmp_path / "measured.json"
    code = main(["calibrate", "--model", "planted", "--images", str(listing), "--neurons",
                 str(tmp_path / "given.json"), "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0 and "measured 2 given neurons on 6 images" in text
    st = json.loads(out.read_text())["statistics"]
    assert st["measured_on_images"] == 6
    assert st["measured_before"]["mean_norm_ratio"] >= 5 and st["measured_after"]["mean_norm_ratio"] <= 2
    assert st["measured_before"]["fraction_with_outliers"] == 1 and st["measured_after"]["fraction_with_outliers"] == 0
    _one_line_error(capsys, ["calibrate", "--model", "planted", "--images", str(listing), "--neurons",
                             "dinov2_vitl14", "--out", str(tmp_path / "x.json")], "another architecture (num_layers=24")
