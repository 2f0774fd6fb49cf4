"""Size and load time of the ``ttreg inspect --html`` page for 16 images at ViT-S/14 size.

The demo's synthetic model (``builtin:dinov2_vits14+planted``: the built-in DINOv2 ViT-S/14
with planted register neurons, 224 px, 16 x 16 patches, 12 blocks, 6 heads) is calibrated on
the scikit-image photos, then ``inspect`` writes the page for 16 of them. The page is loaded
in the tests' headless Chromium (``tests/browser.py``) several times; the script prints the
file size and the median time from navigation to the first drawing, and with ``--screenshot``
saves the README's screenshot (the page as the browser shows it, registers off).

    python benchmarks/html_page.py [--images 16] [--loads 5] [--screenshot docs/html_page.png]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from browser import chromium, console_errors, missing, open_page  # noqa: E402

from ttreg.calibration import calibrate  # noqa: E402
from ttreg.cli_common import resolve_model  # noqa: E402
from ttreg.data import resolve_images  # noqa: E402
from ttreg.demo import SYNTHETIC, SYNTHETIC_CAPTION  # noqa: E402
from ttreg.html_report import Page  # noqa: E402
from ttreg.inspection import inspect_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--screenshot", type=Path, help="PNG to save the page's screenshot to")
    ap.add_argument("--out", type=Path, help="folder for the page and figures (default: a temporary one)")
    args = ap.parse_args()
    if missing():
        sys.exit(f"html_page: {missing()}")
    photos = resolve_images("skimage")
    model, tf, _ = resolve_model(SYNTHETIC)
    t0 = time.time()
    neurons = calibrate(model, photos, transform=tf, batch_size=8).neurons
    print(f"calibrated on {len(photos)} photos in {time.time() - t0:.0f} s: {neurons}")
    n = min(args.images, len(photos))
    if n < args.images:
        print(f"only {n} photos can be read here", file=sys.stderr)
    out = args.out or Path(tempfile.mkdtemp(prefix="ttreg-html-"))
    page = Page(out / "inspect.html", neuron_source="calibrated by benchmarks/html_page.py",
                caption=SYNTHETIC_CAPTION)
    t0 = time.time()
    inspect_images(model, tf, photos.subset(range(n)), neurons, out / "figs", model_name=SYNTHETIC,
                   batch_size=8, page=page)
    print(f"inspect with the page: {time.time() - t0:.0f} s; {page.summary()} "
          f"({page.bytes / n / 1e3:.0f} kB per image)")
    with chromium(1400, 1200) as d:
        times = [open_page(d, page.path) for _ in range(args.loads)]
        print(f"load to first drawing: median {statistics.median(times):.0f} ms "
              f"(min {min(times):.0f}, max {max(times):.0f}, {args.loads} loads, headless Chromium)")
        errors = console_errors(d)
        if errors:
            sys.exit(f"console errors: {errors}")
        if args.screenshot:
            d.find_elements("css selector", "#neuron-list li")[0].click()
            time.sleep(0.3)
            d.save_screenshot(str(args.screenshot))
            print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
