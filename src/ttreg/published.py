"""Published register-neuron sets shipped with ttreg, loadable by name.

``RegisterNeurons.from_name("dinov2_vitl14")`` -- the authors' 45 neurons of DINOv2 ViT-L/14
(layers 12-17), valid on ``timm:vit_large_patch14_dinov2.lvd142m`` and
``hf:facebook/dinov2-large``. Each file records its provenance.
"""
from __future__ import annotations

import json
from importlib import resources

NAMES = {
    "dinov2_vitl14": "dinov2_vitl14.json",
}
ALIASES = {"dinov2_large": "dinov2_vitl14", "dinov2-vitl14": "dinov2_vitl14",
           "vit_large_patch14_dinov2": "dinov2_vitl14", "facebook/dinov2-large": "dinov2_vitl14"}


def published_data(name: str) -> dict:
    """The neuron file (as a dict) of the published set ``name``; ``RegisterNeurons.from_name``
    reads it."""
    key = ALIASES.get(name, name)
    if key not in NAMES:
        raise ValueError(f"no published neuron set named {name!r}; known: {', '.join(NAMES)}")
    return json.loads(resources.files("ttreg").joinpath("resources", NAMES[key]).read_text())


def is_published(name: str) -> bool:
    return ALIASES.get(name, name) in NAMES
