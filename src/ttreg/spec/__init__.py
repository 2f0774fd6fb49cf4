"""Old name of :mod:`ttreg.register_neurons`, kept so ``from ttreg.register_neurons import RegisterNeurons``
still works. (A package, not ``spec.py``, so that git follows ``spec.py`` to its new name.)"""
from ..register_neurons import *  # noqa: F401,F403
