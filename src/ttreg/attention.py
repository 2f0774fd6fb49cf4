"""Reaching inside one attention call: the query, key and value a block hands to the attention
kernel, for every model family at once.

The attention-bias form of test-time registers appends a fitted key and value per head to every
attention of a block (:mod:`ttreg.registers`); fitting it reads the register's key and value
there (:mod:`ttreg.bias`); ``trace`` reads attention maps there. Families compute q/k/v in many
ways (one fused projection or three, qk-norm, rotary embeddings, seq- or batch-first), but they
hand them to one of two functions, so ttreg intercepts those instead of re-implementing any
family's attention:

* ``F.scaled_dot_product_attention(q, k, v, ...)`` -- timm (fused path), transformers
  (``attn_implementation="sdpa"``), open_clip's own ``Attention``: the mode sees the exact
  post-norm, post-rotary ``(B, heads, T, head_dim)`` tensors and appends to ``k``/``v`` (the
  fused kernel still runs);
* ``F.multi_head_attention_forward`` -- ``nn.MultiheadAttention`` (open_clip's default blocks):
  its own ``bias_k``/``bias_v`` arguments are that very extra key and value, on its fused and its
  explicit (``need_weights=True``) path alike.

How: a pre-hook on the attention module pushes an :class:`AttentionCall`, a
``torch.overrides.TorchFunctionMode``, and a forward hook registered with ``always_call=True``
(:class:`ExitCall`) pops it, also when the forward raises. Torch-function modes live on a
*thread-local* stack, and the mode object is created for one call and holds only that call's
data, so two threads never see each other's calls. ``torch.compile`` traces the mode into the
graph without a break, and the ONNX exporter records the concatenation like any other op.

An attention that calls neither function (an explicit softmax path: timm's ``fused_attn=False``,
transformers' ``"eager"`` attention, open_clip's scaled-cosine attention) cannot take the extra
key: the call raises instead of silently leaving it out. Its attention *maps* are still read: the
first ``softmax`` over a square ``(B, heads, T, T)`` inside the module is its probabilities. So
one interception gives ``trace`` the attention maps of every family, without switching any
model to another attention path.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import sys
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from .calls import RegisterCall, entered, in_scope, tag
from .hooks import OwnedHook

_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_MHA_SIG = inspect.signature(F.multi_head_attention_forward)

#: the softmax calls that, inside an attention module, make its attention probabilities
_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)
#: the product of those probabilities with the values
_MATMUL = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)


class Wanted:
    """A :data:`ttreg.calls.SCOPE` entry: the attention maps this context wants (``trace``),
    ``{id(attention module): sink}``."""

    def __init__(self, sinks: dict) -> None:
        self.sinks = sinks

#: ``(key (heads, d), value (heads, dv), log_weight or None)`` appended to one call's keys/values
Extra = tuple


class AttentionCall(TorchFunctionMode):
    """One forward call of one attention module (``owner``), seen from inside.

    ``extra``: ``(key, value, log_weight)`` appended as one more key/value per head (the
    attention-bias form; ``log_weight`` None for weight 1, else added to that key's logit).
    ``probs``: called with the post-softmax attention ``(B, heads, T, keys)``, extra key included.
    ``kv``: ``(num, sink)``: ``sink(key, value)`` gets the last ``num`` keys and values
    ``(B, heads, num, d)`` as the kernel receives them (the test-time registers' own).
    ``registers``: ``(edit, R)`` of a call with R appended registers in an attention that computes
    its probabilities explicitly and returns them (transformers' eager attention): the probabilities
    reach the values through their visible ``(T, T)`` block, which they carry
    (:attr:`RegisterCall.visible`), so the map a library records and trims is on the graph.
    """

    def __init__(self, owner, extra: Extra | None = None, probs: Callable | None = None,
                 kv: tuple[int, Callable] | None = None, registers: tuple | None = None) -> None:
        super().__init__()
        self.owner, self.extra, self.probs, self.kv, self.registers = owner, extra, probs, kv, registers
        self.seen = 0           # kernel calls (SDPA / MHA) seen
        self.mapped = False     # an explicit softmax gave the maps
        self.square = None      # their shape, until they meet the values
        self.maps: list = []    # the maps of each kernel call, until the forward ends

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.seen += 1
            return self._sdpa(func, args, kwargs)
        if func is F.multi_head_attention_forward:
            self.seen += 1
            return self._mha(func, args, kwargs)
        if func in _MATMUL and self.square is not None and args and torch.is_tensor(args[0]) \
                and tuple(args[0].shape) == self.square:
            self.square = None
            args = (self._through_visible(args[0]), *args[1:])
        out = func(*args, **kwargs)
        if (self.probs is not None or self.registers is not None) and func in _SOFTMAX \
                and not (self.seen or self.mapped) and _square(out):
            self.mapped = True      # an explicit-softmax attention: its probabilities as they are
            if self.probs is not None:
                self.probs(out.detach())
            if self.registers is not None:
                self.square = tuple(out.shape)
        return out

    def _through_visible(self, p: torch.Tensor) -> torch.Tensor:
        """The probabilities ``p`` ``(B, heads, T + R, T + R)`` (bitwise), rebuilt from their
        visible block, which ``p`` now carries."""
        edit, R = self.registers
        n = p.shape[-1] - R
        visible = p[..., :n, :n]
        tag(p, RegisterCall(edit, visible=visible))
        return torch.cat([torch.cat([visible, p[..., :n, n:]], dim=-1), p[..., n:, :]], dim=-2)

    def _sdpa(self, func, args, kwargs):
        a = dict(zip(_SDPA_ARGS, args))
        a.update(kwargs)
        q, k, v = a.pop("query"), a.pop("key"), a.pop("value")
        if self.kv is not None:
            num, sink = self.kv
            sink(k[..., k.shape[-2] - num:, :], v[..., v.shape[-2] - num:, :])
        if self.extra is not None:
            if a.get("is_causal"):
                raise RuntimeError("the attention-bias form is for bidirectional (ViT) attention; "
                                   "this call is causal")
            k, v, a["attn_mask"] = append_kv(k, v, a.get("attn_mask"), *self.extra)
        if self.probs is not None:
            self._deliver(attention_probs(q, k, a.get("attn_mask"), a.get("scale"), a.get("enable_gqa", False),
                                          bool(a.get("is_causal", False))))
        return func(q, k, v, **a)

    def _deliver(self, p: torch.Tensor) -> None:
        """Keep the maps of one kernel call; :meth:`finish` hands them on."""
        self.maps.append(p)

    def finish(self) -> None:
        """The module's forward ended: hand its kernel calls' maps on, once. A module that calls
        the kernel once per image of a packed sequence (Qwen-VL towers: one call per
        ``cu_seqlens`` segment) gives them stacked on the batch axis (zero-padded to the longest
        segment)."""
        if not self.maps:
            return
        if len(self.maps) == 1:
            self.probs(self.maps[0])
        else:
            T = max(m.shape[-1] for m in self.maps)
            self.probs(torch.cat([F.pad(m, (0, T - m.shape[-1], 0, T - m.shape[-2])) for m in self.maps]))
        self.maps = []

    def _mha(self, func, args, kwargs):
        bound = _MHA_SIG.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if self.kv is not None:
            num, sink = self.kv
            sink(*_mha_last_kv(a, num))
        if self.extra is not None:
            key, value, log_weight = self.extra
            if a["bias_k"] is not None or a["add_zero_attn"]:
                raise RuntimeError("this nn.MultiheadAttention already has add_bias_kv / add_zero_attn; "
                                   "the attention-bias form cannot add its key")
            if log_weight is not None:
                raise RuntimeError("nn.MultiheadAttention takes one extra key of weight 1 (bias_k); "
                                   "fit the bias with num_registers=1")
            q = a["query"]
            a["bias_k"] = _check(key, a["num_heads"], a["embed_dim_to_check"], "key").reshape(1, 1, -1).to(q.device, q.dtype)
            a["bias_v"] = value.reshape(1, 1, -1).to(q.device, q.dtype)
        if self.probs is None:
            return func(**a)
        need, average = a["need_weights"], a["average_attn_weights"]
        a["need_weights"], a["average_attn_weights"] = True, False
        out, weights = func(**a)
        self.probs(weights.detach())
        return out, (weights.mean(dim=1) if average else weights) if need else None


def _square(t) -> bool:
    """Is ``t`` attention probabilities, ``(B, heads, T, T)``?"""
    return torch.is_tensor(t) and t.dim() == 4 and t.shape[-1] == t.shape[-2]


def _check(key: torch.Tensor, heads: int, dim: int, what: str) -> torch.Tensor:
    if key.dim() != 2 or key.shape[0] * key.shape[1] != dim or key.shape[0] != heads:
        raise RuntimeError(f"the attention bias has {tuple(key.shape)} ({what}: heads x head size); "
                           f"this attention has {heads} heads of {dim // max(heads, 1)}: it was "
                           "fitted on another model")
    return key


def append_kv(k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, key: torch.Tensor,
              value: torch.Tensor, log_weight: float | None):
    """``k``, ``v`` ``(..., heads, S, d)`` with one more key/value per head, and the attention mask
    extended by one column (``log_weight`` there, or nothing when there is no mask and no weight)."""
    if key.shape != (k.shape[-3], k.shape[-1]) or value.shape != (v.shape[-3], v.shape[-1]):
        raise RuntimeError(f"the attention bias has {key.shape[0]} heads of size {key.shape[1]}; this "
                           f"attention has {k.shape[-3]} of {k.shape[-1]}: it was fitted on another model")
    lead = k.shape[:-3]
    key, value = key.to(k.device, k.dtype), value.to(v.device, v.dtype)
    k = torch.cat([k, key.unsqueeze(-2).expand(*lead, -1, 1, -1)], dim=-2)
    v = torch.cat([v, value.unsqueeze(-2).expand(*lead, -1, 1, -1)], dim=-2)
    if mask is None and log_weight is None:
        return k, v, None
    S = k.shape[-2] - 1
    if mask is None:
        mask = torch.zeros(1, S, dtype=k.dtype, device=k.device)
    elif mask.shape[-1] == 1:
        mask = mask.expand(*mask.shape[:-1], S)
    if mask.dtype == torch.bool and log_weight is None:
        col = torch.ones(*mask.shape[:-1], 1, dtype=torch.bool, device=mask.device)
    else:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=k.dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        col = torch.full((*mask.shape[:-1], 1), log_weight or 0.0, dtype=mask.dtype, device=mask.device)
    return k, v, torch.cat([mask, col], dim=-1)


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None,
                    scale: float | None = None, enable_gqa: bool = False,
                    is_causal: bool = False) -> torch.Tensor:
    """Post-softmax probabilities of ``scaled_dot_product_attention(q, k, ., mask, scale)``:
    ``(..., heads, Tq, Tk)``, float32, detached."""
    q, k = q.detach().float(), k.detach().float()
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    logits = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        L, S = logits.shape[-2], logits.shape[-1]
        logits = logits.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if mask is not None:
        mask = mask.detach()
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    return logits.softmax(dim=-1)


def _mha_last_kv(a: dict, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and value projections of the last ``num`` tokens of an
    ``F.multi_head_attention_forward`` call (inputs are sequence-first there), ``(B, heads, num, d)``."""
    E, H = a["embed_dim_to_check"], a["num_heads"]
    bias = a["in_proj_bias"]
    out = []
    for i, (inp, sep) in enumerate(((a["key"], "k_proj_weight"), (a["value"], "v_proj_weight")), 1):
        w = a[sep] if a["use_separate_proj_weight"] else a["in_proj_weight"][i * E:(i + 1) * E]
        b = None if bias is None else bias[i * E:(i + 1) * E]
        x = inp[inp.shape[0] - num:] if inp.dim() == 3 else inp[inp.shape[0] - num:].unsqueeze(1)
        y = F.linear(x, w, b)                                           # (num, B, E)
        out.append(y.reshape(num, y.shape[1], H, -1).permute(1, 2, 0, 3))
    return out[0], out[1]


# --- hooks --------------------------------------------------------------------------------------

def enter(call: AttentionCall) -> None:
    """Push ``call`` for the rest of its owner's forward (a pre-hook calls this)."""
    call.__enter__()


class ExitCall(OwnedHook):
    """Forward hook, registered with ``always_call=True``: pop the :class:`AttentionCall` the
    module's pre-hook pushed (nothing if none), and refuse a call that was to get the extra key
    but never reached an attention kernel ttreg can reach into. ``sites``: the installation that
    owns the hook, if any."""

    def __init__(self, sites=None) -> None:
        self.sites = sites

    def __call__(self, mod, args, output):
        stack = _get_current_function_mode_stack()
        if not stack or not isinstance(stack[-1], AttentionCall) or stack[-1].owner is not mod:
            return None
        call = stack[-1]
        call.__exit__(None, None, None)
        call.finish()
        if call.extra is not None and not call.seen and (
                torch.compiler.is_compiling() or sys.exc_info()[0] is None):
            raise RuntimeError(
                f"{type(mod).__name__} computed attention without scaled_dot_product_attention or "
                "nn.MultiheadAttention, so the attention-bias form cannot add its key: use the fused "
                "path (timm: fused_attn=True; transformers: attn_implementation='sdpa'; open_clip: "
                "no scaled-cosine attention), or the token form")
        return None


def tap(hooks, module, *, probs: Callable | None = None, kv: tuple[int, Callable] | None = None) -> None:
    """For as long as ``hooks`` (a :class:`~ttreg.hooks.HookSet`) lasts, every call of ``module``
    hands its attention maps to ``probs`` / its last keys and values to ``kv`` (see
    :class:`AttentionCall`)."""
    hooks.pre(module, lambda mod, args: enter(AttentionCall(mod, probs=probs, kv=kv)))
    hooks.forward(module, ExitCall(), always_call=True)


class InterceptHook(OwnedHook):
    """Base of pre-hooks that push an :class:`AttentionCall` on every call of their module
    (:func:`intercepted` finds them; ``trace`` then reads attention maps from the call)."""


def intercepted(module) -> bool:
    """Does ``module`` carry an :class:`InterceptHook` (the attention-bias form is installed)?"""
    return any(isinstance(h, InterceptHook) for h in module._forward_pre_hooks.values())


def wanted(module) -> Callable | None:
    """The sink this context wants ``module``'s attention maps in, if any."""
    for w in in_scope(Wanted):
        sink = w.sinks.get(id(module))
        if sink is not None:
            return sink
    return None


@contextlib.contextmanager
def recording(sinks: dict) -> Iterator[None]:
    """Within this context (this thread), intercepted attention modules (``{module: sink}``) hand
    their post-softmax attention to ``sink``."""
    with entered(Wanted({id(m): s for m, s in sinks.items()})):
        yield


__all__ = ["AttentionCall", "ExitCall", "InterceptHook", "append_kv", "attention_probs", "enter",
           "intercepted", "recording", "tap", "wanted"]
