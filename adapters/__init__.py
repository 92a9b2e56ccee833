"""Built-in adapters, one module per model family (imported as ``theseus_general.adapters``).

Each module imports its model library lazily, so ``import theseus_general`` works
without transformers, timm or torchvision installed. Registration order is
detection order; each family adapter claims only its own classes.
"""

from . import bert, vit, resnet, generic  # noqa: F401

__all__ = ["bert", "vit", "resnet", "generic"]
