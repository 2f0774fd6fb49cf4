"""Old name of :mod:`ttreg.register_neurons` (kept so ``from ttreg.spec import RegisterNeurons`` works)."""
from .register_neurons import *  # noqa: F401,F403
