"""What the experiments read from a model, per family: preprocessing, token features (last
layer or any blocks, with or without the final norm), the last layer's keys, CLIP embeddings,
whether a model takes any input size, and a fingerprint. The one place besides
:mod:`.direct` that knows model internals beyond the adapters."""
from __future__ import annotations

import contextlib
import hashlib
import inspect
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters import wrap
from ..hooks import HookSet
from ..sizes import timm_trunk

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def preprocessing(model) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    """``(input size (h, w), mean, std)`` the model expects."""
    try:
        ad = wrap(model)
    except TypeError:
        return (224, 224), IMAGENET_MEAN, IMAGENET_STD
    mean, std = ad.mean_std()
    return tuple(ad.image_size()), tuple(mean), tuple(std)


def model_fingerprint(model) -> str:
    """Architecture + weights hash (the adapter's), or a state-dict hash for other modules."""
    try:
        ad = wrap(model)
        return hashlib.sha256(f"{ad.architecture()}|{ad.weights_hash()}".encode()).hexdigest()[:16]
    except TypeError:
        h = hashlib.sha256(type(model).__name__.encode())
        for name, t in sorted(model.state_dict().items()):
            if torch.is_tensor(t) and t.is_floating_point():
                h.update(name.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(repr(float(t.double().sum())).encode())
        return h.hexdigest()[:16]


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def open_clip_visual(model) -> nn.Module | None:
    visual = getattr(model, "visual", None)
    if isinstance(visual, nn.Module) and hasattr(model, "encode_image"):
        return visual
    if type(model).__module__.startswith("open_clip"):
        return model
    return None


@contextlib.contextmanager
def _capture_output(module: nn.Module) -> Iterator[dict]:
    box: dict = {}
    with HookSet() as hooks:
        hooks.forward(module, lambda m, a, out: box.__setitem__("out", out))
        yield box


def _native_tokens(visual: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip ``VisionTransformer``: (pooled projected embedding, all tokens after ``ln_post``)."""
    with _capture_output(visual.transformer) as box:
        pooled = visual(x)
    if isinstance(pooled, tuple):
        pooled = pooled[0]
    tokens = box["out"]
    if not getattr(visual.transformer, "batch_first", True):
        tokens = tokens.transpose(0, 1)
    return pooled, visual.ln_post(tokens)


def token_features(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-layer tokens after the final norm: ``(prefix (B, npre, D), patches (B, P, D))``.

    Test-time registers (if active) are not among them. timm ViTs (``forward_features``),
    open_clip towers (native or timm trunk) and Hugging Face vision models
    (``last_hidden_state``) are supported.
    """
    ad = wrap(model)
    npre = ad.num_prefix_tokens
    visual = open_clip_visual(model)
    if visual is not None and hasattr(visual, "trunk"):
        tokens = visual.trunk.forward_features(x)
    elif visual is not None and hasattr(visual, "transformer"):
        tokens = _native_tokens(visual, x)[1]
    elif hasattr(model, "forward_features"):
        tokens = model.forward_features(x)
    else:
        out = ad.run(x)
        tokens = getattr(out, "last_hidden_state", None)
        if tokens is None:
            raise TypeError(f"cannot read token features from {type(model).__name__}")
    P = ad.grid_size(x)[0] * ad.grid_size(x)[1]
    return tokens[:, :npre], tokens[:, npre:npre + P]


def clip_embeddings(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An open_clip model's image embedding ``(B, E)`` and projected patch tokens ``(B, P, E)``
    from one forward pass (patch tokens go through the same final norm and projection as the
    pooled token)."""
    visual = open_clip_visual(model)
    if visual is None:
        raise TypeError(f"{type(model).__name__} is not an open_clip model")
    if hasattr(visual, "trunk"):                     # TimmModel: timm trunk + head
        trunk = visual.trunk
        tokens = trunk.forward_features(x)
        pooled = visual.head(trunk.forward_head(tokens))
        patches = visual.head(tokens[:, trunk.num_prefix_tokens:])
        return pooled, patches
    pooled, tokens = _native_tokens(visual, x)
    patches = tokens[:, 1:]
    if visual.proj is not None:
        patches = patches @ visual.proj
    return pooled, patches


def last_layer_keys(model, x: torch.Tensor) -> torch.Tensor:
    """Keys of the last attention layer on every token, heads concatenated: ``(B, T, D)``
    (``T`` includes prefix tokens and any test-time registers, in the model's order).

    Supported: timm-style fused ``qkv`` linears, ``nn.MultiheadAttention`` / open_clip
    ``Attention`` (``in_proj_weight``), and modules with a ``key``/``k_proj`` linear (transformers).
    """
    ad = wrap(model)
    attn = ad.attention(ad.num_layers - 1)
    box: dict = {}
    with HookSet() as hooks:
        qkv = getattr(attn, "qkv", None)
        if isinstance(qkv, nn.Linear):
            D = qkv.out_features // 3
            hooks.forward(qkv, lambda m, a, out: box.__setitem__("k", out[..., D:2 * D]))
        elif isinstance(getattr(attn, "in_proj_weight", None), torch.Tensor):
            D = attn.in_proj_weight.shape[0] // 3
            first = not getattr(attn, "batch_first", True)

            def grab(m, args, kwargs):
                h = args[0] if args else kwargs.get("query", kwargs.get("x"))
                bias = m.in_proj_bias[D:2 * D] if m.in_proj_bias is not None else None
                k = F.linear(h, m.in_proj_weight[D:2 * D], bias)
                box["k"] = k.transpose(0, 1) if first else k
            hooks.pre(attn, grab, with_kwargs=True)
        else:
            lin = next((m for n, m in attn.named_modules()
                        if n.split(".")[-1] in ("key", "k_proj") and isinstance(m, nn.Linear)), None)
            if lin is None:
                raise TypeError(f"cannot find the keys of {type(attn).__name__}; LOST supports timm, "
                                "open_clip and transformers attention modules")
            hooks.forward(lin, lambda m, a, out: box.__setitem__("k", out))
        ad.run(x)
    return box["k"]


def patch_keys(model, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Last-layer keys of the *patch* tokens only ``(B, P, D)`` and the grid ``(rows, cols)``:
    CLS, trained registers and test-time registers are cut off."""
    ad = wrap(model)
    grid = tuple(ad.grid_size(x))
    k = last_layer_keys(model, x)
    npre, P = ad.num_prefix_tokens, grid[0] * grid[1]
    if k.shape[1] < npre + P:
        raise RuntimeError(f"expected at least {npre + P} tokens, got {k.shape[1]}")
    return k[:, npre:npre + P], grid


# --- any input size ------------------------------------------------------------------------------
def accepts_any_size(model) -> bool:
    """Whether the model runs on any image size (a multiple of the patch size): timm ViTs and
    Evas (made dynamic by :func:`ttreg.sizes.dynamic_size`), Hugging Face DINOv2 (always interpolates) and HF models
    whose ``forward`` takes ``interpolate_pos_encoding``. open_clip's own towers do not."""
    if timm_trunk(model) is not None:
        return True
    if type(model).__module__.startswith("transformers"):
        if "Dinov2" in type(model).__name__:
            return True
        try:
            return "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover
            return False
    return False


# --- tokens of any block --------------------------------------------------------------------------
def final_norm(model) -> nn.Module:
    """The norm a model applies to its last block's output (timm ``norm``, open_clip ``ln_post``,
    Hugging Face ``layernorm`` / ``post_layernorm``)."""
    visual = open_clip_visual(model)
    if visual is not None:
        return visual.trunk.norm if hasattr(visual, "trunk") else visual.ln_post
    vit = timm_trunk(model)
    if vit is not None:
        return vit.norm
    for owner in (model, getattr(model, "vision_model", None)):
        for name in ("layernorm", "post_layernorm"):
            mod = getattr(owner, name, None) if owner is not None else None
            if isinstance(mod, nn.Module):
                return mod
    raise TypeError(f"cannot find the final norm of {type(model).__name__}")


def block_tokens(model, x: torch.Tensor, layers: Sequence[int], norm: bool = False
                 ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (prefix (B, npre, D), patches (B, P, D))}``: the residual stream after each of
    ``layers`` (negative indexes allowed), test-time registers left out; with ``norm`` the
    model's final norm applied to each (DINOv2's ``get_intermediate_layers(norm=True)``)."""
    ad = wrap(model)
    L = ad.num_layers
    want = sorted({int(l) % L for l in layers})
    td = ad.token_dim
    box: dict[int, torch.Tensor] = {}
    with HookSet() as hooks:
        for l in want:
            def grab(mod, args, out, l=l):
                y = ad.block_output(out)                  # test-time registers already split off
                box[l] = y if td == 1 else y.transpose(0, 1)
            hooks.forward(ad.blocks[l], grab)
        ad.run(x)
    npre = ad.num_prefix_tokens
    rows, cols = ad.grid_size(x)
    ln = final_norm(model) if norm else None
    out = {}
    for l in layers:
        y = box[int(l) % L]
        if ln is not None:
            y = ln(y)
        out[l] = (y[:, :npre], y[:, npre:npre + rows * cols])
    return out
