"""Built-in adapters, one module per model family (imported as ``theseus_general.adapters``).

Each module imports its model library lazily, so ``import theseus_general`` works
without transformers, timm or torchvision installed.
"""

from . import bert, generic  # noqa: F401

__all__ = ["bert", "generic"]
