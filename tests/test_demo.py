"""``ttreg demo`` and the CLI on the built-in real model, end to end (subprocess)."""
import json
import re
import subprocess
import sys
from pathlib import Path

from test_cli import ENV, assert_png

from ttreg.testing import DEMO_PLANTS


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "ttreg", "demo", "--out", str(out)], capture_output=True,
                       text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "no outlier tokens at layer 11" in r.stdout and "does not need registers" in r.stdout
    assert f"report: {out / 'report.md'}" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    real, syn = summary["real"], summary["synthetic"]
    assert real["neurons"]["neurons"] == [] and real["report"]["heldout_before"]["mean_norm_ratio"] < 2
    planted = {tuple(p) for p in syn["planted"]}
    assert planted == set(DEMO_PLANTS.register_neurons)
    found = {(n["layer"], n["neuron"]) for n in syn["neurons"]["neurons"]}
    # the neurons whose vectors matter at the detection layer: never one outside the plant
    assert DEMO_PLANTS.amplifier in found and found <= planted and not found & set(DEMO_PLANTS.distractors)
    assert f"found {sorted(found)}: " in r.stdout and "planted neurons clear the outliers" in r.stdout
    assert syn["report"]["emergence_layer"] == 9 and syn["report"]["top_k_rule"] == "cleared"
    assert syn["report"]["heldout_before"]["mean_norm_ratio"] >= 4
    assert syn["report"]["heldout_after"]["mean_norm_ratio"] <= 2
    # the outlier sits on each photo's brightest patch: a different place in every photo
    where = {tuple(w) for w in syn["outlier_patches"].values()}
    assert len(syn["outlier_patches"]) == 3 and len(where) == 3
    report = (out / "report.md").read_text()
    assert "artifact" in report and "fine-tuned for saliency" in report
    links = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert len(links) >= 9
    for link in links:
        assert_png(out / link)
    # the interactive page beside the report, labelled synthetic
    page = out / "synthetic.html"
    assert f"wrote {page} (3 images," in r.stdout and "](synthetic.html)" in report
    assert "DINOv2 ViT-S/14 with register neurons planted by ttreg" in page.read_text()


def test_calibrate_builtin_subprocess(tmp_path):
    from ttreg.data import skimage_photos
    d = tmp_path / "photos"
    d.mkdir()
    for name, im in skimage_photos(["astronaut", "coffee", "chelsea", "rocket", "horse"]):
        im.save(d / f"{name}.png")
    out = tmp_path / "n.json"
    r = subprocess.run([sys.executable, "-m", "ttreg", "calibrate", "--model", "builtin:dinov2_vits14",
                        "--images", str(d), "--out", str(out), "--quiet"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "no outlier tokens at layer 11 over 4 images" in r.stdout
    spec = json.loads(out.read_text())
    assert spec["neurons"] == [] and spec["num_images"] == 4 and spec["num_images_with_outliers"] == 0
    assert spec["fingerprint"]["architecture"]["num_layers"] == 12
    ratio = spec["statistics"]["mean_norm_ratio"][11]
    assert 1.0 < ratio < 2.0
