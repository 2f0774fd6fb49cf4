"""The generic adapter: any PyTorch ViT, with one call to :func:`ttreg.wrap`.

``ttreg.wrap(model, blocks="encoder.layers", mlp_down="mlp.fc2", attention="attn",
num_prefix_tokens=1, ...)`` names what role-finding (:mod:`ttreg.adapters.roles`) cannot find;
everything not given is found by what it does:

============================  ==========================================================  ====================
what                          found by role as                                            name it with
============================  ==========================================================  ====================
the blocks                    longest list of same-type modules with attention + MLP      ``blocks=``
a block's attention           ``*Attention*``/``*Attn*`` class, ``MultiheadAttention``,    ``attention=``
                              or the submodule with a fused ``Linear(d -> 3d)``
the neuron site               input of the ``Linear(widest -> width)`` outside attention   ``mlp_down=``
a block's first module        its first norm outside the attention                        ``entry=``
patch size                    first ``Conv2d`` with kernel == stride                      ``patch_size=``
prefix tokens (CLS, trained   counted: tokens block 0 receives minus patches (one probe    ``num_prefix_tokens=``
registers)                    forward at ``image_size``)
token axis                    probed the same way (batch-first or sequence-first)          ``token_dim=``
============================  ==========================================================  ====================

Names are dotted paths (``blocks`` relative to the model; ``attention``, ``mlp_down``,
``entry`` relative to one block); callables take the model (``blocks``) or a block. Also:
``run`` (a method name or ``fn(model, x)``; default ``model(x)``), ``pre_block`` (a module name
between the position embedding and the first block, e.g. CLIP's ``ln_pre``), ``image_size``,
``mean_std`` and ``block_io`` (a :class:`~ttreg.adapters.base.BlockIO`, e.g.
:class:`~ttreg.adapters.base.TokenInputsIO` for blocks that take rotary tables or masks).

What was given or found is stored on the model (``model._ttreg_wrap``, configuration only), so
afterwards every ttreg call -- ``find_register_neurons(model, ...)``, ``trace``,
``test_time_registers`` -- works on the plain model. Attention maps are read from the softmax
the attention module computes (:mod:`ttreg.attention`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence, Union

import torch
import torch.nn as nn

from . import roles
from .base import Adapter, BlockIO

#: attribute of a wrapped model holding its :class:`WrapSpec`
SPEC_ATTR = "_ttreg_wrap"
Name = Union[str, Callable, None]
KEYWORDS = ("blocks", "mlp_down", "attention", "entry", "num_prefix_tokens", "patch_size",
            "image_size", "pre_block", "run", "token_dim", "block_io", "mean_std")


class _Stop(Exception):
    """Raised by the probe once block 0 has shown its input."""


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _fail(model: nn.Module, what: str, how: str) -> TypeError:
    return TypeError(f"ttreg.wrap: cannot find {what} of {type(model).__name__}; {how}")


@dataclass(frozen=True)
class WrapSpec:
    """Where a custom ViT keeps its parts: names (or callables) and sizes. Configuration only."""

    blocks: Name
    mlp_down: Name
    attention: Name
    entry: Name = None
    num_prefix_tokens: int = 0
    patch_size: tuple[int, int] = (16, 16)
    image_size: tuple[int, int] = (224, 224)
    pre_block: str | None = None
    run: Name = None
    token_dim: int = 1
    block_io: BlockIO | None = None
    mean_std: tuple | None = None


def _get(root: nn.Module, name: Name, what: str) -> Any:
    if callable(name):
        return name(root)
    try:
        return root.get_submodule(name)
    except AttributeError:
        raise TypeError(f"ttreg.wrap: {type(root).__name__} has no submodule {name!r} ({what})") from None


class GenericAdapter(Adapter):
    """Any ViT, described by a :class:`WrapSpec` (see the module docstring)."""

    family = "custom"

    def __init__(self, model: nn.Module, spec: WrapSpec) -> None:
        super().__init__(model)
        self.spec = spec
        blocks = _get(model, spec.blocks, "blocks")
        self._blocks = list(blocks)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(getattr(model, SPEC_ATTR, None), WrapSpec)

    @property
    def token_dim(self) -> int:  # type: ignore[override]
        return self.spec.token_dim

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self._blocks

    @property
    def num_prefix_tokens(self) -> int:
        return self.spec.num_prefix_tokens

    @property
    def embed_dim(self) -> int:
        return int(self.down_proj(0).out_features)

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.spec.patch_size

    def down_proj(self, layer: int) -> nn.Module:
        return _get(self._blocks[layer], self.spec.mlp_down, "mlp_down")

    def attention(self, layer: int) -> nn.Module:
        return _get(self._blocks[layer], self.spec.attention, "attention")

    def entry_module(self, layer: int) -> nn.Module:
        if self.spec.entry is None:
            return super().entry_module(layer)
        return _get(self._blocks[layer], self.spec.entry, "entry")

    def pre_block_module(self) -> nn.Module | None:
        return None if self.spec.pre_block is None else _get(self.model, self.spec.pre_block, "pre_block")

    @property
    def block_io(self) -> BlockIO:
        return self.spec.block_io if self.spec.block_io is not None else BlockIO(self.token_dim)

    def run(self, x: torch.Tensor) -> Any:
        fn = self.spec.run
        if fn is None:
            return self.model(x)
        if isinstance(fn, str):
            return getattr(self.model, fn)(x)
        return fn(self.model, x)

    def image_size(self) -> tuple[int, int]:
        return self.spec.image_size

    def mean_std(self):
        return self.spec.mean_std or super().mean_std()


# --- resolving a spec ------------------------------------------------------------------------------
def _block_parts(block: nn.Module, attention: Name, mlp_down: Name) -> tuple[Any, Any]:
    """``(attention, down-projection)`` of one block, given or found; None where not found."""
    if attention is not None:
        try:
            attn = _get(block, attention, "attention")
        except TypeError:
            return None, None
    else:
        found = roles.find_attention_by_role(block)
        attn = found[1] if found else None
    if mlp_down is not None:
        try:
            return attn, _get(block, mlp_down, "mlp_down")
        except TypeError:
            return attn, None
    width = roles.residual_width(block, attn)
    return attn, (roles.down_projection(block, width, attn) if width else None)


def _image_size(model: nn.Module) -> tuple[int, int]:
    for mod in model.modules():
        for key in ("img_size", "image_size"):
            v = getattr(mod, key, None)
            if isinstance(v, int) or (isinstance(v, (tuple, list)) and len(v) == 2):
                return _pair(v)
    return (224, 224)


@torch.no_grad()
def _probe(model: nn.Module, spec: WrapSpec, first_block: nn.Module) -> tuple[int, int]:
    """``(tokens, token_dim)`` of block 0's input on a batch of two images at ``image_size``."""
    seen: dict[str, torch.Size] = {}

    def grab(mod, args, kwargs):
        x = args[0] if args else next((v for v in kwargs.values() if torch.is_tensor(v)), None)
        if x is not None:
            seen["shape"] = x.shape
        raise _Stop
    p = next(model.parameters())
    x = torch.zeros(2, 3, *spec.image_size, device=p.device, dtype=p.dtype)
    h = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        GenericAdapter(model, spec).run(x)
    except _Stop:
        pass
    except Exception as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise TypeError(f"ttreg.wrap: counting the prefix tokens of {type(model).__name__} failed on a "
                        f"(2, 3, {spec.image_size[0]}, {spec.image_size[1]}) batch ({msg}); pass "
                        "image_size= (and run= if model(x) is not how it runs), or "
                        "num_prefix_tokens= and token_dim=") from None
    finally:
        h.remove()
    shape = seen.get("shape")
    if shape is None or len(shape) != 3:
        raise _fail(model, "the token count", "block 0 never ran on a (B, C, H, W) image batch through "
                    "model(x); pass run='forward_features' (or fn(model, x)) and num_prefix_tokens=")
    token_dim = spec.token_dim if spec.token_dim is not None else (0 if shape[1] == 2 and shape[0] != 2 else 1)
    return int(shape[token_dim]), token_dim


def resolve(model: nn.Module, **given) -> WrapSpec:
    """A :class:`WrapSpec` for ``model`` from the given names, finding the rest by role."""
    unknown = set(given) - set(KEYWORDS)
    if unknown:
        raise TypeError(f"ttreg.wrap got unknown keyword(s) {sorted(unknown)}; it takes {', '.join(KEYWORDS)}")
    attention, mlp_down = given.get("attention"), given.get("mlp_down")
    blocks = given.get("blocks")
    if blocks is None:
        found = roles.find_blocks_by_role(
            model, lambda b: all(part is not None for part in _block_parts(b, attention, mlp_down)))
        if found is None:
            # the longest list of same-type modules: say what its blocks lack
            found = roles.find_blocks_by_role(model, lambda b: any(True for _ in b.children()))
            if found is None:
                raise _fail(model, "the transformer blocks",
                            "name them: ttreg.wrap(model, blocks='path.to.blocks') (a ModuleList or "
                            "Sequential of blocks, or fn(model) -> blocks)")
        blocks = found[0]
    first = list(_get(model, blocks, "blocks"))
    if not first:
        raise TypeError(f"ttreg.wrap: blocks={blocks!r} of {type(model).__name__} is empty")
    attn, down = _block_parts(first[0], attention, mlp_down)
    b0 = f"{type(first[0]).__name__} in {blocks if isinstance(blocks, str) else 'blocks'}"
    if attn is None:
        raise _fail(model, f"the attention of block 0 ({b0})",
                    "name it relative to a block: ttreg.wrap(model, attention='attn') (or fn(block))")
    if attention is None:
        attention = roles.find_attention_by_role(first[0])[0]
    if down is None:
        raise _fail(model, f"the MLP down-projection of block 0 ({b0})",
                    "name it relative to a block: ttreg.wrap(model, mlp_down='mlp.fc2') (or fn(block))")
    if mlp_down is None:
        mlp_down = next(n for n, m in first[0].named_modules() if m is down)
    patch = given.get("patch_size") or roles.find_patch_size(model)
    if patch is None:
        raise _fail(model, "the patch size", "no Conv2d with kernel == stride; pass patch_size=16")
    spec = WrapSpec(blocks=blocks, mlp_down=mlp_down, attention=attention, entry=given.get("entry"),
                    num_prefix_tokens=0, patch_size=_pair(patch),
                    image_size=_pair(given.get("image_size") or _image_size(model)),
                    pre_block=given.get("pre_block"), run=given.get("run"),
                    token_dim=given.get("token_dim"), block_io=given.get("block_io"),
                    mean_std=given.get("mean_std"))
    npre, token_dim = given.get("num_prefix_tokens"), spec.token_dim
    if npre is None or token_dim is None:
        tokens, token_dim = _probe(model, spec, first[0])
        grid = (spec.image_size[0] // spec.patch_size[0]) * (spec.image_size[1] // spec.patch_size[1])
        if npre is None:
            npre = tokens - grid
            if npre < 0:
                raise _fail(model, "the prefix tokens", f"block 0 sees {tokens} tokens but a "
                            f"{spec.image_size} image has {grid} patches of {spec.patch_size}; "
                            "pass patch_size=, image_size= or num_prefix_tokens=")
    return replace(spec, num_prefix_tokens=int(npre), token_dim=int(token_dim))


def wrap_custom(model: nn.Module, **given) -> GenericAdapter:
    """Resolve a :class:`WrapSpec`, store it on ``model`` and return its adapter."""
    spec = resolve(model, **given)
    setattr(model, SPEC_ATTR, spec)
    return GenericAdapter(model, spec)


__all__ = ["GenericAdapter", "WrapSpec", "resolve", "wrap_custom", "SPEC_ATTR", "KEYWORDS"]
