"""``RegisterNeurons``: a set of register neurons as plain data, with a JSON file format.

The file is what ``ttreg calibrate`` writes and what anyone can load::

    {
      "format": "ttreg.register_neurons", "version": 2,
      "neurons": [{"layer": 17, "neuron": 884, "score": 12.3}, ...],   # best first
      "hyperparameters": {"threshold": "auto", "detection_layer": -1, ...},
      "num_images": 200, "num_images_with_outliers": 197,
      "fingerprint": {"architecture": {...}, "weights": "9c0e...", "weights_sample": [...]},
      "provenance": {...},          # where the set comes from (calibration run, paper, ...)
      "statistics": {...},          # what the search measured (emergence layer, norm ratios)
      "note": "...",                # a human sentence, e.g. why the set is empty
      "attention_bias": {"file": "NAME.bias.safetensors", "sha256": "...", ...},  # optional
      "sizes": {"calibrated": [[224, 224]], "measured": [[224, 224], [518, 518]]}   # or null
    }

``sizes`` (version 2): the input sizes ``[height, width]`` the set was searched at and those its
effect was measured at; null when unknown. Version 1 files (no ``sizes``) still load.

``attention_bias`` names the :class:`AttentionBias` file written beside the JSON (the bias form).

The fingerprint ties a set to the model it was found on. ``architecture`` keys that are present
must match the model's; ``weights`` (a hash of the weights) must match unless it is null -- or,
for the same weights cast to another dtype (``.half()``, bfloat16), ``weights_sample`` (64 weight
values at fixed places) must match to within 16-bit rounding.

Loading validates the schema: every field has the type above (indices are whole numbers >= 0,
not ``1.9`` or ``true``), ``version`` is one this ttreg reads, and a wrong file is a one-line
``ValueError`` that names the field.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .files import first_non_finite
from .loading import MAX_BIAS_FILE_BYTES, MAX_NEURON_FILE_BYTES, bias_file_name, read_bytes_at_most

FORMAT = "ttreg.register_neurons"
VERSION = 2
#: the versions this ttreg reads (1: no ``sizes``)
READS = (1, 2)
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


#: units of :func:`as_bytes` (K, M, G, T alone are binary, as in most tools)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10 ** 6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10 ** 9, "gib": 1 << 30, "t": 1 << 40, "tb": 10 ** 12,
          "tib": 1 << 40}


def as_bytes(budget) -> int:
    """A memory budget as bytes: a whole number of bytes, or a string such as ``"512MiB"``,
    ``"2GB"`` or ``"1.5G"`` (K/M/G/T alone are binary); a one-line ``ValueError`` otherwise."""
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        unit = m.group(2).lower() if m else None
        if unit not in _UNITS:
            raise ValueError(f"memory_budget must be bytes or a size such as '512MiB' or '2GB', "
                             f"got {budget!r}")
        return int(float(m.group(1)) * _UNITS[unit])
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0 \
            or budget != budget or budget == float("inf"):
        raise ValueError(f"memory_budget must be a number of bytes >= 0 or a size such as '2GB', "
                         f"got {budget!r}")
    return int(budget)


def _sizes_field(v: Any) -> dict[str, list[tuple[int, int]]] | None:
    """The ``sizes`` field validated: null, or an object whose ``calibrated`` and ``measured``
    are lists of ``[height, width]`` whole pixels."""
    if v is None:
        return None
    if not isinstance(v, Mapping):
        raise ValueError(f"'sizes' must be an object or null, got {type(v).__name__}")
    out = {}
    for key in ("calibrated", "measured"):
        rows = v.get(key) or []
        if not isinstance(rows, (list, tuple)):
            raise ValueError(f"sizes.{key} must be a list of [height, width], got {rows!r}")
        out[key] = []
        for i, r in enumerate(rows):
            if isinstance(r, (str, bytes, Mapping)) or not hasattr(r, "__len__") or len(r) != 2:
                raise ValueError(f"sizes.{key}[{i}] must be [height, width], got {r!r}")
            h, w = (as_index(n, f"sizes.{key}[{i}]") for n in r)
            if not (h and w):
                raise ValueError(f"sizes.{key}[{i}] must be at least 1 pixel, got {r!r}")
            out[key].append((h, w))
    return out


def _number(v: Any, what: str) -> float:
    """A score: a finite real number (not a bool, not a string, not NaN or infinity)."""
    if isinstance(v, (bool, str, bytes)) or not hasattr(v, "__float__"):
        raise ValueError(f"{what} must be a number, got {v!r}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{what} must be a finite number, got {f!r} (JSON has no NaN or infinity)")
    return f


def _index_pairs(items: Any, what: str) -> list[tuple[int, int]]:
    """``(layer, neuron)`` pairs of whole numbers >= 0, each checked (``what[i]`` in messages)."""
    if isinstance(items, (str, bytes, Mapping)) or not hasattr(items, "__iter__"):
        raise ValueError(f"{what} must be a list of (layer, neuron) pairs, got {items!r}")
    pairs = []
    for i, p in enumerate(items):
        if isinstance(p, (str, bytes, Mapping)) or not hasattr(p, "__len__") or len(p) != 2:
            raise ValueError(f"{what}[{i}] must be a (layer, neuron) pair, got {p!r}")
        pairs.append((as_index(p[0], f"{what}[{i}] layer"), as_index(p[1], f"{what}[{i}] neuron")))
    return pairs


def _mapping(v: Any, what: str) -> dict:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ValueError(f"{what} must be an object, got {type(v).__name__}")
    _check_depth(v, what)
    bad = first_non_finite(v, what)
    if bad:
        raise ValueError(f"{bad[0]} is {bad[1]!r}, and JSON has no NaN or infinity")
    return dict(v)


def _fingerprint_field(fp: Any, what: str) -> dict[str, Any] | None:
    """A fingerprint validated: null, or an object whose ``architecture`` is an object,
    ``weights`` a string or null and ``weights_sample`` a list of finite numbers or null."""
    if fp is None:
        return None
    if not isinstance(fp, Mapping):
        raise ValueError(f"'{what}' must be an object or null, got {type(fp).__name__}")
    fp = dict(fp)
    fp["architecture"] = _mapping(fp.get("architecture"), f"{what}.architecture") or None
    if fp.get("weights") is not None and not isinstance(fp["weights"], str):
        raise ValueError(f"{what}.weights must be a string or null, got {fp['weights']!r}")
    sample = fp.get("weights_sample")
    if sample is not None:
        if not isinstance(sample, list):
            raise ValueError(f"{what}.weights_sample must be a list of numbers or null")
        fp["weights_sample"] = [_number(v, f"{what}.weights_sample[{i}]") for i, v in enumerate(sample)]
    return fp


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
    #: the attention-bias form fitted for this set (:func:`ttreg.fit_attention_bias`), if any
    attention_bias: "AttentionBias | None" = None
    #: input sizes: ``{"calibrated": [(h, w), ...], "measured": [(h, w), ...]}``; None: unknown
    sizes: dict[str, list[tuple[int, int]]] | None = None

    def __post_init__(self) -> None:
        self.neurons = _index_pairs(self.neurons, "neurons")
        if self.scores is not None:
            self.scores = [_number(s, f"scores[{i}]") for i, s in enumerate(self.scores)]
            if len(self.scores) != len(self.neurons):
                raise ValueError("scores and neurons differ in length")
        if len(set(self.neurons)) != len(self.neurons):
            raise ValueError("a neuron is listed twice")
        self.sizes = _sizes_field(self.sizes)

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
        from .text import count
        body = ", ".join(f"{l}: {ns}" for l, ns in self.by_layer().items())
        text = f"RegisterNeurons({count(len(self), 'neuron')} {{{body}}}"
        if self.num_images:        # found on images; a set from a dict or a name was not
            text += f", {self.num_images_with_outliers}/{count(self.num_images, 'image')} with outliers"
        return text + ")"

    # --- model checks ---------------------------------------------------------------------
    def check_model(self, model) -> None:
        """Raise :class:`ModelMismatchError` if this set was found on another model."""
        from .adapters import wrap
        ad = wrap(model)
        found_for = self.found_for()
        check_fingerprint(self.fingerprint, ad, "these neurons were found", found_for)
        for l, n in self.neurons:
            if not 0 <= l < ad.num_layers:
                raise ModelMismatchError(
                    f"neuron ({l}, {n}): this model has {ad.num_layers} blocks, so the neuron set "
                    "is for another model", found_for)
            if not 0 <= n < ad.mlp_width(l):
                raise ModelMismatchError(
                    f"neuron ({l}, {n}): block {l} of this model has {ad.mlp_width(l)} MLP neurons, "
                    "so the neuron set is for another model", found_for)
        if self.attention_bias is not None:   # its heads must fit too, before any work
            self.attention_bias.check_model(ad, self)

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
            "sizes": None if self.sizes is None else {k: [list(s) for s in v] for k, v in self.sizes.items()},
        }

    @property
    def measured_sizes(self) -> list[tuple[int, int]] | None:
        """The input sizes this set's effect was measured at (None: unknown, e.g. a version 1
        file or a set made by hand)."""
        return None if self.sizes is None else list(self.sizes.get("measured") or [])

    def with_measured_sizes(self, sizes) -> None:
        """Add ``sizes`` to those measured (kept in order, no repeats)."""
        cur = dict(self.sizes or {"calibrated": []})
        seen = list(cur.get("measured") or [])
        cur["measured"] = seen + [tuple(s) for s in sizes if tuple(s) not in seen]
        self.sizes = _sizes_field(cur)

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
        if isinstance(version, bool) or not isinstance(version, int) or version not in READS:
            raise ValueError(f"'version' is {version!r}; this ttreg reads versions "
                             f"{', '.join(map(str, READS))} (upgrade ttreg to read newer files)")
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
        fp = _fingerprint_field(data.get("fingerprint"), "fingerprint")
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
            sizes=data.get("sizes") if version >= 2 else None,
        )

    def save(self, path: str | os.PathLike, outputs=None) -> Path:
        """Write the JSON file atomically (a temporary file renamed into place), or stage it in
        ``outputs`` (a :class:`ttreg.files.Outputs`). With an attention bias, its tensors go beside
        it (``NAME.bias.safetensors``), and the JSON refers to that file by name and SHA-256; both
        are written together or not at all."""
        from .files import Outputs, write_json
        p = Path(path)
        data = self.to_dict()
        with contextlib.nullcontext(outputs) if outputs is not None else Outputs() as o:
            if self.attention_bias is not None:
                bias_file = p.with_name(f"{p.stem}.bias.safetensors")
                digest = self.attention_bias.save(bias_file, outputs=o)
                data["attention_bias"] = {"file": bias_file.name, "sha256": digest,
                                          **self.attention_bias.summary()}
            return write_json(p, data, o)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RegisterNeurons":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no neuron file at {p}")
        try:
            data = json.loads(read_bytes_at_most(p, MAX_NEURON_FILE_BYTES, "ttreg neuron file").decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p} is not a ttreg neuron file (not valid JSON: {e})") from None
        except RecursionError:
            raise ValueError(f"{p} is not a ttreg neuron file (nested too deeply)") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p} is not a ttreg neuron file (the top level is not an object)")
        try:
            rn = cls.from_dict(data)
        except ModelMismatchError:
            raise
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
        name = bias_file_name(data, p)
        if name is not None:
            sha = data["attention_bias"].get("sha256")
            if sha is not None and not isinstance(sha, str):
                raise ValueError(f"{p}: attention_bias.sha256 must be a string, got {sha!r}")
            rn.attention_bias = AttentionBias.load(p.parent / name, sha256=sha)
        return rn

    # --- the Hugging Face Hub (ttreg.hub) -------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name: str | os.PathLike, **kwargs) -> "RegisterNeurons":
        """A neuron set from a Hub repository ("org/name") or a folder written by
        :meth:`save_pretrained` (see :func:`ttreg.hub.neuron_file`)."""
        from .hub import neuron_file
        return cls.load(neuron_file(name, **kwargs))

    def save_pretrained(self, folder: str | os.PathLike, repo_id: str | None = None) -> Path:
        """Write the neuron file, its attention bias and a model card into ``folder``."""
        from .hub import save_pretrained
        return save_pretrained(self, folder, repo_id)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload this set (JSON, attention bias, model card) to the Hub repository ``repo_id``."""
        from .hub import push_to_hub
        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_name(cls, name: str) -> "RegisterNeurons":
        """A published neuron set shipped with ttreg (see ``ttreg.published.NAMES``)."""
        from .published import published_data
        return cls.from_dict(published_data(name))


def check_fingerprint(fp: Mapping | None, adapter, found: str, found_for: str | None = None) -> None:
    """Raise :class:`ModelMismatchError` unless ``adapter``'s model matches the fingerprint ``fp``
    (architecture keys present must match; ``weights``, unless null, must match exactly or up to
    16-bit rounding). ``found`` words the message ("these neurons were found"); ``found_for``
    names the model the data was made for."""
    fp = fp or {}
    arch = adapter.architecture()
    for key, want in (fp.get("architecture") or {}).items():
        have = arch.get(key)
        if have is not None and _norm(have) != _norm(want):
            raise ModelMismatchError(
                f"{found} on another architecture ({key}={want!r}, this model has {have!r})",
                found_for)
    want_w = fp.get("weights")
    if want_w and want_w != adapter.weights_hash() and not _same_values(fp.get("weights_sample"), adapter):
        raise ModelMismatchError(
            f"{found} on the same architecture with other weights (fingerprint {want_w} != "
            f"{adapter.weights_hash()})", found_for)


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


BIAS_FORMAT = "ttreg.attention_bias"


@dataclass
class AttentionBias:
    """The attention-bias form of a test-time register (the authors' rebuttal): per layer and
    head, the mean key and value the test-time register had over a set of images, to be appended
    to every attention of that layer instead of the register token.

    ``key`` ``(L, heads, head_dim)`` and ``value`` ``(L, heads, value_dim)`` are exactly what the
    attention kernel saw (after any qk-norm or rotary embedding). ``weight`` ``(L,)``: how many
    register tokens each layer's key stands for (the ``num_registers`` it was fitted with; its log
    is added to that key's logit); 0 means no extra key in that layer, so an all-zero bias is the
    plain model. ``neurons``: the register neurons it was fitted with (zeroed with it).
    Stored as safetensors (:meth:`save`), usually beside its neuron file.
    """

    key: Any
    value: Any
    weight: Any
    neurons: list[tuple[int, int]] = field(default_factory=list)
    num_images: int = 0
    num_registers: int = 1
    fingerprint: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch
        self.key, self.value = self.key.detach().float().cpu(), self.value.detach().float().cpu()
        self.weight = torch.as_tensor(self.weight, dtype=torch.float32).detach().cpu()
        self.neurons = _index_pairs(self.neurons, "neurons")
        self.num_images = as_index(self.num_images, "num_images")
        if as_index(self.num_registers, "num_registers") < 1:
            raise ValueError(f"num_registers must be at least 1, got {self.num_registers}")
        self.fingerprint = _fingerprint_field(self.fingerprint, "fingerprint")
        self.provenance = _mapping(self.provenance, "provenance")
        if self.key.dim() != 3 or self.value.dim() != 3 or self.key.shape[:2] != self.value.shape[:2]:
            raise ValueError(f"attention bias: key and value must be (layers, heads, dim) with the same "
                             f"layers and heads; got {tuple(self.key.shape)} and {tuple(self.value.shape)}")
        if self.weight.shape != self.key.shape[:1]:
            raise ValueError(f"attention bias: weight must be one number per layer "
                             f"({self.key.shape[0]}), got shape {tuple(self.weight.shape)}")
        if not bool(torch.isfinite(self.weight).all() and (self.weight >= 0).all()):
            raise ValueError("attention bias: weights must be finite and >= 0")
        if not bool(torch.isfinite(self.key).all() and torch.isfinite(self.value).all()):
            raise ValueError("attention bias: keys and values must be finite")

    @property
    def num_layers(self) -> int:
        return int(self.key.shape[0])

    @property
    def layers(self) -> list[int]:
        """Layers that get an extra key (weight > 0)."""
        return [int(l) for l in (self.weight > 0).nonzero().flatten()]

    def summary(self) -> dict[str, Any]:
        """What the neuron JSON says about its bias file."""
        return {"layers": self.num_layers, "heads": int(self.key.shape[1]),
                "head_dim": int(self.key.shape[2]), "num_images": self.num_images,
                "num_registers": self.num_registers}

    def __repr__(self) -> str:
        from .text import count
        L, H, D = self.key.shape
        return (f"AttentionBias({L} layers x {H} heads x {D}, {count(len(self.layers), 'layer')} on, "
                f"fitted on {count(self.num_images, 'image')} with {count(len(self.neurons), 'neuron')})")

    def check_model(self, model, neurons: "RegisterNeurons | None" = None) -> None:
        """Raise :class:`ModelMismatchError` if this bias was fitted on another model (or, given
        ``neurons``, with other register neurons)."""
        from .adapters import wrap
        ad = wrap(model)
        check_fingerprint(self.fingerprint, ad, "this attention bias was fitted")
        if self.num_layers != ad.num_layers:
            raise ModelMismatchError(f"this attention bias has {self.num_layers} layers, the model "
                                     f"{ad.num_layers} blocks: it was fitted on another model")
        self.check_fits(ad)
        if neurons is not None and sorted(self.neurons) != sorted(neurons.neurons):
            raise ModelMismatchError(
                f"this attention bias was fitted with other register neurons ({len(self.neurons)}, "
                f"not the {len(neurons)} given)")

    def check_fits(self, model) -> None:
        """Raise a one-line ``ValueError`` unless every layer this bias adds a key to has
        attention of its heads and head size (what the attention kernel will be given); layers
        whose attention does not say (:meth:`ttreg.adapters.Adapter.attention_heads`) are
        checked at their first call. Cheap: no forward pass."""
        from .adapters import wrap
        ad = wrap(model)
        have = (int(self.key.shape[1]), int(self.key.shape[2]), int(self.value.shape[2]))
        for layer in self.layers:
            if layer >= ad.num_layers:
                raise ValueError(f"this attention bias adds a key in layer {layer}; the model has "
                                 f"{ad.num_layers} blocks: it was fitted on another model")
            want = ad.attention_heads(layer)
            if want is not None and tuple(want) != have:
                raise ValueError(
                    f"this attention bias has {have[0]} heads of size {have[1]} (values {have[2]}); "
                    f"block {layer}'s attention has {want[0]} heads of size {want[1]} (values "
                    f"{want[2]}): it was fitted on another model; fit one for this model "
                    "(ttreg.fit_attention_bias, or ttreg export --form bias --images DIR)")

    # --- file ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, outputs=None) -> str:
        """Write a safetensors file (tensors ``key``, ``value``, ``weight``; the rest as JSON
        metadata) atomically (or staged in ``outputs``); return its SHA-256."""
        from safetensors.torch import save
        meta = {"format": BIAS_FORMAT, "version": "1",
                "neurons": json.dumps(self.neurons), "num_images": str(self.num_images),
                "num_registers": str(self.num_registers), "fingerprint": json.dumps(self.fingerprint),
                "provenance": json.dumps(self.provenance)}
        blob = save({"key": self.key.contiguous(), "value": self.value.contiguous(),
                     "weight": self.weight.contiguous()}, metadata=meta)
        from .files import atomic_write
        write = lambda tmp: tmp.write_bytes(blob)  # noqa: E731
        if outputs is not None:
            outputs.stage(path, write)
        else:
            atomic_write(path, write)
        return hashlib.sha256(blob).hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike, sha256: str | None = None) -> "AttentionBias":
        """Read a file written by :meth:`save` (checked against ``sha256`` if given)."""
        from safetensors import SafetensorError
        from safetensors.torch import load
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"no attention-bias file at {p}")
        blob = read_bytes_at_most(p, MAX_BIAS_FILE_BYTES, "ttreg attention-bias file")
        if sha256 and hashlib.sha256(blob).hexdigest() != sha256:
            raise ValueError(f"{p} is not the attention-bias file its neuron file was saved with "
                             "(SHA-256 differs): it was changed or replaced")
        try:
            tensors = load(blob)
            meta = _safetensors_metadata(blob)
        except (SafetensorError, ValueError, json.JSONDecodeError) as e:
            raise ValueError(f"{p} is not a ttreg attention-bias file ({e})") from None
        if meta.get("format") != BIAS_FORMAT or not {"key", "value", "weight"} <= tensors.keys():
            raise ValueError(f"{p} is not a ttreg attention-bias file")
        try:
            if meta.get("version", "1") != "1":
                raise ValueError(f"metadata 'version' is {meta.get('version')!r}; this ttreg reads "
                                 "version '1' (upgrade ttreg to read newer files)")
            return cls(tensors["key"], tensors["value"], tensors["weight"],
                       neurons=_meta_json(meta, "neurons", []),
                       num_images=_meta_count(meta, "num_images", 0),
                       num_registers=_meta_count(meta, "num_registers", 1),
                       fingerprint=_meta_json(meta, "fingerprint", None),
                       provenance=_meta_json(meta, "provenance", {}))
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None


def _meta_json(meta: Mapping[str, str], key: str, default: Any) -> Any:
    """A JSON-valued metadata field of an attention-bias file (``default`` when absent)."""
    text = meta.get(key)
    if not text:
        return default
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"metadata {key!r} is not valid JSON ({e})") from None


def _meta_count(meta: Mapping[str, str], key: str, default: int) -> int:
    """A whole-number metadata field of an attention-bias file (``default`` when absent)."""
    text = meta.get(key)
    if not text:
        return default
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"metadata {key!r} must be a whole number >= 0, got {text!r}")
    return int(text)


def _safetensors_metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    return dict(header.get("__metadata__") or {})
