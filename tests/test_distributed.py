"""Calibration statistics are sums and counts: two ranks under torchrun equal one process --
the search, the attention-bias fit, a whole calibration (search, emergence statistics, held-out
sweep, bias) and the command line, with image counts that do not divide by two."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import ttreg
from ttreg.cli import main
from ttreg.testing import mixed_images, planted_vit


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_pngs(folder: Path, n: int) -> None:
    """``n`` 64 px PNGs: noise, gradients and blobs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64] / 63.0
    for i in range(n):
        if i % 3 == 0:
            a = rng.integers(0, 256, (64, 64, 3))
        elif i % 3 == 1:
            a = np.stack([xx, yy, xx * yy], -1) * 255 * rng.uniform(0.5, 1)
        else:
            c = rng.uniform(0.2, 0.8, 2)
            a = np.exp(-((xx - c[0]) ** 2 + (yy - c[1]) ** 2) * 20)[..., None].repeat(3, -1) * 255
        Image.fromarray(a.astype(np.uint8)).save(folder / f"{i}.png")


def same(a, b, path="") -> None:
    """``a`` equals ``b``: counts, names and choices exactly, real numbers to float tolerance
    (sums over the ranks add in another order)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def same_neurons(a: ttreg.RegisterNeurons, b: ttreg.RegisterNeurons) -> None:
    assert a.neurons == b.neurons
    assert (a.num_images, a.num_images_with_outliers) == (b.num_images, b.num_images_with_outliers)
    same(a.scores, b.scores)
    same({k: v for k, v in a.statistics.items()}, b.statistics)
    same(a.hyperparameters, b.hyperparameters)
    if a.attention_bias is not None or b.attention_bias is not None:
        assert a.attention_bias.num_images == b.attention_bias.num_images
        torch.testing.assert_close(a.attention_bias.key, b.attention_bias.key, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.attention_bias.value, b.attention_bias.value, rtol=1e-5, atol=1e-6)


def test_two_ranks_equal_one_process(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    write_pngs(folder, 9)
    out = tmp_path / "dist"
    out.mkdir()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                        str(Path(__file__).with_name("dist_worker.py")), str(out), str(folder)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    model = planted_vit()
    single = ttreg.find_register_neurons(model, mixed_images(11), top_k=5, batch_size=2)
    single.attention_bias = ttreg.fit_attention_bias(model, single, mixed_images(11), batch_size=2)
    dist = ttreg.RegisterNeurons.load(out / "search.json")
    assert dist.num_images == 11 and dist.num_images_with_outliers == 11
    same_neurons(dist, single)
    assert dist.attention_bias.num_images == 11

    cal = ttreg.calibrate(model, mixed_images(13, seed=1), heldout=0.4, batch_size=2,
                          attention_bias=True)
    report = json.loads((out / "calibrate_report.json").read_text())
    assert report["num_heldout_images"] == 5 and report["num_search_images"] == 8   # odd shares
    assert len(report["sweep"]) >= 2 and cal.report["attention_bias"]["num_images"] == 13
    same(report, json.loads(json.dumps(cal.report)))
    same_neurons(ttreg.RegisterNeurons.load(out / "calibrate.json"), cal.neurons)

    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "--model", "planted", "--images", str(folder), "--out", "cli.json",
                 "--report", "cli_report.json", "--heldout", "0.4", "--batch-size", "2",
                 "--quiet"]) == 0
    same(json.loads((out / "cli_report.json").read_text()), json.loads(Path("cli_report.json").read_text()))
    same_neurons(ttreg.RegisterNeurons.load(out / "cli.json"), ttreg.RegisterNeurons.load("cli.json"))
