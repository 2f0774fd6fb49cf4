"""``ttreg eval attribution`` on a tiny planted LLaVA whose language model reads the tower's
outlier patch (``ttreg.testing.vlm``), with boxes around the planted marker (so the right answer
is known): the plain maps point at the marker and put nearly all their mass in its box; test-time
registers, zeroing the neurons and the bias form take the outlier away, and the maps with it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ttreg
from ttreg.testing import vlm as testing_vlm
from ttreg.eval.attribution import box_coverage, evaluate_attribution, localisation
from ttreg.eval.cli import box_samples

pytest.importorskip("transformers")

NEURONS = [(1, 7), (2, 21)]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model, proc, x, marked = testing_vlm.planted_vlm("llava", images=6)
    root = tmp_path_factory.mktemp("voc")
    testing_vlm.write_marker_voc(root, model, x, marked)
    return model, proc, x, marked, root


def test_localisation_scores_by_hand():
    heat = torch.zeros(4, 4)
    heat[1, 2] = 3.0
    heat[3, 0] = 1.0
    box = np.array([[40, 20, 60, 40]])                       # on an 80 x 80 image: cell (1, 2) exactly
    got = localisation(heat, box, (80, 80))
    assert got == {"pointing": 1.0, "energy": 0.75}
    cover = box_coverage(np.array([[0, 0, 30, 20]]), (80, 80), (4, 4))
    assert cover[0, 0] == 1 and float(cover[0, 1]) == pytest.approx(0.5) and cover[1:].sum() == 0


def test_pointing_and_energy_plain_vs_registers(planted):
    model, proc, x, marked, root = planted
    samples = box_samples(str(root))
    assert [s.labels for s in samples] == [("marker",)] * 6
    bias = ttreg.fit_attention_bias(model, NEURONS, x)
    r = evaluate_attribution(model, proc, samples, NEURONS, bias=bias, resamples=200, print_table=False)
    arms = r["arms"]
    assert list(arms) == ["plain", "registers", "bias", "zeroed"]
    assert arms["plain"]["pointing"]["mean"] == 1.0
    assert arms["plain"]["energy"]["mean"] > 0.99
    assert arms["plain"]["outlier_share"]["mean"] > 0.99
    for arm in ("registers", "zeroed", "bias"):
        assert arms[arm]["energy"]["mean"] < 0.1                     # about one patch of 36
        assert arms[arm]["outlier_share"]["mean"] < 0.1
        d = r["differences_to_plain"][arm]["energy"]
        assert d["ci95"][1] < -0.8                                     # the whole interval below
    lo, hi = arms["registers"]["energy"]["ci95"]
    assert lo <= arms["registers"]["energy"]["mean"] <= hi
    assert r["config"]["pairs"] == 6 and r["neurons"] == [list(n) for n in NEURONS]
    assert r["random"] is None and r["config"]["control_seeds"] == []


def test_random_neuron_controls_keep_the_artifact(planted):
    """The control: the same edit on as many random neurons of the same layers leaves the
    planted outlier, so its maps stay on it; summarised over the draws with intervals."""
    model, proc, x, marked, root = planted
    samples = box_samples(str(root))
    r = evaluate_attribution(model, proc, samples, NEURONS, control_seeds=(0, 1), resamples=200,
                             print_table=False)
    arms = r["arms"]
    assert list(arms) == ["plain", "registers", "random-0", "random-1", "zeroed"]
    for s in (0, 1):
        setup = arms[f"random-{s}"]["setup"]
        assert setup["kind"] == "random" and setup["seed"] == s
        got = sorted(setup["neurons"])
        assert [l for l, _ in got] == [1, 2] and not set(map(tuple, got)) & set(NEURONS)
        assert arms[f"random-{s}"]["energy"]["mean"] > 0.99
        assert arms[f"random-{s}"]["outlier_share"]["mean"] > 0.99
    ctrl = r["random"]
    assert ctrl["energy"]["mean"] == pytest.approx(np.mean([arms[f"random-{s}"]["energy"]["mean"]
                                                            for s in (0, 1)]))
    assert ctrl["energy"]["ci95"][0] > 0.99 and ctrl["draws"]["energy"]["n"] == 2
    assert ctrl["draws"]["energy"]["values"] == [arms[f"random-{s}"]["energy"]["mean"] for s in (0, 1)]
    d = r["differences_to_plain"]
    assert abs(d["random"]["energy"]["mean"]) < 0.01 and d["registers"]["energy"]["ci95"][1] < -0.8
    assert r["config"]["control_seeds"] == [0, 1]
    from ttreg.eval.attribution import table
    text = table(r)
    assert "random (2 draws)" in text and "random-0" not in text


def test_eval_attribution_command(planted, tmp_path, capsys):
    model, proc, x, marked, root = planted
    folder = tmp_path / "tiny-llava"
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    rn = ttreg.RegisterNeurons(NEURONS)
    rn.save(tmp_path / "n.json")
    out = tmp_path / "r.json"
    from ttreg.cli import main
    assert main(["eval", "attribution", "--model", f"hf:{folder}", "--data", str(root), "--neurons",
                 str(tmp_path / "n.json"), "--bias-images", "0", "--bootstrap", "100", "--out", str(out),
                 "--controls", "1", "--quiet"]) == 0
    got = json.loads(out.read_text())
    assert list(got["arms"]) == ["plain", "registers", "random-0", "zeroed"]
    assert got["config"]["control_seeds"] == [0] and got["random"]["energy"]["mean"] > 0.99
    assert got["arms"]["plain"]["pointing"]["mean"] == 1.0
    assert got["arms"]["registers"]["energy"]["mean"] < 0.1
    assert "pointing game" in capsys.readouterr().out
    assert main(["eval", "attribution", "--model", f"hf:{folder}", "--data", str(tmp_path),
                 "--neurons", str(tmp_path / "n.json")]) == 2
    assert "VOC folder" in capsys.readouterr().err


@pytest.mark.parametrize("family, energy", [("paligemma", 0.99), ("internvl", 0.24)])
def test_other_families_score_the_same_way(tmp_path, family, energy):
    """PaliGemma (one token a patch) and InternVL (one token a 2x2 block: the marker's box holds
    a quarter of its token's area) through the whole evaluation, real processors included."""
    model, proc, x, marked = testing_vlm.planted_vlm(family, images=3)
    testing_vlm.write_marker_voc(tmp_path, model, x, marked)
    r = evaluate_attribution(model, proc, box_samples(str(tmp_path)), NEURONS, resamples=100,
                             print_table=False)
    arms = r["arms"]
    assert arms["plain"]["outlier_share"]["mean"] > 0.99
    assert arms["plain"]["energy"]["mean"] > energy and arms["plain"]["energy"]["mean"] < 1.0 + 1e-6
    assert arms["registers"]["outlier_share"]["mean"] < 0.15
    assert arms["registers"]["energy"]["mean"] < 0.1
