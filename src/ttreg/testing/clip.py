"""A tiny open_clip CLIP for exercising the experiments without downloads: its image tower is a
small timm ViT with planted register neurons (:func:`ttreg.testing.planted_vit`), and
:func:`align_text_tower` makes its text tower agree with chosen image prototypes (so zero-shot
accuracy has a known answer). The command line's ``planted-clip`` model."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .timm_plants import planted_vit

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def planted_clip(*, img_size: int = 64, patch_size: int = 8, depth: int = 6, width: int = 96,
                 embed_dim: int = 32, text_width: int = 32, seed: int = 0,
                 plants: Sequence = ((1, 7, 12, 0.4), (3, 21, 12, 12.0))) -> tuple[nn.Module, Callable]:
    """``(model, tokenizer)``: a random open_clip ``CLIP`` (eval mode) whose ``visual`` is a
    ``TimmModel`` around :func:`ttreg.testing.planted_vit` (class-token pooling, linear
    projection that does not read the plants' write channels) and a one-layer text tower
    using CLIP's tokenizer."""
    import open_clip
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    vision = CLIPVisionCfg(timm_model_name="test_vit", timm_pool="token", timm_proj="linear",
                           image_size=img_size)
    text = CLIPTextCfg(context_length=77, vocab_size=49408, width=text_width, heads=2, layers=1)
    model = CLIP(embed_dim, vision_cfg=vision, text_cfg=text)
    trunk = planted_vit(plants, depth=depth, embed_dim=width, img_size=img_size,
                        patch_size=patch_size, seed=seed, num_classes=0, global_pool="token")
    proj = nn.Linear(width, embed_dim, bias=False)
    with torch.no_grad():
        for p in plants:
            l, n = int(p[0]), int(p[1])
            written = trunk.blocks[l].mlp.fc2.weight[:, n].nonzero().flatten()
            proj.weight[:, written] = 0                 # the head does not read the plants
    model.visual.trunk = trunk
    model.visual.head = nn.Sequential(OrderedDict(drop=nn.Dropout(0.0), proj=proj))
    model.visual.image_size = (img_size, img_size)
    model.visual.image_mean, model.visual.image_std = OPENAI_MEAN, OPENAI_STD
    model.eval()
    return model, open_clip.get_tokenizer("ViT-B-16")


@torch.no_grad()
def align_text_tower(model, tokenizer: Callable, classnames: Sequence[str],
                     templates: Sequence[str], prototypes: torch.Tensor) -> None:
    """Set ``model.text_projection`` so every prompt of class ``c`` embeds to exactly the image
    embedding of ``prototypes[c]`` (a ``(C, 3, H, W)`` image batch): least squares, exact while
    ``len(classnames) * len(templates)`` <= the text width."""
    target = F.normalize(model.encode_image(prototypes).float(), dim=-1)          # (C, E)
    prompts = [t.format(c) for c in classnames for t in templates]
    width = model.text_projection.shape[0]
    saved = model.text_projection.data.clone()
    model.text_projection.data = torch.eye(width, dtype=saved.dtype, device=saved.device)
    pooled = model.encode_text(tokenizer(prompts)).float()                       # (N, width)
    y = target.repeat_interleave(len(templates), dim=0)
    sol = torch.linalg.lstsq(pooled.double(), y.double()).solution
    model.text_projection.data = sol.to(saved.dtype)
