"""Old path of :mod:`ttreg.testing.plant` (``ttreg.plant.plant_register_neurons`` still works). A
package, not ``plant.py``, so that git follows ``plant.py`` to its new place."""
from ..testing.images import marked_images  # noqa: F401
from ..testing.plant import Plant, plant_register_neurons  # noqa: F401
