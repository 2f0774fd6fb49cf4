"""Words for numbers in what ttreg prints: ``count(1, "image")`` is "1 image", ``count(3,
"image")`` "3 images"."""
from __future__ import annotations


def count(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1 (``plural`` for irregular nouns)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


__all__ = ["count"]
