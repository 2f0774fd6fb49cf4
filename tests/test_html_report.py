"""``ttreg inspect --html``: the page's data against inspect.json, its colour scales, all-or-nothing
writing, the command line, and the page itself in a real headless Chromium."""
import base64
import json
import re

import numpy as np
import pytest
import torch

from browser import chromium, console_errors, missing, open_page
from test_cli import photo

from ttreg.cli import main
from ttreg.cli_common import resolve_model
from ttreg.data import resolve_images
from ttreg.files import OutputPathError
from ttreg.html_report import Page, robust_range
from ttreg.registers import test_time_registers
from ttreg.inspection import inspect_images
from ttreg.register_neurons import RegisterNeurons
from ttreg.tracing import trace

PLANTED = [(1, 7), (3, 21)]   # what ttreg.testing.planted_vit plants (test_cli finds exactly these)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A page for two images of the planted tiny ViT (8 x 8 patches, 6 blocks, 4 heads), one
    per forward pass."""
    d = tmp_path_factory.mktemp("html")
    paths = []
    for i in range(2):
        photo(size=(64, 64), seed=i).save(d / f"img{i}.png")
        paths.append(str(d / f"img{i}.png"))
    model, tf, _ = resolve_model("planted")
    rn = RegisterNeurons(PLANTED, scores=[2.5, 1.25], statistics={"emergence_layer": 3})
    src = resolve_images(paths)
    page = Page(d / "page.html", neuron_source="planted by hand", caption="synthetic test model")
    results, written = inspect_images(model, tf, src, rn, d / "figs", page=page, batch_size=1,
                                      model_name="planted")
    x = torch.stack([tf(src.image(i)) for i in range(len(src))])
    plain = trace(model, x, attention=True, neurons=PLANTED)
    with test_time_registers(model, rn, num_registers=1, check=False):
        reg = trace(model, x, attention=True, neurons=PLANTED)
    return {"dir": d, "page": page, "results": results, "written": written, "plain": plain,
            "reg": reg, "json": json.loads((d / "figs" / "inspect.json").read_text())}


def _data(path):
    text = path.read_text()
    blob = re.search(r'<script type="application/json" id="ttreg-data">(.*?)</script>', text, re.S).group(1)
    return text, json.loads(blob)


def _floats(b64, *shape):
    return np.frombuffer(base64.b64decode(b64), dtype="<f4").reshape(shape)


def _fmt(v):   # the page's number format
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}"


def test_page_data_match_inspect_json(built):
    text, data = _data(built["dir"] / "page.html")
    assert built["written"][-1] == built["dir"] / "page.html"
    assert len(built["page"]) == 2 and built["page"].bytes == len(text.encode())
    # self-contained: no address, stylesheet or script file to fetch
    assert not re.search(r"https?://|<link|<script[^>]+src=|@import|url\(", text)
    assert data["grid"] == [8, 8] and data["num_layers"] == 6 and data["num_heads"] == 4
    assert data["neurons"] == [list(n) for n in PLANTED] and data["neuron_scores"] == [2.5, 1.25]
    assert data["emergence_layer"] == 3 and data["detection_layer"] == 5
    assert data["summary"]["source"] == "planted by hand" and data["summary"]["by_layer"] == {"1": 1, "3": 1}
    det = data["detection_layer"]
    for i, (im, ref) in enumerate(zip(data["images"], built["json"]["images"])):
        assert im["name"] == ref["image"] and im["plain"]["norm_ratio"] == ref["plain"]["norm_ratio"]
        for arm, tr in (("plain", built["plain"]), ("registers", built["reg"])):
            a = im["arrays"][arm]
            norms = _floats(a["norms"], 6, 64)
            # the map the page draws at the detection layer is inspect.json's, value for value
            assert norms[det].reshape(8, 8).tolist() == ref[arm]["norm_map"]
            assert norms.max(-1).tolist() == ref[arm]["max_patch_norm"]
            att = _floats(a["attention"], 6, 5, 64)
            to_reg = _floats(a["attention_register"], 6, 5)
            for l in range(6):   # the first token's attention of every block and head, + the mean
                cls = tr.cls_attention(l)[i].reshape(4, 64)
                np.testing.assert_allclose(att[l, :4], cls.numpy(), rtol=1e-5, atol=1e-7)
                np.testing.assert_allclose(att[l, 4], cls.mean(0).numpy(), rtol=1e-5, atol=1e-7)
                want = tr.attention[l][i, :, 0, -1] if arm == "registers" else torch.zeros(4)
                np.testing.assert_allclose(to_reg[l, :4], want.numpy(), rtol=1e-5, atol=1e-7)
        # test-time registers take the neurons' activation off every patch and onto the register
        acts = _floats(im["arrays"]["registers"]["activations"], 2, 64)
        assert (acts == 0).all() and (_floats(im["arrays"]["plain"]["activations"], 2, 64) != 0).any()
        assert _floats(im["arrays"]["registers"]["register_norms"], 6, 1)[:, 0].tolist() == \
            ref["registers"]["register_norm"]
        assert im["arrays"]["image"].startswith("data:image/png;base64,")


def test_robust_range_leaves_outliers_out():
    v = torch.cat([torch.linspace(1, 2, 63), torch.tensor([50.0])])
    # 50 is above mean + 3 std (and 2x the median): the scale stops at 2, the largest other value
    assert robust_range(v[None]).tolist() == [[1.0, 2.0]]
    assert robust_range(v[None], from_zero=True).tolist() == [[0.0, 2.0]]
    # no outlier: the whole range; a constant map gets an upper end just above its value
    assert robust_range(torch.linspace(1, 2, 64)[None]).tolist() == [[1.0, 2.0]]
    lo, hi = robust_range(torch.zeros(2, 3, 10), from_zero=True)[1, 2].tolist()
    assert lo == 0 and 0 < hi <= 1e-6


def test_page_scales_shared_by_both_conditions(built):
    _, data = _data(built["dir"] / "page.html")
    im = data["images"][0]
    det = data["detection_layer"]
    both = np.concatenate([_floats(im["arrays"][a]["norms"], 6, 64)[det] for a in ("plain", "registers")])
    lo, hi = im["arrays"]["scale"]["norms"][det]
    assert lo == pytest.approx(both.min()) and hi < both.max()
    # above the scale: exactly the plain model's outlier tokens (norm above ttreg's auto threshold)
    above = both > hi
    assert above.sum() >= 1 and above[64:].sum() == 0
    plain = both[:64]
    assert (plain[above[:64]] > plain.mean() + 3 * plain.std(ddof=1)).all()


def test_page_write_failure_leaves_no_file(tmp_path):
    model, tf, _ = resolve_model("planted")
    photo(size=(64, 64)).save(tmp_path / "a.png")
    (tmp_path / "taken.html").mkdir()   # a folder where the page should go
    with pytest.raises(OutputPathError):
        inspect_images(model, tf, resolve_images([str(tmp_path / "a.png")]), RegisterNeurons(PLANTED),
                       tmp_path / "figs", page=Page(tmp_path / "taken.html"))
    assert not (tmp_path / "figs").exists() and list((tmp_path / "taken.html").iterdir()) == []


def test_cli_html(tmp_path, capsys):
    photo(size=(64, 64)).save(tmp_path / "a.png")
    RegisterNeurons(PLANTED).save(tmp_path / "n.json")
    base = ["inspect", "--model", "planted", "--neurons", str(tmp_path / "n.json"), "--quiet"]
    assert main(base + ["--out", str(tmp_path / "o"), "--html", str(tmp_path / "x.png"),
                        str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert "give a file name ending in .html" in err and "\n" not in err
    assert not (tmp_path / "o").exists()
    assert main(base + ["--out", str(tmp_path / "o"), str(tmp_path / "a.png"), "--html"]) == 0
    out = capsys.readouterr().out
    page = tmp_path / "o" / "inspect.html"
    assert f"wrote 3 figures and inspect.json" in out and f"wrote {page} (1 images," in out
    _, data = _data(page)
    assert data["caption"].startswith("synthetic model: a tiny timm ViT") and data["summary"]["source"] == str(tmp_path / "n.json")


# --- in a real browser ---------------------------------------------------------------------------

needs_browser = pytest.mark.skipif(missing() is not None, reason=f"no headless browser: {missing()}")


def _text(driver, id_):
    return driver.find_element("id", id_).text


def _pixel(driver, canvas, r, c):
    """RGB of a corner of patch (r, c) on a map (the corner: clear of the ring drawn on outliers)."""
    return driver.execute_script(
        "const cv = document.getElementById(arguments[0]), w = cv.width / 8, h = cv.height / 8;"
        "return Array.from(cv.getContext('2d').getImageData(arguments[2] * w + 2, arguments[1] * h + 2, 1, 1).data).slice(0, 3);",
        canvas, r, c)


@needs_browser
def test_page_in_headless_chromium(built):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    ref = built["json"]["images"]
    det = built["json"]["detection_layer"]
    with chromium() as d:
        ms = open_page(d, built["dir"] / "page.html")
        assert ms > 0
        assert _text(d, "image-name") == ref[0]["image"] and "synthetic test model" in _text(d, "caption")
        # plain model at the detection layer: the numbers of inspect.json
        assert _text(d, "ratio") == f"{ref[0]['plain']['norm_ratio'][det]:.2f}"
        assert _text(d, "max") == _fmt(ref[0]["plain"]["max_patch_norm"][det])
        assert _text(d, "median") == _fmt(ref[0]["plain"]["median_patch_norm"][det])
        assert "(detection)" in _text(d, "layer-label")
        m = np.array(ref[0]["plain"]["norm_map"])
        r, c = (int(v) for v in np.unravel_index(m.argmax(), m.shape))
        top = [252, 255, 164]   # the colour map's top: the outlier is drawn in it
        assert _pixel(d, "norm-map", r, c) == top
        # registers on: every view swaps
        d.find_element("css selector", "label.switch").click()
        assert _text(d, "registers-label") == "test-time registers: on"
        assert _text(d, "ratio") == f"{ref[0]['registers']['norm_ratio'][det]:.2f}"
        assert _text(d, "register-norm") == _fmt(ref[0]["registers"]["register_norm"][det])
        assert _pixel(d, "norm-map", r, c) != top
        assert float(_text(d, "att-register")) > 0
        # the layer slider: block 1 (before the outliers emerge at 3)
        slider = d.find_element("id", "layer")
        slider.send_keys(Keys.HOME)
        slider.send_keys(Keys.ARROW_RIGHT)
        assert _text(d, "layer-value") == "1"
        assert _text(d, "ratio") == f"{ref[0]['registers']['norm_ratio'][1]:.2f}"
        d.find_element("css selector", "label.switch").click()   # off again
        assert _text(d, "ratio") == f"{ref[0]['plain']['norm_ratio'][1]:.2f}"
        # a neuron from the list: (3, 21); plain, its largest activation on the patches
        items = d.find_elements("css selector", "#neuron-list li")
        assert [li.text.split(" block")[0] for li in items] == ["(1, 7)", "(3, 21)"]
        assert "score 1.25" in items[1].text
        items[1].click()
        assert _text(d, "neuron-label") == "(3, 21)"
        plain_max = float(built["plain"].activation_map(1)[0].abs().max())
        assert _text(d, "neuron-patch-max") == _fmt(plain_max)
        d.find_element("css selector", "label.switch").click()
        assert _text(d, "neuron-patch-max") == "0.00"
        reg_val = float(built["reg"].activations[0, 1, -1])
        assert _text(d, "neuron-register") == _fmt(reg_val)
        # hover the outlier patch at the detection layer: its row, column, norm and rank 1
        slider.send_keys(Keys.END)
        d.find_element("css selector", "label.switch").click()   # plain
        cv = d.find_element("id", "norm-map")
        size = cv.size
        ActionChains(d).move_to_element_with_offset(
            cv, int((c + 0.5) * size["width"] / 8 - size["width"] / 2),
            int((r + 0.5) * size["height"] / 8 - size["height"] / 2)).perform()
        hover = _text(d, "hover")
        assert f"patch row {r}, column {c}: norm {_fmt(m.max())} after block {det}, rank 1 of 64" in hover
        # another image from the strip
        d.find_elements("css selector", "#thumbs img")[1].click()
        assert _text(d, "image-name") == ref[1]["image"]
        assert _text(d, "ratio") == f"{ref[1]['plain']['norm_ratio'][det]:.2f}"
        assert console_errors(d) == []


@needs_browser
def test_page_without_register_neurons(tmp_path):
    """A model that needs no registers: the switch is disabled, both conditions are the plain
    model, no neuron view, and the page still draws without a console error."""
    model, tf, _ = resolve_model("planted")
    photo(size=(64, 64)).save(tmp_path / "a.png")
    page = Page(tmp_path / "p.html")
    results, _ = inspect_images(model, tf, resolve_images([str(tmp_path / "a.png")]), RegisterNeurons([]),
                                tmp_path / "figs", page=page)
    _, data = _data(page.path)
    assert data["num_registers"] == 0 and data["neurons"] == [] and data["summary"]["count"] == 0
    assert "activations" not in data["images"][0]["arrays"]["plain"]
    with chromium() as d:
        open_page(d, page.path)
        assert d.find_element("id", "registers").get_attribute("disabled") == "true"
        assert not d.find_element("id", "neuron-view").is_displayed()
        assert _text(d, "ratio") == f"{results['images'][0]['plain']['norm_ratio'][-1]:.2f}"
        assert console_errors(d) == []
