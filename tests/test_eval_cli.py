"""The ``eval`` sub-commands: parser wiring, neuron files, errors as one line, and the
``ttreg eval ...`` entry point of the main command line."""
import argparse
import json

import pytest

from ttreg.eval.cli import add_eval_parsers, main
from ttreg.testing import write_image_folder, write_voc

COMMANDS = ("outliers", "lost", "probe", "zeroshot", "typographic")


def test_add_eval_parsers_adds_five_commands_with_func():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("eval")
    add_eval_parsers(ev.add_subparsers(dest="eval_cmd", required=True))
    for cmd in COMMANDS:
        extra = {"outliers": ["--images", "x"], "lost": ["--voc", "x"], "probe": ["--task", "depth", "--data", "x"],
                 "zeroshot": ["--data", "x"], "typographic": ["--data", "x"]}[cmd]
        args = parser.parse_args(["eval", cmd, "--model", "planted", *extra])
        assert callable(args.func) and args.neurons == "auto" and args.out is None


def test_neuron_file(tmp_path):
    import ttreg
    from ttreg.testing import mixed_images, planted_vit
    model = planted_vit()
    rn = ttreg.find_register_neurons(model, mixed_images(8), top_k=2)
    rn.save(tmp_path / "n.json")
    write_image_folder(tmp_path / "imgs", per_class=1)
    out = tmp_path / "o.json"
    assert main(["outliers", "--model", "planted", "--images", str(tmp_path / "imgs"), "--neurons",
                 str(tmp_path / "n.json"), "--controls", "0", "--quiet", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["neurons"] == [list(p) for p in rn.neurons]
    assert res["arms"]["registers"]["fraction_with_outliers"] == 0.0


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    write_voc(tmp_path / "voc", n=1)
    assert main(["lost", "--model", "planted", "--quiet"]) == 2
    assert "give one of --voc" in capsys.readouterr().err
    assert main(["lost", "--model", "planted", "--voc", str(tmp_path / "voc"), "--neurons",
                 str(tmp_path / "missing.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no neuron file" in err and err.count("\n") == 1
    assert main(["lost", "--model", "planted", "--voc", str(tmp_path / "nothing"), "--quiet"]) == 2
    assert "not a VOC folder" in capsys.readouterr().err
    assert main(["typographic", "--model", "planted", "--data", str(tmp_path), "--quiet"]) == 2
    assert "needs a CLIP model" in capsys.readouterr().err


def test_ttreg_eval_entry_point(tmp_path):
    cli = pytest.importorskip("ttreg.cli")
    write_voc(tmp_path / "voc", n=2)
    out = tmp_path / "lost.json"
    rc = cli.main(["eval", "lost", "--model", "planted", "--voc", str(tmp_path / "voc"),
                   "--top-k", "2", "--controls", "0", "--quiet", "--out", str(out)])
    assert rc == 0 and json.loads(out.read_text())["arms"]["plain"]["images"] == 2
