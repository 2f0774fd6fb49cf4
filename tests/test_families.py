"""Every family ttreg supports, on tiny random models with planted register neurons.

One row per family (:data:`FAMILIES`), built once per session (:func:`zoo`), each planted with
:func:`ttreg.testing.plant_register_neurons` -- neuron (1, 7) writes a little, neuron (2, 21) a
lot, both on the patch that carries a marker (its place changes from image to image), so the
right answer is known everywhere. The capability tests of each row decide the cells of the table
in ``docs/families.md``; the last test checks that the committed table is what these tests
produce (``TTREG_WRITE_FAMILIES=1 pytest tests/test_families.py`` rewrites it).
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn

import ttreg
from ttreg.testing import marked_images, plant_register_neurons

tf = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
open_clip = pytest.importorskip("open_clip")

from timm.models.eva import Eva  # noqa: E402
from timm.models.naflexvit import NaFlexVit, NaFlexVitCfg  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from ttreg.adapters.hf import get_path, siglip2_inputs  # noqa: E402
from ttreg.adapters.hf_qwen_vl import merge_order  # noqa: E402
from ttreg.testing.vlm import qwen_vl_inputs, tiny_qwen_vl  # noqa: E402

from conftest import fail_inside, flat, hook_state, ratio  # noqa: E402


PLANTS = [(1, 7, 0.5), (2, 21, 12.0)]
NEURONS = [(1, 7), (2, 21)]
SIZE, PATCH, DEPTH, WIDTH = 48, 8, 4, 64
GRID = (SIZE // PATCH) ** 2
DOC = Path(__file__).resolve().parents[1] / "docs" / "families.md"


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


# --- the families ---------------------------------------------------------------------------------

TIMM = dict(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=2, num_classes=0)
HFV = dict(hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=DEPTH, num_attention_heads=2,
           image_size=SIZE, patch_size=PATCH)
TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256)
IMAGE_TOKEN = 95


def _timm_eva(**kw):
    return Eva(**TIMM, **kw)


def _dinov3(num_reg_tokens: int = 2):
    return _timm_eva(dynamic_img_size=True, qkv_bias=False, init_values=1e-5, rope_type="dinov3",
                     rope_temperature=100, rope_rotate_half=True, use_rot_pos_emb=True, use_abs_pos_emb=False,
                     num_reg_tokens=num_reg_tokens, use_fc_norm=False, norm_layer=partial(nn.LayerNorm, eps=1e-5))


def _evaclip():
    return _timm_eva(qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                     use_rot_pos_emb=True, ref_feat_shape=(4, 4), global_pool="token")


def _naflex():
    return NaFlexVit(NaFlexVitCfg(patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=2, act_layer="gelu_tanh",
                                  global_pool="map", pos_embed_interp_mode="bilinear",
                                  pos_embed_grid_size=(SIZE // PATCH,) * 2), num_classes=0)


def _siglip():
    return tf.SiglipVisionConfig(**HFV)


def _vlm(name: str):
    if name == "llava":
        cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**HFV).to_dict(), text_config=tf.LlamaConfig(**TEXT).to_dict(),
                             image_token_index=IMAGE_TOKEN, vision_feature_layer=-2)
        return tf.LlavaForConditionalGeneration(cfg)
    if name == "llava_onevision":
        cfg = tf.LlavaOnevisionConfig(vision_config=_siglip().to_dict(), text_config=tf.Qwen2Config(**TEXT).to_dict(),
                                      image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full", image_grid_pinpoints=[[SIZE, SIZE]])
        return tf.LlavaOnevisionForConditionalGeneration(cfg)
    if name == "paligemma":
        cfg = tf.PaliGemmaConfig(vision_config=_siglip().to_dict(), text_config=tf.GemmaConfig(**TEXT, head_dim=16).to_dict(),
                                 image_token_index=IMAGE_TOKEN, projection_dim=32)
        return tf.PaliGemmaForConditionalGeneration(cfg)
    if name == "gemma3":
        cfg = tf.Gemma3Config(vision_config=_siglip().to_dict(),
                              text_config=tf.Gemma3TextConfig(**TEXT, head_dim=16).to_dict(),
                              mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=93,
                              eoi_token_index=94)
        return tf.Gemma3ForConditionalGeneration(cfg)
    if name in ("idefics3", "smolvlm"):
        V, C, M = ((tf.Idefics3VisionConfig, tf.Idefics3Config, tf.Idefics3ForConditionalGeneration) if name == "idefics3"
                   else (tf.SmolVLMVisionConfig, tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration))
        return M(C(vision_config=V(**HFV).to_dict(), text_config=tf.LlamaConfig(**TEXT).to_dict(),
                   image_token_id=IMAGE_TOKEN, scale_factor=2))
    if name == "internvl":
        cfg = tf.InternVLConfig(vision_config=tf.InternVLVisionConfig(**HFV).to_dict(),
                                text_config=tf.Qwen2Config(**TEXT).to_dict(), image_token_id=IMAGE_TOKEN,
                                downsample_ratio=0.5)
        return tf.InternVLForConditionalGeneration(cfg)
    raise KeyError(name)


class TinyMixer(nn.Module):
    """Self-attention that role-finding cannot recognise: no 'attention' in its name, no fused qkv."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        split = lambda t: t.reshape(B, T, self.heads, -1).transpose(1, 2)   # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        return self.o((a @ v).transpose(1, 2).reshape(B, T, D))


class TinyLayer(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.pre_mix, self.mixer = nn.LayerNorm(d), TinyMixer(d, heads)
        self.pre_ff, self.ff = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.mixer(self.pre_mix(x))
        return x + self.ff(self.pre_ff(x))


class TinyViT(nn.Module):
    """A ViT no library defines: a conv stem, one summary token, learned positions."""

    def __init__(self, d: int = WIDTH, depth: int = DEPTH, heads: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, d, PATCH, PATCH)
        self.summary = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.where = nn.Parameter(torch.randn(1, GRID + 1, d) * 0.02)
        self.stack = nn.ModuleList(TinyLayer(d, heads) for _ in range(depth))
        self.out = nn.LayerNorm(d)

    def forward(self, x):
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.summary.expand(len(t), -1, -1), t], 1) + self.where
        for layer in self.stack:
            t = layer(t)
        return self.out(t)


DINOV2 = dict({k: v for k, v in HFV.items() if k != "intermediate_size"}, mlp_ratio=2)


def _dinov2_backbone(**kw):
    return tf.Dinov2Config(**DINOV2, out_indices=[1, 2, 3, 4], **kw)


def _depth(name: str):
    """Depth Anything and DPT on a DINOv2 backbone (what load_backbone builds: Dinov2Backbone)."""
    neck = dict(neck_hidden_sizes=[16, 32, 64, 64], fusion_hidden_size=16)
    if name == "depth_anything":
        cfg = tf.DepthAnythingConfig(backbone_config=_dinov2_backbone(reshape_hidden_states=False),
                                     reassemble_hidden_size=WIDTH, patch_size=PATCH, head_hidden_size=8, **neck)
        return tf.DepthAnythingForDepthEstimation(cfg)
    cfg = tf.DPTConfig(backbone_config=_dinov2_backbone(reshape_hidden_states=False), is_hybrid=False,
                       hidden_size=WIDTH, patch_size=PATCH, image_size=SIZE, reassemble_factors=[4, 2, 1, 0.5],
                       head_in_index=-1, **neck)
    return tf.DPTForDepthEstimation(cfg)


def _timm_features(feature_cls: str):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, feature_cls=feature_cls,
                             img_size=SIZE, patch_size=PATCH, depth=DEPTH, embed_dim=WIDTH, num_heads=2)


def _open_clip_eva(trunk: nn.Module) -> nn.Module:
    """An open_clip CLIP whose tower is ``TimmModel`` around ``trunk`` (EVA02-CLIP's layout)."""
    from ttreg.testing.convert.open_clip import TINY_TEXT_CFG
    clip = open_clip.model.CLIP(32, dict(timm_model_name="eva02_tiny_patch14_224", timm_pool="token",
                                         timm_proj="linear", image_size=SIZE), dict(TINY_TEXT_CFG))
    clip.visual.trunk = trunk
    clip.visual.head.proj = nn.Linear(WIDTH, 32, bias=False)
    clip.visual.image_size = (SIZE, SIZE)
    return clip


@dataclass
class Family:
    """One row of the table: how to build a tiny model and what ttreg must find in it."""

    row: str                                   # the row label in docs/families.md
    library: str
    build: Callable[[], nn.Module]
    adapter: str                               # the adapter class wrap() must pick
    prefix: int                                # CLS + trained registers / storage tokens
    site: Callable[[nn.Module], nn.Module]     # block 0's MLP down-projection (the neuron site)
    kind: str = "encoder"                      # encoder | naflex | vlm | open_clip | custom | task | features
    note: str = ""
    wrap_kw: dict | None = None                # names for ttreg.wrap (the generic adapter)


QWEN_NOTE = "one register per image of the packed sequence (cu_seqlens); RoPE: registers get none"


def _hf_site(path: str) -> Callable:
    return lambda m: get_path(ttreg.wrap(m).blocks[0], path)


FAMILIES: dict[str, Family] = {f.row: f for f in [
    Family("timm VisionTransformer", "timm", lambda: VisionTransformer(**TIMM), "TimmViTAdapter", 1,
           lambda m: m.blocks[0].mlp.fc2),
    Family("timm Eva: EVA-02 (SwiGLU, RoPE)", "timm",
           lambda: _timm_eva(mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4)),
           "TimmEvaAdapter", 1, lambda m: m.blocks[0].mlp.fc2, note="RoPE: registers get none"),
    Family("timm Eva: EVA-CLIP (scale norms)", "timm", _evaclip, "TimmEvaAdapter", 1,
           lambda m: m.blocks[0].mlp.fc2, note="site after the SwiGLU scale norm"),
    Family("timm Eva: DINOv3 (storage tokens)", "timm", _dinov3, "TimmEvaAdapter", 3,
           lambda m: m.blocks[0].mlp.fc2, note="RoPE: registers get none"),
    Family("timm Eva: PE-Core", "timm",
           lambda: _timm_eva(global_pool="map", attn_type="rope", use_pre_transformer_norm=True, use_rot_pos_emb=True,
                             ref_feat_shape=(4, 4), rope_grid_offset=1.0, rope_grid_indexing="xy",
                             attn_pool_num_heads=2, attn_pool_mlp_ratio=4.0),
           "TimmEvaAdapter", 1, lambda m: m.blocks[0].mlp.fc2, note="pre-norm applied to registers"),
    Family("timm NaFlexVit (SigLIP 2)", "timm", _naflex, "TimmNaFlexAdapter", 0,
           lambda m: m.blocks[0].mlp.fc2, kind="naflex", note="padding masks: registers in, padding out"),
    Family("HF Dinov2Model", "transformers",
           lambda: tf.Dinov2Model(tf.Dinov2Config(**{k: v for k, v in HFV.items() if k != "intermediate_size"},
                                                  mlp_ratio=2)),
           "HFDinov2Adapter", 1, _hf_site("mlp.fc2")),
    Family("HF ViTModel", "transformers", lambda: tf.ViTModel(tf.ViTConfig(**HFV)), "HFViTAdapter", 1,
           _hf_site("mlp.fc2")),
    Family("HF CLIPVisionModel", "transformers", lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**HFV)),
           "HFCLIPVisionAdapter", 1, _hf_site("mlp.fc2")),
    Family("HF SiglipVisionModel", "transformers", lambda: tf.SiglipVisionModel(_siglip()),
           "HFSiglipVisionAdapter", 0, _hf_site("mlp.fc2")),
    Family("HF DINOv3ViTModel", "transformers",
           lambda: tf.DINOv3ViTModel(tf.DINOv3ViTConfig(**HFV, num_register_tokens=2, use_gated_mlp=True,
                                                        hidden_act="silu")),
           "HFDINOv3Adapter", 3, _hf_site("mlp.down_proj"), note="RoPE: registers get none"),
    Family("HF Siglip2VisionModel (NaFlex)", "transformers",
           lambda: tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**{k: v for k, v in HFV.items() if k != "image_size"},
                                                                num_patches=GRID)),
           "HFSiglip2Adapter", 0, _hf_site("mlp.fc2"), kind="naflex", note="padding masks: registers in, padding out"),
    Family("HF Aimv2VisionModel", "transformers", lambda: tf.Aimv2VisionModel(tf.Aimv2VisionConfig(**HFV)),
           "HFAimv2Adapter", 0, _hf_site("ffn.down_proj"), note="SwiGLU site: act(gate) * up"),
    Family("HF InternVLVisionModel (InternViT)", "transformers",
           lambda: tf.InternVLVisionModel(tf.InternVLVisionConfig(**HFV)), "HFInternVLVisionAdapter", 1,
           _hf_site("mlp.fc2")),
    Family("HF LLaVA (CLIP tower)", "transformers", partial(_vlm, "llava"), "HFLlavaAdapter", 1,
           _hf_site("mlp.fc2"), kind="vlm"),
    Family("HF LLaVA-OneVision (SigLIP tower)", "transformers", partial(_vlm, "llava_onevision"),
           "HFLlavaOnevisionAdapter", 0, _hf_site("mlp.fc2"), kind="vlm"),
    Family("HF PaliGemma (SigLIP tower)", "transformers", partial(_vlm, "paligemma"), "HFPaliGemmaAdapter", 0,
           _hf_site("mlp.fc2"), kind="vlm"),
    Family("HF Gemma 3 (SigLIP tower)", "transformers", partial(_vlm, "gemma3"), "HFGemma3Adapter", 0,
           _hf_site("mlp.fc2"), kind="vlm"),
    Family("HF Idefics3 (SigLIP-style tower)", "transformers", partial(_vlm, "idefics3"), "HFIdefics3Adapter", 0,
           _hf_site("mlp.fc2"), kind="vlm"),
    Family("HF SmolVLM (SigLIP-style tower)", "transformers", partial(_vlm, "smolvlm"), "HFIdefics3Adapter", 0,
           _hf_site("mlp.fc2"), kind="vlm"),
    Family("HF InternVL (InternViT tower)", "transformers", partial(_vlm, "internvl"), "HFInternVLAdapter", 1,
           _hf_site("mlp.fc2"), kind="vlm"),
    Family("HF Qwen2-VL (packed tower)", "transformers", partial(tiny_qwen_vl, "qwen2_vl"), "HFQwenVLAdapter", 0,
           _hf_site("mlp.fc2"), kind="qwen_vl", note=QWEN_NOTE),
    Family("HF Qwen3-VL (packed tower, deep stack)", "transformers", partial(tiny_qwen_vl, "qwen3_vl"),
           "HFQwenVLAdapter", 0, _hf_site("mlp.linear_fc2"), kind="qwen_vl",
           note=QWEN_NOTE + "; deep-stack features keep their shapes"),
    Family("HF Dinov2Backbone", "transformers", lambda: tf.Dinov2Backbone(tf.Dinov2Config(**DINOV2, out_indices=[2, 4])),
           "HFDinov2BackboneAdapter", 1, _hf_site("mlp.fc2"), kind="task", note="feature maps keep their shapes"),
    Family("HF DepthAnythingForDepthEstimation (DINOv2 backbone)", "transformers", partial(_depth, "depth_anything"),
           "HFTaskAdapter", 1, _hf_site("mlp.fc2"), kind="task", note="registers in the backbone; depth keeps its shape"),
    Family("HF DPTForDepthEstimation (DINOv2 backbone)", "transformers", partial(_depth, "dpt"),
           "HFTaskAdapter", 1, _hf_site("mlp.fc2"), kind="task", note="registers in the backbone; depth keeps its shape"),
    Family("HF ViTForImageClassification", "transformers",
           lambda: tf.ViTForImageClassification(tf.ViTConfig(**HFV, num_labels=3)), "HFTaskAdapter", 1,
           _hf_site("mlp.fc2"), kind="task"),
    Family("HF Dinov2ForImageClassification", "transformers",
           lambda: tf.Dinov2ForImageClassification(tf.Dinov2Config(**DINOV2, num_labels=3)), "HFTaskAdapter", 1,
           _hf_site("mlp.fc2"), kind="task"),
    Family("timm features_only ViT (feature_cls='getter')", "timm", partial(_timm_features, "getter"),
           "TimmFeaturesAdapter", 1, lambda m: m.model.blocks[0].mlp.fc2, kind="features",
           note="feature maps keep their shapes"),
    Family("timm features_only ViT (feature_cls='hook')", "timm", partial(_timm_features, "hook"),
           "TimmFeaturesAdapter", 1, lambda m: m["body"].blocks[0].mlp.fc2, kind="features",
           note="recorded features keep their shapes"),
    Family("open_clip CLIP, timm Eva trunk (EVA02-CLIP)", "open_clip", lambda: _open_clip_eva(_evaclip()),
           "OpenCLIPTimmAdapter", 1, lambda m: m.visual.trunk.blocks[0].mlp.fc2, kind="open_clip"),
    Family("any ViT: ttreg.wrap(model, attention=...)", "custom", TinyViT, "GenericAdapter", 1,
           lambda m: m.stack[0].ff[2], kind="custom", wrap_kw=dict(attention="mixer", image_size=SIZE),
           note="names given: attention, image_size"),
]}
NAMES = list(FAMILIES)
#: recognised and refused: row -> (library, the reason the refusal test checks)
REFUSED = {"HF Qwen2.5-VL": ("transformers", "windowed attention"),
           "timm features_only ViT (feature_cls='fx')": ("timm", "torch.fx rewrite")}


class Zoo:
    """Tiny planted models, built on first use and kept for the session."""

    def __init__(self) -> None:
        self.images, self.marked = marked_images(8, SIZE, PATCH)
        self.models: dict[str, nn.Module] = {}

    def __call__(self, row: str) -> nn.Module:
        if row not in self.models:
            fam = FAMILIES[row]
            torch.manual_seed(0)
            model = fam.build().eval()
            if fam.wrap_kw:
                ttreg.wrap(model, **fam.wrap_kw)
            plant_register_neurons(model, PLANTS, self.images, self.marked)
            self.models[row] = model
        return self.models[row]


@pytest.fixture(scope="session")
def zoo() -> Zoo:
    return Zoo()


# --- what a user of each family reads ---------------------------------------------------------------

def _vlm_pixels(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    names = ttreg.adapters.hf.hf_class_names(model)
    if any("LlavaOnevision" in n for n in names):
        return dict(pixel_values=x[:, None].expand(-1, 2, -1, -1, -1).contiguous(),
                    image_sizes=torch.tensor([[SIZE, SIZE]] * len(x)))
    if any(n.startswith(("Idefics3", "SmolVLM")) for n in names):
        return dict(pixel_values=x[:, None])
    return dict(pixel_values=x)


def _vlm_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the language model receives (its input embeddings, image features merged in), the
    image features alone and the logits."""
    pix = _vlm_pixels(model, x)
    feats = model.get_image_features(**pix)
    feats = getattr(feats, "pooler_output", feats)
    feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats]) if isinstance(feats, (list, tuple)) else feats
    feats = feats.reshape(len(x), -1, feats.shape[-1])
    ids = torch.tensor([[IMAGE_TOKEN] * feats.shape[1] + [3, 4]] * len(x))
    inner = get_path(model, "model")
    lm = get_path(inner, "language_model", "text_model")
    seen = {}
    h = lm.register_forward_pre_hook(lambda m, a, k: seen.update(lm_input=k["inputs_embeds"]), with_kwargs=True)
    try:
        logits = model(input_ids=ids, **pix).logits
    finally:
        h.remove()
    return {"image_features": feats, "lm_input": seen["lm_input"], "logits": logits}


def _qwen_outputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Qwen-VL: the image features (merger output), the deep-stack features (Qwen3-VL), what the
    language model receives and the logits."""
    ins = qwen_vl_inputs(model, list(x))
    feats = model.model.get_image_features(ins["pixel_values"], ins["image_grid_thw"])
    out = {"image_features": torch.stack(list(feats.pooler_output))}
    for i, d in enumerate(getattr(feats, "deepstack_features", None) or []):
        out[f"deepstack_{i}"] = torch.stack(list(d))
    lm = model.model.language_model
    seen = {}
    h = lm.register_forward_pre_hook(lambda m, a, k: seen.update(lm_input=k["inputs_embeds"]), with_kwargs=True)
    try:
        out["logits"] = model(**ins).logits
    finally:
        h.remove()
    out["lm_input"] = seen["lm_input"]
    return out


@torch.no_grad()
def user_call(row: str, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    kind = FAMILIES[row].kind
    if kind == "qwen_vl":
        return _qwen_outputs(model, x)
    if kind == "task":
        return flat(model(pixel_values=x, output_hidden_states=True))
    if kind == "features":
        return flat(model(x))
    if kind == "vlm":
        return _vlm_outputs(model, x)
    if kind == "open_clip":
        return {"image_embeds": model.encode_image(x)}
    if kind == "custom":
        return {"tokens": model(x)}
    if FAMILIES[row].library == "timm":
        f = model.forward_features(x)
        return {"features": f, "pooled": model.forward_head(f, pre_logits=True)}
    kw = siglip2_inputs(x, PATCH) if "Siglip2" in type(model).__name__ else dict(pixel_values=x)
    return flat(model(**kw, output_hidden_states=True))


# --- the capability tests: each decides cells of docs/families.md ---------------------------------

#: capability column -> the tests that must pass for a family to get "yes" there; an empty tuple
#: means ttreg does not have the capability yet ("not yet").
CAPABILITIES: dict[str, tuple[str, ...]] = {
    "structure": ("test_structure",),
    "search": ("test_search_finds_the_planted_neurons",),
    "registers": ("test_registers_remove_the_outliers", "test_batch_equals_single_runs",
                  "test_empty_set_is_bitwise_plain", "test_hooks_gone_after_an_exception"),
    "attention maps": ("test_attention_maps",),
    "bias form": ("test_bias_form",),
}
#: (capability, row) -> why that family cannot have it; its test checks the refusal, the cell says "no"
UNSUPPORTED = {("bias form", "any ViT: ttreg.wrap(model, attention=...)"):
               "no: its attention is an explicit softmax (the bias form needs scaled_dot_product_attention)"}
NO_BIAS = {row for cap, row in UNSUPPORTED if cap == "bias form"}
PASSED: set[tuple[str, str]] = set()     # (test name, row) of the capability tests that passed
RAN: set[tuple[str, str]] = set()


@pytest.fixture
def record(request):
    """Notes that this (test, row) ran, and whether it passed (the report conftest keeps)."""
    key = (request.node.originalname, request.node.callspec.params["row"])
    RAN.add(key)
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed:
        PASSED.add(key)


@pytest.mark.parametrize("row", NAMES)
def test_structure(zoo, row, record):
    model, fam = zoo(row), FAMILIES[row]
    ad = ttreg.wrap(model)
    assert type(ad).__name__ == fam.adapter
    assert ad.num_layers == DEPTH and ad.embed_dim == WIDTH and ad.patch_size == (PATCH, PATCH)
    assert ad.num_prefix_tokens == fam.prefix
    assert ad.down_proj(0) is fam.site(model)                     # the neuron site is its input
    assert ad.mlp_width(0) == fam.site(model).in_features
    tr = ttreg.trace(model, zoo.images[:2])
    assert tr.norms.shape == (2, DEPTH, fam.prefix + GRID)


@pytest.mark.parametrize("row", NAMES)
def test_search_finds_the_planted_neurons(zoo, row, record):
    model = zoo(row)
    found = ttreg.find_register_neurons(model, zoo.images, top_k=2)
    assert sorted(found.neurons) == NEURONS
    assert found.statistics["emergence_layer"] == 2 and found.num_images_with_outliers == len(zoo.images)
    more = ttreg.find_register_neurons(model, zoo.images, top_k=3)
    assert more.scores[1] > 3 * more.scores[2]                     # far above every other neuron
    # the low-memory search (norms first, stopping after the last block; then the scores inside
    # the down-projection hooks) ranks and scores like the one-pass search in every family
    low = ttreg.find_register_neurons(model, zoo.images, top_k=3, memory_budget=0)
    assert more.statistics["search_memory"]["mode"] == "one-pass"
    assert low.statistics["search_memory"]["mode"] == "two-pass" and low.neurons == more.neurons
    torch.testing.assert_close(torch.tensor(low.scores), torch.tensor(more.scores), rtol=1e-6, atol=0)


@pytest.mark.parametrize("row", NAMES)
def test_registers_remove_the_outliers(zoo, row, record):
    model, fam = zoo(row), FAMILIES[row]
    x = zoo.images
    plain = ttreg.trace(model, x)
    with ttreg.test_time_registers(model, NEURONS):
        reg = ttreg.trace(model, x)
        out = user_call(row, model, x)
    with ttreg.zero_neurons(model, NEURONS):
        floor = ttreg.trace(model, x)
    marked = fam.prefix + zoo.marked.float().argmax(-1)
    assert (plain.norms[:, -1].argmax(-1) == marked).all()          # the outlier is the marked patch
    assert ratio(plain).min() >= 5
    assert (ratio(reg) <= 2 * ratio(floor)).all()                # as clean as zeroing the neurons
    assert reg.num_registers == 1 and (reg.norms[:, -1].argmax(-1) == reg.norms.shape[-1] - 1).all()
    ref = user_call(row, model, x)
    assert out.keys() == ref.keys() and all(out[k].shape == ref[k].shape for k in ref)


@pytest.mark.parametrize("row", NAMES)
def test_batch_equals_single_runs(zoo, row, record):
    model, x = zoo(row), zoo.images[:4]
    with ttreg.test_time_registers(model, NEURONS, num_registers=2):
        batch = user_call(row, model, x)
        singles = [user_call(row, model, x[i:i + 1]) for i in range(len(x))]
    for k, v in batch.items():
        assert (torch.cat([s[k] for s in singles]) - v).abs().max() <= 1e-5, k


@pytest.mark.parametrize("row", NAMES)
def test_empty_set_is_bitwise_plain(zoo, row, record):
    model, x = zoo(row), zoo.images[:3]
    plain = user_call(row, model, x)
    with ttreg.test_time_registers(model, ttreg.RegisterNeurons(), num_registers=0):
        same = user_call(row, model, x)
    assert same.keys() == plain.keys()
    assert all(torch.equal(same[k], plain[k]) for k in plain)


@pytest.mark.parametrize("row", NAMES)
def test_hooks_gone_after_an_exception(zoo, row, record):
    model, x = zoo(row), zoo.images[:2]
    user_call(row, model, x)                  # transformers installs its own capture hooks once
    hooks, plain = hook_state(model), user_call(row, model, x)
    fail_inside(model, NEURONS, lambda b: user_call(row, model, b), x)
    assert hook_state(model) == hooks
    again = user_call(row, model, x)
    assert all(torch.equal(again[k], plain[k]) for k in plain)


def _reference_attention(row: str, model: nn.Module, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Block ``layer``'s attention probabilities, computed another way than the adapter does."""
    ad = ttreg.wrap(model)
    if FAMILIES[row].library == "transformers" and FAMILIES[row].kind != "qwen_vl":
        vision = ad.vision if hasattr(ad, "vision") else ad.inner.vision
        cfgs = [m.config for m in vision.modules() if hasattr(m, "config")]
        old = [c._attn_implementation for c in cfgs]
        for c in cfgs:
            c._attn_implementation = "eager"
        try:
            kw = siglip2_inputs(x, PATCH) if "Siglip2" in type(vision).__name__ else dict(pixel_values=x)
            return vision(**kw, output_attentions=True).attentions[layer]
        finally:
            for c, o in zip(cfgs, old):
                c._attn_implementation = o
    if FAMILIES[row].kind == "custom":                       # ... so recompute from the mixer's q and k
        got = {}
        mixer = model.stack[layer].mixer
        hs = [mixer.q.register_forward_hook(lambda m, a, o: got.update(q=o)),
              mixer.k.register_forward_hook(lambda m, a, o: got.update(k=o))]
        try:
            model(x)
        finally:
            for h in hs:
                h.remove()
        q, k = (got[n].reshape(len(x), -1, 2, WIDTH // 2).transpose(1, 2) for n in "qk")
        return (q @ k.transpose(-1, -2) * (WIDTH // 2) ** -0.5).softmax(-1)
    # every other family hands q and k to F.scaled_dot_product_attention (nn.MultiheadAttention
    # too, inside F.multi_head_attention_forward): spy on it while this layer's attention runs
    import torch.nn.functional as F
    real, got, inside = F.scaled_dot_product_attention, {}, []

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if inside:          # every kernel call of the layer (Qwen-VL: one per packed image)
            logits = q.float() @ k.float().transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
            if attn_mask is not None:
                logits = logits.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
                    else logits + attn_mask.float()
            got.setdefault("p", []).append(logits.softmax(-1))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
    attn = ad.attention(layer)
    hs = [attn.register_forward_pre_hook(lambda m, a: inside.append(1)),
          attn.register_forward_hook(lambda m, a, o: inside.clear())]
    F.scaled_dot_product_attention = spy
    try:
        ad.run(x)
    finally:
        F.scaled_dot_product_attention = real
        for h in hs:
            h.remove()
    p = torch.cat(got["p"])
    if FAMILIES[row].kind == "qwen_vl":           # the tower's 2x2 merge-block order -> raster order
        order = merge_order(SIZE // PATCH, SIZE // PATCH, 2)
        p = p[..., order, :][..., order]
    return p


@pytest.mark.parametrize("row", NAMES)
def test_attention_maps(zoo, row, record):
    model, fam, x = zoo(row), FAMILIES[row], zoo.images[:3]
    T = fam.prefix + GRID
    with torch.no_grad():
        tr = ttreg.trace(model, x, attention=True)
        ref = _reference_attention(row, model, x, DEPTH - 1)
    assert sorted(tr.attention) == list(range(DEPTH))
    assert tr.attention[0].shape == (3, 2, T, T)
    assert (tr.attention[1].sum(-1) - 1).abs().max() <= 1e-5
    assert (tr.attention[DEPTH - 1] - ref).abs().max() <= 1e-5
    with ttreg.test_time_registers(model, NEURONS):
        tr_r = ttreg.trace(model, x, attention=[-1])
    assert tr_r.attention[DEPTH - 1].shape == (3, 2, T + 1, T + 1)      # the register is in the map


@pytest.mark.parametrize("row", NAMES)
def test_bias_form(zoo, row, record):
    """The rebuttal's attention-bias form: the register's mean key/value fitted per layer and head
    and appended to every attention, no token; the outliers go as with the token form."""
    model, x = zoo(row), zoo.images
    if row in NO_BIAS:      # refused in one line, never silently left out
        with pytest.raises(ValueError, match="scaled_dot_product_attention") as e:
            ttreg.fit_attention_bias(model, NEURONS, x)
        assert "\n" not in str(e.value)
        return
    bias = ttreg.fit_attention_bias(model, NEURONS, x)
    # what the kernel was given, as the adapter says it before any forward (the bias's check)
    heads = [ttreg.wrap(model).attention_heads(l) for l in range(DEPTH)]
    assert heads == [(bias.key.shape[1], bias.key.shape[2], bias.value.shape[2])] * DEPTH
    ref = user_call(row, model, x)
    with ttreg.test_time_registers(model, NEURONS):
        token = ttreg.trace(model, x)
    with ttreg.test_time_registers(model, NEURONS, form="bias", bias=bias):
        got = ttreg.trace(model, x)
        out = user_call(row, model, x)
    assert got.num_registers == 0 and got.norms.shape == (len(x), DEPTH, FAMILIES[row].prefix + GRID)
    assert (ratio(got) <= 1.5 * ratio(token)).all()
    assert out.keys() == ref.keys() and all(out[k].shape == ref[k].shape for k in ref)


def test_qwen25_vl_is_refused_with_its_reason():
    cfg = tf.Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=1, window_size=32,
                           fullatt_block_indexes=[1]),
        text_config=dict(**TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}), image_token_id=IMAGE_TOKEN)
    model = tf.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    for target in (model, model.model.visual):
        with pytest.raises(TypeError) as e:
            ttreg.wrap(target)
        assert "\n" not in str(e.value) and REFUSED["HF Qwen2.5-VL"][1] in str(e.value)
    with pytest.raises(TypeError, match="windowed attention"):
        ttreg.find_register_neurons(model, marked_images(2, SIZE, PATCH)[0])
    RAN.add(("refused", "HF Qwen2.5-VL"))
    PASSED.add(("refused", "HF Qwen2.5-VL"))


def test_timm_fx_features_are_refused_in_one_line():
    with pytest.raises(TypeError) as e:
        ttreg.wrap(_timm_features("fx"))
    msg = str(e.value)
    assert "\n" not in msg and REFUSED["timm features_only ViT (feature_cls='fx')"][1] in msg
    assert "feature_cls='getter'" in msg and "FeatureGraphNet" in msg
    RAN.add(("refused", "timm features_only ViT (feature_cls='fx')"))
    PASSED.add(("refused", "timm features_only ViT (feature_cls='fx')"))


# --- the same weights in two libraries give the same numbers ---------------------------------------

SAME_AS: dict[str, str] = {}


@torch.no_grad()
def _numbers(model, run, x, registers: bool) -> list[torch.Tensor]:
    with ttreg.test_time_registers(model, NEURONS) if registers else contextlib.nullcontext():
        return [ttreg.trace(model, x).norms, *run(x)]


def _same_numbers(a, b, run_a, run_b, x) -> float:
    """Largest difference between the traces and outputs of ``a`` and ``b``, plain and with
    registers (one model at a time: an open_clip tower and its trunk share their blocks)."""
    diffs = [(p - q).abs().max() for reg in (False, True)
             for p, q in zip(_numbers(a, run_a, x, reg), _numbers(b, run_b, x, reg))]
    return float(max(diffs))


def test_timm_dinov3_and_hf_dinov3_agree(zoo):
    from ttreg.testing.convert.hf import timm_to_hf_dinov3
    tm = zoo("timm Eva: DINOv3 (storage tokens)")
    hf = timm_to_hf_dinov3(tm)
    assert sorted(ttreg.find_register_neurons(hf, zoo.images, top_k=2).neurons) == NEURONS
    x = torch.cat([zoo.images[:3], zoo.images[3:6]])
    assert _same_numbers(tm, hf, lambda b: [tm.forward_features(b)],
                         lambda b: [hf(pixel_values=b).last_hidden_state], x) <= 1e-4
    SAME_AS["HF DINOv3ViTModel"] = "timm Eva DINOv3"


def test_timm_naflex_and_hf_siglip2_agree(zoo):
    from ttreg.testing.convert.hf import timm_to_hf_siglip2
    tm = zoo("timm NaFlexVit (SigLIP 2)")
    hf = timm_to_hf_siglip2(tm)

    def run_tm(b):
        f = tm.forward_features(b)
        return [f, tm.forward_head(f, pre_logits=True)]

    def run_hf(b):
        out = hf(**siglip2_inputs(b, PATCH))
        return [out.last_hidden_state, out.pooler_output]
    assert _same_numbers(tm, hf, run_tm, run_hf, zoo.images[:4]) <= 1e-4
    SAME_AS["HF Siglip2VisionModel (NaFlex)"] = "timm NaFlexVit"


def test_open_clip_eva_tower_and_its_timm_trunk_agree(zoo):
    clip = zoo("open_clip CLIP, timm Eva trunk (EVA02-CLIP)")
    trunk = clip.visual.trunk
    assert ttreg.wrap(clip).architecture() == ttreg.wrap(trunk).architecture()
    found = ttreg.find_register_neurons(trunk, zoo.images, top_k=2)
    with ttreg.test_time_registers(clip, found):                  # a set found on the trunk applies
        pass
    assert _same_numbers(clip, trunk, lambda b: [clip.encode_image(b)],
                         lambda b: [clip.visual.head(trunk(b))], zoo.images[:4]) <= 1e-4
    SAME_AS["open_clip CLIP, timm Eva trunk (EVA02-CLIP)"] = "timm Eva"


# --- what only some families have ----------------------------------------------------------------

def test_register_gets_no_rotary_position_like_a_prefix_token(zoo):
    """DINOv3 (no absolute positions): a zero test-time register appended after the patches gives
    the same numbers as a zero storage token placed before them -- RoPE sees neither."""
    from ttreg.testing.convert.hf import timm_to_hf_dinov3
    tm = zoo("timm Eva: DINOv3 (storage tokens)")
    state = dict(tm.state_dict())
    state["reg_token"] = torch.cat([state["reg_token"], torch.zeros(1, 1, WIDTH)], dim=1)
    mk = _dinov3(num_reg_tokens=3).eval()
    mk.load_state_dict(state)
    x = zoo.images[:3]
    with torch.no_grad():
        with ttreg.test_time_registers(tm, ttreg.RegisterNeurons(), num_registers=1):
            appended = tm.forward_features(x)                       # [cls, 2 storage, patches] + register
        prefixed = mk.forward_features(x)                           # [cls, 2 storage, zero token, patches]
        hf = timm_to_hf_dinov3(tm)
        with ttreg.test_time_registers(hf, ttreg.RegisterNeurons(), num_registers=1):
            appended_hf = hf(pixel_values=x).last_hidden_state
    keep = torch.cat([prefixed[:, :3], prefixed[:, 4:]], dim=1)
    assert (appended - keep).abs().max() <= 1e-5
    assert (appended_hf - keep).abs().max() <= 1e-5
    # and a register that received a rotary position would not give these numbers
    ad = ttreg.wrap(tm)
    io = ad.block_io
    rope = tm.rope.get_embed(shape=(SIZE // PATCH,) * 2)
    ext = io.extend_inputs((), {"rope": rope}, 2)[1]["rope"]
    half = ext.shape[-1] // 2
    assert torch.equal(ext[:-2], rope) and (ext[-2:, :half] == 0).all() and (ext[-2:, half:] == 1).all()


def _padded_batch(images: list[torch.Tensor], length: int):
    """A NaFlex batch: patches ``(B, length, P*P*C)`` (channels last), coordinates, validity."""
    ps, cs, vs = [], [], []
    for im in images:
        rows, cols = im.shape[-2] // PATCH, im.shape[-1] // PATCH
        p = siglip2_inputs(im[None], PATCH)["pixel_values"][0]
        yy, xx = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        c = torch.stack([yy.flatten(), xx.flatten()], -1)
        n = rows * cols
        ps.append(torch.cat([p, p.new_zeros(length - n, p.shape[-1])]))
        cs.append(torch.cat([c, c.new_zeros(length - n, 2)]))
        vs.append(torch.arange(length) < n)
    return torch.stack(ps), torch.stack(cs), torch.stack(vs)


def _padded_runs(row: str, model: nn.Module, big: torch.Tensor, small: torch.Tensor):
    """``(batch, alone, n)``: ``batch()`` runs ``small`` padded into a batch with ``big`` and
    returns its ``n`` real tokens (after any prefix); ``alone()`` runs it by itself."""
    n = (small.shape[-2] // PATCH) * (small.shape[-1] // PATCH)
    if FAMILIES[row].kind == "vlm":                              # Idefics3: padded pixels + patch mask
        tower = ttreg.wrap(model).vision
        pix = torch.zeros(2, 3, SIZE, SIZE)
        pix[0], pix[1, :, :small.shape[-2], :small.shape[-1]] = big, small
        mask = torch.zeros(2, SIZE // PATCH, SIZE // PATCH, dtype=torch.bool)
        mask[0], mask[1, :small.shape[-2] // PATCH, :small.shape[-1] // PATCH] = True, True
        return (lambda: tower(pixel_values=pix, patch_attention_mask=mask).last_hidden_state[1, :n],
                lambda: tower(pixel_values=small[None]).last_hidden_state[0], n)
    P, C, V = _padded_batch([big, small], GRID)
    P1, C1, V1 = _padded_batch([small], n)
    if FAMILIES[row].library == "timm":
        def run(P, C, V):
            return model.forward_features(P, patch_coord=C, patch_valid=V)["patches"][:, model.num_prefix_tokens:]
    else:
        def run(P, C, V):
            return model(pixel_values=P, pixel_attention_mask=V.long(), spatial_shapes=C.amax(1) + 1).last_hidden_state
    return (lambda: run(P, C, V)[1, :n]), (lambda: run(P1, C1, V1)[0]), n


@pytest.mark.parametrize("row", ["timm NaFlexVit (SigLIP 2)", "HF Siglip2VisionModel (NaFlex)",
                                 "HF Idefics3 (SigLIP-style tower)"])
def test_padding_stays_out_registers_are_in(zoo, row):
    """Image 1 (3 rows of patches) padded into a batch with image 0 (all rows) gives the numbers
    it gives alone -- with registers and with neurons that fire hardest *on the padding*, so
    padding that leaked into the registers' value would show."""
    from ttreg.tracing import record
    model = zoo(row)
    batch, alone, n = _padded_runs(row, model, zoo.images[0], zoo.images[1, :, :3 * PATCH, :])
    ad = ttreg.wrap(model)
    with torch.no_grad(), record(ad, (), {1: None, 2: None}) as rec:
        batch()
    pad = ad.num_prefix_tokens + n
    loud = {l: int((rec.activations[l][1, pad:].amax(0) - rec.activations[l][1, :pad].amax(0)).argmax())
            for l in (1, 2)}                                        # neurons loudest on the padding
    assert rec.activations[1][1, pad:, loud[1]].max() > rec.activations[1][1, :pad, loud[1]].max()
    with torch.no_grad(), ttreg.test_time_registers(model, [(1, loud[1]), (2, loud[2])] + NEURONS, check=False):
        assert (batch() - alone()).abs().max() <= 1e-5


@pytest.mark.parametrize("row", ["timm Eva: DINOv3 (storage tokens)", "HF DINOv3ViTModel"])
def test_gradient_checkpointing_with_rotary_tables(zoo, row):
    model = copy.deepcopy(zoo(row)).train()
    x = zoo.images[:2]
    grads = {}
    for ckpt in (False, True):
        if FAMILIES[row].library == "timm":
            model.set_grad_checkpointing(ckpt)
        elif ckpt:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.zero_grad()
        torch.manual_seed(0)                  # DINOv3 rescales its rotary coordinates at random in training
        with ttreg.test_time_registers(model, NEURONS, num_registers=2):
            out = model.forward_features(x) if FAMILIES[row].library == "timm" else model(pixel_values=x).last_hidden_state
            out.pow(2).mean().backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[False].keys() == grads[True].keys() and grads[False]
    assert all(torch.equal(grads[False][n], grads[True][n]) for n in grads[False])


def test_per_token_inputs_by_hand():
    from ttreg.adapters.base import TokenInputsIO, extend_mask, extend_rotary
    # a symmetric mask over [real, real, pad] (image 1) and [real, real, real] (image 0), bool
    keep = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    sym = (keep[:, :, None] & keep[:, None, :])[:, None]                        # (2, 1, 3, 3)
    got = extend_mask(sym, 1)[1, 0].int().tolist()
    assert got == [[1, 1, 0, 1], [1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 0, 1]]      # padding row stays dark
    add = torch.where(sym, 0.0, -1e9)
    assert torch.equal(extend_mask(add, 1)[1, 0], torch.tensor(got).bool().logical_not().float() * -1e9)
    key_only = torch.where(keep, 0.0, float("-inf"))[:, None, None, :]           # (2, 1, 1, 3)
    assert extend_mask(key_only, 2)[1, 0, 0].tolist() == [0.0, 0.0, float("-inf"), 0.0, 0.0]
    io = TokenInputsIO(masks=(("attention_mask", 1),))
    assert io.valid_tokens((None, sym), {}).tolist() == keep.tolist()
    assert io.valid_tokens((None, extend_mask(sym[:1], 1)), {}) is None          # nothing padded
    args, kw = io.extend_inputs((None, sym), {}, 1)
    assert args[1].shape == (2, 1, 4, 4) and kw == {}
    # rotary tables: [sin | cos] rows and (cos, sin) pairs get identity rows at the end
    cat = torch.arange(8.0).reshape(2, 4)
    assert extend_rotary(cat, 1).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [0, 0, 1, 1]]
    cos, sin = extend_rotary((torch.full((2, 2), 0.5), torch.full((2, 2), 0.25)), 1, "cos_sin")
    assert cos[-1].tolist() == [1, 1] and sin[-1].tolist() == [0, 0] and cos[0].tolist() == [0.5, 0.5]


def test_composite_models_use_their_vision_side():
    hfv = {k: v for k, v in HFV.items() if k != "image_size"}
    text = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    models = [tf.Siglip2Model(tf.Siglip2Config(vision_config=dict(**hfv, num_patches=GRID), text_config=text)),
              tf.Aimv2Model(tf.Aimv2Config(vision_config=HFV, text_config=dict(text, num_key_value_heads=2)))]
    x = marked_images(2, SIZE, PATCH)[0]
    for model, adapter in zip(models, ("HFSiglip2Adapter", "HFAimv2Adapter")):
        ad = ttreg.wrap(model.eval())
        assert type(ad).__name__ == adapter and ad.vision is model.vision_model
        assert ttreg.trace(model, x).norms.shape == (2, DEPTH, GRID)


# --- the generic adapter: the whole pipeline on a ViT no library defines --------------------------

def test_generic_adapter_says_what_it_cannot_find():
    model = TinyViT()
    with pytest.raises(TypeError, match="ttreg does not support"):
        ttreg.wrap(model)
    with pytest.raises(TypeError) as e:
        ttreg.wrap(model, image_size=SIZE)
    assert "\n" not in str(e.value) and "attention=" in str(e.value) and "TinyLayer" in str(e.value)
    with pytest.raises(TypeError, match="blocks="):
        ttreg.wrap(nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.Flatten()), attention="x")
    with pytest.raises(TypeError, match="image_size="):
        ttreg.wrap(model, attention="mixer")                       # probed at 224 px: positions break
    with pytest.raises(TypeError, match="unknown keyword"):
        ttreg.wrap(model, attention="mixer", heads=2)
    with pytest.raises(TypeError, match="mlp_down="):
        ttreg.wrap(model, attention="mixer", image_size=SIZE, mlp_down="nothing.here")
    assert not hasattr(model, "_ttreg_wrap")                      # nothing stored after a failure


def test_generic_adapter_takes_callables_and_pickles():
    import pickle
    model = TinyViT().eval()
    ad = ttreg.wrap(model, blocks=lambda m: m.stack, attention=lambda b: b.mixer, mlp_down=lambda b: b.ff[2],
                    num_prefix_tokens=1, token_dim=1, patch_size=PATCH, image_size=SIZE)
    assert ad.down_proj(3) is model.stack[3].ff[2] and ad.attention(0) is model.stack[0].mixer
    assert ttreg.trace(model, marked_images(2, SIZE, PATCH)[0]).norms.shape == (2, DEPTH, GRID + 1)
    named = TinyViT().eval()
    ttreg.wrap(named, attention="mixer", image_size=SIZE)
    back = pickle.loads(pickle.dumps(named))                       # names are plain data
    assert back._ttreg_wrap == named._ttreg_wrap and ttreg.wrap(back).down_proj(0) is back.stack[0].ff[2]


def test_generic_adapter_runs_the_whole_pipeline(zoo, tmp_path):
    from ttreg.data import make_transform, resolve_images
    from ttreg.inspection import inspect_images
    model = zoo("any ViT: ttreg.wrap(model, attention=...)")
    spec = model._ttreg_wrap
    assert (spec.blocks, spec.mlp_down, spec.attention, spec.num_prefix_tokens) == ("stack", "ff.2", "mixer", 1)
    neurons = ttreg.find_register_neurons(model, zoo.images, top_k=2)
    assert sorted(neurons.neurons) == NEURONS
    clone = copy.deepcopy(model)                                   # the description travels with the model
    assert type(ttreg.wrap(clone)).__name__ == "GenericAdapter"
    neurons.save(tmp_path / "n.json")
    with ttreg.test_time_registers(clone, ttreg.RegisterNeurons.load(tmp_path / "n.json")):
        tr = ttreg.trace(clone, zoo.images, attention=[-1], neurons=NEURONS)
    assert ratio(tr).max() <= 2 and tr.attention[DEPTH - 1].shape[-1] == GRID + 2
    from PIL import Image
    pics = [Image.fromarray((torch.rand(40, 48, 3) * 255).byte().numpy()) for _ in range(2)]
    results, written = inspect_images(model, make_transform((SIZE, SIZE), (0.5,) * 3, (0.5,) * 3),
                                      resolve_images(pics), neurons, tmp_path / "inspect")
    pngs = [p for p in written if p.suffix == ".png"]
    assert len(results["images"]) == 2 and len(pngs) >= 2 and all(p.is_file() for p in written)
    assert len(results["images"][0]["registers"]["register_norm"]) == DEPTH
    assert (tmp_path / "inspect" / "inspect.json").is_file()


# --- load_model: each family the way its library loads it ------------------------------------------

def test_load_model_hf_folders(tmp_path):
    from ttreg.models import load_model
    vlm = _vlm("gemma3").eval()
    vlm.save_pretrained(tmp_path / "gemma3")
    enc = tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**{k: v for k, v in HFV.items() if k != "image_size"},
                                                       num_patches=GRID)).eval()
    enc.save_pretrained(tmp_path / "siglip2")
    tf.Siglip2ImageProcessor(patch_size=PATCH, max_num_patches=GRID).save_pretrained(tmp_path / "siglip2")
    for folder, cls, adapter in (("gemma3", "Gemma3ForConditionalGeneration", "HFGemma3Adapter"),
                                 ("siglip2", "Siglip2VisionModel", "HFSiglip2Adapter")):
        for spec in (f"hf:{tmp_path / folder}", str(tmp_path / folder)):
            model, transform = load_model(spec)
            assert type(model).__name__ == cls and type(ttreg.wrap(model)).__name__ == adapter
    from PIL import Image
    x = transform(Image.new("RGB", (50, 30), (255, 0, 0)))          # NaFlex processor -> one square image
    assert x.shape == (3, SIZE, SIZE) and torch.allclose(x[0], torch.ones(SIZE, SIZE))
    with torch.no_grad():
        assert model(**siglip2_inputs(x[None], PATCH)).last_hidden_state.shape == (1, GRID, WIDTH)


def test_load_model_timm_eva_by_name_with_local_weights(tmp_path):
    from safetensors.torch import save_file
    from ttreg.models import load_model
    ref = timm.create_model("vit_tiny_patch16_dinov3_qkvb", pretrained=False)
    file = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(file))
    model, transform = load_model(f"timm:vit_tiny_patch16_dinov3_qkvb@{file}")
    ad = ttreg.wrap(model)
    assert type(ad).__name__ == "TimmEvaAdapter" and ad.num_prefix_tokens == 5
    assert torch.equal(model.blocks[3].mlp.fc2.weight, ref.blocks[3].mlp.fc2.weight)


# --- the table -------------------------------------------------------------------------------------

BEGIN = "<!-- generated by tests/test_families.py: do not edit by hand -->"
END = "<!-- end of generated table -->"


def _cell(row: str, capability: str) -> str | None:
    """"yes" when all ``tests`` passed for ``row``, "not yet" when the capability has no test,
    None when they did not all run (the table cannot be judged in this run)."""
    tests = CAPABILITIES[capability]
    if not tests:
        return "not yet"
    if not all((t, row) in RAN for t in tests):
        return None
    if not all((t, row) in PASSED for t in tests):
        return "no"
    return UNSUPPORTED.get((capability, row), "yes")


def render_table() -> str | None:
    cols = list(CAPABILITIES)
    lines = ["| family | library | " + " | ".join(cols) + " | same numbers as | notes |",
             "|---" * (len(cols) + 4) + "|"]
    for row, fam in FAMILIES.items():
        cells = [_cell(row, c) for c in cols]
        if None in cells:
            return None
        lines.append(f"| {row} | {fam.library} | " + " | ".join(cells) + f" | {SAME_AS.get(row, '')} | {fam.note} |")
    for row, (library, reason) in REFUSED.items():
        if ("refused", row) not in PASSED:
            return None
        lines.append(f"| {row} | {library} | " + " | ".join(["refused"] * len(cols))
                     + f" | | {reason}: see below |")
    return "\n".join(lines)


def test_families_table_is_current():
    """Runs last: the table in docs/families.md is exactly what the tests above produced."""
    table = render_table()
    if table is None or len(SAME_AS) < 3:
        pytest.skip("the family matrix did not run in full (-k / deselection); the table is judged on full runs")
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} lost its generated-table markers"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table}\n{END}{tail}"
    if os.environ.get("TTREG_WRITE_FAMILIES") == "1" and new != text:
        tmp = DOC.with_suffix(".md.tmp")
        tmp.write_text(new)
        tmp.replace(DOC)
        text = new
    assert text == new, ("docs/families.md is out of date with the family tests; regenerate it with "
                         "TTREG_WRITE_FAMILIES=1 pytest tests/test_families.py")
