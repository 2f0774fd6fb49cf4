"""The adapter contract: where a model family keeps its blocks, neuron sites, tokens and attention.

An adapter says *where*; ``trace``, ``neurons`` and ``registers`` say *what*. Every adapter
exposes the same small surface, so the method never looks at a model's attribute names.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn


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

    def output_trims(self, num_registers: int) -> list[tuple[nn.Module, Any]]:
        """``(module, hook)`` forward hooks a family needs while ``num_registers`` test-time
        registers are installed, e.g. to cut them from outputs a library records from *inside*
        the blocks (Hugging Face's ``hidden_states[0]`` and ``attentions``). Hooks hold no
        per-call state. None by default."""
        return []

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

    @contextlib.contextmanager
    def attention_probs(self, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
        """Record post-softmax attention probabilities ``(B, heads, T, T)`` of ``layers``.

        The adapter switches those layers to their explicit (non-fused) path for the duration
        and restores it afterwards. The dict is filled on each forward.
        """
        raise NotImplementedError
        yield {}

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
        numbers to within that dtype's rounding, other weights do not."""
        ws = self._float_weights()
        pick = [ws[round(i * (len(ws) - 1) / max(tensors - 1, 1))] for i in range(min(tensors, len(ws)))]
        out: list[float] = []
        for _, t in pick:
            flat = t.detach().reshape(-1)
            idx = torch.linspace(0, flat.numel() - 1, per_tensor).round().long().unique()
            out += flat[idx.to(flat.device)].float().cpu().tolist()
        return out

    def fingerprint_module(self) -> nn.Module:
        """The module whose weights the fingerprint covers."""
        return self.model

    def describe(self) -> str:
        return (f"{self.family} {type(self.model).__name__} ({self.num_layers} blocks, "
                f"width {self.embed_dim}, MLP {self.mlp_width(0)})")


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
