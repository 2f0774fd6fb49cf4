"""The arms every experiment compares: the plain model, test-time registers, and controls.

* ``plain``: the model as it is.
* ``registers``: the register neurons moved into ``num_registers`` appended tokens (or, for the
  typographic attack, shifted onto chosen patches with ``shift_to``).
* ``random-<seed>``: the *same* edit applied to random neurons drawn from the same layers, with
  the same count per layer (the register neurons themselves excluded) -- the negative control.
* ``bias``: the attention-bias form of the same neurons (the rebuttal's: a fitted key and value
  per head appended to every attention, the neurons still zeroed, no token), fitted on the
  search images with :func:`ttreg.fit_attention_bias`.
* ``zeroed``: the register neurons set to 0 on every token, nothing appended
  (:func:`ttreg.zero_neurons`; the paper's "register neurons zeroed" ablation).
* ``random-zeroed-<seed>``: random neurons from the same layers, same per-layer counts, zeroed
  (the paper's "random neurons zeroed" control).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Sequence

import torch

from ..adapters import wrap
from ..registers import test_time_registers, zero_neurons
from ..register_neurons import RegisterNeurons, as_register_neurons

#: arm kinds; the two random kinds are summarised over their draws
KINDS = ("plain", "registers", "bias", "random", "zeroed", "random-zeroed")


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
    """One condition of an experiment; ``kind`` is one of :data:`KINDS`."""

    name: str
    kind: str
    neurons: RegisterNeurons | None = None
    seed: int | None = None
    num_registers: int = 1
    preset: str = "paper"
    bias: Any = None                 # the AttentionBias of a ``bias`` arm

    @property
    def zeroes(self) -> bool:
        return self.kind in ("zeroed", "random-zeroed")

    def context(self, model, shift_to=None) -> ContextManager[Any]:
        """The edit as a context manager (nothing for ``plain``). With ``shift_to`` (patch
        indices or a ``(B, num_patches)`` bool mask) the values go to those patches instead of
        appended registers; zeroing arms ignore it (they move nothing)."""
        if self.kind == "plain" or self.neurons is None:
            return contextlib.nullcontext()
        check = self.kind in ("registers", "zeroed", "bias")
        if self.zeroes:
            return zero_neurons(model, self.neurons, check=check)
        if self.kind == "bias":
            return test_time_registers(model, self.neurons, preset=self.preset, check=check,
                                       form="bias", bias=self.bias)
        if shift_to is not None:
            return test_time_registers(model, self.neurons, num_registers=0, preset=self.preset,
                                       shift_to=shift_to, check=check)
        return test_time_registers(model, self.neurons, num_registers=self.num_registers,
                                   preset=self.preset, check=check)

    def key(self) -> str:
        """What distinguishes this arm's outputs (for feature caches)."""
        if self.kind == "plain":
            return "plain"
        neurons = sorted(self.neurons.neurons) if self.neurons is not None else []
        if self.zeroes:
            return f"zeroed|{neurons}"
        if self.kind == "bias":
            import hashlib
            digest = hashlib.sha256(self.bias.key.numpy().tobytes() + self.bias.value.numpy().tobytes())
            return f"bias|{self.preset}|{neurons}|{digest.hexdigest()[:16]}"
        return f"{self.kind}|R={self.num_registers}|{self.preset}|{neurons}"

    def describe(self) -> dict[str, Any]:
        edits = self.kind in ("registers", "random", "bias")
        return {"name": self.name, "kind": self.kind, "seed": self.seed,
                "num_registers": self.num_registers if edits and self.kind != "bias" else 0,
                "preset": self.preset if edits else None,
                **({"bias_images": self.bias.num_images, "bias_fitted_with": self.bias.num_registers}
                   if self.kind == "bias" else {}),
                "neurons": [list(p) for p in self.neurons] if self.neurons is not None else []}


def make_arms(model, neurons, *, control_seeds: Sequence[int] = (0, 1, 2),
              num_registers: int | Sequence[int] = 1, preset: str = "paper", plain: bool = True,
              random: bool = True, zeroed: bool = False, random_zeroed: bool | None = None,
              bias=None) -> list[Arm]:
    """``[plain, registers, random-<s>...]`` and, with ``zeroed``, ``[zeroed,
    random-zeroed-<s>...]`` after them (``s`` in ``control_seeds``; ``random_zeroed`` defaults
    to ``zeroed``). No random or zeroed arm when the set is empty (nothing to match or zero).

    ``num_registers`` a list of counts (the number-of-registers ablation): ``[plain,
    registers-R<n>...]``, one arm per count ``n`` >= 1 in order (count 0 is the plain arm), and
    no controls (their draws would mix counts).

    ``bias`` (an :class:`~ttreg.AttentionBias` of these neurons): a ``bias`` arm right after
    ``registers`` (the attention-bias form beside the token form)."""
    rn = as_register_neurons(neurons)
    if not isinstance(num_registers, int):
        counts = [int(n) for n in num_registers]
        if not counts or min(counts) < 0:
            raise ValueError(f"num_registers must be counts >= 0, got {list(num_registers)}")
        return [Arm("plain", "plain")] + [Arm(f"registers-R{n}", "registers", rn, None, n, preset)
                                          for n in dict.fromkeys(counts) if n > 0] + (
            [Arm("bias", "bias", rn, None, 1, preset, bias)] if bias is not None else [])
    arms = [Arm("plain", "plain")] if plain else []
    arms.append(Arm("registers", "registers", rn, None, num_registers, preset))
    if bias is not None:
        arms.append(Arm("bias", "bias", rn, None, num_registers, preset, bias))
    if not len(rn):
        return arms
    draws = {int(s): random_neurons(rn, model, s) for s in control_seeds}
    if random:
        arms += [Arm(f"random-{s}", "random", r, s, num_registers, preset) for s, r in draws.items()]
    if zeroed:
        arms.append(Arm("zeroed", "zeroed", rn))
    if zeroed if random_zeroed is None else random_zeroed:
        arms += [Arm(f"random-zeroed-{s}", "random-zeroed", r, s) for s, r in draws.items()]
    return arms


def arms_of(arms: Sequence[Arm], kind: str) -> list[Arm]:
    return [a for a in arms if a.kind == kind]


def summarize_draws(per_arm: dict[str, dict[str, Any]], keys: Sequence[str],
                    kind: str = "random") -> dict[str, Any] | None:
    """Mean ± 95% CI over the arms of ``kind`` (``random`` or ``random-zeroed``) for each metric
    in ``keys``; None if there are none. Arms are recognised by their ``setup.kind``."""
    from .report import mean_ci
    rand = [v for v in per_arm.values() if (v.get("setup") or {}).get("kind") == kind]
    if not rand:
        return None
    return {k: mean_ci([r[k] for r in rand]) for k in keys if all(r.get(k) is not None for r in rand)}


def summarize_random(per_arm: dict[str, dict[str, Any]], keys: Sequence[str]) -> dict[str, Any] | None:
    """:func:`summarize_draws` over the ``random`` arms."""
    return summarize_draws(per_arm, keys, "random")


def control_rows(result: dict[str, Any], first: str = "images") -> list[dict[str, Any]]:
    """Table rows: every single arm (draws left out) and one summary row per random kind."""
    from .report import draws
    arms = result["arms"]
    single = [{"arm": k, **v} for k, v in arms.items()
              if (v.get("setup") or {}).get("kind") not in ("random", "random-zeroed", "random-values")]
    rows = []
    for r in single:
        r.setdefault("preset", (r.get("setup") or {}).get("preset") or "-")
        rows.append(r)
        kind = (r.get("setup") or {}).get("kind")
        follow = {"registers": [("random", "random")],
                  "zeroed": [("random_zeroed", "random zeroed"), ("random_values", "random values")]}
        for key, label in follow.get(kind, []):
            if result.get(key):
                rows.append({"arm": f"{label} ({draws(result)})", first: r.get(first),
                             "preset": r["preset"], **result[key]})
    return rows


def resolve_neurons(model, neurons, images=None, **options) -> RegisterNeurons:
    """``neurons`` as a :class:`RegisterNeurons`: a set, a dict/pairs, a JSON path, or ``"auto"``
    (:func:`ttreg.calibrate` on ``images``, with the held-out check; ``options`` go to it). The
    set's ``note`` says what the check measured (and when it was in-sample)."""
    if isinstance(neurons, str) and neurons == "auto":
        if images is None:
            raise ValueError("neurons='auto' needs images to calibrate on")
        import warnings
        from ..calibration import calibrate
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # the note says the same
            return calibrate(model, images, **options).neurons
    return as_register_neurons(neurons)
