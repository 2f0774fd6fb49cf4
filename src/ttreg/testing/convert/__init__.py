"""Weight converters from a timm ViT to other model libraries (same weights, another library's
module): how planted Hugging Face and open_clip models are made -- plant in timm, convert -- and
what the cross-library equivalence tests compare. Each submodule converts into one library
(:mod:`~ttreg.testing.convert.hf`, :mod:`~ttreg.testing.convert.open_clip`). The built-in real
model does not use them (:mod:`ttreg.builtin` reads its weights from the ONNX graph itself).
"""
