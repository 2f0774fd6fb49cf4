"""Adapter for ``peft`` models (a LoRA or other adapter injected into a supported ViT): the
registers go into the base model, whose blocks now hold the injected layers. The neuron sites
stay the inputs of the MLP down-projections (a LoRA-wrapped ``fc2`` takes the same input), so a
neuron set keeps its meaning; the fingerprint is the base model's *with* the injected weights,
which differs from the model the set was found on (install with ``check=False`` while training,
and check the set on the trained model afterwards: README, "Fine-tuning with registers").
peft is never imported to recognise a model; the class is matched by name along its MRO."""
from __future__ import annotations

import torch.nn as nn

from .base import DelegatingAdapter


class PeftAdapter(DelegatingAdapter):
    """A ``peft.PeftModel`` through the model it wraps (``get_base_model()``)."""

    family = "peft"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return any(c.__name__ == "PeftModel" and c.__module__.startswith("peft.") for c in type(model).__mro__)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        from . import wrap
        self.inner = wrap(model.get_base_model())

    def describe(self) -> str:
        return f"peft {type(self.model).__name__} around {self.inner.describe()}"


__all__ = ["PeftAdapter"]
