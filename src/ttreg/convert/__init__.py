"""Weight converters between model libraries (same weights, another library's module).

Used for the built-in real model and for cross-library equivalence tests; each submodule
converts into one library.
"""
