"""Convert a timm ``VisionTransformer`` into the equivalent Hugging Face ``transformers`` model.

Same weights, another library's module: ``Dinov2Model``, ``Dinov2WithRegistersModel``,
``ViTModel``, ``CLIPVisionModel``, ``SiglipVisionModel``, ``DINOv3ViTModel`` (from timm's
``Eva``), ``Siglip2VisionModel`` (from timm's ``NaFlexVit``), and ``CLIPModel`` or a tiny
``LlavaForConditionalGeneration`` around a CLIP tower (random text side). The HF config is
built from the timm model's sizes; the HF modules are found by role (see
:mod:`ttreg.adapters.hf`), so the 4.5x and 5.x layouts both convert. Outputs match at the
model's native grid (the libraries interpolate position embeddings differently at other
sizes); timm's classifier head is not converted. This is how planted HF models are made:
plant in timm (:func:`ttreg.testing.planted_vit`), convert.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ...adapters.hf import find_layers, get_path

# Roles inside one HF encoder layer, 5.x names first, then 4.x names.
_LAYER_ROLES = {
    "ln1": ("norm1", "layernorm_before", "layer_norm1"),
    "ln2": ("norm2", "layernorm_after", "layer_norm2"),
    "q": ("attention.q_proj", "self_attn.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "self_attn.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "self_attn.v_proj", "attention.attention.value"),
    "o": ("attention.o_proj", "self_attn.out_proj", "attention.output.dense"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "fc2": ("mlp.fc2", "output.dense"),
    "ls1": ("layer_scale1",),
    "ls2": ("layer_scale2",),
}


def _act_name(act: nn.Module) -> str:
    """The ``transformers`` activation name of a timm/torch activation module."""
    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if name == "GELUTanh" or (name == "GELU" and getattr(act, "approximate", "none") == "tanh"):
        return "gelu_pytorch_tanh"
    if name == "GELU":
        return "gelu"
    if name in ("SiLU", "Swish"):
        return "silu"
    if name == "ReLU":
        return "relu"
    raise ValueError(f"no transformers activation for timm's {name}")


def timm_sizes(m: nn.Module) -> dict[str, Any]:
    """Sizes and options of a timm ``VisionTransformer`` that an HF config needs.

    Raises ``ValueError`` for features the HF models cannot express (gated MLPs, QK norm,
    non-square images, a final norm after pooling).
    """
    if not (hasattr(m, "blocks") and hasattr(m, "patch_embed") and hasattr(m, "pos_embed")):
        raise TypeError(f"expected a timm VisionTransformer, got {type(m).__name__}")
    blk = m.blocks[0]
    mlp = blk.mlp
    if not (hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and isinstance(mlp.fc1, nn.Linear)):
        raise ValueError(f"timm MLP {type(mlp).__name__} (gated?) has no HF counterpart here")
    for extra in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(blk.attn, extra, nn.Identity()), nn.Identity):
            raise ValueError(f"timm attention with a {extra} has no HF counterpart")
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise ValueError("timm MLP with an inner norm has no HF counterpart")
    if not isinstance(getattr(m, "fc_norm", nn.Identity()), nn.Identity):
        raise ValueError("timm fc_norm (norm after pooling) has no HF counterpart; use global_pool='token'")
    img = m.patch_embed.img_size
    img = (img, img) if isinstance(img, int) else tuple(img)
    ps = m.patch_embed.patch_size
    ps = (ps, ps) if isinstance(ps, int) else tuple(ps)
    if img[0] != img[1] or ps[0] != ps[1]:
        raise ValueError(f"HF vision models need square images and patches, got {img} / {ps}")
    D = int(m.embed_dim)
    return dict(
        hidden_size=D, num_hidden_layers=len(m.blocks), num_attention_heads=int(blk.attn.num_heads),
        intermediate_size=int(mlp.fc1.out_features), hidden_act=_act_name(mlp.act),
        layer_norm_eps=float(blk.norm1.eps), image_size=int(img[0]), patch_size=int(ps[0]),
        qkv_bias=blk.attn.qkv.bias is not None, num_channels=int(m.patch_embed.proj.in_channels),
    )


def _prefix_and_patch_pos(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """timm position embeddings split into ``(prefix (npre, D), patches (N, D))``; the prefix
    part is zero when timm adds no position embedding to CLS/registers (``no_embed_class``)."""
    npre, D = int(m.num_prefix_tokens), int(m.embed_dim)
    pos = m.pos_embed.detach()[0]
    if getattr(m, "no_embed_class", False):
        return pos.new_zeros(npre, D), pos
    return pos[:npre], pos[npre:]


@torch.no_grad()
def _copy(dst: nn.Module, src: nn.Module) -> None:
    """Copy weight and bias of a Linear/Conv/LayerNorm (a missing bias on one side means zero)."""
    dst.weight.copy_(src.weight)
    if getattr(dst, "bias", None) is not None:
        if getattr(src, "bias", None) is not None:
            dst.bias.copy_(src.bias)
        else:
            dst.bias.zero_()
    elif getattr(src, "bias", None) is not None and bool(src.bias.any()):
        raise ValueError(f"{type(dst).__name__} has no bias to take timm's")


def _gamma(ls: nn.Module) -> torch.Tensor | None:
    return ls.gamma.detach() if hasattr(ls, "gamma") else None


@torch.no_grad()
def _copy_blocks(hf_root: nn.Module, m: nn.Module, layer_scale: bool) -> None:
    layers = find_layers(hf_root, len(m.blocks))
    D = int(m.embed_dim)
    for hl, tb in zip(layers, m.blocks):
        role = {k: get_path(hl, *paths) for k, paths in _LAYER_ROLES.items()}
        _copy(role["ln1"], tb.norm1)
        _copy(role["ln2"], tb.norm2)
        qkv_w = tb.attn.qkv.weight.reshape(3, D, D)
        qkv_b = tb.attn.qkv.bias.reshape(3, D) if tb.attn.qkv.bias is not None else None
        for i, r in enumerate("qkv"):
            role[r].weight.copy_(qkv_w[i])
            if role[r].bias is not None:
                role[r].bias.copy_(qkv_b[i]) if qkv_b is not None else role[r].bias.zero_()
        _copy(role["o"], tb.attn.proj)
        _copy(role["fc1"], tb.mlp.fc1)
        _copy(role["fc2"], tb.mlp.fc2)
        for hf_ls, t_ls in (("ls1", tb.ls1), ("ls2", tb.ls2)):
            g = _gamma(t_ls)
            if layer_scale:
                role[hf_ls].lambda1.copy_(g) if g is not None else role[hf_ls].lambda1.fill_(1.0)
            elif g is not None:
                raise ValueError("timm LayerScale has no counterpart in this HF model; convert to Dinov2")


def _plain_timm(m: nn.Module, what: str, *, cls: bool = True, regs: bool = False,
                pre_norm: bool = False) -> None:
    if (m.cls_token is not None) != cls:
        raise ValueError(f"{what} needs a timm model with class_token={cls}")
    if (int(getattr(m, "num_reg_tokens", 0)) > 0) != regs:
        raise ValueError(f"{what} needs a timm model {'with' if regs else 'without'} register tokens")
    if (not isinstance(m.norm_pre, nn.Identity)) != pre_norm:
        raise ValueError(f"{what} needs a timm model with pre_norm={pre_norm}")


def _eval(model: nn.Module, like: nn.Module) -> nn.Module:
    p = next(like.parameters())
    return model.to(device=p.device, dtype=p.dtype).eval()


@torch.no_grad()
def _timm_to_dinov2_family(m: nn.Module, with_registers: bool) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    _plain_timm(m, "Dinov2WithRegistersModel" if with_registers else "Dinov2Model", regs=with_registers)
    s = timm_sizes(m)
    hidden = s.pop("intermediate_size")
    D = s["hidden_size"]
    ratio = hidden // D if hidden % D == 0 else (hidden + 0.5) / D   # 5.x configs take only ints
    kw = dict(s, mlp_ratio=ratio, layerscale_value=1.0, use_swiglu_ffn=False, drop_path_rate=0.0,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if with_registers:
        hf = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=m.num_reg_tokens, **kw))
    else:
        hf = Dinov2Model(Dinov2Config(**kw))
    emb = hf.embeddings
    pre, patch = _prefix_and_patch_pos(m)
    emb.cls_token.copy_(m.cls_token)
    emb.position_embeddings.copy_(torch.cat([pre[:1], patch])[None])
    if with_registers:
        emb.register_tokens.copy_(m.reg_token + pre[1:][None])
    _copy(emb.patch_embeddings.projection, m.patch_embed.proj)
    _copy_blocks(hf, m, layer_scale=True)
    _copy(hf.layernorm, m.norm)
    return _eval(hf, m)


def timm_to_hf_dinov2(timm_model: nn.Module) -> nn.Module:
    """timm DINOv2-style ViT (CLS, LayerScale, no pre-norm, no registers) -> ``Dinov2Model``."""
    return _timm_to_dinov2_family(timm_model, with_registers=False)


def timm_to_hf_dinov2_with_registers(timm_model: nn.Module) -> nn.Module:
    """timm ViT with CLS and ``reg_tokens`` (e.g. ``vit_*_reg4_dinov2``) -> ``Dinov2WithRegistersModel``.

    timm's position embeddings of CLS/registers (if any) are folded into the tokens.
    """
    return _timm_to_dinov2_family(timm_model, with_registers=True)


@torch.no_grad()
def timm_to_hf_vit(timm_model: nn.Module, add_pooling_layer: bool = True) -> nn.Module:
    """timm plain ViT (CLS, no LayerScale, no pre-norm) -> ``ViTModel``.

    ``add_pooling_layer``: HF's pooler (dense + tanh on CLS) has no timm counterpart; it keeps
    HF's initialisation.
    """
    from transformers import ViTConfig, ViTModel
    m = timm_model
    _plain_timm(m, "ViTModel")
    cfg = ViTConfig(**timm_sizes(m), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = ViTModel(cfg, add_pooling_layer=add_pooling_layer)
    emb = hf.embeddings
    pre, patch = _prefix_and_patch_pos(m)
    emb.cls_token.copy_(m.cls_token)
    emb.position_embeddings.copy_(torch.cat([pre, patch])[None])
    _copy(emb.patch_embeddings.projection, m.patch_embed.proj)
    _copy_blocks(hf, m, layer_scale=False)
    _copy(hf.layernorm, m.norm)
    return _eval(hf, m)


def _clip_vision_config(m: nn.Module):
    from transformers import CLIPVisionConfig
    _plain_timm(m, "CLIPVisionModel", pre_norm=True)
    s = timm_sizes(m)
    s.pop("qkv_bias")
    return CLIPVisionConfig(**s, attention_dropout=0.0)


@torch.no_grad()
def _load_clip_tower(tower: nn.Module, m: nn.Module) -> nn.Module:
    """Copy timm CLIP-tower weights into an HF ``CLIPVisionModel`` (4.x or 5.x layout)."""
    emb = get_path(tower, "embeddings", "vision_model.embeddings")
    pre, patch = _prefix_and_patch_pos(m)
    emb.class_embedding.copy_(m.cls_token.reshape(-1))
    emb.position_embedding.weight.copy_(torch.cat([pre[:1], patch]))
    _copy(emb.patch_embedding, m.patch_embed.proj)
    _copy(get_path(tower, "pre_layrnorm", "vision_model.pre_layrnorm"), m.norm_pre)
    _copy_blocks(tower, m, layer_scale=False)
    _copy(get_path(tower, "post_layernorm", "vision_model.post_layernorm"), m.norm)
    return tower


def timm_to_hf_clip_vision(timm_model: nn.Module) -> nn.Module:
    """timm CLIP image tower (``pre_norm=True``, CLS, ``global_pool='token'``, final ``norm``) ->
    ``CLIPVisionModel``. HF's ``last_hidden_state`` is before the final norm; its
    ``pooler_output`` is ``post_layernorm`` of CLS, i.e. timm's pre-logits."""
    from transformers import CLIPVisionModel
    hf = CLIPVisionModel(_clip_vision_config(timm_model))
    return _eval(_load_clip_tower(hf, timm_model), timm_model)


@torch.no_grad()
def timm_to_hf_siglip_vision(timm_model: nn.Module) -> nn.Module:
    """timm SigLIP tower (``class_token=False``, ``global_pool='map'``) -> ``SiglipVisionModel``.

    timm's ``attn_pool`` becomes HF's attention-pooling ``head`` (``vision_use_head``).
    """
    from transformers import SiglipVisionConfig, SiglipVisionModel
    m = timm_model
    _plain_timm(m, "SiglipVisionModel", cls=False)
    s = timm_sizes(m)
    s.pop("qkv_bias")
    pool = getattr(m, "attn_pool", None)
    _check_attention_pool(pool)
    hf = SiglipVisionModel(SiglipVisionConfig(**s, attention_dropout=0.0, vision_use_head=pool is not None))
    emb = get_path(hf, "embeddings", "vision_model.embeddings")
    emb.position_embedding.weight.copy_(_prefix_and_patch_pos(m)[1])
    _copy(emb.patch_embedding, m.patch_embed.proj)
    _copy_blocks(hf, m, layer_scale=False)
    _copy(get_path(hf, "post_layernorm", "vision_model.post_layernorm"), m.norm)
    if pool is not None:
        _copy_attention_pool(get_path(hf, "head", "vision_model.head"), pool)
    return _eval(hf, m)


def _check_attention_pool(pool: nn.Module | None) -> None:
    if pool is not None and (type(pool).__name__ != "AttentionPoolLatent" or pool.latent_len != 1
                             or pool.pos_embed is not None or pool.mlp is None
                             or not isinstance(pool.q, nn.Linear)):
        raise ValueError("only timm's single-latent AttentionPoolLatent maps to SigLIP's head")


@torch.no_grad()
def _copy_attention_pool(head: nn.Module, pool: nn.Module) -> None:
    """timm ``AttentionPoolLatent`` -> SigLIP / SigLIP 2 ``MultiheadAttentionPoolingHead``."""
    D = pool.q.weight.shape[1]
    head.probe.copy_(pool.latent)
    head.attention.in_proj_weight.copy_(torch.cat([pool.q.weight, pool.kv.weight]))
    zero = torch.zeros(D, dtype=pool.kv.weight.dtype, device=pool.kv.weight.device)
    qb = pool.q.bias if pool.q.bias is not None else zero
    kvb = pool.kv.bias if pool.kv.bias is not None else torch.cat([zero, zero])
    head.attention.in_proj_bias.copy_(torch.cat([qb, kvb]))
    _copy(head.attention.out_proj, pool.proj)
    _copy(head.layernorm, pool.norm)
    _copy(head.mlp.fc1, pool.mlp.fc1)
    _copy(head.mlp.fc2, pool.mlp.fc2)


@torch.no_grad()
def timm_to_hf_clip(timm_model: nn.Module, text_config=None, *, projection_dim: int | None = None,
                    seed: int = 0) -> nn.Module:
    """A whole ``CLIPModel`` whose image tower carries the timm CLIP tower's weights.

    ``text_config``: a ``CLIPTextConfig`` (default: a tiny one); the text side and the visual
    projection (``projection_dim``, default the tower width) are random from ``seed``.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig
    vision = _clip_vision_config(timm_model)
    if text_config is None:
        text_config = CLIPTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     max_position_embeddings=16)
    cfg = CLIPConfig(text_config=text_config.to_dict(), vision_config=vision.to_dict(),
                     projection_dim=projection_dim or vision.hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = CLIPModel(cfg)
    _load_clip_tower(hf.vision_model, timm_model)
    return _eval(hf, timm_model)


def _block_ok(blk: nn.Module, what: str) -> None:
    """timm block features the HF layouts below cannot express."""
    attn = blk.attn
    for extra in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(attn, extra, nn.Identity()), nn.Identity):
            raise ValueError(f"timm attention with a {extra} has no {what} counterpart")
    if getattr(attn, "gate", None) is not None:
        raise ValueError(f"timm gated attention has no {what} counterpart")
    if not isinstance(getattr(blk.mlp, "norm", nn.Identity()), nn.Identity):
        raise ValueError(f"a timm MLP with an inner norm has no {what} counterpart")


def _qkv(attn: nn.Module, D: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """``[(weight, bias)]`` of q, k, v of a timm ``Attention`` / ``EvaAttention`` (fused or not)."""
    if getattr(attn, "qkv", None) is not None:
        ws = attn.qkv.weight.reshape(3, -1, D)
        if attn.qkv.bias is not None:
            bs = list(attn.qkv.bias.reshape(3, -1))
        elif getattr(attn, "q_bias", None) is not None:
            bs = [attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias]
        else:
            bs = [None] * 3
        return list(zip(ws, bs))
    return [(p.weight, p.bias) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]


@torch.no_grad()
def timm_to_hf_dinov3(timm_model: nn.Module) -> nn.Module:
    """timm ``Eva`` in the DINOv3 layout (``vit_*_patch16_dinov3``: CLS + storage tokens, no
    absolute position embedding, ``dinov3`` RoPE with half rotation, LayerScale, plain or SwiGLU
    MLP) -> ``DINOv3ViTModel``. The rotary tables of the two libraries agree (same periods, same
    patch-centre coordinates), so outputs match at any image size."""
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    m = timm_model
    if type(m).__name__ != "Eva" or not isinstance(getattr(m, "rope", None), RotaryEmbeddingDinoV3):
        raise ValueError("timm_to_hf_dinov3 needs a timm Eva with rope_type='dinov3' (vit_*_dinov3)")
    if m.pos_embed is not None or m.cls_token is None or not isinstance(m.norm_pre, nn.Identity):
        raise ValueError("DINOv3ViTModel has a CLS token, no absolute position embedding and no pre-norm")
    if not getattr(m.rope, "rotate_half", True) or type(m.blocks[0]).__name__ != "EvaBlock":
        raise ValueError("DINOv3ViTModel rotates half the head dims and uses pre-norm blocks")
    blk = m.blocks[0]
    _block_ok(blk, "DINOv3ViTModel")
    D, W = int(m.embed_dim), int(blk.mlp.fc2.in_features)
    gated = type(blk.mlp).__name__ in ("GluMlp", "SwiGLU")
    act = "silu" if gated else _act_name(blk.mlp.act)
    bias = _qkv(blk.attn, D)[0][1] is not None
    ph, pw = m.patch_embed.patch_size
    cfg = DINOv3ViTConfig(
        hidden_size=D, intermediate_size=W, num_hidden_layers=len(m.blocks),
        num_attention_heads=int(blk.attn.num_heads), hidden_act=act,
        layer_norm_eps=float(blk.norm1.eps), rope_theta=float(m.rope.temperature),
        image_size=int(m.patch_embed.img_size[0]), patch_size=int(ph),
        num_register_tokens=int(m.num_prefix_tokens) - 1, layerscale_value=1.0,
        use_gated_mlp=gated, query_bias=bias, key_bias=False, value_bias=bias,
        proj_bias=blk.attn.proj.bias is not None, mlp_bias=blk.mlp.fc2.bias is not None,
        drop_path_rate=0.0)
    hf = DINOv3ViTModel(cfg)
    emb = hf.embeddings
    emb.cls_token.copy_(m.cls_token)
    if m.reg_token is not None:
        emb.register_tokens.copy_(m.reg_token)
    _copy(emb.patch_embeddings, m.patch_embed.proj)
    for hl, tb in zip(find_layers(hf, len(m.blocks)), m.blocks):
        _copy(hl.norm1, tb.norm1)
        _copy(hl.norm2, tb.norm2)
        for proj, (w, b) in zip((hl.attention.q_proj, hl.attention.k_proj, hl.attention.v_proj),
                                _qkv(tb.attn, D)):
            proj.weight.copy_(w)
            if proj.bias is not None:
                proj.bias.copy_(b) if b is not None else proj.bias.zero_()
        _copy(hl.attention.o_proj, tb.attn.proj)
        for ls, gamma in ((hl.layer_scale1, tb.gamma_1), (hl.layer_scale2, tb.gamma_2)):
            ls.lambda1.copy_(gamma) if gamma is not None else ls.lambda1.fill_(1.0)
        mlp = tb.mlp
        if type(mlp).__name__ == "GluMlp":
            if getattr(mlp, "gate_last", False):
                raise ValueError("a GluMlp with gate_last=True has no DINOv3ViTModel counterpart")
            gate_w, up_w = mlp.fc1.weight.chunk(2)
            hl.mlp.gate_proj.weight.copy_(gate_w)
            hl.mlp.up_proj.weight.copy_(up_w)
            if mlp.fc1.bias is not None:
                gate_b, up_b = mlp.fc1.bias.chunk(2)
                hl.mlp.gate_proj.bias.copy_(gate_b)
                hl.mlp.up_proj.bias.copy_(up_b)
        elif gated:
            _copy(hl.mlp.gate_proj, mlp.fc1_g)
            _copy(hl.mlp.up_proj, mlp.fc1_x)
        else:
            _copy(hl.mlp.up_proj, mlp.fc1)
        _copy(hl.mlp.down_proj, mlp.fc2)
    _copy(hf.norm, m.norm)
    return _eval(hf, m)


@torch.no_grad()
def timm_to_hf_siglip2(timm_model: nn.Module) -> nn.Module:
    """timm ``NaFlexVit`` in the SigLIP 2 layout (``naflexvit_*_siglip``: linear patch embedding
    on ``(P, P, C)`` patches, a learned square position grid resized bilinearly with antialias, no
    prefix tokens, plain blocks, ``map`` pooling) -> ``Siglip2VisionModel``."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel
    m = timm_model
    emb = getattr(m, "embeds", None)
    if type(m).__name__ != "NaFlexVit" or emb is None or not isinstance(emb.proj, nn.Linear):
        raise ValueError("timm_to_hf_siglip2 needs a timm NaFlexVit with a linear patch embedding")
    if (m.num_prefix_tokens or emb.pos_embed_type != "learned" or getattr(m, "rope", None) is not None
            or not getattr(emb, "channels_last", True)):
        raise ValueError("Siglip2VisionModel has no prefix tokens, a learned position grid, no RoPE "
                         "and (P, P, C) patches")
    if (emb.pos_embed_interp_mode, emb.pos_embed_antialias, emb.pos_embed_align_corners) != ("bilinear", True, False):
        raise ValueError("Siglip2VisionModel resizes positions bilinearly with antialias "
                         "(pos_embed_interp_mode='bilinear')")
    gh, gw = emb.pos_embed.shape[1:3]
    if gh != gw or not isinstance(m.norm_pre, nn.Identity):
        raise ValueError("Siglip2VisionModel needs a square position grid and no pre-norm")
    blk = m.blocks[0]
    if type(blk).__name__ != "Block":
        raise ValueError("Siglip2VisionModel needs timm's plain Block")
    _block_ok(blk, "Siglip2VisionModel")
    pool = getattr(m, "attn_pool", None)
    _check_attention_pool(pool)
    D = int(m.embed_dim)
    ph, pw = emb.patch_size
    cfg = Siglip2VisionConfig(
        hidden_size=D, intermediate_size=int(blk.mlp.fc1.out_features), num_hidden_layers=len(m.blocks),
        num_attention_heads=int(blk.attn.num_heads), hidden_act=_act_name(blk.mlp.act),
        layer_norm_eps=float(blk.norm1.eps), num_channels=int(emb.in_chans), num_patches=int(gh * gw),
        patch_size=int(ph), attention_dropout=0.0, vision_use_head=pool is not None)
    hf = Siglip2VisionModel(cfg)
    _copy(hf.embeddings.patch_embedding, emb.proj)
    hf.embeddings.position_embedding.weight.copy_(emb.pos_embed.reshape(gh * gw, D))
    _copy_blocks(hf, m, layer_scale=False)
    _copy(hf.post_layernorm, m.norm)
    if pool is not None:
        _copy_attention_pool(hf.head, pool)
    return _eval(hf, m)


def tiny_text_config(**overrides):
    """A tiny random Llama config for test VLMs (no language weights needed)."""
    from transformers import LlamaConfig
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    kw.update(overrides)
    return LlamaConfig(**kw)


@torch.no_grad()
def timm_to_hf_llava(timm_model: nn.Module, text_config=None, *, vision_feature_layer: int = -2,
                     vision_feature_select_strategy: str = "default", seed: int = 0) -> nn.Module:
    """A ``LlavaForConditionalGeneration`` whose CLIP vision tower carries the timm tower's weights.

    ``text_config``: the language model's config (default: :func:`tiny_text_config`); the
    language model and projector are randomly initialised from ``seed``.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    text_config = text_config if text_config is not None else tiny_text_config()
    cfg = LlavaConfig(vision_config=_clip_vision_config(timm_model), text_config=text_config,
                      vision_feature_layer=vision_feature_layer,
                      vision_feature_select_strategy=vision_feature_select_strategy,
                      image_token_index=text_config.vocab_size - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = LlavaForConditionalGeneration(cfg)
    _load_clip_tower(get_path(hf, "model.vision_tower", "vision_tower"), timm_model)
    return _eval(hf, timm_model)


__all__ = ["timm_to_hf_dinov2", "timm_to_hf_dinov2_with_registers", "timm_to_hf_vit",
           "timm_to_hf_clip_vision", "timm_to_hf_clip", "timm_to_hf_siglip_vision", "timm_to_hf_llava",
           "timm_to_hf_dinov3", "timm_to_hf_siglip2", "tiny_text_config", "timm_sizes"]
