"""Adapters for Hugging Face ``transformers`` vision models.

Encoders: Dinov2, Dinov2WithRegisters, ViT, CLIPVision, CLIP (image side), SiglipVision, Siglip
(image side), DINOv3ViT (CLS + register tokens, RoPE), Siglip2Vision / Siglip2 (NaFlex:
pre-patchified pixels, padding masks), Aimv2Vision / Aimv2, InternVLVision. VLMs -- LLaVA,
LLaVA-OneVision, PaliGemma, Gemma 3, Idefics3, SmolVLM, InternVL -- through their vision tower
(:class:`HFVLMAdapter`). Qwen2.5-VL is refused with a reason (:class:`HFQwen25VLRefusal`).

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

import contextlib
import inspect
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from ..hooks import HookSet, OwnedHook
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


def _trim(obj: Any, tokens: int, keep: int) -> Any:
    """Cut hidden states ``(B, tokens, D)`` and attention maps ``(B, h, tokens, tokens)`` inside a
    model output back to ``keep`` tokens (nothing a user sees may carry the registers)."""
    if torch.is_tensor(obj):
        if obj.dim() == 3 and obj.shape[1] == tokens:
            return obj[:, :keep]
        if obj.dim() == 4 and obj.shape[-1] == obj.shape[-2] == tokens:
            return obj[..., :keep, :keep]
        return obj
    if isinstance(obj, dict):                       # ModelOutput is an OrderedDict
        for key in ("hidden_states", "attentions"):
            if obj.get(key) is not None:
                obj[key] = _trim(obj[key], tokens, keep)
        return obj
    if type(obj) in (tuple, list):
        return type(obj)(_trim(o, tokens, keep) for o in obj)
    return obj


def visible_tokens(output: Any) -> int | None:
    """Token count of the hidden states a user sees in a model output (``last_hidden_state``,
    else the shortest recorded hidden state), or None."""
    last = output.get("last_hidden_state") if isinstance(output, dict) else None
    if torch.is_tensor(last) and last.dim() == 3:
        return int(last.shape[1])
    states = output.get("hidden_states") if isinstance(output, dict) else None
    sizes = [int(h.shape[1]) for h in states or () if torch.is_tensor(h) and h.dim() == 3]
    return min(sizes) if sizes else None


class TrimRecordedOutputs(OwnedHook):
    """Forward hook: cut ``num`` test-time registers out of the ``hidden_states`` / ``attentions``
    a transformers model recorded inside its layers. The visible token count is read from the
    output itself, so the hook keeps no per-call state, and on a forward without registers no
    tensor has the extra tokens and nothing is cut."""

    def __init__(self, num: int) -> None:
        self.num = num

    def __call__(self, mod, args, output):
        keep = visible_tokens(output)
        return None if keep is None else _trim(output, keep + self.num, keep)


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

    def output_trims(self, num_registers: int) -> list[tuple[nn.Module, Any]]:
        """transformers records ``hidden_states`` and ``attentions`` from inside the layers, where
        the registers are present (5.x: ``hidden_states[0]`` is layer 0's input, and every
        attention map); cut them off in the outputs of the models that return those."""
        from transformers import PreTrainedModel
        return [(mod, TrimRecordedOutputs(num_registers)) for mod in self.vision.modules()
                if mod is self.vision or isinstance(mod, PreTrainedModel)]

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

    @contextlib.contextmanager
    def attention_probs(self, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Post-softmax attention through the eager path: every config involved is switched to
        ``"eager"`` (and, before transformers 5, to ``output_attentions``) until the context ends.
        The weights are read from whichever attention submodule returns them (the outer one in
        5.x, the inner self-attention in 4.5x)."""
        import transformers
        before_5 = int(transformers.__version__.split(".")[0]) < 5
        store: dict[int, torch.Tensor] = {}
        subs = {layer: [m for n, m in self._layers[layer].named_modules()
                        if n and "attention" in type(m).__name__.lower()] for layer in layers}
        # the vision config and the attention modules' own; never a composite model's top-level
        # config, whose setter would rewrite every sub-config on restore
        configs = {id(c): c for c in [self.config] + [getattr(m, "config", None)
                                                      for ms in subs.values() for m in ms] if c is not None}
        with HookSet() as hooks:
            for cfg in configs.values():
                if getattr(cfg, "_attn_implementation", None) != "eager":
                    hooks.set_attr(cfg, "_attn_implementation", "eager")
                if before_5:
                    hooks.set_attr(cfg, "output_attentions", True)
            for layer, mods in subs.items():
                def grab(mod, args, out, layer=layer):
                    w = out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else None
                    if torch.is_tensor(w) and w.dim() == 4 and layer not in store:
                        store[layer] = w.detach()

                def start(mod, args, layer=layer):
                    store.pop(layer, None)

                def check(mod, args, out, layer=layer):
                    if layer not in store:
                        raise RuntimeError(f"block {layer}: no attention module of "
                                           f"{type(mod).__name__} returned weights on the eager path")
                hooks.pre(self._layers[layer], start)
                for m in mods:
                    hooks.forward(m, grab)
                hooks.forward(self._layers[layer], check)
            yield store


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


class HFLlavaAdapter(HFVLMAdapter):
    """LLaVA-style VLMs (CLIP tower). The projector reads ``hidden_states[vision_feature_layer]``,
    which keeps its shape."""
    class_names = ("LlavaForConditionalGeneration", "LlavaModel")


class HFLlavaOnevisionAdapter(HFVLMAdapter):
    """LLaVA-OneVision (SigLIP tower, any-resolution tiles)."""
    class_names = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")


class HFPaliGemmaAdapter(HFVLMAdapter):
    """PaliGemma (SigLIP tower)."""
    class_names = ("PaliGemmaForConditionalGeneration", "PaliGemmaModel")


class HFGemma3Adapter(HFVLMAdapter):
    """Gemma 3 (SigLIP tower, pooled to ``mm_tokens_per_image``)."""
    class_names = ("Gemma3ForConditionalGeneration", "Gemma3Model")


class HFIdefics3Adapter(HFVLMAdapter):
    """Idefics3 and SmolVLM (SigLIP-style tower with patch masks, pixel-shuffle connector)."""
    class_names = ("Idefics3ForConditionalGeneration", "Idefics3Model",
                   "SmolVLMForConditionalGeneration", "SmolVLMModel")


class HFInternVLAdapter(HFVLMAdapter):
    """InternVL (InternViT tower, pixel-shuffle projector)."""
    class_names = ("InternVLForConditionalGeneration", "InternVLModel")


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
           "siglip2_inputs", "find_layers", "find_attention", "find_down_proj", "get_path"]
