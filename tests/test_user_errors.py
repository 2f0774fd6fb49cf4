"""What a user can get wrong, and what the environment can do to a run: output files, inputs,
neuron files, arguments, missing packages, help and README, start-up. Every case gives a one-line
message naming what to do (exit status 2 in the command line), a listed skip, or correct
behaviour -- never a traceback, a half-written output or a replaced special file.

Root bypasses file permissions, so the "read-only folder" and "permission denied" cases run
for real only as another user (skipped as root, with the reason); as root they are covered by a
parent that is a file, and by a simulated PermissionError from the image decoder.
"""
import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ttreg
from ttreg import files
from ttreg.cli import main
from ttreg.data import ImageError, load_image, make_transform, resolve_images
from ttreg.register_neurons import ModelMismatchError, RegisterNeurons

from conftest import default_sigint  # noqa: E402 (the tests folder's helpers)
from test_cli import ENV, _one_line_error as one_line  # noqa: E402

ROOT = os.geteuid() == 0
SRC = Path(__file__).resolve().parents[1] / "src" / "ttreg"
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    for i in range(5):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 255, (64, 72, 3)).astype(np.uint8)).save(d / f"im{i}.png")
    return d


@pytest.fixture(scope="module")
def given(tmp_path_factory):
    """The planted model's two register neurons, as a neuron file (so inspect need not search)."""
    from ttreg.testing import planted_vit
    p = tmp_path_factory.mktemp("given") / "planted.json"
    RegisterNeurons.from_dict({1: [7], 3: [21]}, model=planted_vit()).save(p)
    return str(p)


def special_files(tmp_path):
    """A FIFO, a symbolic link, a socket and (if the system lets us) a character device, each
    with a function telling whether it is still what it was."""
    out = {}
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out["fifo"] = (fifo, lambda p: stat.S_ISFIFO(os.lstat(p).st_mode))
    target = tmp_path / "target.json"
    target.write_text("keep")
    link = tmp_path / "link.json"
    os.symlink(target, link)
    out["symlink"] = (link, lambda p: os.path.islink(p) and target.read_text() == "keep")
    sock_path = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    out["socket"] = (sock_path, lambda p: stat.S_ISSOCK(os.lstat(p).st_mode))
    dev = tmp_path / "null-device"
    try:
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        out["device"] = (dev, lambda p: stat.S_ISCHR(os.lstat(p).st_mode))
    except (PermissionError, OSError):
        pass
    return out, s


# --- writing files ----------------------------------------------------------------------------------

def test_special_files_are_refused_not_replaced(tmp_path, capsys, imgs):
    specials, sock = special_files(tmp_path)
    try:
        for kind, (path, intact) in specials.items():
            # checked before the model loads: a model spec that cannot load is never reached
            one_line(capsys, ["calibrate", "--model", "timm:no_such_model", "--images", str(imgs),
                              "--out", str(path)], "--out", "not a regular file")
            one_line(capsys, ["calibrate", "--model", "timm:no_such_model", "--images", str(imgs),
                              "--out", str(tmp_path / "ok.json"), "--report", str(path)], "--report")
            one_line(capsys, ["eval", "outliers", "--model", "timm:no_such_model", "--images",
                              str(imgs), "--out", str(path)], "--out")
            with pytest.raises(files.OutputPathError, match="not a regular file"):
                RegisterNeurons([(1, 2)]).save(path)
            assert intact(path), kind
        assert not (tmp_path / "ok.json").exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [p.name for p, _ in specials.values()] + ["target.json"])
    finally:
        sock.close()


def test_modes_kept_and_umask_respected(tmp_path):
    old = os.umask(0o027)
    try:
        new = files.write_json(tmp_path / "new.json", {"a": 1})
        assert stat.S_IMODE(os.stat(new).st_mode) == 0o640          # 0o666 & ~0o027, not 0o600
        kept = tmp_path / "kept.json"
        kept.write_text("{}")
        os.chmod(kept, 0o644)
        RegisterNeurons([(1, 2)]).save(kept)
        assert stat.S_IMODE(os.stat(kept).st_mode) == 0o644
        assert json.loads(kept.read_text())["neurons"][0] == {"layer": 1, "neuron": 2, "score": None}
        os.chmod(kept, 0o600)
        files.write_text(kept, "x")
        assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600 and kept.read_text() == "x"
    finally:
        os.umask(old)


def test_failure_or_ctrl_c_leaves_nothing(tmp_path):
    for exc in (RuntimeError("disk on fire"), KeyboardInterrupt()):
        def boom(tmp):
            Path(tmp).write_text("half")
            raise exc
        with pytest.raises(type(exc)):
            with files.Outputs() as out:
                files.write_json(tmp_path / "a" / "b" / "first.json", [1], outputs=out)
                out.stage(tmp_path / "a" / "c" / "second.json", boom)
        assert list(tmp_path.iterdir()) == []            # temporaries and created folders gone
    with pytest.raises(TypeError):                       # not JSON: nothing is written
        files.write_json(tmp_path / "x.json", {"a": object()})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(files.OutputPathError, match="written twice"):
        with files.Outputs() as out:
            files.write_json(tmp_path / "x.json", 1, outputs=out)
            files.write_json(tmp_path / "." / "x.json", 2, outputs=out)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_commit_is_held_and_reported_truly(tmp_path, monkeypatch, capsys, sigint_raises):
    real_replace = os.replace
    calls = []

    def replace(a, b):
        if not calls:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of the renames
        calls.append(b)
        real_replace(a, b)

    monkeypatch.setattr(files.os, "replace", replace)
    before = files.committed_count()
    with pytest.raises(KeyboardInterrupt):
        with files.Outputs() as out:
            for i in range(3):
                files.write_json(tmp_path / f"{i}.json", i, outputs=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.json", "1.json", "2.json"]
    assert files.committed_count() - before == 3


def test_output_paths_checked_before_the_model(tmp_path, capsys, imgs):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    base = ["calibrate", "--model", "timm:no_such_model", "--images", str(imgs)]
    one_line(capsys, base + ["--out", str(tmp_path / "afile" / "n.json")], "afile is a file, not a folder")
    one_line(capsys, base + ["--out", str(tmp_path / "adir")], "is a folder")
    one_line(capsys, base + ["--out", str(tmp_path / "n.json"), "--report", str(tmp_path / "adir")],
             "--report", "is a folder")
    one_line(capsys, base + ["--out", str(tmp_path / "x.json"), "--report", str(tmp_path / "x.json")],
             "--out and --report both name")
    one_line(capsys, ["inspect", "--model", "timm:no_such_model", str(imgs), "--out",
                      str(tmp_path / "afile")], "--out", "not a folder")
    one_line(capsys, ["inspect", "--model", "timm:no_such_model", str(imgs), "--out",
                      str(tmp_path / "afile" / "figs")], "afile is a file")
    one_line(capsys, ["demo", "--out", str(tmp_path / "afile")], "not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile"]
    assert list((tmp_path / "adir").iterdir()) == []


@pytest.mark.skipif(ROOT, reason="root bypasses folder permissions; covered by a parent that is a file")
def test_read_only_folder(tmp_path, capsys, imgs):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    one_line(capsys, ["calibrate", "--model", "planted", "--images", str(imgs), "--out",
                      str(ro / "n.json")], "permission denied")


# --- inspect: batches, folders, Ctrl-C, odd names, planted-clip --------------------------------------

def test_inspect_batches_folders_and_odd_names(tmp_path, capsys, imgs, given, monkeypatch):
    import ttreg.inspection as inspection
    odd = tmp_path / "odd"
    odd.mkdir()
    name = os.fsdecode(b"caf\xe9 \xff.png")  # not UTF-8: kept by Python as surrogate escapes
    Image.open(imgs / "im0.png").save(odd / name)
    sizes = []
    real_trace = inspection.trace
    monkeypatch.setattr(inspection, "trace", lambda m, x, **kw: sizes.append(len(x)) or real_trace(m, x, **kw))
    out = tmp_path / "figs"
    rc = main(["inspect", "--model", "planted", str(imgs / "im0.png"), str(imgs / "im1.png"), str(odd),
               "--out", str(out), "--batch-size", "2", "--neurons", given, "--num-neurons", "1"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert sizes == [2, 2, 1, 1]  # 3 images in batches of 2, plain and with registers
    data = json.loads((out / "inspect.json").read_text())
    assert len(data["images"]) == 3
    shown = data["images"][-1]["image"]
    assert shown.endswith("caf\ufffd \ufffd.png") and shown in text.out
    assert all("\udce9" not in im["image"] for im in data["images"])
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 9 and all(p.stat().st_size > 1000 for p in pngs)
    assert stat.S_IMODE(pngs[0].stat().st_mode) == 0o666 & ~_umask()


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def test_ctrl_c_in_inspect_leaves_no_pngs(tmp_path, capsys, imgs, given, monkeypatch):
    import ttreg.viz as viz
    real = viz.heads
    calls = []

    def heads(*a, **kw):  # Ctrl-C after the first figure was made
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(viz, "heads", heads)
    out = tmp_path / "figs"
    rc = main(["inspect", "--model", "planted", str(imgs), "--out", str(out), "--batch-size", "1",
               "--neurons", given])
    err = capsys.readouterr().err.strip()
    assert rc == 130 and err == "ttreg: interrupted; nothing was written"
    assert not out.exists() and list(tmp_path.iterdir()) == []
    (out / "old").mkdir(parents=True)  # an existing folder keeps what it had, and only that
    calls.clear()
    rc = main(["inspect", "--model", "planted", str(imgs), "--out", str(out), "--batch-size", "1",
               "--neurons", given])
    assert rc == 130 and [p.name for p in out.iterdir()] == ["old"]


def test_inspect_planted_clip_and_layer_range(tmp_path, capsys, imgs):
    rc = main(["inspect", "--model", "planted-clip", str(imgs / "im0.png"), "--out", str(tmp_path / "f")])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((tmp_path / "f" / "inspect.json").read_text())
    assert data["images"][0]["plain"]["norm_ratio"][-1] > 3 * data["images"][0]["registers"]["norm_ratio"][-1]
    one_line(capsys, ["inspect", "--model", "planted", str(imgs / "im0.png"), "--out",
                      str(tmp_path / "g"), "--layer", "40"], "--layer=40 is out of range", "6 blocks")
    assert not (tmp_path / "g").exists()


# --- demo and missing optional packages ----------------------------------------------------------

def block(monkeypatch, *names):
    """Make ``import NAME`` (and its submodules) fail as if the package were not installed."""
    for key in list(sys.modules):
        if key.split(".")[0] in names:
            monkeypatch.setitem(sys.modules, key, None)
    for n in names:
        monkeypatch.setitem(sys.modules, n, None)


@pytest.mark.parametrize("missing,pip", [("matplotlib", "matplotlib"), ("timm", "timm"),
                                         ("skimage", "scikit-image")])
def test_demo_without_a_package_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, missing, pip):
    block(monkeypatch, missing)
    out = tmp_path / "ttreg-demo"
    one_line(capsys, ["demo", "--out", str(out)], f"pip install {pip}")
    assert list(tmp_path.iterdir()) == []


def test_missing_packages_are_one_line_where_first_needed(tmp_path, capsys, imgs, monkeypatch):
    from ttreg.models import ModelLoadError, load_model, save_model
    from ttreg.testing import planted_vit
    import timm
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
    path = save_model(model, tmp_path / "m.safetensors")
    block(monkeypatch, "matplotlib")
    one_line(capsys, ["inspect", "--model", str(path), str(imgs), "--out", str(tmp_path / "f")],
             "pip install matplotlib")
    monkeypatch.undo()
    block(monkeypatch, "timm")
    with pytest.raises(ModelLoadError, match="needs timm: pip install timm"):
        load_model(str(path))
    monkeypatch.undo()
    from ttreg.cli_common import user_error_message
    for mod, pip in (("onnx", "onnx"), ("open_clip", "open_clip_torch"), ("transformers", "transformers")):
        assert user_error_message(ModuleNotFoundError(f"No module named '{mod}'", name=mod)) == \
            f"{mod} is not installed: pip install {pip}"


# --- reading inputs -------------------------------------------------------------------------------

def _png(tmp_path, name, arr_or_im):
    im = arr_or_im if isinstance(arr_or_im, Image.Image) else Image.fromarray(arr_or_im)
    p = tmp_path / name
    im.save(p)
    return p


def test_16_bit_and_float_images_are_read_by_their_type_range(tmp_path):
    grey16 = _png(tmp_path, "grey16.png", np.full((20, 30), 32768, np.uint16))
    assert np.asarray(load_image(grey16)).tolist() == np.full((20, 30, 3), 128).tolist()
    ramp = np.array([[0, 257, 65535, 25700]], np.uint16).repeat(3, 0)
    assert np.asarray(load_image(_png(tmp_path, "ramp.png", ramp)))[0, :, 0].tolist() == [0, 1, 255, 100]
    i32 = tmp_path / "i32.tif"  # 32-bit integers, as Pillow stores some 16-bit files
    Image.fromarray(np.array([[32768, 70000, -5]], np.int32)).save(i32)
    assert np.asarray(load_image(i32))[0, :, 0].tolist() == [128, 255, 0]
    flt = tmp_path / "f.tif"
    Image.fromarray(np.full((6, 6), 0.25, np.float32)).save(flt)
    assert np.asarray(load_image(flt)).tolist() == np.full((6, 6, 3), 64).tolist()
    for bad in (255.0, -0.5, float("nan")):
        p = tmp_path / f"bad{bad}.tif"
        Image.fromarray(np.full((6, 6), bad, np.float32)).save(p)
        with pytest.raises(ImageError, match=r"float image must hold values in \[0, 1\]") as e:
            load_image(p)
        assert str(p.name) in str(e.value) and len(str(e.value).splitlines()) == 1


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that says it is ``width`` x ``height`` (8-bit RGB) but holds no pixels: Pillow
    reads its size from the header without allocating the image."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))
    return path


def test_image_size_limit_is_ttregs_not_pillows(tmp_path, monkeypatch):
    """The documented 20000x20000 holds: Pillow's own guard (89.5 MP by default) does not refuse
    a 100 MP photo; over the limit is one line with the size, before any pixel is decoded."""
    from PIL import ImageFile
    import ttreg.data as data
    assert data.MAX_PIXELS == 20000 * 20000 and Image.MAX_IMAGE_PIXELS < 100_000_000
    pillow_default = Image.MAX_IMAGE_PIXELS
    decoded = []

    def load(self):   # a header-only file cannot be decoded; say how far it got instead
        decoded.append(self.size)
        raise OSError("reached decoding")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    with pytest.raises(ImageError, match=r"photo.png: corrupt or truncated image \(reached decoding\)"):
        load_image(_png_header(tmp_path / "photo.png", 12000, 8400))          # 100.8 MP
    assert decoded == [(12000, 8400)]
    for w, h in ((20000, 20000), (16000, 25000)):      # exactly the limit
        with pytest.raises(ImageError, match="reached decoding"):
            load_image(_png_header(tmp_path / "edge.png", w, h))
    for w, h, needle in ((20001, 20000, "20001x20000 is too large (over 20000x20000 = 400000000 pixels)"),
                         (40000, 40000, "too large (over 20000x20000 = 400000000 pixels)")):  # Pillow's refusal
        decoded.clear()
        with pytest.raises(ImageError) as e:
            load_image(_png_header(tmp_path / "big.png", w, h))
        assert needle in str(e.value) and "downscale it first" in str(e.value) and "\n" not in str(e.value)
        assert decoded == []
    assert Image.MAX_IMAGE_PIXELS == pillow_default                       # Pillow's setting restored
    # the limit is the module's: a smaller one holds the same way, a real image under it loads
    monkeypatch.undo()
    monkeypatch.setattr(data, "MAX_SIDE", 70)
    monkeypatch.setattr(data, "MAX_PIXELS", 70 * 70)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)                    # Pillow's far lower
    ok = load_image(_png(tmp_path, "ok.png", np.full((70, 70, 3), 9, np.uint8)))
    assert ok.size == (70, 70) and np.asarray(ok).max() == 9 and Image.MAX_IMAGE_PIXELS == 1000
    with pytest.raises(ImageError, match=r"71x70 is too large \(over 70x70 = 4900 pixels\)"):
        load_image(_png(tmp_path, "no.png", np.full((70, 71, 3), 9, np.uint8)))


def test_elongated_image_is_refused_and_resize_memory_is_bounded(tmp_path, monkeypatch):
    long = _png(tmp_path, "long.png", np.full((1, 60000), 200, np.uint8))
    with pytest.raises(ImageError, match="60000x1 is too elongated"):
        load_image(long)
    # make_transform takes the crop straight from the source: the only resize is to the output
    asked = []
    real = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda self, size, *a, **kw: asked.append(size) or real(self, size, *a, **kw))
    tf = make_transform((64, 64), (0.5,) * 3, (0.5,) * 3)
    x = tf(Image.new("RGB", (60000, 1), (200, 100, 0)))
    assert asked == [(64, 64)] and x.shape == (3, 64, 64)
    assert torch.allclose(x[:, 0, 0], (torch.tensor([200, 100, 0]) / 255 - 0.5) / 0.5, atol=1e-6)
    # and it is the same picture as resize-then-crop, to within one grey level
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (80, 96, 3)).astype(np.uint8))
    ref = np.asarray(real(im, (77, 64), Image.BICUBIC).crop((6, 0, 70, 64)), dtype=np.float32) / 255
    got = (tf(im) * 0.5 + 0.5).permute(1, 2, 0).numpy()
    assert np.abs(got - ref).max() <= 1.01 / 255


def test_list_files_comments_and_permission_denied(tmp_path, imgs, monkeypatch):
    listing = tmp_path / "list.txt"
    listing.write_text(f"  # indented comment\n\t# tab comment\n{imgs / 'im0.png'}\n\n   {imgs / 'im1.png'}  \n")
    src = resolve_images(listing)
    assert [Path(n).name for n in src.names] == ["im0.png", "im1.png"] and not src.skipped
    import PIL.Image as PI
    real_open = PI.open

    def denied(path, *a, **kw):
        if str(path).endswith("im1.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(PI, "open", denied)
    src = resolve_images(listing)
    assert len(src) == 1 and "permission denied" in src.skipped[0].reason
    assert "corrupt" not in src.skipped[0].reason


@pytest.mark.skipif(ROOT, reason="root reads any file; covered by a simulated PermissionError")
def test_permission_denied_image_for_real(tmp_path, imgs):
    p = tmp_path / "locked.png"
    p.write_bytes((imgs / "im0.png").read_bytes())
    os.chmod(p, 0)
    with pytest.raises(ImageError, match="permission denied"):
        load_image(p)


NEURON_FILES = [
    # name, content, the field the one-line error must name
    ("neurons not a list", {"neurons": 5}, "'neurons' must be a list"),
    ("rows as lists", {"neurons": [[3, 21]]}, "neurons[0] must be an object"),
    ("missing layer", {"neurons": [{"neuron": 21}]}, "neurons[0] has no 'layer'"),
    ("null layer", {"neurons": [{"layer": None, "neuron": 21}]}, "neurons[0] has no 'layer'"),
    ("float index", {"neurons": [{"layer": 1.9, "neuron": 21}]}, "neurons[0].layer must be a whole number"),
    ("bool index", {"neurons": [{"layer": 1, "neuron": True}]}, "neurons[0].neuron must be a whole number"),
    ("negative index", {"neurons": [{"layer": -1, "neuron": 2}]}, "neurons[0].layer must be >= 0"),
    ("string score", {"neurons": [{"layer": 1, "neuron": 2, "score": "high"}]}, "neurons[0].score"),
    ("string fingerprint", {"fingerprint": "abc"}, "'fingerprint' must be an object"),
    ("weights not a string", {"fingerprint": {"weights": 5}}, "fingerprint.weights"),
    ("unknown version", {"version": 99}, "'version' is 99"),
    ("version as string", {"version": "1"}, "'version' is '1'"),
    ("wrong format", {"format": "other"}, "'format' is 'other'"),
    ("hyperparameters a list", {"hyperparameters": [1]}, "hyperparameters must be an object"),
    ("num_images negative", {"num_images": -4}, "num_images must be >= 0"),
    ("note a number", {"note": 5}, "'note' must be a string"),
    ("deep provenance", {"provenance": {"a": json.loads("[" * 40 + "]" * 40)}}, "provenance is nested"),
    # NaN and Infinity are no JSON: Python writes them unless told not to, strict parsers refuse them
    ("NaN score", {"neurons": [{"layer": 1, "neuron": 2, "score": math.nan}]},
     "neurons[0].score must be a finite number, got nan"),
    ("Infinity score", {"neurons": [{"layer": 1, "neuron": 2, "score": -math.inf}]},
     "neurons[0].score must be a finite number, got -inf"),
    ("NaN in the sample", {"fingerprint": {"weights_sample": [0.5, math.nan]}},
     "fingerprint.weights_sample[1] must be a finite number"),
    ("Infinity in statistics", {"statistics": {"ratio": [2.0, math.inf]}}, "statistics.ratio[1] is inf"),
    ("bias file elsewhere", {"attention_bias": {"file": "../n.bias.safetensors"}},
     "attention_bias.file must name a file beside it (a plain file name), got '../n.bias.safetensors'"),
    ("bias file a folder", {"attention_bias": {"file": "."}}, "attention_bias.file must name a file"),
    ("bias not an object", {"attention_bias": "n.bias.safetensors"}, "'attention_bias' must be an object"),
]


@pytest.mark.parametrize("name,patch,needle", NEURON_FILES, ids=[c[0] for c in NEURON_FILES])
def test_neuron_file_schema(tmp_path, name, patch, needle):
    good = RegisterNeurons([(1, 7), (3, 21)], [2.0, 1.0]).to_dict()
    p = tmp_path / "n.json"
    p.write_text(json.dumps({**good, **patch}))
    with pytest.raises(ValueError) as e:
        RegisterNeurons.load(p)
    msg = str(e.value)
    assert needle in msg and len(msg.splitlines()) == 1 and str(p) in msg


def test_neuron_files_are_written_as_standard_json(tmp_path):
    """A score that is no number is refused when the set is made; a NaN anywhere else stops the
    write with the field named, and leaves no file; what is written is strict JSON."""
    for scores in ([math.nan], [math.inf]):
        with pytest.raises(ValueError, match=r"scores\[0\] must be a finite number"):
            RegisterNeurons([(1, 7)], scores)
    rn = RegisterNeurons([(1, 7), (3, 21)], [2.0, 1.0])
    rn.statistics["heldout_after"] = {"mean_norm_ratio": math.nan}
    with pytest.raises(ValueError, match=r"^cannot write .*n\.json: statistics\.heldout_after\.mean_norm_ratio "
                                         r"is nan, and JSON has no NaN or infinity$"):
        rn.save(tmp_path / "n.json")
    assert list(tmp_path.iterdir()) == []
    rn.statistics["heldout_after"]["mean_norm_ratio"] = 1.5
    text = rn.save(tmp_path / "n.json").read_text()

    def refuse(word):
        raise AssertionError(f"non-standard JSON: {word}")
    assert json.loads(text, parse_constant=refuse)["neurons"][0] == {"layer": 1, "neuron": 7, "score": 2.0}
    assert RegisterNeurons.load(tmp_path / "n.json").statistics["heldout_after"] == {"mean_norm_ratio": 1.5}


def test_neuron_file_nesting_and_plain_mappings(tmp_path, capsys, imgs):
    p = tmp_path / "deep.json"
    p.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match="nested too deeply"):
        RegisterNeurons.load(p)
    one_line(capsys, ["calibrate", "--model", "timm:no_such_model", "--images", str(imgs), "--neurons",
                      str(p), "--out", str(tmp_path / "o.json")], "nested too deeply")
    assert RegisterNeurons.from_dict({"3": [21], 1: [7]}).neurons == [(3, 21), (1, 7)]
    for bad, needle in (({1: [1.9]}, "whole number"), ({1: [True]}, "whole number"),
                        ({1: 5}, "expected a list"), ({"x": [1]}, "whole number")):
        with pytest.raises(ValueError, match=needle):
            RegisterNeurons.from_dict(bad)
    for pairs in ([(1.9, 2)], [(True, 2)], [(1, 2, 3)], ["ab"]):
        with pytest.raises(ValueError):
            RegisterNeurons(pairs)
    assert RegisterNeurons([(np.int64(2), torch.tensor(5))]).neurons == [(2, 5)]


def test_wrong_model_message_names_the_model(tmp_path, capsys, imgs, planted):
    from ttreg.testing import planted_vit
    rn = RegisterNeurons.from_dict({3: [21]}, model=planted_vit(embed_dim=128))
    rn.provenance["model_spec"] = "timm:my_wide_vit"
    rn.save(tmp_path / "other.json")
    with pytest.raises(ModelMismatchError) as e:
        rn.check_model(planted)
    assert "found for timm:my_wide_vit" in str(e.value) and "check=False" in str(e.value)
    err = one_line(capsys, ["inspect", "--model", "planted", "--neurons", str(tmp_path / "other.json"),
                            "--out", str(tmp_path / "f"), str(imgs / "im0.png")],
                   "another architecture", "found for timm:my_wide_vit", "ttreg calibrate")
    assert "check=False" not in err and not (tmp_path / "f").exists()
    rn.provenance.clear()  # no provenance: the fingerprint's architecture names it
    with pytest.raises(ModelMismatchError, match=r"found for timm VisionTransformer \(6 blocks, 128 wide\)"):
        rn.check_model(planted)


# --- arguments: refused by the parsers (CLI) and by the API, in one line -----------------------------

BAD_ARGS = [
    (["calibrate", "--heldout", "1.5"], "--heldout: must be in [0, 1)"),
    (["calibrate", "--heldout", "nan"], "--heldout"),
    (["calibrate", "--max-k", "-5"], "--max-k: must be at least 1"),
    (["calibrate", "--top-k", "-2"], "--top-k"),
    (["calibrate", "--top-k", "2.5"], "--top-k"),
    (["calibrate", "--threshold", "-1"], "--threshold"),
    (["calibrate", "--threshold", "0"], "--threshold"),
    (["calibrate", "--threshold", "nan"], "--threshold"),
    (["calibrate", "--batch-size", "0"], "--batch-size: must be at least 1"),
    (["calibrate", "--device", "mps"], "not available"),
    (["calibrate", "--device", "cuda:3"], "not available"),
    (["calibrate", "--device", "toaster"], "is not a device"),
    (["inspect", "x.png", "--num-registers", "0"], "--num-registers"),
    (["inspect", "x.png", "--num-neurons", "-1"], "--num-neurons"),
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["eval", "outliers", "--images", "x", "--limit", "-3"], "--limit: must be at least 1"),
    (["eval", "outliers", "--images", "x", "--controls", "-1"], "--controls: must be at least 0"),
    (["eval", "outliers", "--images", "x", "--threshold", "nan"], "--threshold"),
    (["eval", "outliers", "--images", "x", "--search-images", "0"], "--search-images"),
    (["eval", "probe", "--task", "depth", "--data", "x", "--val-fraction", "1"], "--val-fraction"),
    (["eval", "probe", "--task", "depth", "--data", "x", "--steps", "0"], "--steps"),
    (["eval", "probe", "--task", "depth", "--data", "x", "--max-depth", "-1"], "--max-depth"),
    (["eval", "lost", "--voc", "x", "--k-patches", "0"], "--k-patches"),
]


@pytest.mark.parametrize("argv,needle", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_parsers_refuse_bad_numbers(capsys, tmp_path, argv, needle):
    need = {"calibrate": ["--images", "x", "--out", str(tmp_path / "n.json")],
            "inspect": ["--out", str(tmp_path / "f")], "demo": [], "eval": []}[argv[0]]
    model = [] if argv[0] == "demo" else ["--model", "planted"]
    one_line(capsys, argv + model + need, needle)
    assert list(tmp_path.iterdir()) == []


def test_api_refuses_bad_thresholds_and_no_images(planted):
    from ttreg.eval.outliers import evaluate_outliers
    from ttreg.testing import mixed_images
    x = mixed_images(4)
    for thr in (-1, 0, float("nan"), math.inf, "high", True):
        for fn in (ttreg.find_register_neurons, ttreg.calibrate):
            with pytest.raises(ValueError, match="threshold must be a positive") as e:
                fn(planted, x, threshold=thr)
            assert len(str(e.value).splitlines()) == 1
        with pytest.raises(ValueError, match="threshold"):
            evaluate_outliers(planted, x, [(3, 21)], threshold=thr, print_table=False)
    for empty in (x[:0], [], iter([])):
        for fn in (ttreg.find_register_neurons, ttreg.calibrate):
            with pytest.raises(ImageError, match="no images"):
                fn(planted, empty)
    for kw, needle in (({"heldout": 1.5}, "heldout"), ({"max_k": 0}, "max_k"), ({"top_k": -1}, "top_k"),
                       ({"top_k": 2.5}, "top_k"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ValueError, match=needle):
            ttreg.calibrate(planted, x, **kw)


def test_automatic_top_k_that_fails_exits_3(tmp_path, capsys, imgs):
    out = tmp_path / "n.json"
    rc = main(["calibrate", "--model", "planted", "--images", str(imgs), "--out", str(out),
               "--threshold", "0.001", "--max-k", "4", "--report", str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 3 and "automatic top-k failed: zeroing the 4 best neurons" in err
    assert len(err.splitlines()) == 1
    assert 0 < len(json.loads(out.read_text())["neurons"]) <= 4
    assert json.loads((tmp_path / "r.json").read_text())["top_k_cleared"] is False


def test_images_and_device_checked_before_the_model(tmp_path, capsys, imgs):
    one_line(capsys, ["calibrate", "--model", "timm:no_such_model", "--images", str(tmp_path / "nope"),
                      "--out", str(tmp_path / "n.json")], "no such file or folder")
    one_line(capsys, ["inspect", "--model", "timm:no_such_model", str(tmp_path / "nope.png"),
                      "--out", str(tmp_path / "f")], "no such file")
    one_line(capsys, ["calibrate", "--model", "timm:no_such_model", "--images", str(imgs),
                      "--neurons", str(tmp_path / "none.json"), "--out", str(tmp_path / "n.json")],
             "no neuron file")
    rc = main(["calibrate", "--model", "planted", "--images", str(imgs), "--device", "cpu:0",
               "--out", str(tmp_path / "n.json"), "--quiet"])
    assert rc == 0 and (tmp_path / "n.json").is_file()


# --- help, README, model specs -------------------------------------------------------------------

def _parsers():
    import argparse
    from ttreg.cli import build_parser
    todo, out = [((), build_parser())], {}
    while todo:
        path, p = todo.pop()
        out[path] = p
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += [((*path, name), sub) for name, sub in a.choices.items()]
    return out


def _options(parser) -> set[str]:
    import argparse
    return {o for a in parser._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
            for o in a.option_strings}


def test_every_option_has_help_text():
    import argparse
    for path, p in _parsers().items():
        for a in p._actions:
            if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
                assert a.help and a.help.strip(), f"ttreg {' '.join(path)} {a.option_strings or a.dest}"


def _readme_synopses() -> dict[tuple, set[str]]:
    """``{command path: options}`` from the first code block after '## Command line'."""
    import re
    text = README.read_text()
    block = text[text.index("## Command line"):].split("```")[1]
    entries, current = [], None
    for line in block.splitlines():
        if line.startswith(("ttreg", "EVAL-OPTIONS:")):
            current = [line]
            entries.append(current)
        elif line.strip() and current is not None:
            current.append(line)
    macros, out = {}, {}
    for e in entries:
        joined = " ".join(e)
        if joined.startswith("EVAL-OPTIONS:"):
            macros["EVAL-OPTIONS"] = set(re.findall(r"--[a-z][a-z0-9-]*", joined))
            continue
        words = joined.split()[1:]
        path = tuple(w for w in words[:2] if re.fullmatch(r"[a-z]+", w))
        opts = set(re.findall(r"--[a-z][a-z0-9-]*", joined))
        out[path] = (opts, "EVAL-OPTIONS" in joined)
    return {p: o | (macros["EVAL-OPTIONS"] if m else set()) for p, (o, m) in out.items()}


def test_readme_synopsis_matches_the_parsers():
    readme = _readme_synopses()
    parsers = {p: _options(parser) for p, parser in _parsers().items() if p != ("eval",)}
    assert set(readme) == set(parsers)
    for path, opts in parsers.items():
        assert readme[path] == opts, (path, "missing in README:", opts - readme[path],
                                      "not an option:", readme[path] - opts)


def test_model_spec_error_lists_only_documented_forms(tmp_path, capsys, imgs):
    err = one_line(capsys, ["calibrate", "--model", "nosuch:thing", "--images", str(imgs),
                            "--out", str(tmp_path / "n.json")], "unknown model spec 'nosuch:thing'")
    import re
    readme = README.read_text()
    tail = err.split("; use ", 1)[1]
    forms = [f.strip() for f in re.split(r",\s*(?:or\s+)?|\s+or\s+|a synthetic model:\s*", tail) if f.strip()]
    assert "a local path" in forms and "a local path" in readme
    forms = [f.strip() for f in forms if f != "a local path"]
    assert len(forms) == 10, forms  # 7 spec forms + 3 synthetic models
    for f in forms:
        assert f"`{f}`" in readme, f


# --- security ------------------------------------------------------------------------------------

def test_no_pickle_eval_exec_or_shell_in_src():
    import ast
    banned_modules = {"pickle", "cPickle", "dill", "marshal", "shelve", "subprocess"}
    problems = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(SRC)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                problems += [where for a in node.names if a.name.split(".")[0] in banned_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                problems.append(where)
            elif isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
                if isinstance(f, ast.Name) and name in ("eval", "exec", "compile"):
                    problems.append(f"{where} {name}()")
                if owner == "os" and name in ("system", "popen", "execv", "execvp", "spawnv"):
                    problems.append(f"{where} os.{name}()")
                if any(k.arg == "shell" for k in node.keywords):
                    problems.append(f"{where} shell=")
                if owner == "torch" and name == "load":
                    wo = [k for k in node.keywords if k.arg == "weights_only"]
                    if not (wo and isinstance(wo[0].value, ast.Constant) and wo[0].value.value is True):
                        problems.append(f"{where} torch.load without weights_only=True")
    assert problems == []


def test_model_file_metadata_is_validated(tmp_path):
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from ttreg.models import META_KWARGS, ModelLoadError, load_model, save_model
    model = timm.create_model("test_vit", pretrained=False, img_size=32, num_classes=3)
    path = save_model(model, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    loaded, _ = load_model(str(path))
    assert loaded.num_classes == 3 and loaded.patch_embed.img_size == (32, 32)
    for kwargs, needle in (({"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "unexpected key 'pretrained_cfg_overlay'"),
                           ({"num_classes": "3"}, "num_classes' must be a whole number"),
                           ({"img_size": [32, -1]}, "img_size' must be two whole numbers"),
                           ({"dynamic_img_size": 1}, "dynamic_img_size' must be true or false"),
                           ({"global_pool": "exec"}, "global_pool' must be one of")):
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, str(bad), metadata={**meta, META_KWARGS: json.dumps({**json.loads(meta[META_KWARGS]), **kwargs})})
        with pytest.raises(ModelLoadError, match=needle) as e:
            load_model(str(bad))
        assert len(str(e.value).splitlines()) == 1
    save_file(tensors, str(bad), metadata={**meta, META_KWARGS: "[1, 2]"})
    with pytest.raises(ModelLoadError, match="must be an object"):
        load_model(str(bad))


# --- start-up and library noise --------------------------------------------------------------------

def test_ctrl_c_during_import_is_one_line_exit_130(tmp_path):
    """SIGINT while torch is being imported (-X importtime says when)."""
    p = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "ttreg", "calibrate", "--model",
                          "planted", "--images", str(tmp_path), "--out", str(tmp_path / "n.json")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                         preexec_fn=default_sigint)
    seen = []
    for line in p.stderr:  # the first finished torch submodule: torch is being imported now
        seen.append(line)
        if line.rstrip().split("|")[-1].strip().startswith("torch."):
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    ours = [l for l in err.splitlines() if not l.startswith("import time:")]
    assert p.returncode == 130, err[-2000:]
    assert ours == ["ttreg: interrupted; nothing was written"]
    assert not (tmp_path / "n.json").exists()


def test_open_clip_error_log_line_is_not_printed(tmp_path, capsys, imgs):
    import logging
    pytest.importorskip("open_clip")
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []  # as in a plain command line run: logging.error() would call basicConfig
    try:
        err = one_line(capsys, ["calibrate", "--model", "open_clip:ViT-B-32/nosuchtag", "--images",
                                str(imgs), "--out", str(tmp_path / "n.json")], "nosuchtag")
        assert "ERROR:root" not in err and root.handlers == []
    finally:
        root.handlers = saved


def test_ci_runs_the_default_and_the_slow_tests():
    """CI (.ci/run) runs `make test-all`: the default suite, then `pytest -m slow`, where
    pytest's exit 5 (nothing selected) is no failure."""
    import shutil
    root = README.parent
    assert "make test-all" in (root / ".ci" / "run").read_text()
    if shutil.which("make") is None:
        pytest.skip("no make here")
    venv = Path(sys.executable).parent.parent
    steps = subprocess.run(["make", "-n", "test-all", f"VENV={venv}"], cwd=root, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    runs = [s for s in steps if "-m pytest" in s]
    assert runs == [f"{venv}/bin/python -m pytest", f"{venv}/bin/python -m pytest -m slow || [ $? -eq 5 ]"]
    for code, ok in ((0, True), (5, True), (1, False)):
        tail = runs[1].split("||", 1)[1]
        assert (subprocess.run(["sh", "-c", f"sh -c 'exit {code}' ||{tail}"]).returncode == 0) is ok
