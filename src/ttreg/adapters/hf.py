"""Adapters for Hugging Face ``transformers`` vision models: Dinov2, Dinov2WithRegisters, ViT,
CLIPVision, CLIP (image side), SiglipVision and the vision tower of LLaVA-style models.

Structure is found by role, not by attribute name, so the 4.5x and the 5.x module layouts both
work: the blocks are the ``ModuleList`` of ``num_hidden_layers`` identical layers; in a layer the
attention is the outermost ``*Attention*`` submodule, and the MLP down-projection is the
``nn.Linear`` outside it that maps the widest input back to ``hidden_size`` (``fc2``,
``mlp.fc2``, ``output.dense``, ``down_proj``). Transformers is never imported to recognise a
model; classes are matched by name along the model's MRO.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from ..hooks import HookSet, OwnedHook
from .base import Adapter

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
#: normalisation the matching HF image processors use, by vision ``model_type``
MEAN_STD = {"dinov2": IMAGENET, "dinov2_with_registers": IMAGENET, "vit": HALF,
            "clip_vision_model": OPENAI_CLIP, "siglip_vision_model": HALF}


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
    attn, _ = find_attention(layer)
    best = None
    for name, mod in layer.named_modules():
        if name == attn or name.startswith(attn + ".") or not isinstance(mod, nn.Linear):
            continue
        if mod.out_features == hidden and (best is None or mod.in_features >= best.in_features):
            best = mod
    if best is None:
        raise TypeError(f"cannot find the MLP down-projection of {type(layer).__name__}")
    return best


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


class HFLlavaAdapter(HFVisionAdapter):
    """LLaVA-style VLMs: the vision tower (``model.vision_tower`` in transformers 5,
    ``vision_tower`` before). The projector reads ``hidden_states[vision_feature_layer]``,
    which keeps its shape."""
    class_names = ("LlavaForConditionalGeneration", "LlavaModel")

    def vision_module(self, model: nn.Module) -> nn.Module:
        tower = get_path(model, "model.vision_tower", "vision_tower")
        if not isinstance(tower, nn.Module):
            raise TypeError(f"{type(model).__name__} has no single vision tower")
        return tower


#: tried in order by :func:`ttreg.wrap`; most specific first
HF_ADAPTERS: list[type[Adapter]] = [HFLlavaAdapter, HFCLIPAdapter, HFDinov2Adapter, HFViTAdapter,
                                    HFCLIPVisionAdapter, HFSiglipVisionAdapter]

__all__ = ["HF_ADAPTERS", "HFVisionAdapter", "HFDinov2Adapter", "HFViTAdapter", "HFCLIPVisionAdapter",
           "HFSiglipVisionAdapter", "HFCLIPAdapter", "HFLlavaAdapter", "find_layers", "find_attention",
           "find_down_proj", "get_path"]
