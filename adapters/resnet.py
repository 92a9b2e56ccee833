"""ResNets from torchvision and timm (stages ``layer1`` .. ``layer4``).

Each stage is its own container, so groups never cross a stage boundary, and a
target can be one depth per compressed stage (``successor_depth=[2, 2, 3, 2]``
for ``[3, 4, 6, 3]``), one global depth, or a ratio. Stages of a single block
have nothing to merge and are left as they are (they get no entry in a
per-stage list). The first block of a stage is the one that downsamples
(stride, channel change, ``downsample`` branch); the successor of each stage's
first group must be built like it, which ``init='first'`` (the default) and
``'group_first'`` do and ``'group_last'`` does not (that fails at once).

Export gives the same class with shorter stages; its state dict loads strictly
into ``torchvision.models.resnet.ResNet(Bottleneck, [2, 2, 3, 2], ...)`` or
``timm.models.resnet.ResNet(Bottleneck, layers=[2, 2, 3, 2], ...)`` built with
the predecessor's other arguments.
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

_MODULES = ("torchvision.models.resnet", "timm.models.resnet")
STAGES = ("layer1", "layer2", "layer3", "layer4")


def _is_resnet(model: nn.Module) -> bool:
    for name in _MODULES:
        module = sys.modules.get(name)  # imported whenever such a model exists
        if module is not None and isinstance(model, module.ResNet):
            return True
    return False


def _stages(model: nn.Module) -> List[str]:
    return [s for s in STAGES if isinstance(getattr(model, s, None), nn.Sequential)]


@register_adapter("resnet")
class ResNetAdapter(Adapter):
    supports = (
        "torchvision ResNet / ResNeXt / Wide ResNet and timm ResNet (incl. ResNet-D, SE-ResNet, ResNeXt): "
        "stages layer1..layer4 whose blocks after the first share one structure; single-block stages are kept"
    )

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_resnet(model)

    def check(self, model: nn.Module) -> None:
        super().check(model)
        for stage in _stages(model):
            blocks = list(getattr(model, stage))
            if len(blocks) > 2:
                odd = first_mismatch(blocks[1:])
                if odd is not None:
                    raise AdapterError(
                        f"The resnet adapter cannot rebuild this {type(model).__name__}: in {stage}, block {odd + 1} "
                        f"differs from block 1 ({structure_difference(blocks[1], blocks[odd + 1])}), but a ResNet "
                        "constructor builds every block after a stage's first alike. Use adapter='generic' with "
                        "container=... and export(native=False)."
                    )

    def containers(self, model: nn.Module, sample: Optional[Any] = None) -> List[str]:
        paths = [s for s in _stages(model) if len(getattr(model, s)) >= 2]
        if not paths:
            raise AdapterError(
                f"Every stage of this {type(model).__name__} has a single block "
                f"({', '.join(f'{s}: {len(getattr(model, s))}' for s in _stages(model))}); there is nothing to merge."
            )
        return paths

    def sample_input(self, model: nn.Module) -> Optional[Any]:
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is None:
            return None
        generator = torch.Generator().manual_seed(0)
        # 32 x 32 survives the standard stem and four stages (down to 1 x 1).
        return torch.randn(2, first_conv.in_channels, 32, 32, generator=generator).to(first_conv.weight.device)

    def check_successor(self, group_blocks: List[nn.Module], successor: nn.Module) -> Optional[str]:
        # A group's first block is its stage's first block exactly when it is the
        # stage's first group, and that is where a native rebuild puts the stage's
        # downsampling head; every other position holds an ordinary block.
        reason = structure_difference(group_blocks[0], successor)
        if reason:
            return (f"the successor is not built like the group's first block ({reason}); a native ResNet puts a "
                    "block like the stage's first (downsampling) block first and ordinary blocks after it")
        return None
