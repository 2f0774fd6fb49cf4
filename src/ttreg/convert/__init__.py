"""Old path of :mod:`ttreg.testing.convert` (``from ttreg.convert.hf import timm_to_hf_dinov2``
still works): ``ttreg.convert.hf`` and ``ttreg.convert.open_clip`` are those modules."""
import sys

from ..testing.convert import hf, open_clip

sys.modules[f"{__name__}.hf"], sys.modules[f"{__name__}.open_clip"] = hf, open_clip
