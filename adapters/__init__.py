"""Built-in adapters, one module per model family (imported as ``theseus_general.adapters``).

Each module imports its model library lazily, so ``import theseus_general`` works
without transformers, timm or torchvision installed. Registration order is
detection order; each family adapter claims only its own classes, and hf,
registered after them, claims every other transformers PreTrainedModel.
"""

from . import bert, vit, resnet, hf, generic  # noqa: F401  (hf after the families it would also match)

__all__ = ["bert", "vit", "resnet", "hf", "generic"]
