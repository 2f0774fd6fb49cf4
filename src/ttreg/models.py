"""Model strings -> ``(model, transform)``: timm, Hugging Face, open_clip, the built-in model, local files.

Specs::

    timm:NAME                      timm.create_model(NAME, pretrained=True)
    timm:NAME@/path/weights.safetensors   the same architecture, weights from a local file
    hf:ORG/NAME   or  hf:/local/folder     transformers AutoModelForImageTextToText.from_pretrained for
                                   vision-language models (LLaVA, Gemma 3, InternVL, ...), else
                                   AutoModel.from_pretrained (DINOv3, SigLIP 2, AIMv2, ...)
    open_clip:ARCH/PRETRAINED      open_clip.create_model_and_transforms(ARCH, pretrained=PRETRAINED)
    open_clip:ARCH@/path/file.bin  open_clip:hf-hub:ORG/NAME
    builtin:dinov2_vits14          the offline DINOv2 ViT-S/14 (timm); builtin:dinov2_vits14-hf (HF)
    /a/local/path                  an HF model folder (config.json), or a .safetensors file (or a
                                   folder holding one) written by :func:`save_model`

``transform`` maps a PIL image to a normalised ``(C, H, W)`` tensor, as the model expects: the
model's image processor when it makes one such image; otherwise (NaFlex patch sequences, tiled
VLM inputs) a resize to the adapter's input size with the processor's mean and std.
Every failure is a :class:`ModelLoadError` with a one-line message; downloads that fail say
``could not download <what> — no network? pass a local path``. When the Hugging Face Hub cannot
be reached, hub downloads run in offline mode (the local cache is used, nothing is retried).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import torch.nn as nn

KINDS = ("timm", "hf", "open_clip", "builtin")
#: the spec forms, as README's "Model specs" lists them
SPEC_FORMS = ("timm:NAME", "timm:NAME@/path/weights.safetensors", "hf:ORG/NAME", "hf:/local/folder",
              "open_clip:ARCH/PRETRAINED", "builtin:dinov2_vits14", "builtin:dinov2_vits14-hf",
              "a local path")
SPEC_HELP = ", ".join(SPEC_FORMS[:-1]) + f" or {SPEC_FORMS[-1]}"
from .loading import (META_KWARGS, META_SPEC, ModelLoadError,  # noqa: F401 - public here too
                      first_line, hub_offline_if_unreachable, loading_errors)


def load_model(spec: str, device: str = "cpu", *, library: str | None = None
               ) -> tuple[nn.Module, Callable]:
    """Load ``spec`` in eval mode on ``device``; return ``(model, transform)``.

    ``spec``: ``timm:NAME``, ``timm:NAME@/path/weights.safetensors``, ``hf:ORG/NAME``,
    ``hf:/local/folder``, ``open_clip:ARCH/PRETRAINED``, ``builtin:dinov2_vits14`` (timm) or
    ``builtin:dinov2_vits14-hf`` (transformers), or a local path (see the module docstring).
    ``device``: where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
    ``library`` (``"timm"`` or ``"hf"``): the built-in model's library (the same as the ``-hf``
    suffix), also of its cached ``.safetensors`` file given as a local path.
    ``transform``: PIL image -> normalised ``(C, H, W)`` tensor, as the model expects (its
    repr says how it resizes and normalises). Errors are a one-line :class:`ModelLoadError`."""
    spec = str(spec).strip()
    kind, sep, rest = spec.partition(":")
    if kind in KINDS and sep:
        if not rest:
            raise ModelLoadError(f"empty model name in {spec!r}; use {SPEC_HELP}")
        model, transform = _LOADERS[kind](rest, library=library)
    elif Path(spec).expanduser().exists():
        model, transform = load_local(Path(spec).expanduser(), library=library)
    else:
        what = f"unknown model kind {kind!r}" if sep else f"no such file or folder {spec!r}"
        raise ModelLoadError(f"{what}; model specs: {SPEC_HELP}")
    return model.to(device).eval(), transform


# --- the kinds ----------------------------------------------------------------------------------
def _load_timm(rest: str, **_: Any) -> tuple[nn.Module, Callable]:
    try:
        import timm
        from timm.data import create_transform, resolve_model_data_config
    except ImportError:
        raise ModelLoadError("timm models need timm: pip install timm") from None
    name, at, file = rest.partition("@")
    form = "a timm spec looks like timm:NAME or timm:NAME@/path/weights.safetensors"
    if not name:
        raise ModelLoadError(f"empty model name in 'timm:{rest}'; {form}")
    kwargs: dict[str, Any] = {}
    if at:
        kwargs["pretrained_cfg_overlay"] = {"file": str(_weights_file(f"timm:{rest}", file, form))}
    on_hub = name.startswith(("hf-hub:", "hf_hub:"))
    if not on_hub and not timm.is_model(name):
        raise ModelLoadError(f"timm {timm.__version__} has no model {name!r}")
    if not (on_hub or at):
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError as e:  # an unknown pretrained tag
            raise ModelLoadError(f"timm: {first_line(e)}") from None
        if not (cfg and (cfg.hf_hub_id or cfg.url or cfg.file)):
            raise ModelLoadError(f"timm has no pretrained weights for {name!r}; "
                                 f"pass a checkpoint: timm:{name}@/path/to/weights")
    with loading_errors(f"timm:{rest}"):
        model = timm.create_model(name, pretrained=True, **kwargs)
    return model, create_transform(**resolve_model_data_config(model), is_training=False)


#: how a weights file starts: a zip archive (torch.save, NumPy .npz), a pickle (torch.save's
#: legacy format)
_WEIGHTS_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _weights_file(spec: str, file: str, form: str) -> Path:
    """The local weights file after ``@`` in ``spec``: it exists, and is a safetensors file, a
    PyTorch checkpoint (``torch.save``) or a NumPy archive -- checked from its first bytes, so
    ``@/etc/passwd`` is one line that says what a spec looks like, not a loader's traceback."""
    if not file:
        raise ModelLoadError(f"nothing after '@' in {spec!r}; {form}")
    path = Path(file).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"no such checkpoint file: {path} (in {spec!r}; {form})")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise ModelLoadError(f"cannot read the checkpoint file {path}: {first_line(e)}") from None
    size = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    safetensors = len(head) == 9 and head[8:9] == b"{" and 0 < size <= path.stat().st_size - 8
    if not (safetensors or head.startswith(_WEIGHTS_MAGIC)):
        raise ModelLoadError(f"{path} is not a weights file (a .safetensors file or a PyTorch "
                             f"checkpoint saved with torch.save); {form}")
    return path


class HFImageTransform:
    """PIL image -> ``(C, H, W)`` tensor through a transformers image processor (exactly what
    the model's ``AutoImageProcessor`` does)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        p = self.processor
        steps = [type(p).__name__]
        if getattr(p, "do_resize", False) and getattr(p, "size", None):
            steps.append(f"resize to {dict(p.size)}")
        if getattr(p, "do_center_crop", False) and getattr(p, "crop_size", None):
            steps.append(f"centre crop {dict(p.crop_size)}")
        if getattr(p, "do_rescale", False):
            steps.append(f"rescale by {getattr(p, 'rescale_factor', 1 / 255):.4g}")
        if getattr(p, "do_normalize", False):
            steps.append(f"normalise mean={tuple(p.image_mean)} std={tuple(p.image_std)}")
        return f"HFImageTransform({', '.join(steps)})"


def hf_auto_class(config):
    """The transformers auto class that loads ``config``'s model the way transformers documents
    it: ``AutoModelForImageTextToText`` for vision-language models, ``AutoModel`` otherwise."""
    from transformers import AutoModel, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    if getattr(config, "model_type", None) in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModel


def hf_transform(processor, model) -> Callable:
    """The image processor as a transform if it turns one image into one ``(C, H, W)`` tensor;
    else (patch sequences, tiles) the adapter's size with the processor's mean and std."""
    from PIL import Image
    from .adapters import wrap
    from .data import make_transform
    if processor is not None:
        try:
            probe = HFImageTransform(processor)(Image.new("RGB", (40, 30)))
            if hasattr(probe, "dim") and probe.dim() == 3 and probe.shape[0] == 3:
                return HFImageTransform(processor)
        except Exception:  # a processor that wants more than an image
            pass
    ad = wrap(model)
    mean, std = ad.mean_std()
    mean = getattr(processor, "image_mean", None) or mean
    std = getattr(processor, "image_std", None) or std
    return make_transform(ad.image_size(), mean, std)


def _load_hf(name: str, **_: Any) -> tuple[nn.Module, Callable]:
    try:
        from transformers import AutoConfig, AutoImageProcessor
    except ImportError:
        raise ModelLoadError("Hugging Face models need transformers: pip install transformers") from None
    local = Path(name).expanduser().is_dir()
    with loading_errors(name if local else f"hf:{name}", network=not local):
        model = hf_auto_class(AutoConfig.from_pretrained(name)).from_pretrained(name)
    try:
        with hub_offline_if_unreachable() if not local else contextlib.nullcontext():
            processor = AutoImageProcessor.from_pretrained(name)
    except Exception:  # no preprocessor config: the adapter's size and statistics
        processor = None
    return model, hf_transform(processor, model)


class _Held(logging.Handler):
    """Keeps log records back (see :func:`_root_log_held`)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _root_log_held() -> Iterator[None]:
    """Hold back what a library logs through the root logger (open_clip's ``logging.error``
    would otherwise print an ``ERROR:root:`` line before our one-line error). On failure the
    records are dropped (the error says it); on success they are passed on."""
    root = logging.getLogger()
    held = _Held()
    root.addHandler(held)
    try:
        yield
    except BaseException:
        root.removeHandler(held)
        raise
    root.removeHandler(held)
    for record in held.records:
        root.handle(record)


def _load_open_clip(rest: str, **_: Any) -> tuple[nn.Module, Callable]:
    try:
        import open_clip
    except ImportError:
        raise ModelLoadError("open_clip models need open_clip_torch: pip install open_clip_torch") from None
    if rest.startswith(("hf-hub:", "local-dir:")):
        arch, pretrained = rest, None
    else:
        arch, sep, pretrained = rest.partition("@") if "@" in rest else rest.partition("/")
        form = ("an open_clip spec looks like open_clip:ARCH/PRETRAINED, open_clip:ARCH@/path/file.bin "
                "or open_clip:hf-hub:ORG/NAME")
        if not arch:
            raise ModelLoadError(f"empty architecture in 'open_clip:{rest}'; {form}")
        if sep == "@":
            pretrained = str(_weights_file(f"open_clip:{rest}", pretrained, form))
        elif sep and not pretrained:
            raise ModelLoadError(f"nothing after '/' in 'open_clip:{rest}'; {form}")
    with _root_log_held(), loading_errors(f"open_clip:{rest}"):
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=pretrained or None, require_pretrained=True)
    return model, preprocess


def open_clip_tokenizer(spec: str) -> Callable:
    """The text tokenizer of an ``open_clip:...`` spec."""
    try:
        import open_clip
    except ImportError:
        raise ModelLoadError("open_clip models need open_clip_torch: pip install open_clip_torch") from None
    rest = spec.split(":", 1)[1]
    arch = rest if rest.startswith(("hf-hub:", "local-dir:")) else rest.replace("@", "/").split("/")[0]
    with _root_log_held(), loading_errors(f"the tokenizer of {spec}"):
        return open_clip.get_tokenizer(arch)


def _load_builtin(rest: str, library: str | None = None, **_: Any) -> tuple[nn.Module, Callable]:
    from . import builtin
    name = rest
    if name.endswith("-hf") or name.endswith("-timm"):
        name, _, suffix = name.rpartition("-")
        if library and library != suffix:
            raise ModelLoadError(f"builtin:{rest} is the {suffix} version but library={library!r}")
        library = suffix
    model = builtin.load_builtin(name, library=library or "timm")
    return model, builtin.builtin_transform()


_LOADERS = {"timm": _load_timm, "hf": _load_hf, "open_clip": _load_open_clip,
            "builtin": _load_builtin}


# --- local files ---------------------------------------------------------------------------------
def load_local(path: Path, library: str | None = None) -> tuple[nn.Module, Callable]:
    """An HF model folder, an open_clip folder, or a ttreg safetensors file (or its folder)."""
    if path.is_dir() and (path / "config.json").is_file():
        return _load_hf(str(path))
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        return _load_open_clip(f"local-dir:{path}")
    file = path
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise ModelLoadError(f"{path}: expected an HF model folder (config.json) or one .safetensors "
                                 f"file written by ttreg; found {len(found)} .safetensors files")
        file = found[0]
    return _load_ttreg_file(file, library=library)


def _load_ttreg_file(file: Path, library: str | None = None) -> tuple[nn.Module, Callable]:
    from safetensors import safe_open
    from .builtin import read_safetensors
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise ModelLoadError(f"{file}: not a safetensors file ({first_line(e)})") from None
    spec = meta.get(META_SPEC)
    if not spec:
        raise ModelLoadError(f"{file}: no '{META_SPEC}' metadata, so not a model saved by ttreg; "
                             f"for a timm checkpoint use timm:NAME@{file}")
    kind, _, name = spec.partition(":")
    sd = read_safetensors(file)
    if kind == "builtin" and "embeddings.cls_token" in sd:  # the built-in model's cache file
        from . import builtin
        builtin._check_name(name)
        model = builtin.build_hf(sd) if library == "hf" else builtin.build_timm(sd)
        return model, builtin.builtin_transform()
    if kind in ("timm", "builtin"):
        try:
            import timm
            from timm.data import create_transform, resolve_model_data_config
        except ImportError:
            raise ModelLoadError(f"{file} is a timm model, which needs timm: pip install timm") from None
        arch = meta.get("timm.architecture", name)
        kwargs = _checked_kwargs(file, meta.get(META_KWARGS))
        cfg = _checked_cfg(file, meta.get("timm.pretrained_cfg"))
        if not timm.is_model(arch):
            raise ModelLoadError(f"{file}: timm {timm.__version__} has no model {arch!r}")
        try:
            model = timm.create_model(arch, pretrained=False, **kwargs)
            model.load_state_dict(sd, strict=True)
        except Exception as e:
            raise ModelLoadError(f"{file}: cannot rebuild {spec} ({first_line(e)})") from None
        if cfg:
            model.pretrained_cfg = {**model.pretrained_cfg, **cfg}
        return model, create_transform(**resolve_model_data_config(model), is_training=False)
    raise ModelLoadError(f"{file}: cannot rebuild a {kind!r} model (saved spec {spec!r})")


#: the constructor arguments :func:`save_model` writes, and the check each must pass
_KWARG_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "num_classes": ("a whole number >= 0", lambda v: type(v) is int and v >= 0),
    "global_pool": ("one of '', 'token', 'avg', 'avgmax', 'max', 'map'",
                    lambda v: v in ("", "token", "avg", "avgmax", "max", "map")),
    "img_size": ("two whole numbers > 0",
                 lambda v: isinstance(v, list) and len(v) == 2 and all(type(x) is int and 0 < x <= 65536 for x in v)),
    "dynamic_img_size": ("true or false", lambda v: type(v) is bool),
}
_CFG_CHECKS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "mean": ("three numbers", lambda v: isinstance(v, list) and len(v) == 3
             and all(type(x) in (int, float) for x in v)),
    "std": ("three numbers > 0", lambda v: isinstance(v, list) and len(v) == 3
            and all(type(x) in (int, float) and x > 0 for x in v)),
    "input_size": ("three whole numbers > 0", lambda v: isinstance(v, list) and len(v) == 3
                   and all(type(x) is int and 0 < x <= 65536 for x in v)),
    "crop_pct": ("a number in (0, 2]", lambda v: type(v) in (int, float) and 0 < v <= 2),
    "interpolation": ("a resampling name such as 'bicubic'",
                      lambda v: v in ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")),
}


def _checked_meta(file: Path, key: str, text: str | None, checks: dict) -> dict[str, Any]:
    """Metadata ``key`` of a ttreg model file as a dict holding only the keys ttreg writes, each
    of the right type; anything else is a one-line :class:`ModelLoadError` (the values reach
    ``timm.create_model``, so nothing unexpected may pass)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise ModelLoadError(f"{file}: metadata '{key}' is not valid JSON") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file}: metadata '{key}' must be an object")
    for k, v in value.items():
        if k not in checks:
            raise ModelLoadError(f"{file}: metadata '{key}' has an unexpected key {k!r} (ttreg writes "
                                 f"only {', '.join(checks)}); not a file ttreg wrote")
        what, ok = checks[k]
        if not ok(v):
            raise ModelLoadError(f"{file}: metadata '{key}.{k}' must be {what}, got {v!r}")
    return value


def _checked_kwargs(file: Path, text: str | None) -> dict[str, Any]:
    return _checked_meta(file, META_KWARGS, text, _KWARG_CHECKS)


def _checked_cfg(file: Path, text: str | None) -> dict[str, Any]:
    return _checked_meta(file, "timm.pretrained_cfg", text, _CFG_CHECKS)


def save_model(model: nn.Module, path: str | os.PathLike, spec: str | None = None) -> Path:
    """Write a timm ``VisionTransformer`` created by name (e.g. the built-in model, perhaps with
    planted neurons) as one safetensors file that :func:`load_model` rebuilds from its path.

    ``path``: a ``.safetensors`` file, or a folder (``model.safetensors`` inside). Written
    atomically. The metadata records the timm architecture and the constructor arguments that
    change the weights' shapes or the forward pass (classes, image size, dynamic size, pooling).
    """
    from timm.models.vision_transformer import VisionTransformer
    from .builtin import write_safetensors
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"save_model writes timm VisionTransformers, not {type(model).__name__}")
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    arch = cfg.get("architecture")
    if not arch:
        raise ValueError("this VisionTransformer was not created by name (timm.create_model), "
                         "so it cannot be rebuilt from a file")
    kwargs = {"num_classes": int(model.num_classes), "global_pool": model.global_pool,
              "img_size": list(model.patch_embed.img_size),
              "dynamic_img_size": bool(model.dynamic_img_size)}
    keep = {k: cfg[k] for k in ("mean", "std", "input_size", "crop_pct", "interpolation") if k in cfg}
    meta = {META_SPEC: spec or f"timm:{arch}", META_KWARGS: json.dumps(kwargs),
            "timm.architecture": arch, "timm.pretrained_cfg": json.dumps(keep),
            "format": "ttreg.weights/1"}
    if kwargs["global_pool"] not in ("", "token", "avg", "avgmax", "max", "map"):
        raise ValueError(f"global_pool {kwargs['global_pool']!r} cannot be saved")
    p = Path(path)
    if p.suffix != ".safetensors":
        p = p / "model.safetensors"
    write_safetensors({k: v.detach().cpu() for k, v in model.state_dict().items()}, p, meta)
    return p


def load_processor(spec: str):
    """The ``transformers`` processor of a model spec ``hf:ORG/NAME`` or ``hf:/folder`` (or a
    local folder): ``AutoProcessor.from_pretrained``. A one-line ``ValueError`` if there is none."""
    name = spec[3:] if spec.startswith("hf:") else spec
    try:
        from transformers import AutoProcessor
        return AutoProcessor.from_pretrained(name)
    except Exception as e:   # no processor files, an unknown processor class
        raise ValueError(f"{spec}: no transformers processor to build prompts with "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "attribution needs a vision-language model saved with its processor") from None
