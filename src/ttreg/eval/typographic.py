"""Typographic attacks on CLIP: write a wrong class name onto each image and measure how often
the model then predicts the written class (attack success), for: the plain model; register
neurons shifted onto the patches under the text (``shift_to``, the paper's mitigation); the same
edit on random neurons from the same layers; the register neurons zeroed (no shift, the paper's
ablation); the register neurons' values on the text patches replaced by random draws (the
rebuttal's "random register neuron value" control, 48.2 +- 1.5 there: each neuron's value drawn
from a normal matched to that neuron's mean and standard deviation over the image's tokens,
seeded per draw); and pixel ablation of the text region (set to the normalisation mean). The clean
images give the reference accuracy. The paper's attack images are not released; the label
rendering here is ttreg's own."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..adapters import wrap
from ..hooks import HookSet
from ..register_neurons import as_register_neurons
from .arms import Arm, control_rows, make_arms, summarize_draws, summarize_random
from .backbone import preprocessing
from .datasets import load_rgb, resize_center_crop, to_tensor
from .report import format_table
from .zeroshot import classify, load_templates, text_classifier


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def render_text(image, text: str, *, position: str | tuple[int, int] = "random",
                font_size: int | None = None, rng: np.random.Generator | None = None,
                color=(0, 0, 0), background=(255, 255, 255), margin: int = 2):
    """Write ``text`` on a filled label onto a copy of the PIL ``image``.

    Returns ``(attacked image, mask)``: ``mask`` ``(H, W)`` bool is the label's rectangle, the
    only pixels that change. ``position``: ``"random"`` (uniform where the label fits),
    ``"center"`` or the top-left corner ``(x, y)``. ``font_size`` defaults to a sixth of the
    height, shrunk until the label fits the width.
    """
    from PIL import ImageDraw
    im = image.copy()
    W, H = im.size
    draw = ImageDraw.Draw(im)
    size = font_size or max(8, H // 6)
    while True:
        font = _font(size)
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        bw, bh = r - l + 2 * margin, b - t + 2 * margin
        if (bw <= W and bh <= H) or size <= 4:
            break
        size -= 1
    bw, bh = min(bw, W), min(bh, H)
    if position == "random":
        rng = rng or np.random.default_rng(0)
        x, y = int(rng.integers(0, W - bw + 1)), int(rng.integers(0, H - bh + 1))
    elif position == "center":
        x, y = (W - bw) // 2, (H - bh) // 2
    else:
        x, y = int(position[0]), int(position[1])
    draw.rectangle([x, y, x + bw - 1, y + bh - 1], fill=background)
    draw.text((x + margin - l, y + margin - t), text, font=font, fill=color)
    mask = np.zeros((H, W), dtype=bool)
    mask[y:y + bh, x:x + bw] = True
    return im, mask


def patch_mask(mask: np.ndarray | torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Pixel mask ``(..., H, W)`` -> patch mask ``(..., rows * cols)``: a patch is marked when
    any of its pixels is."""
    m = torch.as_tensor(mask, dtype=torch.bool)
    *lead, H, W = m.shape
    ph, pw = patch
    m = m[..., : H - H % ph, : W - W % pw]
    m = m.reshape(*lead, H // ph, ph, W // pw, pw).any(-1).any(-2)
    return m.reshape(*lead, -1)


@contextlib.contextmanager
def random_values(model, neurons, text: torch.Tensor, seed: int) -> Iterator[None]:
    """The register neurons' values on the ``text`` patches (``(B, rows * cols)`` bool) replaced
    by random draws, every other token untouched: per image and neuron, ``mean + std * N(0, 1)``
    with the mean and (unbiased) standard deviation of that neuron over the image's tokens.
    Draws come from a generator seeded with ``seed``, in forward order."""
    ad = wrap(model)
    rn = as_register_neurons(neurons)
    g = torch.Generator().manual_seed(int(seed))
    by_layer = rn.by_layer()

    def hook_for(idx: list[int]):
        def hook(module, args):
            h = args[0]
            B, T, _ = h.shape
            npre = T - text.shape[1]
            where = torch.cat([text.new_zeros(B, npre), text], dim=1)[:, :, None].to(h.device)
            k = torch.tensor(idx, device=h.device)
            v = h.index_select(-1, k).float()                           # (B, T, K)
            noise = torch.randn(v.shape, generator=g).to(h.device)
            drawn = v.mean(1, keepdim=True) + v.std(1, keepdim=True) * noise
            return (h.index_copy(-1, k, torch.where(where, drawn, v).to(h.dtype)), *args[1:])
        return hook
    with HookSet() as hooks:
        for layer, idx in by_layer.items():
            hooks.pre(ad.down_proj(layer), hook_for(idx))
        yield


def evaluate_typographic(model, tokenizer: Callable, items: Sequence[tuple], classnames: Sequence[str],
                         neurons, *, templates: Sequence[str] | None = None,
                         control_seeds: Sequence[int] = (0, 1, 2), preset: str = "paper",
                         position: str = "random", font_size: int | None = None, seed: int = 0,
                         batch_size: int = 32, progress: bool = False,
                         print_table: bool = True) -> dict[str, Any]:
    """Attack success (and accuracy) per arm; ``items``: ``[(image path, class index)]``.

    Each image gets a wrong class name (uniform among the others, reproducible from ``seed``).
    """
    if len(classnames) < 2:
        raise ValueError("a typographic attack needs at least two classes")
    ad = wrap(model)
    size, mean, std = preprocessing(model)
    p = ad.parameter()
    W = text_classifier(model, tokenizer, classnames,
                        list(templates) if templates is not None else load_templates())
    rng = np.random.default_rng(seed)
    arms = make_arms(model, neurons, control_seeds=control_seeds, num_registers=0, preset=preset,
                     zeroed=True, random_zeroed=False)
    if len(as_register_neurons(neurons)):
        arms += [Arm(f"random-values-{s}", "random-values", as_register_neurons(neurons), int(s))
                 for s in control_seeds]
    names = ["clean", "plain", *[a.name for a in arms[1:]], "pixel ablation"]
    preds: dict[str, list] = {n: [] for n in names}
    written: list[int] = []
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="typographic", unit="batch")
    with torch.no_grad():
        for chunk in chunks:
            clean, attacked, masks = [], [], []
            for path, label in chunk:
                im = resize_center_crop(load_rgb(path), size)
                wrong = int(rng.choice([c for c in range(len(classnames)) if c != int(label)]))
                adv, mask = render_text(im, classnames[wrong], position=position,
                                        font_size=font_size, rng=rng)
                clean.append(to_tensor(im, mean, std))
                attacked.append(to_tensor(adv, mean, std))
                masks.append(mask)
                written.append(wrong)
            xc = torch.stack(clean).to(p.device, p.dtype)
            xa = torch.stack(attacked).to(p.device, p.dtype)
            pix = torch.from_numpy(np.stack(masks)).to(p.device)
            xab = xa.masked_fill(pix[:, None], 0.0)
            shift = patch_mask(np.stack(masks), ad.patch_size).to(p.device)
            preds["clean"].append(classify(model, xc, W).argmax(-1).cpu())
            preds["plain"].append(classify(model, xa, W).argmax(-1).cpu())
            preds["pixel ablation"].append(classify(model, xab, W).argmax(-1).cpu())
            for arm in arms[1:]:
                ctx = (random_values(model, arm.neurons, shift, arm.seed) if arm.kind == "random-values"
                       else arm.context(model, shift_to=shift))
                with ctx:
                    preds[arm.name].append(classify(model, xa, W).argmax(-1).cpu())
    labels = torch.tensor([int(t) for _, t in items])
    target = torch.tensor(written)
    per_arm = {}
    for n in names:
        pr = torch.cat(preds[n])
        per_arm[n] = {"images": len(items), "accuracy": float((pr == labels).float().mean()),
                      "attack_success": None if n == "clean" else float((pr == target).float().mean())}
    for a in arms[1:]:
        per_arm[a.name]["setup"] = {**a.describe(),
                                    "shift_to": None if a.zeroes else "text patches"}
        if a.kind == "random-values":
            per_arm[a.name]["setup"].update(preset=None, shift_to=None, replaced_on="text patches")
    result = {"experiment": "typographic",
              "config": {"classes": len(classnames), "position": position, "font_size": font_size,
                         "seed": seed, "preset": preset, "control_seeds": list(control_seeds),
                         "input_size": list(size)},
              "neurons": arms[1].describe()["neurons"], "arms": per_arm,
              "random": summarize_random(per_arm, ["attack_success", "accuracy"]),
              "random_values": summarize_draws(per_arm, ["attack_success", "accuracy"], "random-values")}
    if print_table:
        print(table(result))
    return result


def table(result: dict[str, Any]) -> str:
    names = {"registers": "register neurons -> text", "random": "random neurons -> text",
             "zeroed": "register neurons zeroed"}
    names_random = {"random values": "random register-neuron values on text"}
    rows = control_rows(result)
    for r in rows:
        r["arm"] = names.get(r["arm"], r["arm"]).replace("random (", "random neurons -> text (")
        for k, v in names_random.items():
            r["arm"] = r["arm"].replace(k + " (", v + " (")
        for k in ("attack_success", "accuracy"):
            v = r.get(k)
            r[k] = {**v, "mean": 100 * v["mean"], "ci95": 100 * v["ci95"]} if isinstance(v, dict) \
                else (None if v is None else 100 * v)
    return format_table(rows, [("arm", "arm"), ("preset", "preset"), ("images", "images"),
                               ("attack_success", "attack success %"),
                               ("accuracy", "accuracy %")], title="Typographic attack", digits=1)
