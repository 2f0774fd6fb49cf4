"""Adapters for Hugging Face ``transformers`` vision models.

Encoders: Dinov2, Dinov2WithRegisters, ViT, CLIPVision, CLIP (image side), SiglipVision, Siglip
(image side), DINOv3ViT (CLS + register tokens, RoPE), Siglip2Vision / Siglip2 (NaFlex:
pre-patchified pixels, padding masks), Aimv2Vision / Aimv2, InternVLVision. VLMs -- LLaVA,
LLaVA-OneVision, PaliGemma, Gemma 3, Idefics3, SmolVLM, InternVL -- through their vision tower
(:class:`HFVLMAdapter`); Qwen2-VL and Qwen3-VL, whose towers pack images into one sequence, in
:mod:`ttreg.adapters.hf_qwen_vl`. Qwen2.5-VL is refused with a reason (:class:`HFQwen25VLRefusal`).
For text-to-image attribution (:mod:`ttreg.attribution`) the LLaVA, LLaVA-OneVision and
Idefics3 / SmolVLM adapters also say where the image tokens sit in the language model's
sequence and what each one shows (:meth:`HFVLMAdapter.image_tokens`, :class:`ImageTokens`).

Structure is found by role, not by attribute name, so the 4.5x and the 5.x module layouts both
work: the blocks are the ``ModuleList`` of ``num_hidden_layers`` identical layers; in a layer the
attention is the outermost ``*Attention*`` submodule, and the MLP down-projection is the
``nn.Linear`` outside it that maps the widest input back to ``hidden_size`` (``fc2``,
``mlp.fc2``, ``output.dense``, ``down_proj``). Layers that take an ``attention_mask`` get it
extended for the registers (registers masked in, padding kept out); DINOv3's rotary
``position_embeddings`` get identity rows (a register has no rotary position, like CLS and the
register tokens). Transformers is never imported to recognise a model; classes are matched by
name along the model's MRO.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..calls import tagged
from . import roles
from .base import Adapter, BlockIO, DelegatingAdapter, TokenInputsIO

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
#: normalisation the matching HF image processors use, by vision ``model_type``
MEAN_STD = {"dinov2": IMAGENET, "dinov2_with_registers": IMAGENET, "vit": HALF,
            "clip_vision_model": OPENAI_CLIP, "siglip_vision_model": HALF, "dinov3_vit": IMAGENET,
            "siglip2_vision_model": HALF, "aimv2_vision_model": OPENAI_CLIP,
            "internvl_vision": IMAGENET, "idefics3_vision": HALF, "smolvlm_vision": HALF}


def hf_class_names(model: nn.Module) -> set[str]:
    """Names of the ``transformers`` classes ``model`` is an instance of."""
    return {c.__name__ for c in type(model).__mro__ if c.__module__.startswith("transformers.")}


def get_path(module: nn.Module, *paths: str) -> Any:
    """The first dotted attribute path that exists on ``module`` (None if none does)."""
    for path in paths:
        obj = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def find_attention(layer: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of the outermost attention submodule of an encoder layer."""
    for name, mod in layer.named_modules():
        if name and "attention" in type(mod).__name__.lower():
            return name, mod
    raise TypeError(f"{type(layer).__name__} has no attention submodule")


def find_layers(vision: nn.Module, num_layers: int | None = None) -> nn.ModuleList:
    """The encoder's list of transformer layers (first ``ModuleList`` of identical attention layers)."""
    for mod in vision.modules():
        if (isinstance(mod, nn.ModuleList) and len(mod) and (num_layers is None or len(mod) == num_layers)
                and all(type(m) is type(mod[0]) for m in mod)):
            try:
                find_attention(mod[0])
            except TypeError:
                continue
            return mod
    raise TypeError(f"cannot find the encoder layers of {type(vision).__name__}")


def find_down_proj(layer: nn.Module, hidden: int) -> nn.Linear:
    """The MLP down-projection of a layer: outside the attention, ``Linear(widest -> hidden)``.

    Ties (an MLP ratio of 1) go to the last such module registered, which is the down-projection
    in every HF layout (``intermediate.dense`` precedes ``output.dense``, ``fc1`` precedes ``fc2``).
    """
    best = roles.down_projection(layer, hidden, find_attention(layer)[1])
    if best is None:
        raise TypeError(f"cannot find the MLP down-projection of {type(layer).__name__}")
    return best


def _arg_index(module: nn.Module, name: str) -> int:
    """Position of argument ``name`` of ``module.forward`` among the positional ones (-1: none)."""
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return -1
    return params.index(name) if name in params else -1


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` or ``obj.key`` (transformers sizes are dicts or ``SizeDict``s), else None."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _hw(size: Any) -> tuple[int, int]:
    """``(height, width)`` of a transformers size (dict, ``SizeDict``, number or pair)."""
    h, w = _get(size, "height"), _get(size, "width")
    return (int(h), int(w)) if h is not None and w is not None else _pair(size)


def _visible(h: Any, tokens: int, keep: int) -> Any:
    """One recorded tensor as the plain model gives it: a hidden state ``(B, tokens, D)`` that was a
    block's input with the registers appended becomes the tensor the block received (the very one
    the output was computed from, so gradients reach it); other ``tokens``-long hidden states and
    ``(B, h, tokens, tokens)`` attention maps are cut back to ``keep`` tokens."""
    if not torch.is_tensor(h):
        return h
    call = tagged(h)
    if call is not None and call.visible is not None and h.shape[-1 if h.dim() == 4 else 1] == tokens:
        return call.visible
    if h.dim() == 3 and h.shape[1] == tokens:
        return h[:, :keep]
    if h.dim() == 4 and h.shape[-1] == h.shape[-2] == tokens:
        if h.requires_grad:
            warnings.warn("with test-time registers the recorded attention maps are cut to the "
                          "visible tokens after the attention used the full map: they are not on the "
                          "autograd graph (their .grad stays None); see docs/method.md",
                          RecordedAttentionWarning, stacklevel=2)
        return h[..., :keep, :keep]
    return h


class RecordedAttentionWarning(UserWarning):
    """Recorded attention maps of a model with registers are not on the autograd graph."""


def trim_recorded(output: Any, num_registers: int) -> Any:
    """A transformers model output (a ``ModelOutput`` or, with ``return_dict=False``, a tuple)
    with the ``hidden_states`` and ``attentions`` it recorded inside the layers made as the plain
    model returns them. The visible token count is the last hidden state's."""
    first = output.get("last_hidden_state") if isinstance(output, dict) else (
        output[0] if isinstance(output, tuple) and output else None)
    if not torch.is_tensor(first) or first.dim() != 3:
        return output
    keep = int(first.shape[1])
    tokens = keep + num_registers

    def fix(group):
        return tuple(_visible(h, tokens, keep) for h in group) if type(group) in (tuple, list) else group
    if isinstance(output, dict):                       # ModelOutput is an OrderedDict
        for key in ("hidden_states", "attentions"):
            if output.get(key) is not None:
                output[key] = fix(output[key])
        return output
    return type(output)(fix(o) if i else o for i, o in enumerate(output))


class HFVisionAdapter(Adapter):
    """A ``transformers`` vision encoder. Subclasses name the classes they accept and, for
    composite models, which submodule is the vision encoder (:meth:`vision_module`)."""

    family = "hf"
    #: transformers class names this adapter accepts (subclasses of them too)
    class_names: tuple[str, ...] = ()

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return bool(hf_class_names(model) & set(cls.class_names))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.vision = self.vision_module(model)
        self.config = self.vision.config
        self._layers = find_layers(self.vision, getattr(self.config, "num_hidden_layers", None))

    def vision_module(self, model: nn.Module) -> nn.Module:
        """The module whose ``forward(pixel_values=...)`` runs embeddings and encoder."""
        return model

    # --- structure -------------------------------------------------------------------------
    @property
    def blocks(self) -> Sequence[nn.Module]:
        return list(self._layers)

    @property
    def embeddings(self) -> nn.Module:
        return get_path(self.vision, "embeddings", "vision_model.embeddings")

    @property
    def num_prefix_tokens(self) -> int:
        emb = self.embeddings
        cls = any(getattr(emb, n, None) is not None for n in ("cls_token", "class_embedding"))
        regs = getattr(emb, "register_tokens", None)
        return int(cls) + (int(regs.shape[1]) if regs is not None else 0)

    @property
    def embed_dim(self) -> int:
        return int(self.config.hidden_size)

    @property
    def patch_size(self) -> tuple[int, int]:
        return _pair(self.config.patch_size)

    def down_proj(self, layer: int) -> nn.Module:
        return find_down_proj(self._layers[layer], self.embed_dim)

    def attention(self, layer: int) -> nn.Module:
        return find_attention(self._layers[layer])[1]

    def pre_block_module(self) -> nn.Module | None:
        return get_path(self.vision, "pre_layrnorm", "vision_model.pre_layrnorm")

    @property
    def block_io(self) -> BlockIO:
        """An ``attention_mask`` argument of the layers is extended for the registers."""
        return TokenInputsIO(self.token_dim, masks=(("attention_mask", _arg_index(self._layers[0], "attention_mask")),))

    def output_trims(self) -> list[tuple[nn.Module, Any]]:
        """transformers records ``hidden_states`` and ``attentions`` from inside the layers, where
        the registers are present (5.x: ``hidden_states[0]`` is layer 0's input, and every
        attention map); the models that return those give them back as the plain model does."""
        from transformers import PreTrainedModel
        return [(mod, trim_recorded) for mod in self.vision.modules()
                if mod is self.vision or isinstance(mod, PreTrainedModel)]

    @staticmethod
    def reentrant_checkpointing(block: nn.Module) -> bool:
        """transformers checkpoints a layer's ``forward`` (its hooks stay outside) with the
        ``use_reentrant`` given to ``gradient_checkpointing_enable``, bound in the
        ``functools.partial`` it stores on the layer. Anything else there (a wrapper, a mock) says
        nothing: a re-entrant run it makes is still refused, by the block-input checks."""
        if not (getattr(block, "gradient_checkpointing", False) and block.training
                and torch.is_grad_enabled()):
            return False
        fn = getattr(block, "_gradient_checkpointing_func", None)
        return isinstance(fn, functools.partial) and fn.keywords.get("use_reentrant") is True

    @staticmethod
    def records_attention(attention: nn.Module) -> bool:
        """transformers' eager attention computes its probabilities and returns them (recorded as
        ``attentions``); SDPA and flash attention return none."""
        return getattr(getattr(attention, "config", None), "_attn_implementation", None) == "eager"

    # --- running ---------------------------------------------------------------------------
    def run(self, x: torch.Tensor) -> Any:
        """The vision encoder on ``x``, resizing the position embedding for other sizes (and
        always while tracing for export, so the graph keeps the size dynamic)."""
        kw = {}
        if (tuple(x.shape[-2:]) != self.image_size() or torch.jit.is_tracing()) \
                and self._accepts("interpolate_pos_encoding"):
            kw["interpolate_pos_encoding"] = True
        return self.vision(pixel_values=x, **kw)

    def dynamic_size(self) -> bool:
        return self._accepts("interpolate_pos_encoding")

    def _accepts(self, arg: str) -> bool:
        try:
            return arg in inspect.signature(self.vision.forward).parameters
        except (TypeError, ValueError):
            return False

    def image_size(self) -> tuple[int, int]:
        return _pair(self.config.image_size)

    def takes_any_size(self) -> bool:
        return self._accepts("interpolate_pos_encoding")   # run() passes it at other sizes

    def final_norm(self) -> nn.Module:
        norm = get_path(self.vision, "layernorm", "post_layernorm", "vision_model.post_layernorm")
        if not isinstance(norm, nn.Module):
            raise TypeError(f"cannot find the final norm of {type(self.model).__name__}")
        return norm

    def output_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``last_hidden_state`` (after the final norm where the model applies one to every token)."""
        tokens = getattr(self.run(x), "last_hidden_state", None)
        if tokens is None:
            raise TypeError(f"cannot read token features from {type(self.model).__name__}")
        return tokens


    def mean_std(self):
        return MEAN_STD.get(getattr(self.config, "model_type", ""), IMAGENET)

    def parameter(self) -> torch.Tensor:
        return next(self.vision.parameters())

    def fingerprint_module(self) -> nn.Module:
        return self.vision


class HFDinov2Adapter(HFVisionAdapter):
    """``Dinov2Model`` (CLS) and ``Dinov2WithRegistersModel`` (CLS + trained registers)."""
    class_names = ("Dinov2Model", "Dinov2WithRegistersModel")

    def dynamic_size(self) -> bool:
        return True  # the embeddings always resize the position grid to the input

    def takes_any_size(self) -> bool:
        return True


class HFViTAdapter(HFVisionAdapter):
    """``ViTModel`` (CLS, optional pooler)."""
    class_names = ("ViTModel",)


class HFCLIPVisionAdapter(HFVisionAdapter):
    """``CLIPVisionModel``: CLS, ``pre_layrnorm`` before the blocks, ``post_layernorm`` on CLS."""
    class_names = ("CLIPVisionModel", "CLIPVisionModelWithProjection")

    def vision_module(self, model: nn.Module) -> nn.Module:
        return model.vision_model if "CLIPVisionModelWithProjection" in hf_class_names(model) else model


class HFSiglipVisionAdapter(HFVisionAdapter):
    """``SiglipVisionModel``: no prefix token; the attention-pooling head reads the final hidden
    state, from which the registers are already removed."""
    class_names = ("SiglipVisionModel",)

    def dynamic_size(self) -> bool:
        return False  # the pooling head's nn.MultiheadAttention traces the token count as a constant


class HFCLIPAdapter(HFVisionAdapter):
    """``CLIPModel`` / ``SiglipModel``: the image side (``vision_model``); ``run`` runs only it."""
    class_names = ("CLIPModel", "SiglipModel")

    def vision_module(self, model: nn.Module) -> nn.Module:
        return model.vision_model


class HFDINOv3Adapter(HFVisionAdapter):
    """``DINOv3ViTModel``: CLS + register tokens, no absolute position embedding, RoPE on the
    patch tokens. The layers take ``position_embeddings=(cos, sin)`` for the patches and treat
    every token before them as prefix, so the registers get identity rows (no rotary position)."""
    class_names = ("DINOv3ViTModel",)

    @property
    def block_io(self) -> BlockIO:
        return TokenInputsIO(self.token_dim, rotary=("position_embeddings",), layout="cos_sin")


class HFSiglip2Adapter(HFVisionAdapter):
    """``Siglip2VisionModel`` / ``Siglip2Model`` (image side), the NaFlex SigLIP 2.

    The model takes pre-patchified pixels ``(B, N, P*P*C)`` with ``pixel_attention_mask`` and
    ``spatial_shapes``; ``run`` patchifies an image batch (every patch real). On padded NaFlex
    batches the layers' attention mask is extended: registers masked in, padding kept out (and
    kept out of the register edit)."""
    class_names = ("Siglip2VisionModel", "Siglip2Model")

    def vision_module(self, model: nn.Module) -> nn.Module:
        return model.vision_model if "Siglip2Model" in hf_class_names(model) else model

    def image_size(self) -> tuple[int, int]:
        side = round(int(self.config.num_patches) ** 0.5) * int(self.config.patch_size)
        return (side, side)

    def run(self, x: torch.Tensor) -> Any:
        return self.vision(**siglip2_inputs(x, int(self.config.patch_size)))


def siglip2_inputs(x: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """Siglip2 keyword inputs for an image batch ``(B, C, H, W)``: patches flattened as the
    Siglip2 image processor does (row-major patches, each ``(P, P, C)``), all of them real."""
    B, C, H, W = x.shape
    rows, cols = H // patch, W // patch
    p = x[:, :, :rows * patch, :cols * patch].reshape(B, C, rows, patch, cols, patch)
    p = p.permute(0, 2, 4, 3, 5, 1).reshape(B, rows * cols, patch * patch * C)
    return {"pixel_values": p,
            "pixel_attention_mask": torch.ones(B, rows * cols, dtype=torch.long, device=x.device),
            "spatial_shapes": torch.tensor([[rows, cols]] * B, dtype=torch.long, device=x.device)}


class HFAimv2Adapter(HFVisionAdapter):
    """``Aimv2VisionModel`` / ``Aimv2Model`` (image side): no prefix token, RMS norms, SwiGLU MLP
    (the neuron site is ``act(gate) * up``, the input of ``down_proj``)."""
    class_names = ("Aimv2VisionModel", "Aimv2Model")

    def vision_module(self, model: nn.Module) -> nn.Module:
        return model.vision_model if "Aimv2Model" in hf_class_names(model) else model


class HFInternVLVisionAdapter(HFVisionAdapter):
    """``InternVLVisionModel`` (InternViT): CLS, LayerScale, layer norms or RMS norms."""
    class_names = ("InternVLVisionModel",)


class HFIdefics3VisionAdapter(HFVisionAdapter):
    """The SigLIP-style towers of Idefics3 and SmolVLM (``Idefics3VisionTransformer``,
    ``SmolVLMVisionTransformer``): no prefix token; padded image batches come with a patch
    attention mask, which the registers join."""
    class_names = ("Idefics3VisionTransformer", "SmolVLMVisionTransformer")


@dataclass
class ImageTokens:
    """Where a VLM's image tokens sit in the language model's sequence, and what each one shows.

    One row per sequence of the batch, ``N`` the most image tokens of any row (``valid`` says
    which are real). ``sources`` names the tower patches each token carries (pixel shuffle: a
    block of them; a newline or CLS token: none), as ``view * patches_per_view + patch`` over the
    views (images, tiles, crops) in the order the tower runs them; -1 pads. ``boxes`` is each
    token's footprint on its image, ``x0, y0, x1, y1`` in ``[0, 1]`` of the image's width and
    height (NaN: a token with no place on the image)."""

    positions: torch.Tensor          # (B, N) long: sequence positions
    valid: torch.Tensor              # (B, N) bool
    sources: torch.Tensor            # (B, N, K) long
    boxes: torch.Tensor              # (B, N, 4) float
    num_views: int
    grid: tuple[int, int]            # the tower's patch grid of one view (rows, cols)

    @property
    def patches_per_view(self) -> int:
        return self.grid[0] * self.grid[1]


def token_positions(input_ids: torch.Tensor, token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions (B, N), valid (B, N))`` of ``token_id`` in each row of ``input_ids``, in
    sequence order; ``N`` is the largest count of any row."""
    hit = input_ids == token_id
    B, T = hit.shape
    n = int(hit.sum(1).max()) if B else 0
    order = torch.arange(T, device=hit.device).expand(B, T)
    key = torch.where(hit, order, order + T)                      # hits first, in order
    pos = key.sort(dim=1).values[:, :n]
    valid = pos < T
    return torch.where(valid, pos, torch.zeros_like(pos)), valid


def flat_order(valid: torch.Tensor) -> torch.Tensor:
    """``(B, N)``: the place of each valid token among all the batch's image tokens, row by row
    (the order in which a VLM scatters image features into its sequence)."""
    flat = valid.reshape(-1).long()
    return (flat.cumsum(0) - 1).reshape(valid.shape)


def patch_boxes(rows: int, cols: int) -> torch.Tensor:
    """``(rows * cols, 4)``: each cell of a ``rows x cols`` grid as ``x0, y0, x1, y1`` in [0, 1]."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    r, c = r.reshape(-1).double(), c.reshape(-1).double()
    return torch.stack([c / cols, r / rows, (c + 1) / cols, (r + 1) / rows], dim=-1)


def boxes_in(local: torch.Tensor, frame: torch.Tensor) -> torch.Tensor:
    """Boxes given in ``[0, 1]`` of a frame, moved into the frame's own box (both ``(..., 4)``)."""
    w, h = frame[..., 2] - frame[..., 0], frame[..., 3] - frame[..., 1]
    return torch.stack([frame[..., 0] + local[..., 0] * w, frame[..., 1] + local[..., 1] * h,
                        frame[..., 0] + local[..., 2] * w, frame[..., 1] + local[..., 3] * h], dim=-1)


def _nan_where(boxes: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep[..., None], boxes, torch.full_like(boxes, float("nan")))


class HFVLMAdapter(DelegatingAdapter):
    """A vision-language model, through its vision tower: structure, running and fingerprint are
    the tower's own adapter's (so a neuron set found on the tower applies to the VLM and back).
    Test-time registers live inside the tower's blocks and are cut from every block output, so
    what the projector and the language model receive keeps its shape."""

    family = "hf"
    class_names: tuple[str, ...] = ()
    #: where VLMs keep the tower (transformers 5 first, then 4.x)
    TOWER_PATHS = ("model.vision_tower", "vision_tower", "model.vision_model", "vision_model")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return bool(hf_class_names(model) & set(cls.class_names))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        tower = get_path(model, *self.TOWER_PATHS)
        if not isinstance(tower, nn.Module):
            raise TypeError(f"{type(model).__name__} has no single vision tower")
        from . import wrap
        self.vision = tower
        self.inner = wrap(tower)

    def describe(self) -> str:
        return f"{type(self.model).__name__} vision tower: {self.inner.describe()}"

    # --- the language model's side (text-to-image attribution) --------------------------------
    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        for name in ("image_token_id", "image_token_index"):
            v = getattr(cfg, name, None)
            if v is not None:
                return int(v)
        raise TypeError(f"{type(self.model).__name__}: its config names no image token")

    def language_model(self) -> nn.Module:
        lm = get_path(self.model, "model.language_model", "language_model", "model.text_model", "text_model")
        if not isinstance(lm, nn.Module):
            raise TypeError(f"{type(self.model).__name__} has no language model ttreg can find")
        return lm

    def lm_attention(self) -> list[nn.Module]:
        """The attention module of every layer of the language model, in order."""
        lm = self.language_model()
        cfg = getattr(lm, "config", None)
        layers = find_layers(lm, getattr(cfg, "num_hidden_layers", None))
        return [find_attention(layer)[1] for layer in layers]

    #: per-token inputs of the tokens appended after the prompt (an attributed answer), where the
    #: family marks them (PaliGemma: ``token_type_ids`` 1, the causal suffix after its
    #: bidirectional prefix, as ``generate`` marks the tokens it makes); other keys get 0
    answer_token_inputs: dict[str, int] = {}
    #: what joins the image placeholder and the prompt when the processor has no chat template
    prompt_separator = "\n"

    def processor_images(self, images: Sequence) -> list:
        """Images as this family's processor takes them, one per text (default: a flat list)."""
        return list(images)

    def layout(self, processor, images: Sequence) -> dict[str, Any]:
        """What :meth:`image_tokens` needs besides the model inputs, read from ``processor`` for
        ``images`` (PIL, one per sequence): nothing by default."""
        return {}

    def image_tokens(self, inputs: dict, layout: dict | None = None) -> ImageTokens:
        """Where the image tokens of ``inputs`` (what the processor returns) sit in the language
        model's sequence and what each one shows (:class:`ImageTokens`)."""
        raise NotImplementedError(f"text-to-image attribution is not available for "
                                  f"{type(self.model).__name__} yet (LLaVA, LLaVA-OneVision, "
                                  "Idefics3, SmolVLM, PaliGemma, Gemma 3 and InternVL are)")

    def _whole_views(self, inputs: dict, views: torch.Tensor, layout: dict | None) -> torch.Tensor:
        """``(V, 4)``: each view's box on its image -- ``layout["view_boxes"]``, else every view
        the whole image (one view per image: checked against the image-token runs)."""
        vb = (layout or {}).get("view_boxes")
        if vb is not None:
            return vb
        ids = inputs["input_ids"] == self.image_token_id
        runs = int((ids & ~torch.nn.functional.pad(ids, (1, 0))[:, :-1]).sum())
        if runs != len(views):
            raise ValueError(f"{len(views)} views for {runs} images: these inputs split images into "
                             "tiles; pass the processor (or layout={'view_boxes': ...}) to place them")
        return torch.tensor([[0.0, 0.0, 1.0, 1.0]] * len(views), dtype=torch.float64)

    def _fixed_views(self, inputs: dict, views: torch.Tensor, per_view: int, first: int,
                     sources_of, view_boxes: torch.Tensor) -> ImageTokens:
        """Image tokens of families where every view (image or crop, in tower order) gives
        ``per_view`` tokens in a row; ``first`` of them (CLS) show no patch; ``sources_of(j)``
        maps local patch-token indices ``(...,)`` to ``(..., K)`` tower patches of the view and
        ``view_boxes`` ``(V, 4)`` places the views on their images."""
        gh, gw = self.grid_size(views)
        P = gh * gw
        pos, valid = token_positions(inputs["input_ids"], self.image_token_id)
        g = flat_order(valid)
        view, local = g.div(per_view, rounding_mode="floor"), g % per_view - first
        keep = valid & (local >= 0)
        if int(valid.sum()) != len(views) * per_view:
            raise ValueError(f"the inputs hold {int(valid.sum())} image tokens for {len(views)} views "
                             f"of {per_view} tokens each; give the processor's output unchanged")
        src = sources_of(local.clamp_min(0))                          # (B, N, K) patches
        sources = torch.where(keep[..., None], view[..., None] * P + src, torch.full_like(src, -1))
        fp = self._footprints(src, gh, gw)                            # (B, N, 4) in the view
        vb = view_boxes.to(fp)[view.clamp(0, len(views) - 1)]
        return ImageTokens(pos, valid, sources, _nan_where(boxes_in(fp, vb), keep), len(views), (gh, gw))

    @staticmethod
    def _footprints(src: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
        """The box ``(..., 4)`` in [0, 1] of a view covering tower patches ``src`` ``(..., K)``."""
        boxes = patch_boxes(gh, gw)[src.clamp_min(0)]                # (..., K, 4)
        return torch.cat([boxes[..., :2].amin(-2), boxes[..., 2:].amax(-2)], dim=-1)


class HFLlavaAdapter(HFVLMAdapter):
    """LLaVA-style VLMs (CLIP tower). The projector reads ``hidden_states[vision_feature_layer]``,
    which keeps its shape. One image, one view: image token ``j`` is patch ``j`` (the
    ``"default"`` feature strategy drops CLS; ``"full"`` keeps it as a token showing no patch);
    the view is the processor's centre crop of the image."""
    class_names = ("LlavaForConditionalGeneration", "LlavaModel")

    def layout(self, processor, images: Sequence) -> dict[str, Any]:
        """The box of each image the view shows: CLIP's processor resizes the shorter side and
        crops the centre; without a crop, the whole image."""
        ip = getattr(processor, "image_processor", None)
        crop = getattr(ip, "crop_size", None)
        if ip is None or not getattr(ip, "do_center_crop", False) or crop is None:
            return {}
        ch, cw = _hw(crop)
        short = _get(getattr(ip, "size", None), "shortest_edge")
        boxes = []
        for im in images:
            W, H = im.size
            s = (short / min(H, W)) if short else 1.0
            h, w = min(ch / s, H), min(cw / s, W)       # the crop in the image's pixels
            boxes.append([(W - w) / 2 / W, (H - h) / 2 / H, (W + w) / 2 / W, (H + h) / 2 / H])
        return {"view_boxes": torch.tensor(boxes, dtype=torch.float64)}

    def image_tokens(self, inputs: dict, layout: dict | None = None) -> ImageTokens:
        views = inputs["pixel_values"]
        gh, gw = self.grid_size(views)
        full = getattr(self.model.config, "vision_feature_select_strategy", "default") == "full"
        first = self.num_prefix_tokens if full else 0
        vb = (layout or {}).get("view_boxes")
        vb = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * len(views), dtype=torch.float64) if vb is None else vb
        return self._fixed_views(inputs, views, first + gh * gw, first, lambda j: j[..., None], vb)


class HFLlavaOnevisionAdapter(HFVLMAdapter):
    """LLaVA-OneVision (SigLIP tower, any-resolution tiles). An image's tokens are the base view
    (the whole image, squashed to the tower's size) and then the tiles' patches as one grid
    over the image, unpadded to its aspect ratio (and shrunk past ``anyres_max_N``), with a
    newline token after each row. Which patch each token carries is read by running the model's
    own ``pack_image_features`` on patch coordinates instead of features."""
    class_names = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")

    def image_tokens(self, inputs: dict, layout: dict | None = None) -> ImageTokens:
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            get_anyres_image_grid_shape, image_size_to_num_patches)
        cfg, pix, sizes = self.model.config, inputs["pixel_values"], inputs["image_sizes"]
        vsize = int(cfg.vision_config.image_size)
        gh, gw = self.grid_size(pix.flatten(0, 1) if pix.dim() == 5 else pix)
        P, pre = gh * gw, self.num_prefix_tokens
        counts = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, vsize) for s in sizes]
        packer = get_path(self.model, "model.pack_image_features", "pack_image_features")
        r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        r, c = r.reshape(-1).double(), c.reshape(-1).double()
        feats, first_view, widths = [], 0, []
        for s, n in zip(sizes, counts):
            npw = get_anyres_image_grid_shape(s, cfg.image_grid_pinpoints, vsize)[1] if n > 1 else 1
            widths.append(npw)
            tiles = torch.arange(n - 1).double()
            gr = torch.cat([r[None], (tiles // npw)[:, None] * gh + r[None]])         # (n, P)
            gc = torch.cat([c[None], (tiles % npw)[:, None] * gw + c[None]])
            f = torch.stack([torch.ones_like(gr), torch.full_like(gr, first_view), gr, gc], -1)
            f = torch.cat([torch.full((n, pre, 4), float("nan"), dtype=f.dtype), f], dim=1)
            if getattr(cfg, "vision_feature_select_strategy", "full") == "default":
                f = f[:, 1:]
            feats.append(f)
            first_view += n
        packed, _ = packer(feats, sizes, image_newline=torch.zeros(4, dtype=torch.float64),
                           vision_aspect_ratio=getattr(cfg, "vision_aspect_ratio", "anyres_max_9"))
        srcs, boxes = [], []
        for f, n, npw in zip(packed, counts, widths):   # one image: base view, then the tile grid
            src, box = self._sources(f, n, npw, gh, gw, P)
            srcs.append(src)
            boxes.append(box)
        pos, valid = token_positions(inputs["input_ids"], self.image_token_id)
        if int(valid.sum()) != sum(len(s) for s in srcs):
            raise ValueError(f"the inputs hold {int(valid.sum())} image tokens, the images "
                             f"{sum(len(s) for s in srcs)}; give the processor's output unchanged")
        g = flat_order(valid).clamp_min(0)
        all_src, all_box = torch.cat(srcs), torch.cat(boxes)
        keep = valid & (all_src[g] >= 0)
        return ImageTokens(pos, valid, torch.where(keep, all_src[g], -1)[..., None],
                           _nan_where(all_box[g], keep), first_view, (gh, gw))

    @staticmethod
    def _sources(f: torch.Tensor, n: int, npw: int, gh: int, gw: int, P: int):
        """``(tokens,)`` flat tower patch and ``(tokens, 4)`` box of one image's packed tokens."""
        base = P if n > 1 else len(f) - 1
        ok = f[:, 0] > 0.5                                            # newline tokens carry 0
        view0 = f[:, 1].nan_to_num(-1).round().long()
        gr, gc = f[:, 2].nan_to_num(-1).round().long(), f[:, 3].nan_to_num(-1).round().long()
        idx = torch.arange(len(f))
        is_base = idx < base
        ok = ok & (gr >= 0)
        view = torch.where(is_base, view0, view0 + 1 + (gr // gh) * npw + gc // gw)
        patch = (gr % gh) * gw + gc % gw
        src = torch.where(ok, view * P + patch, torch.full_like(patch, -1))
        box = torch.full((len(f), 4), float("nan"), dtype=torch.float64)
        box[:base] = patch_boxes(gh, gw)[patch[:base].clamp(0, P - 1)]
        rest = len(f) - base
        if n > 1 and rest:
            rows = int((~ok[base:]).sum())                           # one newline per row
            cols = rest // rows - 1
            k = torch.arange(rest)
            i, j = k // (cols + 1), k % (cols + 1)
            box[base:] = torch.stack([j / cols, i / rows, (j + 1) / cols, (i + 1) / rows], -1).double()
        return src, _nan_where(box, ok)


class HFPaliGemmaAdapter(HFVLMAdapter):
    """PaliGemma (SigLIP tower, linear projector). One view per image, the whole image squashed
    to the tower's size: image token ``j`` is patch ``j``. The language model is a prefix LM: the
    image and the prompt (``token_type_ids`` 0) attend to each other both ways, the answer
    (``token_type_ids`` 1) causally; an attributed answer is marked 1, as ``generate`` marks
    the tokens it makes, so the prompt does not see it."""
    class_names = ("PaliGemmaForConditionalGeneration", "PaliGemmaModel")
    answer_token_inputs = {"token_type_ids": 1}
    prompt_separator = ""            # the processor puts <bos> after the image tokens itself

    def image_tokens(self, inputs: dict, layout: dict | None = None) -> ImageTokens:
        views = inputs["pixel_values"]
        gh, gw = self.grid_size(views)
        return self._fixed_views(inputs, views, gh * gw, 0, lambda j: j[..., None],
                                 self._whole_views(inputs, views, layout))


class HFGemma3Adapter(HFVLMAdapter):
    """Gemma 3 (SigLIP tower; the projector average-pools the patch grid to
    ``mm_tokens_per_image`` tokens). One view per image, the whole image squashed to the
    tower's size; each image token carries a ``k x k`` block of patches, read by running the
    projector's own pooling on one-hot patch maps. Image tokens attend to each other both ways
    in the language model (``token_type_ids`` 1 on them, 0 on text: an appended answer is
    text). Pan-and-scan crops are refused (their places on the image are not read yet)."""
    class_names = ("Gemma3ForConditionalGeneration", "Gemma3Model")

    def processor_images(self, images: Sequence) -> list:
        return [[im] for im in images]

    def layout(self, processor, images: Sequence) -> dict[str, Any]:
        ip = getattr(processor, "image_processor", None)
        if getattr(ip, "do_pan_and_scan", False):
            raise ValueError("attribution does not place Gemma 3's pan-and-scan crops on the image "
                             "yet: use the processor with do_pan_and_scan=False")
        return {}

    def image_tokens(self, inputs: dict, layout: dict | None = None) -> ImageTokens:
        views = inputs["pixel_values"]
        gh, gw = self.grid_size(views)
        proj = get_path(self.model, "model.multi_modal_projector", "multi_modal_projector")
        eye = torch.eye(gh * gw, dtype=torch.float64).reshape(gh * gw, 1, gh, gw)
        member = proj.avg_pool(eye).flatten(1).T > 0                     # (tokens, patches)
        block = member.nonzero()[:, 1].reshape(member.shape[0], -1)      # (tokens, k*k) patches
        return self._fixed_views(inputs, views, block.shape[0], 0, lambda j: block[j],
                                 self._whole_views(inputs, views, layout))


class HFIdefics3Adapter(HFVLMAdapter):
    """Idefics3 and SmolVLM (SigLIP-style tower with patch masks, pixel-shuffle connector). An
    image is split into ``rows x cols`` crops that tile it, then shown whole (the global view);
    each view gives ``(grid / s)^2`` tokens, each carrying an ``s x s`` block of patches (read by
    running the connector's own ``pixel_shuffle`` on patch indices). All-zero views are padding,
    dropped as the model drops them."""
    class_names = ("Idefics3ForConditionalGeneration", "Idefics3Model",
                   "SmolVLMForConditionalGeneration", "SmolVLMModel")

    def processor_images(self, images: Sequence) -> list:
        return [[im] for im in images]

    def layout(self, processor, images: Sequence) -> dict[str, Any]:
        """The crop grid of each image, as the processor splits it."""
        got = processor.image_processor([[im] for im in images], return_row_col_info=True)
        return {"rows": [int(r[0]) for r in got["rows"]], "cols": [int(c[0]) for c in got["cols"]]}

    def image_tokens(self, inputs: dict, layout: dict | None = None) -> ImageTokens:
        pix = inputs["pixel_values"]
        B, n = pix.shape[:2]
        real = (pix != 0).flatten(2).any(-1)                          # (B, n) as the model decides
        views = pix[real]
        gh, gw = self.grid_size(views)
        connector = get_path(self.model, "model.connector", "connector")
        s = int(connector.scale_factor)
        idx = torch.arange(gh * gw, dtype=torch.float64).reshape(1, -1, 1)
        block = connector.pixel_shuffle(idx, s)[0].round().long()      # (tokens, s*s) patches
        per_view = block.shape[0]
        rows, cols = (layout or {}).get("rows"), (layout or {}).get("cols")
        counts = real.sum(1).tolist()
        if rows is None:
            if any(c != 1 for c in counts):
                raise ValueError("these Idefics3 inputs split images into crops: pass the processor "
                                 "(or layout={'rows': [...], 'cols': [...]}) to place the crops")
            rows, cols = [0] * B, [0] * B
        vb = []
        for b in range(B):
            R, C = int(rows[b]), int(cols[b])
            if counts[b] != R * C + 1:
                raise ValueError(f"row {b}: {counts[b]} views, but a {R}x{C} crop grid and the "
                                 "global view make {R * C + 1}")
            vb += [[j / C, i / R, (j + 1) / C, (i + 1) / R] for i in range(R) for j in range(C)]
            vb.append([0.0, 0.0, 1.0, 1.0])
        vb = torch.tensor(vb, dtype=torch.float64)
        pam = inputs.get("pixel_attention_mask")
        if pam is not None:                                            # padding inside a view
            real_px = pam[real].bool()
            hh = real_px.any(2).sum(1).double() / real_px.shape[1]
            ww = real_px.any(1).sum(1).double() / real_px.shape[2]
            vb = self._shrink(vb, hh, ww)
        return self._fixed_views(inputs, views, per_view, 0, lambda j: block[j], vb)

    @staticmethod
    def _shrink(vb: torch.Tensor, hh: torch.Tensor, ww: torch.Tensor) -> torch.Tensor:
        """Views whose real pixels fill only the top-left ``hh x ww`` share: stretch each view's
        frame so that share lands on the view's box (patches in the padding fall outside)."""
        w, h = vb[:, 2] - vb[:, 0], vb[:, 3] - vb[:, 1]
        return torch.stack([vb[:, 0], vb[:, 1], vb[:, 0] + w / ww, vb[:, 1] + h / hh], -1)


class HFInternVLAdapter(HFVLMAdapter):
    """InternVL (InternViT tower, pixel-shuffle projector). The processor cuts an image into a
    ``rows x cols`` grid of tiles that covers it (the image squashed to the grid) and, with
    more than one tile, adds the whole image (the thumbnail) after them; each view gives
    ``(grid * downsample_ratio)^2`` tokens (CLS dropped), each carrying a block of patches read
    by running the model's own ``pixel_shuffle`` on patch indices."""
    class_names = ("InternVLForConditionalGeneration", "InternVLModel")

    def layout(self, processor, images: Sequence) -> dict[str, Any]:
        """Each view's box on its image, from the tile grid the processor chooses."""
        from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas
        ip = processor.image_processor
        kw = getattr(processor, "images_kwargs", None) or {}
        crop = kw.get("crop_to_patches", getattr(ip, "crop_to_patches", False))
        lo, hi = int(getattr(ip, "min_patches", 1)), int(getattr(ip, "max_patches", 1))
        th, tw = _hw(ip.size)
        boxes = []
        for im in images:
            W, H = im.size
            cols, rows = get_optimal_tiled_canvas((H, W), (th, tw), lo, hi) if crop and hi > 1 else (1, 1)
            boxes += [[c / cols, r / rows, (c + 1) / cols, (r + 1) / rows]
                      for r in range(rows) for c in range(cols)]
            if rows * cols > 1:
                boxes.append([0.0, 0.0, 1.0, 1.0])
        return {"view_boxes": torch.tensor(boxes, dtype=torch.float64)}

    def image_tokens(self, inputs: dict, layout: dict | None = None) -> ImageTokens:
        views = inputs["pixel_values"]
        gh, gw = self.grid_size(views)
        cfg = self.model.config
        if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
            raise ValueError("attribution reads InternVL with vision_feature_select_strategy "
                             "'default' (CLS dropped) only")
        inner = get_path(self.model, "model")
        idx = torch.arange(gh * gw, dtype=torch.float64).reshape(1, gh, gw, 1)
        block = inner.pixel_shuffle(idx, scale_factor=cfg.downsample_ratio)
        block = block.reshape(-1, block.shape[-1]).round().long()      # (tokens, s*s) patches
        vb = self._whole_views(inputs, views, layout)
        if len(vb) != len(views):
            raise ValueError(f"the layout places {len(vb)} views, the inputs hold {len(views)}; "
                             "give the processor's output unchanged")
        return self._fixed_views(inputs, views, block.shape[0], 0, lambda j: block[j], vb)


#: why Qwen2.5-VL's vision tower cannot carry a test-time register (also in docs/families.md)
QWEN25_VL_REASON = (
    "ttreg cannot carry a test-time register faithfully through Qwen2.5-VL's vision tower: most "
    "of its blocks use windowed attention over a packed sequence of all images (one token sees "
    "only its own window), so an appended register could serve as the global sink the method "
    "moves outliers into only in the few full-attention blocks; a register would also have to be "
    "threaded through the window permutation and kept out of the 2x2 patch merger. See "
    "docs/families.md")


class HFQwen25VLRefusal(Adapter):
    """Qwen2.5-VL: recognised and refused with the reason (:data:`QWEN25_VL_REASON`)."""

    family = "hf"
    class_names = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel",
                   "Qwen2_5_VisionTransformerPretrainedModel")

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return bool(hf_class_names(model) & set(cls.class_names))

    def __init__(self, model: nn.Module) -> None:
        raise TypeError(QWEN25_VL_REASON)


#: tried in order by :func:`ttreg.wrap`; most specific first
HF_ADAPTERS: list[type[Adapter]] = [
    HFQwen25VLRefusal, HFLlavaAdapter, HFLlavaOnevisionAdapter, HFPaliGemmaAdapter, HFGemma3Adapter,
    HFIdefics3Adapter, HFInternVLAdapter, HFCLIPAdapter, HFSiglip2Adapter, HFAimv2Adapter,
    HFDinov2Adapter, HFDINOv3Adapter, HFViTAdapter, HFCLIPVisionAdapter, HFSiglipVisionAdapter,
    HFInternVLVisionAdapter, HFIdefics3VisionAdapter]

__all__ = ["HF_ADAPTERS", "HFVisionAdapter", "HFDinov2Adapter", "HFViTAdapter", "HFCLIPVisionAdapter",
           "HFSiglipVisionAdapter", "HFCLIPAdapter", "HFDINOv3Adapter", "HFSiglip2Adapter",
           "HFAimv2Adapter", "HFInternVLVisionAdapter", "HFIdefics3VisionAdapter", "HFVLMAdapter",
           "HFLlavaAdapter", "HFLlavaOnevisionAdapter", "HFPaliGemmaAdapter", "HFGemma3Adapter",
           "HFIdefics3Adapter", "HFInternVLAdapter", "HFQwen25VLRefusal", "QWEN25_VL_REASON",
           "siglip2_inputs", "find_layers", "find_attention", "find_down_proj", "get_path", "ImageTokens",
           "token_positions", "flat_order", "patch_boxes", "boxes_in"]
