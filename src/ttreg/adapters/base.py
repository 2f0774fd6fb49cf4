"""The adapter contract: where a model family keeps its blocks, neuron sites, tokens and attention.

An adapter says *where*; ``trace``, ``neurons`` and ``registers`` say *what*. Every adapter
exposes the same small surface, so the method never looks at a model's attribute names.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..calls import carried, entered, in_scope
from ..hooks import HookSet


#: keyword names under which attention modules take their input (first positional otherwise)
ATTENTION_INPUTS = ("hidden_states", "x", "q_x", "query")


class Adapter:
    """Base class. Subclasses fill in the structural methods for one model family.

    Token layout inside the blocks: ``[prefix tokens][patch tokens][test-time registers]``.
    ``num_prefix_tokens`` counts CLS and trained registers; test-time registers are appended
    after the patch tokens by :mod:`ttreg.registers`.
    """

    family: str = "base"
    #: index of the token axis of a block's hidden state (1 for batch-first, 0 for seq-first)
    token_dim: int = 1

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # --- recognising a model -------------------------------------------------------------
    @classmethod
    def matches(cls, model: nn.Module) -> bool:  # pragma: no cover - overridden
        return False

    # --- structure -----------------------------------------------------------------------
    @property
    def blocks(self) -> Sequence[nn.Module]:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def patch_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def down_proj(self, layer: int) -> nn.Module:
        """The MLP down-projection of block ``layer``; its *input* is the neuron site."""
        raise NotImplementedError

    def entry_module(self, layer: int) -> nn.Module:
        """The submodule of block ``layer`` that first reads the block's input (the pre-attention
        norm of a pre-norm block). Its hooks run inside the block's ``forward`` even where a
        library keeps block-level hooks outside gradient checkpointing (transformers 5)."""
        block = self.blocks[layer]
        attn = self.attention(layer)
        inside = {id(m) for m in attn.modules()}
        for mod in block.modules():
            if id(mod) not in inside and mod is not block and "norm" in type(mod).__name__.lower():
                return mod
        return attn

    def mlp_width(self, layer: int) -> int:
        mod = self.down_proj(layer)
        return int(getattr(mod, "in_features"))

    def attention(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def register_init(self, batch: int, num: int, like: torch.Tensor) -> torch.Tensor:
        """Initial value of ``num`` registers as the first block sees them, batch-first
        ``(batch, num, dim)`` (see :func:`initial_registers`)."""
        return initial_registers(self.pre_block_module(), batch, num, like)

    def pre_block_module(self) -> nn.Module | None:
        """Token-wise module between the position embedding and the first block, if any.

        Test-time registers are zeros added *after the position embedding*, so this module
        (CLIP's ``ln_pre``) is applied to them before they join the first block's input."""
        return None

    def output_trims(self) -> list[tuple[nn.Module, Any]]:
        """``(module, trim)`` for the modules whose outputs hold what a library recorded *inside*
        the blocks (Hugging Face's ``hidden_states[0]`` and ``attentions``): ``trim(output, R)``
        returns that output as the plain model gives it, with ``R`` test-time registers active.
        None by default."""
        return []

    @staticmethod
    def reentrant_checkpointing(block: nn.Module) -> bool:
        """Will the family's own gradient checkpointing re-run ``block`` re-entrantly (on detached
        inputs, outside its hooks) in this call? Checked before a block with registers runs, so
        that case is refused before the backward pass. False unless a family says so."""
        return False

    @staticmethod
    def records_attention(attention: nn.Module) -> bool:
        """Does ``attention`` compute its probabilities explicitly and return them to a library
        that records them (transformers' eager attention)? In calls with registers they then
        reach the values through their visible block, so the recorded map is on the graph.
        False unless a family says so."""
        return False

    # --- block input/output plumbing -------------------------------------------------------
    @property
    def block_io(self) -> "BlockIO":
        """How this family's blocks take and return the hidden state (see :class:`BlockIO`)."""
        return BlockIO(self.token_dim)

    def block_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return self.block_io.input(args, kwargs)

    def block_output(self, output: Any) -> torch.Tensor:
        return self.block_io.output(output)

    # --- running -----------------------------------------------------------------------------
    def run(self, x: torch.Tensor) -> Any:
        """Run the model through all its blocks (the cheapest call that does)."""
        return self.model(x)

    def image_size(self) -> tuple[int, int]:
        """The input size the model was built for (height, width)."""
        return (224, 224)

    def dynamic_size(self) -> bool:
        """Does ``run`` take other input sizes than :meth:`image_size`, resizing the position
        embedding with ops an ONNX graph keeps dynamic (so an export can leave height and width
        free)? False unless a family says so (timm's ``dynamic_img_size`` resizes with antialiased
        bicubic interpolation, which the ONNX exporter cannot write)."""
        return False

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel normalisation the model expects (ImageNet's unless the model says)."""
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

    def parameter(self) -> torch.Tensor:
        """Any parameter of the model: tells the device and dtype inputs should have."""
        return next(self.model.parameters())

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(rows, cols)`` for an image batch ``x`` of shape (B, C, H, W)."""
        ph, pw = self.patch_size
        return x.shape[-2] // ph, x.shape[-1] // pw


    # --- reading features (the evaluations) ----------------------------------------------------
    def takes_any_size(self) -> bool:
        """Does the model run on images of any size (a multiple of the patch size) within
        :meth:`any_size`? False unless a family says so."""
        return False

    @contextlib.contextmanager
    def any_size(self) -> Iterator[None]:
        """Within the context the model runs on any image size where :meth:`takes_any_size`
        (whatever a family switches for it is restored on exit, also on an exception); nothing
        to switch by default."""
        yield

    def final_norm(self) -> nn.Module:
        """The norm the model applies to its last block's output."""
        raise NotImplementedError(f"ttreg does not know the final norm of {type(self.model).__name__}")

    def output_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's tokens after the final norm, batch-first ``(B, T, D)``, test-time
        registers left out. By default the last block's output through :meth:`final_norm`."""
        return self.intermediates(x, [self.num_layers - 1], norm=True, split=False)[0]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer tokens after the final norm: ``(prefix (B, npre, D), patches (B, P, D))``."""
        return self.split_tokens(self.output_tokens(x), x)

    def split_tokens(self, tokens: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-first tokens ``(B, T, D)`` of images ``x`` -> ``(prefix, patches)`` (anything after
        the patches, e.g. test-time registers, left out)."""
        npre = self.num_prefix_tokens
        rows, cols = self.grid_size(x)
        if tokens.shape[1] < npre + rows * cols:
            raise RuntimeError(f"expected at least {npre + rows * cols} tokens, got {tokens.shape[1]}")
        return tokens[:, :npre], tokens[:, npre:npre + rows * cols]

    def intermediates(self, x: torch.Tensor, indices: int | Sequence[int] = 1, norm: bool = False,
                      split: bool = True, registers: bool = False) -> list:
        """The residual stream after blocks ``indices`` (an int ``n``: the last ``n`` blocks; or
        block indexes, negative allowed), in that order, as timm's
        ``forward_intermediates(indices, norm=norm)`` takes them; with ``norm`` the final norm
        applied to each (DINOv2's ``get_intermediate_layers(norm=True)``). Each entry is
        ``(prefix (B, npre, D), patches (B, P, D))``, or with ``split=False`` the batch-first
        ``(B, T, D)`` tokens; test-time registers are left out (with ``registers`` and
        ``split=False``, appended after the patches, as the blocks see them). One forward pass."""
        L = self.num_layers
        layers = list(range(L - int(indices), L)) if isinstance(indices, int) else [int(i) for i in indices]
        for l in layers:
            if not -L <= l < L:
                raise ValueError(f"block {l} does not exist: the model has {L} blocks")
        box: dict[int, torch.Tensor] = {}
        with HookSet() as hooks:
            for l in sorted({l % L for l in layers}):
                def grab(mod, args, out, l=l):
                    y = self.block_output(out)                  # registers split off
                    regs = carried(y) if registers else None
                    y = self.block_io.batch_first(y)
                    box[l] = y if regs is None else torch.cat([y, regs.to(y.dtype)], dim=1)
                hooks.forward(self.blocks[l], grab)
            self.run(x)
        ln = self.final_norm() if norm else None
        out = []
        for l in layers:
            y = box[l % L]
            y = ln(y) if ln is not None else y
            out.append(self.split_tokens(y, x) if split else y)
        return out

    def image_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A CLIP model's image embedding ``(B, E)`` and its patch tokens through the same final
        norm and projection ``(B, P, E)``, from one forward pass."""
        raise TypeError(f"{type(self.model).__name__} is not an open_clip model")

    def direct_tower(self):
        """A CLIP image tower as the direct-contribution heat map needs it (open_clip adapters:
        :class:`~ttreg.adapters.open_clip.DirectTower`); a one-line ``TypeError`` saying what is
        unsupported."""
        raise TypeError(f"{type(self.model).__name__} (open_clip CLIP models only)")

    def qkv_weights(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight (3 * A, D), bias (3 * A,) or None)``: block ``layer``'s query, key and value
        projections stacked in that order, applied to its attention's input. Found by role: an
        ``in_proj_weight`` (``nn.MultiheadAttention``, open_clip), a fused ``Linear(D -> 3A)``, or
        three linears named ``query``/``key``/``value``, ``q_proj``/``k_proj``/``v_proj`` or
        ``q``/``k``/``v``."""
        attn = self.attention(layer)
        if isinstance(getattr(attn, "in_proj_weight", None), torch.Tensor):
            return attn.in_proj_weight, getattr(attn, "in_proj_bias", None)
        linears = {n.split(".")[-1]: m for n, m in attn.named_modules() if isinstance(m, nn.Linear)}
        fused = linears.get("qkv") or next((m for m in linears.values()
                                             if m.out_features == 3 * m.in_features), None)
        if fused is not None:
            return fused.weight, fused.bias
        for names in (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v")):
            if all(n in linears for n in names):
                mods = [linears[n] for n in names]
                bias = None if all(m.bias is None for m in mods) else torch.cat(
                    [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods])
                return torch.cat([m.weight for m in mods]), bias
        raise TypeError(f"cannot find the query, key and value projections of block {layer} "
                        f"({type(attn).__name__})")

    @contextlib.contextmanager
    def record_qkv(self, layers: Sequence[int]) -> Iterator[dict[int, dict[str, torch.Tensor]]]:
        """Record ``{block: {"query", "key", "value": (B, T, A)}}`` of ``layers`` (keys: the block
        indexes, negative ones counted from the end) on each forward
        inside the block: the projections of every token the attention sees (prefix, patches,
        test-time registers, in the model's order), heads side by side, before any qk-norm or
        rotary embedding -- what LOST's hook on timm's ``qkv`` reads."""
        store: dict[int, dict[str, torch.Tensor]] = {}
        L = self.num_layers
        weights = {l % L: self.qkv_weights(l % L) for l in layers}
        with HookSet() as hooks:
            for l, (w, b) in weights.items():
                def grab(mod, args, kwargs, l=l, w=w, b=b):
                    h = args[0] if args else next(kwargs[k] for k in ATTENTION_INPUTS if k in kwargs)
                    h = self.block_io.batch_first(h)
                    q, k, v = F.linear(h, w, b).chunk(3, dim=-1)
                    store[l] = {"query": q, "key": k, "value": v}
                hooks.pre(self.attention(l), grab, with_kwargs=True)
            yield store

    # --- identity ------------------------------------------------------------------------------
    def architecture(self) -> dict[str, Any]:
        """Library-specific description; two models with equal descriptions share a layout."""
        return {
            "family": self.family,
            "class": type(self.model).__name__,
            "num_layers": self.num_layers,
            "embed_dim": self.embed_dim,
            "mlp_width": self.mlp_width(0),
            "num_prefix_tokens": self.num_prefix_tokens,
            "patch_size": list(self.patch_size),
        }

    def _float_weights(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, t) for name, t in sorted(self.fingerprint_module().state_dict().items())
                if torch.is_tensor(t) and t.is_floating_point()]

    def weights_hash(self) -> str:
        """A fast fingerprint of the weights: shape, sum, abs-sum and a strided sample of each.
        Exact: it changes when the model is cast to another dtype (see :meth:`weights_sample`)."""
        h = hashlib.sha256()
        for name, t in self._float_weights():
            flat = t.detach().reshape(-1).float()
            step = max(1, flat.numel() // 512)
            sample = flat[::step].cpu()
            stats = torch.stack([flat.sum(), flat.abs().sum()]).double().cpu()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(stats.numpy().round(4).tobytes())
            h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]

    def weights_sample(self, tensors: int = 16, per_tensor: int = 4) -> list[float]:
        """A few weight values at fixed places (``per_tensor`` spread over each of ``tensors``
        weight tensors spread over the model): the same weights in another dtype give the same
        numbers to within that dtype's rounding, other weights do not. The places are computed
        in float32 whatever ``torch.get_default_dtype()`` is; a NaN or infinite weight reads as 0
        or the largest float32, so the sample is standard JSON."""
        ws = self._float_weights()
        pick = [ws[round(i * (len(ws) - 1) / max(tensors - 1, 1))] for i in range(min(tensors, len(ws)))]
        big = torch.finfo(torch.float32).max
        out: list[float] = []
        for _, t in pick:
            flat = t.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, per_tensor, dtype=torch.float32).round().long().unique()
            values = flat[idx.to(flat.device)].float().cpu()
            out += torch.nan_to_num(values, nan=0.0, posinf=big, neginf=-big).tolist()
        return out

    def attention_heads(self, layer: int) -> tuple[int, int, int] | None:
        """``(heads, key size, value size)`` of ``layer``'s attention, as its kernel is given them
        (the shape an attention bias must have), read from the attention module or the first
        submodule that says (``num_heads`` or ``num_attention_heads``; ``head_dim`` or
        ``attention_head_size``, else the width over the heads); None where none says."""
        for mod in self.attention(layer).modules():
            heads = _int_attr(mod, "num_heads", "num_attention_heads")
            if not heads:
                continue
            size = _int_attr(mod, "head_dim", "attention_head_size")
            if not size:
                width = _int_attr(mod, "embed_dim", "all_head_size")
                if not width or width % heads:
                    return None
                size = width // heads
            return heads, size, size
        return None

    def fingerprint_module(self) -> nn.Module:
        """The module whose weights the fingerprint covers."""
        return self.model

    def describe(self) -> str:
        return (f"{self.family} {type(self.model).__name__} ({self.num_layers} blocks, "
                f"width {self.embed_dim}, MLP {self.mlp_width(0)})")

    def __repr__(self) -> str:
        """A short summary (the family, the model's class and its sizes), never the weights."""
        return f"{type(self).__name__}({self.describe()})"


class DelegatingAdapter(Adapter):
    """An adapter for a model that contains a supported one (a VLM's vision tower, an open_clip
    tower around a timm trunk): everything structural is ``inner``'s, so a neuron set found on
    the inner model applies to the outer one and back (same architecture, same fingerprint)."""

    inner: Adapter

    @property
    def token_dim(self) -> int:  # type: ignore[override]
        return self.inner.token_dim

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.inner.blocks

    @property
    def num_prefix_tokens(self) -> int:
        return self.inner.num_prefix_tokens

    @property
    def embed_dim(self) -> int:
        return self.inner.embed_dim

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.inner.patch_size

    def down_proj(self, layer: int) -> nn.Module:
        return self.inner.down_proj(layer)

    def attention(self, layer: int) -> nn.Module:
        return self.inner.attention(layer)

    def entry_module(self, layer: int) -> nn.Module:
        return self.inner.entry_module(layer)

    def pre_block_module(self) -> nn.Module | None:
        return self.inner.pre_block_module()

    def output_trims(self) -> list[tuple[nn.Module, Any]]:
        return self.inner.output_trims()

    @property
    def reentrant_checkpointing(self):  # type: ignore[override]
        return self.inner.reentrant_checkpointing

    @property
    def records_attention(self):  # type: ignore[override]
        return self.inner.records_attention

    @property
    def block_io(self) -> "BlockIO":
        return self.inner.block_io

    def run(self, x: torch.Tensor) -> Any:
        return self.inner.run(x)

    def image_size(self) -> tuple[int, int]:
        return self.inner.image_size()

    def mean_std(self):
        return self.inner.mean_std()

    def parameter(self) -> torch.Tensor:
        return self.inner.parameter()

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        return self.inner.grid_size(x)


    def takes_any_size(self) -> bool:
        return self.inner.takes_any_size()

    def any_size(self):
        return self.inner.any_size()

    def final_norm(self) -> nn.Module:
        return self.inner.final_norm()

    def output_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.output_tokens(x)

    def qkv_weights(self, layer: int):
        return self.inner.qkv_weights(layer)

    def architecture(self) -> dict[str, Any]:
        return self.inner.architecture()

    def fingerprint_module(self) -> nn.Module:
        return self.inner.fingerprint_module()


def _int_attr(mod: nn.Module, *names: str) -> int | None:
    """The first of ``names`` that ``mod`` holds as a whole number > 0 (not a bool)."""
    for name in names:
        v = getattr(mod, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def initial_registers(pre: nn.Module | None, batch: int, num: int, like: torch.Tensor) -> torch.Tensor:
    """``num`` test-time registers as the first block sees them: zeros added after the position
    embedding, through ``pre`` (the token-wise module before the first block, e.g. CLIP's
    ``ln_pre``) if there is one. Batch-first ``(batch, num, dim)``, ``like``'s dtype and device."""
    zeros = like.new_zeros(batch, num, like.shape[-1])
    return pre(zeros) if pre is not None and num else zeros


@dataclass(frozen=True)
class BlockIO:
    """How a family's blocks take and return the hidden state.

    Plain data (the token axis) and pure methods, with no reference to a model, so hooks that
    hold one survive ``copy.deepcopy`` and pickling of the model unchanged.
    """

    #: index of the token axis of a block's hidden state (1 for batch-first, 0 for seq-first)
    token_dim: int = 1
    #: ``(keyword, position)`` of a block's ``is_causal`` argument (position -1: keyword only)
    causal_arg: tuple[str, int] = ("is_causal", -1)

    _KEYS = ("hidden_states", "x", "q_x")

    def input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        if args:
            return args[0]
        for key in self._KEYS:
            if key in kwargs:
                return kwargs[key]
        raise RuntimeError("cannot find the hidden state among a block's inputs")

    def replace_input(self, args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
        if args:
            return (new, *args[1:]), kwargs
        for key in self._KEYS:
            if key in kwargs:
                return args, {**kwargs, key: new}
        raise RuntimeError("cannot find the hidden state among a block's inputs")

    def extend_inputs(self, args: tuple, kwargs: dict, num_registers: int) -> tuple[tuple, dict]:
        """Adjust a block's other per-token inputs (rotary tables, masks) for ``num_registers``
        appended tokens. Nothing to adjust by default."""
        return args, kwargs

    def causal(self, args: tuple, kwargs: dict) -> bool:
        """Is the block called with causal attention (``is_causal=True``)?"""
        key, pos = self.causal_arg
        v = kwargs.get(key, args[pos] if 0 <= pos < len(args) else False)
        return v is True

    def valid_tokens(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """``(B, T)`` bool: which of the block input's ``T`` tokens are real (not padding), or None
        when all are. Padding is read from the block's attention mask (see :class:`TokenInputsIO`)."""
        return None

    def output(self, output: Any) -> torch.Tensor:
        return output[0] if isinstance(output, (tuple, list)) else output

    def replace_output(self, output: Any, new: torch.Tensor) -> Any:
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        return new

    def batch_first(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.token_dim == 1 else t.transpose(0, 1)

    def packing(self, args: tuple, kwargs: dict, num_registers: int = 0) -> "Packing | None":
        """Where the images sit when a block's tokens are one packed sequence (:class:`PackedIO`);
        None for batch-first or sequence-first blocks."""
        return None

    def attention_map(self, p: torch.Tensor) -> torch.Tensor:
        """Attention maps ``(B, heads, T, T)`` as the kernel saw them, in the token order the
        traces use (as they are by default)."""
        return p


#: rotary-table layouts :class:`TokenInputsIO` can extend
ROTARY_LAYOUTS = ("sincos_cat", "cos_sin")


def extend_rotary(table: Any, num: int, layout: str = "sincos_cat") -> Any:
    """A rotary table for the patch tokens, extended by ``num`` rows that rotate by nothing.

    Libraries rotate only the tokens after the prefix (timm's ``eva.py`` skips
    ``num_prefix_tokens``; Hugging Face DINOv3 treats every token before the table's rows as
    prefix), so the appended registers sit after the patches, inside the rotated range. Their
    rows are the identity rotation (cos 1, sin 0): a register gets no position, exactly like a
    prefix token. Layouts: ``"sincos_cat"`` -- one tensor ``(..., N, 2d)`` holding ``[sin | cos]``
    (timm); ``"cos_sin"`` -- a ``(cos, sin)`` pair of ``(..., N, d)`` tensors (transformers).
    """
    if table is None or not num:
        return table
    if layout == "sincos_cat":
        d = table.shape[-1] // 2
        rows = torch.cat([table.new_zeros(*table.shape[:-2], num, d),
                          table.new_ones(*table.shape[:-2], num, table.shape[-1] - d)], dim=-1)
        return torch.cat([table, rows], dim=-2)
    if layout == "cos_sin":
        cos, sin = table
        ones = cos.new_ones(*cos.shape[:-2], num, cos.shape[-1])
        zeros = sin.new_zeros(*sin.shape[:-2], num, sin.shape[-1])
        return type(table)((torch.cat([cos, ones], dim=-2), torch.cat([sin, zeros], dim=-2)))
    raise ValueError(f"unknown rotary layout {layout!r}; one of {ROTARY_LAYOUTS}")


#: an additive mask entry at or below this hides the key (transformers and timm use the dtype's
#: minimum, SDPA users -inf, older code -1e4 or -1e9)
MASKED = -1e4


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Boolean "may attend" of a mask: bool masks as they are, additive masks where not hugely negative."""
    if mask.dtype == torch.bool:
        return mask
    return mask > MASKED if mask.is_floating_point() else mask != 0


def mask_keys(mask: torch.Tensor) -> torch.Tensor:
    """``(B, K)`` bool: the keys (tokens) an attention mask ``(B, [heads,] Q, K)`` lets any query
    see -- the real tokens; padding is hidden from every query."""
    allowed = _allowed(mask if mask.dim() > 2 else mask[None])
    return allowed.reshape(allowed.shape[0], -1, allowed.shape[-1]).any(dim=1)


def extend_mask(mask: torch.Tensor | None, num: int) -> torch.Tensor | None:
    """An attention mask ``(B, [heads,] Q, K)`` over ``K`` tokens extended to ``K + num``: the
    registers are masked in, padding stays out.

    A query that may attend to anything may attend to the registers (new columns); a register, as
    a query, attends to the real tokens and the registers (new rows, when the mask has one row per
    token; key-only masks with ``Q == 1`` broadcast). Fully masked rows (padding as queries in
    symmetric masks) stay fully masked. Bool and additive (0 / large negative) masks keep their
    dtype and values.
    """
    if mask is None or not num:
        return mask
    if mask.dim() == 2:                       # one (Q, K) mask for the whole batch
        return extend_mask(mask[None], num)[0]
    allowed = _allowed(mask)
    if mask.dtype == torch.bool:
        yes, no = torch.ones((), dtype=torch.bool), torch.zeros((), dtype=torch.bool)
    else:
        yes = torch.zeros((), dtype=mask.dtype)
        no = mask.amin() if bool((~allowed).any()) else torch.tensor(torch.finfo(mask.dtype).min, dtype=mask.dtype)
    yes, no = yes.to(mask.device), no.to(mask.device)
    rows_on = allowed.any(dim=-1, keepdim=True)                          # (B, h, Q, 1)
    cols = torch.where(rows_on, yes, no).expand(*mask.shape[:-1], num)
    out = torch.cat([mask, cols.to(mask.dtype)], dim=-1)                 # (B, h, Q, K + num)
    Q, K = mask.shape[-2], mask.shape[-1]
    if Q == K and Q > 1:
        keys = allowed.reshape(allowed.shape[0], -1, K).any(dim=1)       # (B, K)
        keys = torch.cat([keys, keys.new_ones(keys.shape[0], num)], dim=1)
        lead = mask.shape[1:-2]
        row = torch.where(keys, yes, no).to(mask.dtype)                  # (B, K + num)
        row = row.reshape(row.shape[0], *([1] * len(lead)), 1, K + num)
        out = torch.cat([out, row.expand(mask.shape[0], *lead, num, K + num)], dim=-2)
    return out


@dataclass(frozen=True)
class TokenInputsIO(BlockIO):
    """:class:`BlockIO` for blocks that take per-token inputs besides the hidden state.

    ``rotary``: keyword arguments that hold a rotary table over the patch tokens (``layout`` as
    :func:`extend_rotary`); each is extended with identity rows for the registers.
    ``masks``: ``(keyword, position)`` of attention masks (position: the mask's index among the
    positional arguments, or -1 if only passed by keyword); each is extended by
    :func:`extend_mask` and tells which tokens are padding (:meth:`valid_tokens`).
    """

    rotary: tuple[str, ...] = ()
    layout: str = "sincos_cat"
    masks: tuple[tuple[str, int], ...] = ()

    def _find_mask(self, args: tuple, kwargs: dict) -> tuple[str | int | None, Any]:
        for key, pos in self.masks:
            if kwargs.get(key) is not None:
                return key, kwargs[key]
            if 0 <= pos < len(args) and args[pos] is not None:
                return pos, args[pos]
        return None, None

    def extend_inputs(self, args: tuple, kwargs: dict, num_registers: int) -> tuple[tuple, dict]:
        if not num_registers:
            return args, kwargs
        kwargs = dict(kwargs)
        for key in self.rotary:
            if kwargs.get(key) is not None:
                kwargs[key] = extend_rotary(kwargs[key], num_registers, self.layout)
        where, mask = self._find_mask(args, kwargs)
        if isinstance(where, str):
            kwargs[where] = extend_mask(mask, num_registers)
        elif isinstance(where, int):
            args = (*args[:where], extend_mask(mask, num_registers), *args[where + 1:])
        return args, kwargs

    def valid_tokens(self, args: tuple, kwargs: dict) -> torch.Tensor | None:
        _, mask = self._find_mask(args, kwargs)
        if not torch.is_tensor(mask) or mask.dim() < 2:
            return None
        keys = mask_keys(mask)
        return None if bool(keys.all()) else keys


# --- packed sequences: several images in one (tokens, dim) sequence, told apart by cu_seqlens ------

class Packing:
    """Where each image sits in a packed sequence, and ``R`` test-time registers after each.

    Towers that pack the patches of every image into one ``(total, D)`` sequence and separate them
    with ``cu_seqlens`` (Qwen2-VL, Qwen3-VL: variable-length attention, one segment per image or
    video frame) give each segment its own registers, appended at the segment's end, so each image
    attends to its own. ``lengths``: the tokens of each segment without registers ``(N,)``.
    :meth:`batch` makes a packed tensor batch-first ``(N, n_max + R, ...)``: segment ``i``'s tokens
    first, zero padding, its ``R`` registers last (where the register edit expects them);
    :attr:`valid` says which places are real. Index tensors only: no loop over images.
    """

    def __init__(self, lengths: torch.Tensor, num_registers: int = 0) -> None:
        self.lengths = lengths.long()
        self.R = int(num_registers)
        N = len(self.lengths)
        self.n_max = int(self.lengths.max()) if N else 0
        start = torch.cumsum(self.lengths + self.R, 0) - (self.lengths + self.R)     # (N,)
        j = torch.arange(self.n_max + self.R, device=self.lengths.device)              # (W,)
        own = j[None] < self.lengths[:, None]                                          # (N, W)
        reg = j[None] >= self.n_max
        pos = torch.where(reg, self.lengths[:, None] + (j[None] - self.n_max), j[None])
        self.valid = own | reg                                                         # (N, W)
        self.index = torch.where(self.valid, start[:, None] + pos, torch.zeros_like(pos))
        self.total = int((self.lengths + self.R).sum())

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor, num_registers: int = 0) -> "Packing":
        cu = cu_seqlens.long()
        return cls(cu[1:] - cu[:-1], num_registers)

    @property
    def padded(self) -> bool:
        return bool((self.lengths != self.n_max).any())

    @functools.cached_property
    def plain(self) -> "Packing":
        """The same images without registers."""
        return self if not self.R else Packing(self.lengths)

    def batch(self, t: torch.Tensor) -> torch.Tensor:
        """Packed ``(total, ...)`` -> ``(N, n_max + R, ...)`` (padding: zeros)."""
        out = t[self.index.to(t.device)]
        keep = self.valid.to(t.device).reshape(*self.valid.shape, *([1] * (t.dim() - 1)))
        return torch.where(keep, out, torch.zeros((), dtype=t.dtype, device=t.device))

    def unbatch(self, tb: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`batch`: ``(N, n_max + R, ...)`` -> packed ``(total, ...)``."""
        return tb[self.valid.to(tb.device)]

    def append(self, t: torch.Tensor, registers: torch.Tensor) -> torch.Tensor:
        """Packed ``t`` without registers, ``registers`` ``(N, R, D)`` -> packed with them, each
        image's after its own tokens."""
        return self.unbatch(torch.cat([self.plain.batch(t), registers.to(t.dtype)], dim=1))

    def cut(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ``t`` with the registers -> ``(t without them, registers (N, R, D))``."""
        tb = self.batch(t)
        return self.plain.unbatch(tb[:, :self.n_max]), tb[:, self.n_max:]

    def spread(self, table: torch.Tensor, fill: float) -> torch.Tensor:
        """A per-token table ``(total, ...)`` over the plain tokens with ``R`` rows of ``fill`` added
        after each segment (rotary tables: identity rows)."""
        rows = table.new_full((len(self.lengths), self.R, *table.shape[1:]), fill)
        return self.append(table, rows) if self.R else table

    def cu_seqlens(self, like: torch.Tensor) -> torch.Tensor:
        cu = torch.cat([self.lengths.new_zeros(1), torch.cumsum(self.lengths + self.R, 0)])
        return cu.to(like.device, like.dtype)


@dataclass(frozen=True)
class PackedGrid:
    """An adapter's packed run of ``images`` equal images of ``tokens`` tokens each, and
    ``order`` ``(tokens,)``: the place in the tower's sequence of each patch in raster order
    (the tower may order patches otherwise, e.g. Qwen's 2x2 merge blocks)."""

    images: int
    tokens: int
    order: torch.Tensor


@contextlib.contextmanager
def packed_run(grid: PackedGrid) -> Iterator[None]:
    """Within this context, a packed tower's hidden states read batch-first by ``grid`` (an entry
    of :data:`ttreg.calls.SCOPE`, like the edits of ``with`` blocks)."""
    with entered(grid):
        yield


def packed_grid() -> PackedGrid | None:
    """The layout of the packed run going on now in this context (:func:`packed_run`), or None."""
    return next(in_scope(PackedGrid), None)


@dataclass(frozen=True)
class PackedIO(BlockIO):
    """:class:`BlockIO` for blocks over one packed sequence ``(total, D)`` of several images
    separated by ``cu_seqlens`` (variable-length attention), with a rotary ``(cos, sin)`` table of
    ``(total, d)`` rows. Each image segment gets its own registers (:class:`Packing`); the rotary
    table gets identity rows for them (cos 1, sin 0: a register has no rotary position), and
    ``cu_seqlens`` / ``max_seqlen`` grow by ``R`` per segment.

    Reading a hidden state batch-first (traces, the search, intermediates) needs the images'
    layout, which a block's output alone does not have: within an adapter's ``run`` it is
    :func:`packed_run` (equal images, patches put back in raster order); elsewhere the whole
    sequence reads as one image.
    """

    token_dim: int = 0
    segments: tuple[str, int] = ("cu_seqlens", 1)
    rotary: tuple[str, ...] = ("position_embeddings",)
    max_len: str = "max_seqlen"

    def packing(self, args: tuple, kwargs: dict, num_registers: int = 0) -> Packing | None:
        key, pos = self.segments
        cu = kwargs.get(key, args[pos] if 0 <= pos < len(args) else None)
        return Packing.of(cu, num_registers) if torch.is_tensor(cu) else None

    def extend_inputs(self, args: tuple, kwargs: dict, num_registers: int) -> tuple[tuple, dict]:
        if not num_registers:
            return args, kwargs
        pk = self.packing(args, kwargs, num_registers)
        kwargs = dict(kwargs)
        key, pos = self.segments
        if key in kwargs:
            kwargs[key] = pk.cu_seqlens(kwargs[key])
        else:
            args = (*args[:pos], pk.cu_seqlens(args[pos]), *args[pos + 1:])
        for name in self.rotary:
            table = kwargs.get(name)
            if table is not None:
                cos, sin = table
                kwargs[name] = type(table)((pk.spread(cos, 1.0), pk.spread(sin, 0.0)))
        m = kwargs.get(self.max_len)
        if m is not None:
            kwargs[self.max_len] = m + num_registers
        return args, kwargs

    def batch_first(self, t: torch.Tensor) -> torch.Tensor:
        grid = packed_grid()
        if grid is None or t.dim() != 2:
            return t[None] if t.dim() == 2 else t
        N, n = grid.images, grid.tokens
        R = t.shape[0] // N - n
        if R < 0 or t.shape[0] != N * (n + R):
            return t[None]
        tb = t.reshape(N, n + R, *t.shape[1:])
        order = grid.order.to(t.device)
        return torch.cat([tb[:, order], tb[:, n:]], dim=1) if R else tb[:, order]

    def attention_map(self, p: torch.Tensor) -> torch.Tensor:
        """Attention maps ``(N, heads, T, T)`` in the tower's token order -> in raster order."""
        grid = packed_grid()
        if grid is None:
            return p
        n = grid.tokens
        if p.shape[-1] < n:
            return p
        order = torch.cat([grid.order.to(p.device), torch.arange(n, p.shape[-1], device=p.device)])
        return p[..., order, :][..., order]
