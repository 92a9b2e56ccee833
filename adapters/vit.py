"""Vision Transformers from timm and torchvision.

Supports timm's ``VisionTransformer`` (and the DeiT / distilled variants timm
builds from it; blocks in ``blocks``) and torchvision's ``VisionTransformer``
(blocks in ``encoder.layers``). Export gives the same class with fewer blocks,
whose state dict loads strictly into a natively built model of the new depth:
``timm.create_model(name, depth=n, ...)`` / ``VisionTransformer(depth=n, ...)``
for timm, ``VisionTransformer(num_layers=n, ...)`` for torchvision.

Other ViT-like classes (timm's Eva, BEiT, Swin; Hugging Face ViT) are not
claimed here; use adapter='generic' with container=... for those.
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional

import torch
from torch import nn

from theseus_general.adapter import Adapter
from theseus_general.errors import AdapterError
from theseus_general.registry import register_adapter

from ._structure import first_mismatch, structure_difference

# Modules are looked up in sys.modules: a model of these classes means its library
# is imported, and a missing library is never imported here.
_TIMM = "timm.models.vision_transformer"
_TORCHVISION = "torchvision.models.vision_transformer"


def _family(model: nn.Module) -> Optional[str]:
    for name, family in ((_TIMM, "timm"), (_TORCHVISION, "torchvision")):
        module = sys.modules.get(name)
        if module is not None and isinstance(model, module.VisionTransformer):
            return family
    return None


_PATHS = {"timm": "blocks", "torchvision": "encoder.layers"}


@register_adapter("vit")
class VitAdapter(Adapter):
    supports = (
        "timm VisionTransformer (ViT, DeiT; blocks) and torchvision VisionTransformer (encoder.layers), "
        "with blocks that all have the same structure"
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _family(model) is not None

    def check(self, model: nn.Module) -> None:
        super().check(model)
        blocks = model.get_submodule(_PATHS[_family(model)])
        if len(blocks) >= 2:
            odd = first_mismatch(list(blocks))
            if odd is not None:
                raise AdapterError(
                    f"The vit adapter cannot rebuild this {type(model).__name__} at a new depth: block {odd} differs "
                    f"from block 0 ({structure_difference(blocks[0], blocks[odd])}), so no depth=n constructor "
                    "builds the exported model. Use adapter='generic' with container=... and export(native=False)."
                )

    def containers(self, model: nn.Module, sample: Optional[Any] = None) -> List[str]:
        return [_PATHS[_family(model)]]

    def sample_input(self, model: nn.Module) -> Optional[Any]:
        device = next(model.parameters()).device
        if _family(model) == "torchvision":
            size, channels = (model.image_size, model.image_size), model.conv_proj.in_channels
        else:
            size = getattr(model.patch_embed, "img_size", None)
            proj = getattr(model.patch_embed, "proj", None)
            if size is None or not isinstance(proj, nn.Conv2d):
                return None  # dynamic size or a hybrid stem: the caller's sample= is needed
            channels = proj.in_channels
        generator = torch.Generator().manual_seed(0)
        return torch.randn(2, channels, *size, generator=generator).to(device)

    def check_successor(self, group_blocks: List[nn.Module], successor: nn.Module) -> Optional[str]:
        reason = structure_difference(group_blocks[0], successor)
        if reason:
            return f"the successor is not built like a block of this model ({reason}), so no depth=n constructor rebuilds it"
        return None

    def finalize_export(self, model: nn.Module, depths: dict) -> nn.Module:
        (depth,) = depths.values()
        feature_info = getattr(model, "feature_info", None)
        if _family(model) == "timm" and isinstance(feature_info, list):
            # timm keeps one entry per block ("blocks.<i>") for features_only / forward_intermediates.
            model.feature_info = [dict(info, module=f"blocks.{i}") for i, info in enumerate(feature_info[:depth])]
        return model
