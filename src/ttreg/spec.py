"""``RegisterNeurons``: a set of register neurons as plain data, with a JSON file format.

The file is what ``ttreg calibrate`` writes and what anyone can load::

    {
      "format": "ttreg.register_neurons", "version": 1,
      "neurons": [{"layer": 17, "neuron": 884, "score": 12.3}, ...],   # best first
      "hyperparameters": {"threshold": "auto", "detection_layer": -1, ...},
      "num_images": 200, "num_images_with_outliers": 197,
      "fingerprint": {"architecture": {...}, "weights": "9c0e...", "weights_sample": [...]},
      "provenance": {...},          # where the set comes from (calibration run, paper, ...)
      "statistics": {...},          # what the search measured (emergence layer, norm ratios)
      "note": "..."                 # a human sentence, e.g. why the set is empty
    }

The fingerprint ties a set to the model it was found on. ``architecture`` keys that are present
must match the model's; ``weights`` (a hash of the weights) must match unless it is null -- or,
for the same weights cast to another dtype (``.half()``, bfloat16), ``weights_sample`` (64 weight
values at fixed places) must match to within 16-bit rounding.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

FORMAT = "ttreg.register_neurons"
VERSION = 1


class ModelMismatchError(ValueError):
    """A neuron set applied to a model other than the one it was found on."""


@dataclass
class RegisterNeurons:
    """Register neurons ``(layer, neuron)``, best first, with how and where they were found."""

    neurons: list[tuple[int, int]] = field(default_factory=list)
    scores: list[float] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    num_images: int = 0
    num_images_with_outliers: int = 0
    fingerprint: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def __post_init__(self) -> None:
        self.neurons = [(int(l), int(n)) for l, n in self.neurons]
        if self.scores is not None:
            self.scores = [float(s) for s in self.scores]
            if len(self.scores) != len(self.neurons):
                raise ValueError("scores and neurons differ in length")
        if len(set(self.neurons)) != len(self.neurons):
            raise ValueError("a neuron is listed twice")

    # --- views --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.neurons)

    def __iter__(self):
        return iter(self.neurons)

    def by_layer(self) -> dict[int, list[int]]:
        """``{layer: [neuron, ...]}`` in ascending layer order."""
        out: dict[int, list[int]] = {}
        for l, n in self.neurons:
            out.setdefault(l, []).append(n)
        return dict(sorted(out.items()))

    def top(self, k: int) -> "RegisterNeurons":
        """The ``k`` best neurons, everything else kept."""
        d = self.to_dict()
        d["neurons"] = d["neurons"][:k]
        d.setdefault("hyperparameters", {})["top_k"] = k
        return RegisterNeurons.from_dict(d)

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.neurons})

    def __repr__(self) -> str:
        body = ", ".join(f"{l}: {ns}" for l, ns in self.by_layer().items())
        return (f"RegisterNeurons({len(self)} neurons {{{body}}}, "
                f"{self.num_images_with_outliers}/{self.num_images} images with outliers)")

    # --- model checks ---------------------------------------------------------------------
    def check_model(self, model) -> None:
        """Raise :class:`ModelMismatchError` if this set was found on another model."""
        from .adapters import wrap
        ad = wrap(model)
        fp = self.fingerprint or {}
        arch = ad.architecture()
        for key, want in (fp.get("architecture") or {}).items():
            have = arch.get(key)
            if have is not None and _norm(have) != _norm(want):
                raise ModelMismatchError(
                    f"these neurons were found on another architecture ({key}={want!r}, this model "
                    f"has {have!r}); calibrate on this model or pass check=False")
        for l, n in self.neurons:
            if not 0 <= l < ad.num_layers:
                raise ModelMismatchError(
                    f"neuron ({l}, {n}): the model has {ad.num_layers} blocks; "
                    "this neuron set is for another model")
            if not 0 <= n < ad.mlp_width(l):
                raise ModelMismatchError(
                    f"neuron ({l}, {n}): block {l} has {ad.mlp_width(l)} MLP neurons; "
                    "this neuron set is for another model")
        want_w = fp.get("weights")
        if want_w and want_w != ad.weights_hash() and not _same_values(fp.get("weights_sample"), ad):
            raise ModelMismatchError(
                "these neurons were found on the same architecture with other weights "
                f"(fingerprint {want_w} != {ad.weights_hash()}); calibrate on this model "
                "or pass check=False")

    @staticmethod
    def fingerprint_of(model) -> dict[str, Any]:
        from .adapters import wrap
        ad = wrap(model)
        return {"architecture": ad.architecture(), "weights": ad.weights_hash(),
                "weights_sample": ad.weights_sample()}

    # --- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        scores = self.scores or [None] * len(self.neurons)
        return {
            "format": FORMAT,
            "version": VERSION,
            "neurons": [{"layer": l, "neuron": n, "score": s}
                        for (l, n), s in zip(self.neurons, scores)],
            "hyperparameters": self.hyperparameters,
            "num_images": self.num_images,
            "num_images_with_outliers": self.num_images_with_outliers,
            "fingerprint": self.fingerprint,
            "provenance": self.provenance,
            "statistics": self.statistics,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, data: Mapping, model=None) -> "RegisterNeurons":
        """Build from a file's dict, or from a plain ``{layer: [neuron, ...]}`` mapping.

        With ``model``, a plain mapping is fingerprinted to that model (so applying it to
        another model is caught) and checked against its size.
        """
        if "neurons" in data and "format" in data:
            if data.get("format") != FORMAT:
                raise ValueError(f"not a ttreg register-neuron file (format {data.get('format')!r})")
            rows = data["neurons"]
            scores = [r.get("score") for r in rows]
            rn = cls(
                neurons=[(r["layer"], r["neuron"]) for r in rows],
                scores=None if any(s is None for s in scores) else scores,
                hyperparameters=dict(data.get("hyperparameters") or {}),
                num_images=int(data.get("num_images") or 0),
                num_images_with_outliers=int(data.get("num_images_with_outliers") or 0),
                fingerprint=data.get("fingerprint"),
                provenance=dict(data.get("provenance") or {}),
                statistics=dict(data.get("statistics") or {}),
                note=data.get("note") or "",
            )
        else:
            pairs = [(int(l), int(n)) for l, ns in data.items() for n in ns]
            rn = cls(neurons=pairs, provenance={"source": "from_dict"})
        if model is not None:
            if rn.fingerprint is None:
                rn.fingerprint = cls.fingerprint_of(model)
            rn.check_model(model)
        return rn

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file atomically (a temporary file renamed into place)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RegisterNeurons":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no neuron file at {p}")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p} is not a ttreg neuron file (not valid JSON: {e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p} is not a ttreg neuron file")
        return cls.from_dict(data)

    @classmethod
    def from_name(cls, name: str) -> "RegisterNeurons":
        """A published neuron set shipped with ttreg (see ``ttreg.published.NAMES``)."""
        from .published import load_published
        return load_published(name)


def _same_values(sample, adapter) -> bool:
    """Do the model's weights equal the recorded sample up to 16-bit rounding? (The hash is exact,
    so a model cast with ``.half()`` or to bfloat16 is recognised through the sample.)"""
    if not isinstance(sample, list) or not sample:
        return False
    import torch
    have = torch.tensor(adapter.weights_sample(), dtype=torch.float64)
    want = torch.tensor([float(v) for v in sample], dtype=torch.float64)
    if have.shape != want.shape:
        return False
    scale = want.abs().max().clamp_min(1e-12)
    return bool(torch.allclose(have, want, rtol=1e-2, atol=1e-3 * float(scale)))


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def as_register_neurons(neurons, model=None) -> RegisterNeurons:
    """Accept a RegisterNeurons, a ``{layer: [neurons]}`` dict, or ``(layer, neuron)`` pairs."""
    if isinstance(neurons, RegisterNeurons):
        return neurons
    if neurons is None:
        return RegisterNeurons()
    if isinstance(neurons, Mapping):
        return RegisterNeurons.from_dict(neurons)
    if isinstance(neurons, (str, os.PathLike)):
        return RegisterNeurons.load(neurons)
    return RegisterNeurons(neurons=list(neurons))


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


