"""Convert a CLIP-style timm ``VisionTransformer`` into an open_clip ``CLIP`` with the same vision weights.

The timm model must be laid out like an OpenAI/OpenCLIP image tower: a class token, learned
position embeddings that cover it, a pre-norm (``ln_pre``, or none), pre-LN blocks with a
(quick) GELU MLP, the final ``norm`` applied before ``'token'`` pooling (``ln_post``), and a
bias-free linear ``head`` (the image projection). This is how ttreg makes open_clip models with
planted register neurons: plant in timm (:func:`ttreg.testing.planted_vit` with
``pre_norm=True, class_token=True, global_pool='token'``), then convert.

Weight map (timm -> open_clip ``visual``)::

    patch_embed.proj   -> conv1                 cls_token -> class_embedding
    pos_embed          -> positional_embedding  norm_pre  -> ln_pre     norm -> ln_post
    blocks.i.norm1/2   -> transformer.resblocks.i.ln_1/2
    blocks.i.attn.qkv  -> ...attn.in_proj_{weight,bias}   blocks.i.attn.proj -> ...attn.out_proj
    blocks.i.mlp.fc1/2 -> ...mlp.c_fc/c_proj              blocks.i.ls1/2     -> ...ls_1/2
    head.weight.T      -> proj
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

#: a small text tower for converted models (the vision tower is what matters)
TINY_TEXT_CFG = dict(context_length=8, vocab_size=64, width=32, heads=2, layers=1)


def _is_quick_gelu(act: nn.Module) -> bool:
    name = type(act).__name__
    if name == "QuickGELU":
        return True
    if name == "GELU" and getattr(act, "approximate", "none") == "none":
        return False
    raise ValueError(f"open_clip towers use GELU or QuickGELU; the timm model uses {name}")


def _check_layout(m: nn.Module) -> None:
    from timm.models.vision_transformer import Attention, Block, Mlp, VisionTransformer
    if not isinstance(m, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(m).__name__}")
    problems = []
    if m.cls_token is None or m.num_prefix_tokens != 1:
        problems.append("exactly one class token and no trained registers")
    if getattr(m, "no_embed_class", False) or m.pos_embed is None:
        problems.append("a learned position embedding that covers the class token")
    if m.global_pool != "token" or not isinstance(m.fc_norm, nn.Identity):
        problems.append("global_pool='token' with the final norm before pooling")
    if isinstance(m.norm, nn.Identity):
        problems.append("a final norm (ln_post)")
    if m.patch_embed.proj.bias is not None and m.patch_embed.proj.bias.abs().max() > 0:
        problems.append("a bias-free patch embedding (timm pre_norm=True)")
    if not isinstance(getattr(m, "attn_pool", None), (type(None), nn.Identity)):
        problems.append("no attention pooling")
    for blk in m.blocks:
        if type(blk) is not Block or type(blk.attn) is not Attention or type(blk.mlp) is not Mlp:
            problems.append("plain pre-LN Block/Attention/Mlp blocks")
            break
        attn, mlp = blk.attn, blk.mlp
        extra = (attn.q_norm, attn.k_norm, attn.norm, mlp.norm)
        if not all(isinstance(e, nn.Identity) for e in extra) or getattr(attn, "gate", None) is not None:
            problems.append("no qk-norm, attention norm, gate or MLP norm")
            break
        if mlp.fc1.bias is None or mlp.fc2.bias is None or attn.proj.bias is None:
            problems.append("biases on the MLP and attention output projections")
            break
    if problems:
        raise ValueError("this timm model is not CLIP-shaped; open_clip needs " + "; ".join(problems))


@torch.no_grad()
def timm_to_open_clip(timm_model: nn.Module, embed_dim: int | None = None,
                      text_cfg: Mapping[str, Any] | None = None,
                      proj: torch.Tensor | None = None) -> nn.Module:
    """Return an ``open_clip.model.CLIP`` whose ``visual`` computes what ``timm_model`` computes.

    ``proj``: the image projection ``(width, embed_dim)``; by default the transpose of the timm
    ``head`` weight (which must have no bias), or the identity when the head is ``Identity``.
    ``embed_dim`` defaults to the projection's output size. ``text_cfg``: open_clip
    ``CLIPTextCfg`` fields (default: a tiny random text tower). The result is in eval mode, on the
    timm model's device and dtype; its preprocessing config takes the timm ``pretrained_cfg``'s
    mean and std when there is one (OpenAI's otherwise).
    """
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import CLIP, set_model_preprocess_cfg

    m = timm_model
    _check_layout(m)
    D = int(m.embed_dim)
    if proj is None:
        head = m.head
        if isinstance(head, nn.Identity):
            proj = torch.eye(D)
        elif isinstance(head, nn.Linear):
            if head.bias is not None and head.bias.abs().max() > 0:
                raise ValueError("the timm head has a bias; open_clip's projection has none "
                                 "(pass proj= to set the projection explicitly)")
            proj = head.weight.t()
        else:
            raise ValueError(f"cannot read a projection from a {type(head).__name__} head; pass proj=")
    proj = torch.as_tensor(proj)
    if proj.shape[0] != D:
        raise ValueError(f"proj has {proj.shape[0]} rows; the model's width is {D}")
    embed_dim = int(proj.shape[1]) if embed_dim is None else int(embed_dim)
    if embed_dim != proj.shape[1]:
        raise ValueError(f"embed_dim={embed_dim} but proj maps to {proj.shape[1]}")

    blk0 = m.blocks[0]
    heads = int(blk0.attn.num_heads)
    ph, pw = m.patch_embed.patch_size
    if ph != pw:
        raise ValueError("open_clip needs square patches")
    ls = getattr(blk0, "ls1", None)
    has_ls = ls is not None and hasattr(ls, "gamma")
    vision_cfg = dict(
        layers=len(m.blocks), width=D, head_width=D // heads,
        mlp_ratio=blk0.mlp.fc1.out_features / D, patch_size=int(ph),
        image_size=tuple(int(s) for s in m.patch_embed.img_size),
        no_ln_pre=isinstance(m.norm_pre, nn.Identity),
        ls_init_value=1.0 if has_ls else None,
        norm_kwargs={"eps": float(m.norm.eps)},
    )
    clip = CLIP(embed_dim, vision_cfg, dict(text_cfg or TINY_TEXT_CFG),
                quick_gelu=_is_quick_gelu(blk0.mlp.act))
    param = next(m.parameters())
    clip = clip.to(device=param.device, dtype=param.dtype)

    v = clip.visual
    v.conv1.weight.copy_(m.patch_embed.proj.weight)
    v.class_embedding.copy_(m.cls_token.reshape(-1))
    v.positional_embedding.copy_(m.pos_embed.reshape(-1, D))
    if not isinstance(m.norm_pre, nn.Identity):
        v.ln_pre.load_state_dict(m.norm_pre.state_dict())
    v.ln_post.load_state_dict(m.norm.state_dict())
    v.proj.copy_(proj)
    for src, dst in zip(m.blocks, v.transformer.resblocks):
        dst.ln_1.load_state_dict(src.norm1.state_dict())
        dst.ln_2.load_state_dict(src.norm2.state_dict())
        dst.attn.in_proj_weight.copy_(src.attn.qkv.weight)
        qkv_bias = src.attn.qkv.bias
        dst.attn.in_proj_bias.copy_(qkv_bias if qkv_bias is not None else torch.zeros_like(dst.attn.in_proj_bias))
        dst.attn.out_proj.load_state_dict(src.attn.proj.state_dict())
        dst.mlp.c_fc.load_state_dict(src.mlp.fc1.state_dict())
        dst.mlp.c_proj.load_state_dict(src.mlp.fc2.state_dict())
        if has_ls:
            dst.ls_1.gamma.copy_(src.ls1.gamma)
            dst.ls_2.gamma.copy_(src.ls2.gamma)
    cfg = getattr(m, "pretrained_cfg", None) or {}
    set_model_preprocess_cfg(clip, {
        "size": v.image_size, "mode": "RGB", "interpolation": "bicubic", "resize_mode": "shortest",
        "fill_color": 0, "mean": tuple(cfg.get("mean", OPENAI_DATASET_MEAN)),
        "std": tuple(cfg.get("std", OPENAI_DATASET_STD))})
    return clip.eval()


__all__ = ["timm_to_open_clip", "TINY_TEXT_CFG"]
