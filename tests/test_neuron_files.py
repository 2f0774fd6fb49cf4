"""Neuron files (:class:`ttreg.RegisterNeurons` as JSON): a saved set loads back equal, and a set
found on one model is refused on a model with another architecture or other weights."""
import json

import pytest

import ttreg
from ttreg.testing import planted_vit

from conftest import all_hooks


def test_neuron_file_round_trip(tmp_path, planted, images):
    rn = ttreg.find_register_neurons(planted, images, top_k=2)
    path = rn.save(tmp_path / "n.json")
    data = json.loads(path.read_text())
    assert data["format"] == "ttreg.register_neurons" and len(data["neurons"]) == 2
    back = ttreg.RegisterNeurons.load(path)
    assert back == rn
    assert [p.name for p in tmp_path.iterdir()] == ["n.json"]  # no temp files left
    back.check_model(planted)


def test_neuron_file_for_another_model_is_refused(planted, images):
    rn = ttreg.find_register_neurons(planted, images, top_k=2)
    other_arch = planted_vit(depth=6, embed_dim=128)
    with pytest.raises(ttreg.ModelMismatchError, match="another architecture"):
        ttreg.add_test_time_registers(other_arch, rn)
    other_weights = planted_vit(seed=1)
    with pytest.raises(ttreg.ModelMismatchError, match="other weights"):
        ttreg.add_test_time_registers(other_weights, rn)
    ttreg.add_test_time_registers(other_weights, rn, check=False).remove()
    assert all_hooks(other_weights) == 0

