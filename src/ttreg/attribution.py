"""Text-to-image attribution through a vision-language model's language model.

The paper's VLM result (LLaVA-Llama-3-8B with test-time registers in its CLIP tower) is that the
language model's attention from the answer to the image becomes a cleaner map: without
registers part of it lands on the tower's high-norm outlier patches, which carry no local
content. :func:`attribution` measures it:

1. the prompt (with the image placeholder, through the processor's chat template when it has
   one) and the answer -- given, or the model's own greedy answer -- make one sequence per image;
2. one forward of the whole model on it, with the language model's post-softmax attention read
   where it is computed (any attention implementation that runs a softmax or
   ``scaled_dot_product_attention``; :mod:`ttreg.attention`);
3. for each answer token, the attention of the position that *predicts* it (the last prompt
   token for the first answer token, as ``generate`` computes it) to every image token, averaged
   over the chosen heads, kept per language-model layer;
4. each image token placed on the image through the family's adapter
   (:meth:`ttreg.adapters.hf.HFVLMAdapter.image_tokens`: which tower patches it carries, where
   its view -- image, tile, crop -- lies on the image) and spread over a patch grid of the image
   by area.

The same call inside ``ttreg.test_time_registers(model, neurons)`` gives the registered maps:
the registers live in the tower and are cut from its outputs, so the sequence the language
model reads has the same tokens. The tower's outlier patches (the detection layer's norms in
the same forward) are reported so that the share of attribution mass on them can be compared,
plain vs registers (:meth:`Attribution.mass_on`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .adapters import wrap
from . import attention as _attention
from .hooks import HookSet
from .outliers import outlier_mask
from .registers import active_registers


@dataclass
class Attribution:
    """Attention from the answer tokens to the image tokens, per answer token and layer.

    ``weights`` ``(B, A, L, N)``: for row ``b``, answer token ``a``, layer ``layers[l]``, the
    attention (mean of the chosen heads) of the position predicting answer token ``a`` to image
    token ``n``; 0 where ``answer_mask`` or ``tokens.valid`` is False. Maps put that mass on
    a ``grid`` over the image (by default the tower's patch grid of one view); a cell holds the
    mass of the tokens whose footprint covers it, split by area, so a map sums to the mass on
    the image tokens that have a place on the image."""

    weights: torch.Tensor
    answer_mask: torch.Tensor
    answer_ids: list[list[int]]
    answers: list[str]
    tokens: Any                                   # ttreg.adapters.hf.ImageTokens
    layers: list[int]
    heads: str | list[int]
    tower_layer: int
    tower_norms: torch.Tensor                     # (views, patches) at tower_layer
    outlier_patches: torch.Tensor                 # (views, patches) bool
    grid: tuple[int, int] = (0, 0)
    registers: bool = False
    sequence_length: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.grid == (0, 0):
            self.grid = tuple(self.tokens.grid)

    # --- token level -------------------------------------------------------------------------
    @property
    def outlier_tokens(self) -> torch.Tensor:
        """``(B, N)`` bool: image tokens carrying at least one of this run's outlier patches."""
        src = self.tokens.sources
        flat = self.outlier_patches.reshape(-1)
        hit = flat[src.clamp_min(0)] & (src >= 0)
        return hit.any(-1) & self.tokens.valid

    def token_weights(self, per_layer: bool = False) -> torch.Tensor:
        """``(B, N)`` mean over the answer tokens and layers (``per_layer``: ``(B, L, N)``)."""
        m = self.answer_mask.to(self.weights.dtype)[:, :, None, None]
        w = (self.weights * m).sum(1) / m.sum(1).clamp_min(1)
        return w if per_layer else w.mean(1)

    def image_mass(self) -> torch.Tensor:
        """``(B,)``: the share of the answer's attention that goes to image tokens (mean over
        answer tokens and layers)."""
        return self.token_weights().sum(-1)

    def mass_on(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B,)``: the share of the attention to the image that lands on ``tokens`` (a ``(B, N)``
        bool mask, e.g. :attr:`outlier_tokens` of the plain run)."""
        w = self.token_weights()
        return (w * tokens.to(w.device)).sum(-1) / w.sum(-1).clamp_min(1e-30)

    @property
    def outlier_share(self) -> torch.Tensor:
        """``(B,)``: :meth:`mass_on` this run's own outlier tokens."""
        return self.mass_on(self.outlier_tokens)

    # --- maps on the image -------------------------------------------------------------------
    def spread(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, N, rows * cols)``: the share of each image token's footprint in each cell."""
        return spread(self.tokens.boxes, grid or self.grid)

    def maps(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, A, L, rows, cols)``: per answer token and layer."""
        g = grid or self.grid
        S = self.spread(g).to(self.weights.dtype)
        return torch.einsum("baln,bng->balg", self.weights, S).reshape(*self.weights.shape[:3], *g)

    def layer_maps(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, L, rows, cols)``: per layer, mean over the answer tokens."""
        g = grid or self.grid
        S = self.spread(g).to(self.weights.dtype)
        w = self.token_weights(per_layer=True)
        return torch.einsum("bln,bng->blg", w, S).reshape(w.shape[0], w.shape[1], *g)

    def map(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """``(B, rows, cols)``: mean over the answer tokens and the layers."""
        return self.layer_maps(grid).mean(1)

    def summary(self, i: int, reference: "Attribution | None" = None) -> dict[str, Any]:
        """Numbers of row ``i`` for a JSON report; ``reference`` (the plain run) names the outlier
        tokens the share is measured on (default: this run's own)."""
        out = (reference or self).outlier_tokens
        return {"answer": self.answers[i], "answer_tokens": int(self.answer_mask[i].sum()),
                "layers": list(self.layers), "heads": self.heads,
                "image_mass": float(self.image_mass()[i]),
                "outlier_tokens": int(out[i].sum()),
                "outlier_share": float(self.mass_on(out)[i]),
                "uniform_share": float(out[i].sum() / self.tokens.valid[i].sum().clamp_min(1)),
                "map": self.map()[i].tolist()}


def spread(boxes: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(..., N, rows * cols)``: the share of each box ``(..., N, 4)`` (``x0, y0, x1, y1`` in
    [0, 1]) that falls in each cell of a ``rows x cols`` grid; 0 for NaN boxes."""
    rows, cols = grid
    b = boxes.double()
    ok = ~torch.isnan(b).any(-1)
    b = torch.nan_to_num(b, nan=0.0)
    cx = torch.arange(cols + 1, dtype=torch.float64, device=b.device) / cols
    cy = torch.arange(rows + 1, dtype=torch.float64, device=b.device) / rows
    ox = (torch.minimum(b[..., 2:3], cx[1:]) - torch.maximum(b[..., 0:1], cx[:-1])).clamp_min(0)
    oy = (torch.minimum(b[..., 3:4], cy[1:]) - torch.maximum(b[..., 1:2], cy[:-1])).clamp_min(0)
    area = ((b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])).clamp_min(1e-30)
    share = oy[..., :, None] * ox[..., None, :] / area[..., None, None]
    return (share.flatten(-2) * ok[..., None]).float()


# --- inputs ----------------------------------------------------------------------------------------
def prompt_text(processor, prompt: str, chat: bool | None = None, separator: str = "\n") -> str:
    """The text for one image and ``prompt``: the processor's chat template (a user turn with the
    image, then the prompt, and the generation prompt) when it has one and ``chat`` is not False;
    else the processor's image placeholder, ``separator`` (the family's
    :attr:`~ttreg.adapters.hf.HFVLMAdapter.prompt_separator`) and the prompt. A prompt that
    already holds the placeholder is used as it is."""
    token = getattr(processor, "image_token", None) or "<image>"
    if token in prompt:
        return prompt
    if chat is not False and getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if chat:
        raise ValueError("chat=True: this processor has no chat template")
    return f"{token}{separator}{prompt}"


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _per_row(value, n: int, what: str) -> list:
    if value is None or isinstance(value, str):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"{what}: give one string, or one per image ({n}), not {len(value)}")
    return value


def require_vlm(model) -> None:
    """Raise a one-line ``ValueError`` unless ``model`` is a VLM :func:`attribution` supports."""
    _vlm_adapter(model)


def _vlm_adapter(model):
    from .adapters.hf import HFVLMAdapter
    ad = wrap(model)
    supported = "LLaVA, LLaVA-OneVision, Idefics3, SmolVLM, PaliGemma, Gemma 3, InternVL"
    if not isinstance(ad, HFVLMAdapter):
        raise ValueError(f"attribution needs a vision-language model ({supported}); "
                         f"{type(ad.model).__name__} is {ad.describe()}")
    if type(ad).image_tokens is HFVLMAdapter.image_tokens:
        raise ValueError(f"attribution is not available for {type(ad.model).__name__} yet "
                         f"(it is for {supported})")
    return ad


def _resolve_indices(values, n: int, what: str) -> list[int]:
    if values is None:
        return list(range(n))
    values = [values] if isinstance(values, int) else list(values)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not -n <= v < n:
            raise ValueError(f"{what}: {v!r} is not one of the {n} (negative counts from the end)")
        out.append(v % n)
    if not out:
        raise ValueError(f"{what}: give at least one")
    return sorted(set(out))


def _rows(inputs: dict) -> tuple[list[torch.Tensor], dict[str, list[torch.Tensor]]]:
    """Each row's real tokens (padding dropped, either side) and the other per-token inputs."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    per_token = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")
                 and torch.is_tensor(v) and v.shape[:2] == ids.shape}
    rows = [ids[b][mask[b]] for b in range(len(ids))]
    return rows, {k: [v[b][mask[b]] for b in range(len(ids))] for k, v in per_token.items()}


def _padded(rows: Sequence[torch.Tensor], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    out = rows[0].new_full((len(rows), T), pad)
    mask = torch.zeros(len(rows), T, dtype=torch.long, device=rows[0].device)
    for b, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        out[b, sl] = r
        mask[b, sl] = 1
    return out, mask


def _assembled(inputs: dict, answers: Sequence[Sequence[int]], pad: int, left: bool = False,
               fill: dict[str, int] | None = None) -> dict:
    """``inputs`` with each row's answer appended after its real tokens, re-padded (right padding
    by default: every real token keeps its position, so a batch equals its rows run alone).
    Other per-token inputs (``token_type_ids``, ...) get ``fill[key]`` (default 0) on the
    answer."""
    rows, extra = _rows(inputs)
    full = [torch.cat([r, r.new_tensor(list(a))]) for r, a in zip(rows, answers)]
    ids, mask = _padded(full, pad, left)
    out = {k: v for k, v in inputs.items() if k not in extra}
    out.update(input_ids=ids, attention_mask=mask)
    for k, vals in extra.items():
        f = (fill or {}).get(k, 0)
        grown = [torch.cat([v, v.new_full((len(a), *v.shape[1:]), f)]) for v, a in zip(vals, answers)]
        out[k] = _padded(grown, 0, left)[0]
    return out


def _eos_ids(model, processor) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None),
                _tokenizer(processor)):
        v = getattr(src, "eos_token_id", None)
        if v is not None:
            ids |= set(v) if isinstance(v, (list, tuple, set)) else {int(v)}
    return ids


@torch.no_grad()
def greedy_answers(model, inputs: dict, max_new_tokens: int, eos: set[int], pad: int) -> list[list[int]]:
    """The model's greedy answer for each row (left-padded batch through ``model.generate``), cut
    before the first end-of-sequence token (kept when it is the first token: something must be
    attributed)."""
    left = _assembled(inputs, [[] for _ in range(len(inputs["input_ids"]))], pad, left=True)
    out = model.generate(**left, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = out[:, left["input_ids"].shape[1]:].tolist()
    answers = []
    for row in new:
        cut = next((k for k, t in enumerate(row) if t in eos), len(row))
        answers.append(row[:max(cut, 1)])
    return answers


def _model_inputs(inputs: dict, model) -> dict:
    p = next(model.parameters())
    return {k: (v.to(p.device, p.dtype) if torch.is_floating_point(v) else v.to(p.device))
            if torch.is_tensor(v) else v for k, v in inputs.items()}


# --- the computation -------------------------------------------------------------------------------
def attribution(model, processor, images, prompt, answer=None, layers=None, heads="mean", *,
                max_new_tokens: int = 16, tower_layer: int = -1, threshold="auto",
                chat: bool | None = None) -> Attribution:
    """Text-to-image attribution of ``model``'s answer on ``images`` (PIL images, one sequence
    each) for ``prompt`` (one string, or one per image).

    ``answer``: the text to attribute (one, or one per image; token ids are taken as they are,
    e.g. another run's :attr:`Attribution.answer_ids`); None asks the model for its greedy
    answer (at most ``max_new_tokens`` tokens). ``layers``: language-model layers kept (indices,
    negatives from the end; default all). ``heads``: ``"mean"`` (all heads) or the head indices
    averaged. ``tower_layer``/``threshold``: where and how the tower's outlier patches are read
    (:func:`ttreg.outliers.outlier_mask`). ``chat``: use the processor's chat template (default:
    when it has one). Inside ``ttreg.test_time_registers(model, neurons)`` the maps are the
    registered ones. Returns an :class:`Attribution`.
    """
    ad = _vlm_adapter(model)
    if processor is None:
        raise ValueError("attribution needs the model's processor (transformers AutoProcessor)")
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("attribution: give at least one image")
    prompts = _per_row(prompt, len(images), "prompt")
    if any(not p for p in prompts):
        raise ValueError("attribution: the prompt is empty")
    texts = [prompt_text(processor, p, chat, ad.prompt_separator) for p in prompts]
    tok = _tokenizer(processor)
    images = [im.convert("RGB") if hasattr(im, "convert") else im for im in images]
    inputs = dict(processor(images=ad.processor_images(images), text=texts, return_tensors="pt",
                            padding=True))
    layout = ad.layout(processor, images)
    if isinstance(answer, (list, tuple)) and answer and all(isinstance(a, int) for a in answer):
        answer = [answer] * len(images)                      # one answer as token ids
    answers = _per_row(answer, len(images), "answer")
    if all(a is None for a in answers):
        answer_ids = None
    elif any(a is None for a in answers):
        raise ValueError("answer: give every row an answer, or none (the model's own)")
    else:
        answer_ids = [list(a) if isinstance(a, (list, tuple)) else tok(a, add_special_tokens=False)["input_ids"]
                      for a in answers]
        if any(not a for a in answer_ids):
            raise ValueError("answer: an answer is empty after tokenising")
    return attribute_inputs(model, inputs, answer_ids, layout=layout, layers=layers, heads=heads,
                            max_new_tokens=max_new_tokens, tower_layer=tower_layer,
                            threshold=threshold, decode=tok.decode,
                            eos=_eos_ids(model, processor), pad=_pad_id(model, tok))


def _pad_id(model, tok) -> int:
    for v in (getattr(tok, "pad_token_id", None), getattr(getattr(model, "generation_config", None),
                                                          "pad_token_id", None)):
        if v is not None:
            return int(v)
    return 0


@torch.no_grad()
def attribute_inputs(model, inputs: dict, answer_ids: Sequence[Sequence[int]] | None = None, *,
                     layout: dict | None = None, layers=None, heads="mean", max_new_tokens: int = 16,
                     tower_layer: int = -1, threshold="auto", decode=None, eos: set[int] | None = None,
                     pad: int = 0) -> Attribution:
    """:func:`attribution` on processor outputs ``inputs`` (``input_ids``, ``attention_mask``,
    ``pixel_values``, ...), the answer given as token ids per row (None: the greedy answer).
    ``layout``: what the family's adapter reads from the processor (:meth:`HFVLMAdapter.layout`).
    ``decode``: token ids -> text for :attr:`Attribution.answers`."""
    ad = _vlm_adapter(model)
    attn = ad.lm_attention()
    L = len(attn)
    keep = _resolve_indices(layers, L, "layers")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    inputs = _model_inputs(dict(inputs), model)
    B = len(inputs["input_ids"])
    if answer_ids is None:
        answer_ids = greedy_answers(model, inputs, max_new_tokens, eos or set(), pad)
    answer_ids = [list(map(int, a)) for a in answer_ids]
    if len(answer_ids) != B or any(not a for a in answer_ids):
        raise ValueError(f"answer_ids: one non-empty answer per row ({B}) needed")
    prompt_len = [len(r) for r in _rows(inputs)[0]]
    full = _assembled(inputs, answer_ids, pad, fill=ad.answer_token_inputs)
    tokens = ad.image_tokens(full, layout)
    A = max(len(a) for a in answer_ids)
    k = torch.arange(A)
    answer_mask = k[None] < torch.tensor([len(a) for a in answer_ids])[:, None]
    query = (torch.tensor(prompt_len)[:, None] - 1 + k[None]).clamp(max=full["input_ids"].shape[1] - 1)
    dev = full["input_ids"].device
    query, cols = query.to(dev), tokens.positions.to(dev)
    store: dict[int, torch.Tensor] = {}     # filled from inside each attention call (ttreg.attention)
    got: dict[int, torch.Tensor] = {}
    head_idx = None

    def reduce(layer: int):
        def hook(mod, args, out):
            nonlocal head_idx
            w = store[layer]                                            # (B, H, T, T)
            if head_idx is None:
                head_idx = _resolve_indices(None if heads == "mean" else heads, w.shape[1], "heads")
            w = w[:, head_idx].float().mean(1)                           # (B, T, T)
            rows = w.gather(1, query[..., None].expand(-1, -1, w.shape[-1]))      # (B, A, T)
            got[layer] = rows.gather(2, cols[:, None, :].expand(-1, A, -1))      # (B, A, N)
            store[layer] = got[layer]                                    # drop the full map
        return hook

    tl = _resolve_indices(tower_layer, ad.num_layers, "tower_layer")[0]
    tower = ad.blocks[tl]
    norms: list[torch.Tensor] = []
    with HookSet() as hooks:
        for l in keep:
            _attention.tap(hooks, attn[l], probs=lambda p, l=l: store.__setitem__(l, p))
            hooks.forward(attn[l], reduce(l))
        hooks.forward(tower, lambda m, a, out: norms.append(ad.block_output(out).float().norm(dim=-1)))
        model(**full, use_cache=False)
    if not norms:
        raise RuntimeError("the vision tower did not run on these inputs (no pixel_values?)")
    tn = torch.cat(norms)                                                # (views, prefix + P)
    P = tokens.patches_per_view
    if tn.shape != (tokens.num_views, ad.num_prefix_tokens + P):
        raise RuntimeError(f"the tower ran {tuple(tn.shape)} tokens, the layout expects "
                           f"{tokens.num_views} views of {ad.num_prefix_tokens} + {P}")
    out = outlier_mask(tn, ad.num_prefix_tokens, threshold=threshold)[:, ad.num_prefix_tokens:]
    weights = torch.stack([got[l] for l in keep], dim=2).cpu()          # (B, A, L, N)
    weights = weights * answer_mask[:, :, None, None] * tokens.valid.cpu()[:, None, None, :]
    tokens = type(tokens)(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in vars(tokens).items()})
    return Attribution(weights=weights, answer_mask=answer_mask, answer_ids=answer_ids,
                       answers=[decode(a) if decode else " ".join(map(str, a)) for a in answer_ids],
                       tokens=tokens, layers=keep, heads="mean" if heads == "mean" else list(head_idx or []),
                       tower_layer=tl, tower_norms=tn[:, ad.num_prefix_tokens:].cpu(),
                       outlier_patches=out.cpu(), registers=active_registers(ad),
                       sequence_length=full["attention_mask"].sum(1).tolist())


__all__ = ["Attribution", "attribution", "attribute_inputs", "prompt_text", "greedy_answers", "spread",
           "require_vlm"]
