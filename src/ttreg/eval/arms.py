"""The arms every experiment compares: the plain model, test-time registers, and a control.

* ``plain``: the model as it is.
* ``registers``: the register neurons moved into ``num_registers`` appended tokens (or, for the
  typographic attack, shifted onto chosen patches with ``shift_to``).
* ``random-<seed>``: the *same* edit applied to random neurons drawn from the same layers, with
  the same count per layer (the register neurons themselves excluded) -- the negative control.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Sequence

import torch

from ..adapters import wrap
from ..registers import test_time_registers
from ..spec import RegisterNeurons, as_register_neurons


def random_neurons(neurons: RegisterNeurons, model, seed: int) -> RegisterNeurons:
    """Random neurons with the same per-layer counts as ``neurons``, none of them a register
    neuron; reproducible from ``seed``."""
    ad = wrap(model)
    g = torch.Generator().manual_seed(int(seed))
    pairs: list[tuple[int, int]] = []
    for layer, idx in neurons.by_layer().items():
        width = ad.mlp_width(layer)
        taken = torch.zeros(width, dtype=torch.bool)
        taken[torch.as_tensor(idx)] = True
        free = (~taken).nonzero().flatten()
        if len(free) < len(idx):
            raise ValueError(f"layer {layer} has too few neurons for a random control")
        pick = free[torch.randperm(len(free), generator=g)[: len(idx)]]
        pairs += [(layer, int(n)) for n in pick.sort().values]
    return RegisterNeurons(pairs, provenance={"source": "random control", "seed": int(seed),
                                              "matches": len(neurons)})


@dataclass
class Arm:
    """One condition of an experiment. ``kind``: ``plain``, ``registers`` or ``random``."""

    name: str
    kind: str
    neurons: RegisterNeurons | None = None
    seed: int | None = None
    num_registers: int = 1
    preset: str = "paper"

    def context(self, model, shift_to=None) -> ContextManager[Any]:
        """The edit as a context manager (nothing for ``plain``). With ``shift_to`` (patch
        indices or a ``(B, num_patches)`` bool mask) the values go to those patches instead of
        appended registers."""
        if self.kind == "plain" or self.neurons is None:
            return contextlib.nullcontext()
        if shift_to is not None:
            return test_time_registers(model, self.neurons, num_registers=0, preset=self.preset,
                                       shift_to=shift_to, check=self.kind == "registers")
        return test_time_registers(model, self.neurons, num_registers=self.num_registers,
                                   preset=self.preset, check=self.kind == "registers")

    def key(self) -> str:
        """What distinguishes this arm's outputs (for feature caches)."""
        if self.kind == "plain":
            return "plain"
        return (f"{self.kind}|R={self.num_registers}|{self.preset}|"
                f"{sorted(self.neurons.neurons) if self.neurons is not None else []}")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "seed": self.seed,
                "num_registers": self.num_registers if self.kind != "plain" else 0,
                "preset": self.preset if self.kind != "plain" else None,
                "neurons": [list(p) for p in self.neurons] if self.neurons is not None else []}


def make_arms(model, neurons, *, control_seeds: Sequence[int] = (0, 1, 2), num_registers: int = 1,
              preset: str = "paper", plain: bool = True) -> list[Arm]:
    """``[plain, registers, random-<s> for s in control_seeds]``; no random arm when the set is
    empty (there is nothing to match)."""
    rn = as_register_neurons(neurons)
    arms = [Arm("plain", "plain")] if plain else []
    arms.append(Arm("registers", "registers", rn, None, num_registers, preset))
    if len(rn):
        for s in control_seeds:
            arms.append(Arm(f"random-{s}", "random", random_neurons(rn, model, s), int(s),
                            num_registers, preset))
    return arms


def summarize_random(per_arm: dict[str, dict[str, Any]], keys: Sequence[str]) -> dict[str, Any] | None:
    """Mean ± 95% CI over the ``random-*`` arms for each metric in ``keys`` (None if none)."""
    from .report import mean_ci
    rand = [v for k, v in per_arm.items() if k.startswith("random-")]
    if not rand:
        return None
    return {k: mean_ci([r[k] for r in rand]) for k in keys if all(r.get(k) is not None for r in rand)}


def resolve_neurons(model, neurons, images=None, **search) -> RegisterNeurons:
    """``neurons`` as a :class:`RegisterNeurons`: a set, a dict/pairs, a JSON path, or ``"auto"``
    (search ``images`` with :func:`ttreg.find_register_neurons`; ``search`` goes to it)."""
    if isinstance(neurons, str) and neurons == "auto":
        if images is None:
            raise ValueError("neurons='auto' needs images to search on")
        import warnings
        from ..neurons import find_register_neurons
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return find_register_neurons(model, images, **search)
    return as_register_neurons(neurons)
