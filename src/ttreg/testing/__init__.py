"""Models with a known answer, for tests, demos, benchmarks and trying ttreg without downloads.

* Plants that work on any family, through the adapter (:mod:`ttreg.testing.plant`):
  :func:`plant_register_neurons` with :class:`Plant` -- timm, Hugging Face, open_clip or a ViT
  described with ``ttreg.wrap(model, ...)``; the neurons fire on a chosen patch or on content
  (:func:`marked_images`).
* Plants written straight into a timm ``VisionTransformer`` (:mod:`ttreg.testing.timm_plants`):
  :func:`plant_timm_register_neurons` with :class:`TimmPlant` (fires on one patch, set in the
  position embedding; no images needed) and :func:`planted_vit`; outliers that behave like real
  ones, :func:`plant_content_outliers` / :func:`content_planted_vit` (:class:`ContentPlants`);
  :func:`size_planted_vit` (a neuron that fires only on inputs with many patches);
  :func:`plant_demo` (the demo's ``builtin:dinov2_vits14+planted``).
* Images (:mod:`ttreg.testing.images`): :func:`mixed_images`, :func:`marked_images`.
* A tiny open_clip CLIP around the planted ViT (:mod:`ttreg.testing.clip`, the command line's
  ``planted-clip``): :func:`planted_clip`, :func:`align_text_tower`.
* Tiny data sets in the real on-disk layouts for ``ttreg eval`` (:mod:`ttreg.testing.tiny_datasets`):
  :func:`write_voc`, :func:`write_coco`, :func:`write_image_folder`, :func:`write_segmentation`,
  :func:`write_binary_segmentation`, :func:`write_depth`.
* Converters from timm to Hugging Face and open_clip (:mod:`ttreg.testing.convert`; imported on
  their own): plant in timm, convert.

Old paths still work: ``ttreg.plant`` (:func:`plant_register_neurons`, :class:`Plant`,
:func:`marked_images`), ``ttreg.eval.synthetic`` (clip and data sets) and ``ttreg.convert``.
"""
from __future__ import annotations

from .clip import OPENAI_MEAN, OPENAI_STD, align_text_tower, planted_clip
from .tiny_datasets import (COLORS, color_image, write_binary_segmentation, write_coco, write_depth,
                       write_image_folder, write_segmentation, write_voc)
from .images import marked_images, mixed_images
from .plant import Plant, plant_register_neurons
from .timm_plants import (DEMO_PLANTS, SIZE_PLANTS, ContentPlants, TimmPlant, content_planted_vit,
                          plant_content_outliers, plant_demo, plant_timm_register_neurons, planted_vit,
                          size_planted_vit)

__all__ = ["COLORS", "ContentPlants", "DEMO_PLANTS", "OPENAI_MEAN", "OPENAI_STD", "Plant", "SIZE_PLANTS",
           "TimmPlant", "align_text_tower", "color_image", "content_planted_vit", "marked_images",
           "mixed_images", "plant_content_outliers", "plant_demo", "plant_register_neurons",
           "plant_timm_register_neurons", "planted_clip", "planted_vit", "size_planted_vit",
           "write_binary_segmentation", "write_coco", "write_depth", "write_image_folder",
           "write_segmentation", "write_voc"]


def __dir__() -> list[str]:
    """The public names only (``dir(ttreg.testing)`` shows the API, not its submodules' imports)."""
    return sorted(__all__)
