"""The ``edge-slm`` command (:func:`main`); the build commands load lazily."""

from edge_slm.cli.main import main

__all__ = ["main"]
