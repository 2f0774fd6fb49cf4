"""Tiny ``transformers`` vision-language models, built offline, for tests, figures and
benchmarks of text-to-image attribution (:mod:`ttreg.attribution`): LLaVA, LLaVA-OneVision,
Idefics3, PaliGemma, Gemma 3 and InternVL with a word-level tokenizer and real processors (:func:`tiny_vlm`,
:func:`tiny_vlm_processor`), register neurons planted in the tower (:func:`planted_vlm`, through
:func:`ttreg.plant.plant_register_neurons`), and a language model whose attention is written to
read the tower's outlier tokens (:func:`read_outliers`). Synthetic models: their weights are
random, then edited.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


#: the families :func:`tiny_vlm` builds
VLM_FAMILIES = ("llava", "llava_onevision", "idefics3", "paligemma", "gemma3", "internvl")
#: families whose tower ends in a LayerNorm before the language model reads it (or whose
#: projector starts with one): :func:`planted_vlm` silences one more channel, the reference
#: :func:`read_outliers` subtracts, so that a token without the outlier reads exactly 0
NORMED_FAMILIES = ("paligemma", "gemma3", "internvl")
#: the image token strings of the families (id :data:`VLM_IMAGE_TOKEN`) and their other tokens
#: (``tokenizer attribute: token``, ids counted down from 94)
_FAMILY_TOKENS = {"gemma3": ("<image_soft_token>", {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}),
                  "internvl": ("<IMG_CONTEXT>", {"start_image_token": "<img>", "end_image_token": "</img>",
                                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})}
#: the register neurons :func:`planted_vlm` plants: ``(layer, neuron, write)``, a small one and a big one
VLM_PLANTS = ((1, 7, 0.5), (2, 21, 12.0))
#: the image placeholder token's id in :func:`tiny_tokenizer` (the last of its 96 ids)
VLM_IMAGE_TOKEN = 95
_WORDS = ("what what's is are in on the a an of this that image picture photo there here where "
          "which colour color object objects cat dog bird car tree sky red green blue left right "
          "top bottom describe show me point to find patch marker square small big one two "
          "answer question yes no it and or with").split()
_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<fake_token_around_image>", "<global-img>",
             "<end_of_utterance>", "<video>"] + [f"<row_{r}_col_{c}>" for r in (1, 2) for c in (1, 2)]


def _side(v) -> int:
    """A config's image or patch size as one number (InternVL's are pairs)."""
    return int(v[0]) if isinstance(v, (list, tuple)) else int(v)


def tiny_tokenizer(family: str | None = None):
    """A word-level ``transformers`` tokenizer of 96 ids, built offline: special tokens (the
    Idefics3 image tags among them), a few English words, ``<image>`` = :data:`VLM_IMAGE_TOKEN`
    (for ``family`` "gemma3" / "internvl": that family's image token there, and its image tags,
    as tokenizer attributes, on the ids below it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    image, extra = _FAMILY_TOKENS.get(family, ("<image>", {}))
    vocab = {t: i for i, t in enumerate(_SPECIALS + list(dict.fromkeys(_WORDS)))}
    top = {t: VLM_IMAGE_TOKEN - 1 - k for k, t in enumerate(t for t in extra.values() if t not in vocab and t != image)}
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), VLM_IMAGE_TOKEN)
                  if i not in vocab.values() and i not in top.values()})
    vocab.update(top)
    vocab[image] = VLM_IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = list(dict.fromkeys(_SPECIALS[2:] + [image] + list(extra.values())))
    kw = {"extra_special_tokens": {**extra, "image_token": image}} if extra else {}
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>", **kw)
    out.add_special_tokens({"additional_special_tokens": specials})
    return out


def tiny_vlm(family: str, *, size: int = 48, patch: int = 8, width: int = 64, depth: int = 4):
    """A tiny random ``transformers`` VLM of ``family`` (:data:`VLM_FAMILIES`, or ``"smolvlm"``,
    built like Idefics3; no processor here) built offline: a
    ``depth``-block tower of ``width`` on ``size``-px images, a one-layer language model with
    query/key biases and a rotary base so large that positions barely turn the keys (so an
    attention pattern can be written into the weights, see :func:`read_outliers`).
    LLaVA-OneVision tiles images of up to 2x2 tiles; Idefics3 splits up to 2x2 crops; InternVL
    cuts up to 4 tiles (and a thumbnail); Gemma 3 pools the 6x6 patches to 2x2 tokens."""
    import transformers as tf
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth,
                  num_attention_heads=2, image_size=size, patch_size=patch)
    text = dict(vocab_size=VLM_IMAGE_TOKEN + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 1e12}, pad_token_id=0,
                bos_token_id=2, eos_token_id=3)
    if family == "llava":
        cfg = tf.LlavaConfig(vision_config=tf.CLIPVisionConfig(**vision).to_dict(),
                             text_config=tf.LlamaConfig(**text, attention_bias=True).to_dict(),
                             image_token_index=VLM_IMAGE_TOKEN, vision_feature_layer=-2,
                             vision_feature_select_strategy="default")
        model = tf.LlavaForConditionalGeneration(cfg)
    elif family == "llava_onevision":
        cfg = tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**vision).to_dict(), text_config=tf.Qwen2Config(**text).to_dict(),
            image_token_index=VLM_IMAGE_TOKEN, vision_feature_layer=-1, vision_feature_select_strategy="full",
            image_grid_pinpoints=[[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]])
        model = tf.LlavaOnevisionForConditionalGeneration(cfg)
    elif family == "paligemma":
        cfg = tf.PaliGemmaConfig(vision_config=tf.SiglipVisionConfig(**vision).to_dict(),
                                 text_config=tf.GemmaConfig(**text, head_dim=16, attention_bias=True).to_dict(),
                                 image_token_index=VLM_IMAGE_TOKEN, projection_dim=32)
        model = tf.PaliGemmaForConditionalGeneration(cfg)
    elif family == "gemma3":
        t3 = {k: v for k, v in text.items() if k != "rope_parameters"}
        cfg = tf.Gemma3Config(vision_config=tf.SiglipVisionConfig(**vision).to_dict(),
                              text_config=tf.Gemma3TextConfig(**t3, head_dim=16, attention_bias=True).to_dict(),
                              mm_tokens_per_image=4, image_token_index=VLM_IMAGE_TOKEN,
                              boi_token_index=VLM_IMAGE_TOKEN - 1, eoi_token_index=VLM_IMAGE_TOKEN - 2)
        model = tf.Gemma3ForConditionalGeneration(cfg)
    elif family == "internvl":
        cfg = tf.InternVLConfig(vision_config=tf.InternVLVisionConfig(**vision).to_dict(),
                                text_config=tf.Qwen2Config(**text).to_dict(), image_token_id=VLM_IMAGE_TOKEN,
                                downsample_ratio=0.5)
        model = tf.InternVLForConditionalGeneration(cfg)
    elif family in ("idefics3", "smolvlm"):
        V, C, M = ((tf.Idefics3VisionConfig, tf.Idefics3Config, tf.Idefics3ForConditionalGeneration)
                   if family == "idefics3" else
                   (tf.SmolVLMVisionConfig, tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration))
        cfg = C(vision_config=V(**vision).to_dict(), image_token_id=VLM_IMAGE_TOKEN, scale_factor=2,
                text_config=tf.LlamaConfig(**text, attention_bias=True).to_dict())
        model = M(cfg)
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(VLM_FAMILIES)}")
    model.generation_config.pad_token_id = 0
    return model.eval()


def tiny_vlm_processor(family: str, model, tokenizer=None):
    """The ``transformers`` processor of :func:`tiny_vlm`'s ``family``, built offline around
    :func:`tiny_tokenizer`, with image sizes matching ``model``."""
    import transformers as tf
    tok = tokenizer or tiny_tokenizer(family)
    v = model.config.vision_config
    size, patch = _side(v.image_size), _side(v.patch_size)
    if family == "llava":
        ip = tf.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "llava_onevision":
        ip = tf.LlavaOnevisionImageProcessor(size={"height": size, "width": size},
                                             image_grid_pinpoints=model.config.image_grid_pinpoints)
        vp = tf.LlavaOnevisionVideoProcessor(size={"height": size, "width": size})
        return tf.LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                          num_image_tokens=(size // patch) ** 2,
                                          vision_feature_select_strategy="full", video_token="<video>")
    if family == "idefics3":
        ip = tf.Idefics3ImageProcessor(size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size})
        seq = (size // patch // int(model.config.scale_factor)) ** 2
        return tf.Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=seq)
    if family == "paligemma":
        ip = tf.SiglipImageProcessor(size={"height": size, "width": size})
        ip.image_seq_length = (size // patch) ** 2
        return tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    if family == "gemma3":
        ip = tf.Gemma3ImageProcessor(size={"height": size, "width": size})
        return tf.Gemma3Processor(image_processor=ip, tokenizer=tok,
                                  image_seq_length=int(model.config.mm_tokens_per_image))
    if family == "internvl":
        ip = tf.GotOcr2ImageProcessor(size={"height": size, "width": size}, max_patches=4,
                                      crop_to_patches=True)
        seq = int((size // patch * model.config.downsample_ratio) ** 2)
        vp = tf.InternVLVideoProcessor(size={"height": size, "width": size})
        return tf.InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp, image_seq_length=seq)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(VLM_FAMILIES)}")


def vlm_pixels(model, x: torch.Tensor) -> dict:
    """:func:`tiny_vlm` image inputs for a batch ``x`` of tower-sized normalised images, as the
    processor would give them for images of the tower's size: one view each (LLaVA, Idefics3
    without crops), the base view and one tile (LLaVA-OneVision)."""
    if hasattr(model.model, "connector"):
        return {"pixel_values": x[:, None]}
    if "Onevision" in type(model).__name__:
        side = int(model.config.vision_config.image_size)
        return {"pixel_values": x[:, None].expand(-1, 2, -1, -1, -1).contiguous(),
                "image_sizes": torch.tensor([[side, side]] * len(x))}
    return {"pixel_values": x}


@torch.no_grad()
def silence_channels(model, channels: Sequence[int]) -> None:
    """Make residual ``channels`` of a ViT (any model :func:`ttreg.wrap` takes) carry 0 on every
    token: no layer writing the residual stream (a linear or convolution with the model's width
    of outputs, an embedding table, a position or class embedding, the norm before the blocks)
    writes them. Plant a register neuron along them afterwards and it is their only writer."""
    from ..adapters import wrap
    ad = wrap(model)
    width = ad.embed_dim
    ch = [int(c) % width for c in channels]
    module = ad.fingerprint_module()
    for mod in module.modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and w.shape[0] == width:
            w[ch] = 0
            if mod.bias is not None:
                mod.bias[ch] = 0
        elif isinstance(mod, nn.Embedding) and w.shape[1] == width:
            w[:, ch] = 0
    for name, p in module.named_parameters():
        if name.endswith(("position_embedding", "position_embeddings", "class_embedding", "cls_token")) \
                and p.shape[-1] == width:
            p[..., ch] = 0
    pre = ad.pre_block_module()
    for name in ("weight", "bias"):
        p = getattr(pre, name, None) if pre is not None else None
        if isinstance(p, torch.Tensor):
            p[ch] = 0


@torch.no_grad()
def read_outliers(model, channel: int, *, gain: float = 0.1, focus: float = 16.0,
                  reference: int | None = None) -> None:
    """Make a :func:`tiny_vlm`'s language model look at the tower's outlier tokens.

    ``channel``: the tower channel a planted register neuron writes the outliers along, and
    nothing else writes (:func:`silence_channels`). The projector carries it, times ``gain``,
    into one language-model channel no text token has, and every query of the language model's
    attention looks for that channel (``focus``: the logit per unit of the normalised channel).
    So a token the tower made an outlier draws the attention of every text position, and the same
    token without the outlier draws no more than any other image token.

    Where a LayerNorm stands between the tower's residual stream and the projector's linear map
    (PaliGemma's and Gemma 3's SigLIP ``post_layernorm``, InternVL's projector norm) a silent
    channel comes out of it as ``-mean/std`` of its token, not 0: ``reference`` (another silenced
    channel) is given the same norm weights and subtracted, so a token without the outlier
    carries exactly 0. Gemma 3 normalises queries and keys per head: its ``q_norm``/``k_norm``
    weights set the logit instead of ``focus`` times the value."""
    inner = model.model
    D = int(model.config.vision_config.hidden_size)
    ch = int(channel) % D
    ref = None if reference is None else int(reference) % D
    lm = inner.text_model if hasattr(inner, "text_model") else inner.language_model
    e = int(lm.config.hidden_size) - 1
    proj = getattr(inner, "multi_modal_projector", None)
    normed = hasattr(proj, "linear") or hasattr(proj, "mm_input_projection_weight") or hasattr(proj, "layer_norm")
    if normed and ref is None:
        raise ValueError(f"{type(model).__name__}: a LayerNorm precedes the projector; give reference=")
    if hasattr(proj, "linear") or hasattr(proj, "mm_input_projection_weight"):   # PaliGemma, Gemma 3
        tower = inner.vision_tower
        post = getattr(tower, "post_layernorm", None) or tower.vision_model.post_layernorm
        post.weight[ref], post.bias[ref] = post.weight[ch], post.bias[ch]
    if hasattr(inner, "connector"):                           # Idefics3: pixel shuffle, one linear
        proj = inner.connector.modality_projection.proj
        s = int(inner.connector.scale_factor)
        cols = [k * D + ch for k in range(s * s)]
        proj.weight[:, cols] = 0
        proj.weight[e] = 0
        proj.weight[e, cols] = gain
    elif hasattr(proj, "linear"):                             # PaliGemma: one linear
        lin = proj.linear
        lin.weight[:, [ch, ref]] = 0
        lin.weight[e] = 0
        lin.weight[e, ch], lin.weight[e, ref] = gain, -gain
        lin.bias[e] = 0
    elif hasattr(proj, "mm_input_projection_weight"):         # Gemma 3: pool, RMSNorm, matrix
        proj.mm_soft_emb_norm.weight[ref] = proj.mm_soft_emb_norm.weight[ch]
        W = proj.mm_input_projection_weight                   # (vision, text)
        W[[ch, ref]] = 0
        W[:, e] = 0
        W[ch, e], W[ref, e] = gain, -gain
    else:                                                     # LLaVA, LLaVA-OneVision, InternVL
        l1, l2 = proj.linear_1, proj.linear_2
        cols, refs = [ch], []
        if hasattr(proj, "layer_norm"):                       # InternVL: pixel shuffle, LayerNorm first
            s2 = l1.in_features // D
            cols, refs = [k * D + ch for k in range(s2)], [k * D + ref for k in range(s2)]
            ln = proj.layer_norm
            ln.weight[refs], ln.bias[refs] = ln.weight[cols], ln.bias[cols]
        l1.weight[:, cols + refs] = 0
        l1.weight[e] = 0
        l1.weight[e, cols] = gain
        if refs:
            l1.weight[e, refs] = -gain
        l1.bias[e] = 0
        l2.weight[e] = 0
        l2.weight[:, e] = 0
        l2.weight[e, e] = 1
        l2.bias[e] = 0
    lm.embed_tokens.weight[:, e] = 0
    attn = lm.layers[0].self_attn
    dh = int(attn.head_dim)
    d = dh // 2 - 1                 # the slowest rotary pair: positions barely turn it
    attn.q_proj.weight.zero_()
    attn.q_proj.bias.zero_()
    attn.q_proj.bias[d::dh] = focus
    attn.k_proj.weight.zero_()
    attn.k_proj.bias.zero_()
    attn.k_proj.weight[d::dh, e] = 1.0
    if hasattr(attn, "q_norm"):     # Gemma 3: q and k normalised per head, weights (1 + w)
        attn.q_norm.weight.zero_()
        attn.k_norm.weight.zero_()
        attn.q_norm.weight[d] = focus - 1
        attn.k_norm.weight[d] = 3.0


def planted_vlm(family: str, plants: Sequence = VLM_PLANTS, *, images: int = 8,
                read: bool = True):
    """``(model, processor, images, marked)``: :func:`tiny_vlm` (processor None for SmolVLM) with register neurons planted in
    its tower (:func:`ttreg.plant.plant_register_neurons`, firing on the marker patch of
    :func:`ttreg.plant.marked_images`), and with ``read`` the plants' channels silenced before
    planting (:func:`silence_channels`) and the language model looking at the outliers
    (:func:`read_outliers`). A synthetic model."""
    from .images import marked_images
    from .plant import plant_register_neurons
    torch.manual_seed(0)
    model = tiny_vlm(family)
    v = model.config.vision_config
    x, marked = marked_images(images, _side(v.image_size), _side(v.patch_size))
    D = int(v.hidden_size)
    ref = D - 1 - len(plants) if family in NORMED_FAMILIES else None
    if read:                        # the plants' channels: written by them alone
        silence_channels(model, [D - 1 - i for i in range(len(plants))] + ([ref] if ref is not None else []))
    done = plant_register_neurons(model, plants, x, marked)
    if read:                        # the biggest plant's channel
        big = max(range(len(done)), key=lambda i: done[i].write)
        read_outliers(model, D - 1 - big, reference=ref, gain=1.0 if ref is not None else 0.1)
    return model, tiny_vlm_processor(family, model) if family in VLM_FAMILIES else None, x, marked


def to_pil(model, x: torch.Tensor) -> list:
    """Tower-sized normalised images ``(B, 3, H, W)`` as PIL images (the inverse of the model's
    normalisation; exact for :func:`ttreg.plant.marked_images`' markers)."""
    from PIL import Image
    from ..adapters import wrap
    from ..viz import denormalize
    mean, std = wrap(model).mean_std()
    return [Image.fromarray((denormalize(t, mean, std) * 255).round().astype("uint8")) for t in x]


def write_marker_voc(root, model, x: torch.Tensor, marked: torch.Tensor, name: str = "marker") -> list:
    """A Pascal-VOC-layout folder of the images ``x`` (lossless PNGs) with one box each, named
    ``name``, around the marked patch (``marked``: ``(B, patches)`` bool); returns the boxes."""
    from pathlib import Path
    root = Path(root)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    v = model.config.vision_config
    patch, cells = _side(v.patch_size), _side(v.image_size) // _side(v.patch_size)
    boxes = []
    for i, im in enumerate(to_pil(model, x)):
        r, c = divmod(int(marked[i].float().argmax()), cells)
        x1, y1, x2, y2 = c * patch, r * patch, (c + 1) * patch, (r + 1) * patch
        stem = f"{i:06d}"
        im.save(root / "JPEGImages" / f"{stem}.png")
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.png</filename><object><name>{name}</name>"
            f"<bndbox><xmin>{x1 + 1}</xmin><ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax>"
            "</bndbox></object></annotation>")
        boxes.append([x1, y1, x2, y2])
    return boxes


def save_planted_vlm(folder, family: str = "llava", images: int = 2) -> dict:
    """Write a :func:`planted_vlm` (its language model reading the outliers) for the command line:
    ``folder/model`` (weights, config and processor, loadable as ``hf:folder/model``),
    ``folder/neurons.json`` (the planted neurons) and ``images`` marked images as PNGs. Returns
    the paths. A synthetic model."""
    from pathlib import Path
    from ..register_neurons import RegisterNeurons
    folder = Path(folder)
    model, proc, x, marked = planted_vlm(family)
    model.save_pretrained(folder / "model")
    proc.save_pretrained(folder / "model")
    RegisterNeurons([p[:2] for p in VLM_PLANTS], provenance={"source": "ttreg.testing.vlm planted"}).save(folder / "neurons.json")
    paths = []
    for i, im in enumerate(to_pil(model, x[:images])):
        paths.append(folder / f"marked_{i}.png")
        im.save(paths[-1])
    return {"model": folder / "model", "neurons": folder / "neurons.json", "images": paths}


#: the Qwen VLMs :func:`tiny_qwen_vl` builds
QWEN_VL_FAMILIES = ("qwen2_vl", "qwen3_vl")


def tiny_qwen_vl(family: str = "qwen2_vl", *, patch: int = 8, width: int = 64, depth: int = 4,
                 size: int = 48, text: dict | None = None):
    """A tiny random Qwen2-VL or Qwen3-VL (:data:`QWEN_VL_FAMILIES`) built offline: a
    ``depth``-block tower of ``width`` (2x2 patch merger; Qwen3-VL: a learned position grid for
    ``size``-px images and deep-stack mergers after blocks 1 and 2), one frame per image
    (``temporal_patch_size=1``), and a one-layer language model with M-RoPE."""
    import transformers as tf
    txt = dict(vocab_size=VLM_IMAGE_TOKEN + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
               bos_token_id=2, eos_token_id=3,
               rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    txt.update(text or {})
    vision = dict(depth=depth, num_heads=2, patch_size=patch, spatial_merge_size=2, temporal_patch_size=1)
    if family == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(vision_config=dict(vision, embed_dim=width, hidden_size=32, mlp_ratio=2),
                               text_config=txt, image_token_id=VLM_IMAGE_TOKEN, vision_start_token_id=93,
                               vision_end_token_id=94)
        model = tf.Qwen2VLForConditionalGeneration(cfg)
    elif family == "qwen3_vl":
        grid = size // patch
        cfg = tf.Qwen3VLConfig(vision_config=dict(vision, hidden_size=width, intermediate_size=2 * width,
                                                  out_hidden_size=32, num_position_embeddings=grid * grid,
                                                  deepstack_visual_indexes=[1, 2]),
                               text_config=dict(txt, head_dim=16), image_token_id=VLM_IMAGE_TOKEN,
                               vision_start_token_id=93, vision_end_token_id=94)
        model = tf.Qwen3VLForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(QWEN_VL_FAMILIES)}")
    model.generation_config.pad_token_id = 0
    return model.eval()


def qwen_vl_inputs(model, images: Sequence[torch.Tensor], text: Sequence[int] = (3, 4)) -> dict:
    """Model inputs for a :func:`tiny_qwen_vl` and a list of normalised images ``(3, H, W)`` (sides
    multiples of 2 patches; sizes may differ), as the processor gives them for one sequence per
    image: ``pixel_values`` packed, ``image_grid_thw``, and ``input_ids`` (vision start, the
    image's tokens, vision end, ``text``) with ``mm_token_type_ids`` and ``attention_mask``
    (sequences of different lengths left-padded)."""
    from ..adapters.hf_qwen_vl import qwen_pixels
    v = model.config.vision_config
    p, m = int(v.patch_size), int(v.spatial_merge_size)
    pix, grids, rows = [], [], []
    for im in images:
        px, g = qwen_pixels(im[None], p, m, int(v.temporal_patch_size))
        pix.append(px)
        grids.append(g)
        n = int(g[0].prod()) // (m * m)
        rows.append([93] + [VLM_IMAGE_TOKEN] * n + [94] + list(text))
    T = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return {"pixel_values": torch.cat(pix), "image_grid_thw": torch.cat(grids), "input_ids": ids,
            "attention_mask": mask, "mm_token_type_ids": (ids == VLM_IMAGE_TOKEN).int()}
