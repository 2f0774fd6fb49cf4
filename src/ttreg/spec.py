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

Loading validates the schema: every field has the type above (indices are whole numbers >= 0,
not ``1.9`` or ``true``), ``version`` is one this ttreg reads, and a wrong file is a one-line
``ValueError`` that names the field.
"""
from __future__ import annotations

import json
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

FORMAT = "ttreg.register_neurons"
VERSION = 1
#: deepest nesting accepted in the free-form fields (hyperparameters, provenance, statistics)
MAX_DEPTH = 32


class ModelMismatchError(ValueError):
    """A neuron set applied to a model other than the one it was found on.

    ``reason`` says what differs and ``found_for`` names the model the set was found for;
    ``str(err)`` is the Python advice (``check=False``), :attr:`cli_message` the command line's.
    """

    def __init__(self, reason: str, found_for: str | None = None) -> None:
        self.reason, self.found_for = reason, found_for
        super().__init__(self._text("calibrate on this model or pass check=False"))

    def _text(self, advice: str) -> str:
        where = f"; the set was found for {self.found_for}" if self.found_for else ""
        return f"{self.reason}{where}; {advice}"

    @property
    def cli_message(self) -> str:
        """The message for command-line users (no ``check=False`` there)."""
        return self._text("use a neuron set made for this model, or make one with "
                          "'ttreg calibrate --model SPEC --images DIR --out neurons.json'")


def as_index(v: Any, what: str) -> int:
    """A layer or neuron index: a whole number >= 0 (not a bool, not 1.9)."""
    if isinstance(v, bool) or "bool" in type(v).__name__.lower() or "bool" in str(getattr(v, "dtype", "")):
        raise ValueError(f"{what} must be a whole number, got {v!r}")
    try:
        i = operator.index(v)
    except TypeError:
        raise ValueError(f"{what} must be a whole number, got {v!r}") from None
    if i < 0:
        raise ValueError(f"{what} must be >= 0, got {i}")
    return i


def _number(v: Any, what: str) -> float:
    """A score: a real number (not a bool, not a string)."""
    if isinstance(v, (bool, str, bytes)) or not hasattr(v, "__float__"):
        raise ValueError(f"{what} must be a number, got {v!r}")
    return float(v)


def _mapping(v: Any, what: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ValueError(f"{what} must be an object, got {type(v).__name__}")
    _check_depth(v, what)
    return dict(v)


def _check_depth(obj: Any, what: str) -> None:
    """Refuse nesting deeper than :data:`MAX_DEPTH` (without recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if d > MAX_DEPTH:
            raise ValueError(f"{what} is nested more than {MAX_DEPTH} levels deep")
        if isinstance(o, Mapping):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend((v, d + 1) for v in o)


def _count(v: Any, what: str) -> int:
    return 0 if v is None else as_index(v, what)


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
        pairs = []
        for i, p in enumerate(self.neurons):
            if isinstance(p, (str, bytes, Mapping)) or not hasattr(p, "__len__") or len(p) != 2:
                raise ValueError(f"neurons[{i}] must be a (layer, neuron) pair, got {p!r}")
            pairs.append((as_index(p[0], f"neurons[{i}] layer"), as_index(p[1], f"neurons[{i}] neuron")))
        self.neurons = pairs
        if self.scores is not None:
            self.scores = [_number(s, f"scores[{i}]") for i, s in enumerate(self.scores)]
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
        found_for = self.found_for()
        for key, want in (fp.get("architecture") or {}).items():
            have = arch.get(key)
            if have is not None and _norm(have) != _norm(want):
                raise ModelMismatchError(
                    f"these neurons were found on another architecture ({key}={want!r}, this model "
                    f"has {have!r})", found_for)
        for l, n in self.neurons:
            if not 0 <= l < ad.num_layers:
                raise ModelMismatchError(
                    f"neuron ({l}, {n}): this model has {ad.num_layers} blocks, so the neuron set "
                    "is for another model", found_for)
            if not 0 <= n < ad.mlp_width(l):
                raise ModelMismatchError(
                    f"neuron ({l}, {n}): block {l} of this model has {ad.mlp_width(l)} MLP neurons, "
                    "so the neuron set is for another model", found_for)
        want_w = fp.get("weights")
        if want_w and want_w != ad.weights_hash() and not _same_values(fp.get("weights_sample"), ad):
            raise ModelMismatchError(
                "these neurons were found on the same architecture with other weights "
                f"(fingerprint {want_w} != {ad.weights_hash()})", found_for)

    def found_for(self) -> str | None:
        """The model this set was found for, in words (from its provenance or fingerprint)."""
        prov = self.provenance or {}
        if prov.get("model_spec"):
            return str(prov["model_spec"])
        if prov.get("valid_on"):
            on = prov["valid_on"]
            return " or ".join(map(str, on)) if isinstance(on, (list, tuple)) else str(on)
        if prov.get("model"):
            return str(prov["model"])
        arch = (self.fingerprint or {}).get("architecture") or {}
        if arch:
            parts = [str(arch[k]) for k in ("family", "class") if arch.get(k)]
            sizes = [f"{arch[k]} {n}" for k, n in (("num_layers", "blocks"), ("embed_dim", "wide"))
                     if arch.get(k) is not None]
            return " ".join(parts) + (f" ({', '.join(sizes)})" if sizes else "") or None
        return None

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

        The file form is validated field by field (a one-line ``ValueError`` names the wrong
        field). With ``model``, a plain mapping is fingerprinted to that model (so applying it
        to another model is caught) and checked against its size.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a neuron set must be an object, got {type(data).__name__}")
        if "format" in data or "neurons" in data:
            rn = cls._from_file_dict(data)
        else:
            pairs = []
            for l, ns in data.items():
                layer = as_index(int(l) if isinstance(l, str) and l.strip().isdigit() else l, f"layer {l!r}")
                if isinstance(ns, (str, bytes, Mapping)) or not hasattr(ns, "__iter__"):
                    raise ValueError(f"layer {l!r}: expected a list of neuron indices, got {ns!r}")
                pairs += [(layer, as_index(n, f"layer {l!r} neuron")) for n in ns]
            rn = cls(neurons=pairs, provenance={"source": "from_dict"})
        if model is not None:
            if rn.fingerprint is None:
                rn.fingerprint = cls.fingerprint_of(model)
            rn.check_model(model)
        return rn

    @classmethod
    def _from_file_dict(cls, data: Mapping) -> "RegisterNeurons":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a ttreg register-neuron file: 'format' is {data.get('format')!r}, "
                             f"expected {FORMAT!r}")
        version = data.get("version", VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or version != VERSION:
            raise ValueError(f"'version' is {version!r}; this ttreg reads version {VERSION} "
                             "(upgrade ttreg to read newer files)")
        rows = data.get("neurons")
        if not isinstance(rows, list):
            raise ValueError(f"'neurons' must be a list of {{\"layer\", \"neuron\", \"score\"}} objects, "
                             f"got {type(rows).__name__}")
        pairs, scores = [], []
        for i, r in enumerate(rows):
            if not isinstance(r, Mapping):
                raise ValueError(f"neurons[{i}] must be an object with 'layer' and 'neuron', got {r!r}")
            for key in ("layer", "neuron"):
                if r.get(key) is None:
                    raise ValueError(f"neurons[{i}] has no '{key}'")
            pairs.append((as_index(r["layer"], f"neurons[{i}].layer"), as_index(r["neuron"], f"neurons[{i}].neuron")))
            s = r.get("score")
            scores.append(None if s is None else _number(s, f"neurons[{i}].score"))
        fp = data.get("fingerprint")
        if fp is not None:
            if not isinstance(fp, Mapping):
                raise ValueError(f"'fingerprint' must be an object or null, got {type(fp).__name__}")
            fp = dict(fp)
            fp["architecture"] = _mapping(fp.get("architecture"), "fingerprint.architecture") or None
            if fp.get("weights") is not None and not isinstance(fp["weights"], str):
                raise ValueError(f"fingerprint.weights must be a string or null, got {fp['weights']!r}")
            sample = fp.get("weights_sample")
            if sample is not None:
                if not isinstance(sample, list):
                    raise ValueError("fingerprint.weights_sample must be a list of numbers or null")
                fp["weights_sample"] = [_number(v, "fingerprint.weights_sample") for v in sample]
        note = data.get("note")
        if note is not None and not isinstance(note, str):
            raise ValueError(f"'note' must be a string, got {type(note).__name__}")
        return cls(
            neurons=pairs,
            scores=None if any(s is None for s in scores) else scores,
            hyperparameters=_mapping(data.get("hyperparameters"), "hyperparameters"),
            num_images=_count(data.get("num_images"), "num_images"),
            num_images_with_outliers=_count(data.get("num_images_with_outliers"), "num_images_with_outliers"),
            fingerprint=fp,
            provenance=_mapping(data.get("provenance"), "provenance"),
            statistics=_mapping(data.get("statistics"), "statistics"),
            note=note or "",
        )

    def save(self, path: str | os.PathLike, outputs=None) -> Path:
        """Write the JSON file atomically (a temporary file renamed into place), or stage it in
        ``outputs`` (a :class:`ttreg.files.Outputs`)."""
        from .files import write_json
        return write_json(path, self.to_dict(), outputs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RegisterNeurons":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no neuron file at {p}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p} is not a ttreg neuron file (not valid JSON: {e})") from None
        except RecursionError:
            raise ValueError(f"{p} is not a ttreg neuron file (nested too deeply)") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p} is not a ttreg neuron file (the top level is not an object)")
        try:
            return cls.from_dict(data)
        except ModelMismatchError:
            raise
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None

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
