"""What the experiments read from a model: preprocessing, token features (last layer or any
blocks, with or without the final norm), a layer's keys, queries and values, CLIP embeddings,
whether a model takes any input size, and a fingerprint. Thin functions over the adapter
contract (:class:`ttreg.adapters.base.Adapter`): what a family does lives in its adapter."""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch
import torch.nn as nn

from ..adapters import wrap

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


def token_features(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-layer tokens after the final norm: ``(prefix (B, npre, D), patches (B, P, D))``,
    test-time registers (if active) not among them (:meth:`Adapter.features`)."""
    return wrap(model).features(x)


def clip_embeddings(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An open_clip model's image embedding ``(B, E)`` and projected patch tokens ``(B, P, E)``
    from one forward pass (:meth:`Adapter.image_embeddings`)."""
    try:
        ad = wrap(model)
    except TypeError:
        raise TypeError(f"{type(model).__name__} is not an open_clip model") from None
    return ad.image_embeddings(x)


#: what LOST-style sweeps read from an attention layer
QKV = ("key", "query", "value")


def layer_qkv(model, x: torch.Tensor, layers: Sequence[int], features: Sequence[str] = QKV
              ) -> dict[tuple[int, str], torch.Tensor]:
    """``{(block, feature): (B, T, A)}``: the ``features`` (``key``, ``query``, ``value``) of every
    token in each of ``layers`` (negative indexes count from the end; ``block`` is the
    non-negative index), heads side by side, from one forward pass (:meth:`Adapter.record_qkv`)."""
    ad = wrap(model)
    bad = [f for f in features if f not in QKV]
    if bad:
        raise ValueError(f"features must be among {', '.join(QKV)}, got {', '.join(bad)}")
    L = ad.num_layers
    with ad.record_qkv(layers) as store:
        ad.run(x)
    return {(l % L, f): store[l % L][f] for l in layers for f in features}


def last_layer_keys(model, x: torch.Tensor) -> torch.Tensor:
    """Keys of the last attention layer on every token, heads concatenated: ``(B, T, D)``
    (``T`` includes prefix tokens and any test-time registers, in the model's order)."""
    L = wrap(model).num_layers
    return layer_qkv(model, x, [L - 1], ["key"])[(L - 1, "key")]


def patch_features(model, x: torch.Tensor, layers: Sequence[int] = (-1,), features: Sequence[str] = ("key",)
                   ) -> tuple[dict[tuple[int, str], torch.Tensor], tuple[int, int]]:
    """:func:`layer_qkv` of the *patch* tokens only ``(B, P, A)`` and the grid ``(rows, cols)``:
    CLS, trained registers and test-time registers are cut off."""
    ad = wrap(model)
    feats = layer_qkv(model, x, layers, features)
    return {k: ad.split_tokens(v, x)[1] for k, v in feats.items()}, tuple(ad.grid_size(x))


def patch_keys(model, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Last-layer keys of the *patch* tokens only ``(B, P, D)`` and the grid ``(rows, cols)``:
    CLS, trained registers and test-time registers are cut off."""
    feats, grid = patch_features(model, x)
    return next(iter(feats.values())), grid


# --- any input size ------------------------------------------------------------------------------
def accepts_any_size(model) -> bool:
    """Whether the model runs on any image size (a multiple of the patch size) inside
    :func:`ttreg.sizes.dynamic_size` (:meth:`Adapter.takes_any_size`): timm ViTs and Evas, Hugging
    Face DINOv2 and HF models whose ``forward`` takes ``interpolate_pos_encoding``; open_clip's own
    towers do not."""
    try:
        return wrap(model).takes_any_size()
    except TypeError:
        return False


# --- tokens of any block --------------------------------------------------------------------------
def final_norm(model) -> nn.Module:
    """The norm a model applies to its last block's output (:meth:`Adapter.final_norm`)."""
    return wrap(model).final_norm()


def block_tokens(model, x: torch.Tensor, layers: Sequence[int], norm: bool = False
                 ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (prefix (B, npre, D), patches (B, P, D))}``: the residual stream after each of
    ``layers`` (negative indexes allowed), test-time registers left out; with ``norm`` the
    model's final norm applied to each (:meth:`Adapter.intermediates`)."""
    layers = list(layers)
    return dict(zip(layers, wrap(model).intermediates(x, layers, norm=norm)))
