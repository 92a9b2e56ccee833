"""Built-in adapters, one module per model family (imported as ``theseus_general.adapters``).

Each module imports its model library lazily, so ``import theseus_general`` works
without transformers, timm or torchvision installed. Registration order is
detection order; each family adapter claims only its own classes, hf,
registered after them, claims every other transformers PreTrainedModel, and
backbone claims what is left that holds a resnet or vit model inside it.
"""

from . import bert, vit, resnet, hf, backbone, generic  # noqa: F401  (hf after the families it would also match)

__all__ = ["bert", "vit", "resnet", "hf", "backbone", "generic"]
