"""Old path of :mod:`ttreg.testing.clip` and :mod:`ttreg.testing.tiny_datasets` (``from
ttreg.eval.synthetic import write_voc`` still works). A package, not ``synthetic.py``, so that git
follows ``synthetic.py`` to its new place."""
from ...testing.clip import OPENAI_MEAN, OPENAI_STD, align_text_tower, planted_clip  # noqa: F401
from ...testing.tiny_datasets import (COLORS, color_image, write_binary_segmentation,  # noqa: F401
                                      write_coco, write_depth, write_image_folder, write_segmentation,
                                      write_voc)
