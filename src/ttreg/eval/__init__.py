"""The paper's experiments, each comparing the plain model with test-time registers in one run.

One module per experiment, each following the reference code its docstring names:
:mod:`.outliers` (outlier and attention statistics), :mod:`.lost` (unsupervised object
discovery, CorLoc; valeoai/LOST), :mod:`.probe` (linear probes: classification, segmentation,
depth; DINOv2's protocol), :mod:`.zeroshot` (CLIP zero-shot classification and segmentation;
Chefer et al.'s metrics, Gandelsman et al.'s heat map in :mod:`.direct`) and :mod:`.typographic`
(typographic attacks) and :mod:`.attribution` (a VLM's text-to-image attribution: pointing
game, energy in box). Shared pieces: :mod:`.arms` (plain / test-time registers / random-neuron
control / register neurons zeroed / random neurons zeroed), :mod:`.backbone` (what each model
family exposes), :mod:`.metrics`, :mod:`.datasets`, :mod:`.report`; :mod:`.cli` adds ``ttreg eval ...``.
Tiny models and data sets in the real layouts, for tests and trying things out, are in
:mod:`ttreg.testing` (``planted_clip``, ``write_voc``, ...).

Every ``evaluate_*`` function returns a JSON-able dict and can print a table
(:func:`ttreg.eval.report.format_table`). Modules import lazily, so ``import ttreg.eval`` is cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate_outliers": "outliers",
    "evaluate_lost": "lost",
    "evaluate_probe": "probe",
    "evaluate_zeroshot": "zeroshot",
    "evaluate_zeroshot_segmentation": "zeroshot",
    "evaluate_typographic": "typographic",
    "evaluate_attribution": "attribution",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)
