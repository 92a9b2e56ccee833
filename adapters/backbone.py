"""A family's backbone nested in a larger model: detectors, segmenters, wrappers.

``Theseus(detector, ratio=0.5)`` finds, in module order, the outermost submodule that
a *family* adapter recognises (``resnet``: a ResNet or a ResNet body such as
``fasterrcnn_resnet50_fpn().backbone.body``, ``fcn_resnet50().backbone`` or a timm
``features_only`` ResNet; ``vit``: a timm or torchvision VisionTransformer) and hands
that submodule to the family adapter: the containers are its stages or blocks
(``backbone.body.layer1`` ..), compressed by the family's rules, with the family's
default recipe. Export rebuilds the backbone natively, as the family adapter does
(checked against the predecessor, loaded strictly), and puts it in place of the old
one in the exported copy; the rest of the model is the trained rest, unchanged.
The model stays of its own class, e.g. a FasterRCNN whose state dict loads strictly
into the torchvision model built the same way with the shallower ResNet::

    FasterRCNN(_resnet_fpn_extractor(ResNet(Bottleneck, [2, 2, 3, 2]), 5), num_classes=91)

What is outside the backbone is not rebuilt. torchvision's detection and
segmentation heads do not depend on the backbone's depth; a wrapper of your own that
records the depth itself (a stored count, block indices) is not updated, and a timm
``features_only`` ViT (FeatureGetterNet), whose ``out_indices`` name blocks by index,
is refused. Several backbones in one model: name the one with ``backbone='path'``.
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional, Tuple

from torch import nn

from theseus_general.adapter import Adapter
from theseus_general.errors import AdapterError
from theseus_general.registry import adapter_class, register_adapter

FAMILIES = ("resnet", "vit")  # adapters whose models are found nested, in this order of preference
# Models whose forward takes a batch of images as one tensor or list, so a sample can be made.
_IMAGE_MODELS = (("torchvision.models.detection.generalized_rcnn", "GeneralizedRCNN"),
                 ("torchvision.models.detection.retinanet", "RetinaNet"),
                 ("torchvision.models.detection.fcos", "FCOS"),
                 ("torchvision.models.segmentation._utils", "_SimpleSegmentationModel"))
# Wrappers that select the nested model's blocks by index: a shallower backbone would shift them.
_BY_INDEX = (("timm.models._features", "FeatureGetterNet"),)


def _instance_of(model: nn.Module, classes) -> bool:
    for module_name, class_name in classes:
        module = sys.modules.get(module_name)
        if module is not None and isinstance(model, getattr(module, class_name, ())):
            return True
    return False


def find_backbones(model: nn.Module) -> List[Tuple[str, str]]:
    """(path, family) of every outermost submodule of `model` (not `model` itself) that a family
    adapter recognises, in module order."""
    found: List[Tuple[str, str]] = []
    for path, module in model.named_modules():
        if not path or any(path.startswith(p + ".") for p, _ in found):
            continue
        family = next((f for f in FAMILIES if adapter_class(f).matches(module)), None)
        if family is not None:
            found.append((path, family))
    return found


def _strip(path: str, prefix: str) -> str:
    return path[len(prefix) + 1:]


@register_adapter("backbone")
class BackboneAdapter(Adapter):
    supports = (
        "a model that holds a ResNet (or a ResNet body: torchvision detection / segmentation backbones, timm "
        "features_only) or a timm / torchvision VisionTransformer as a submodule, e.g. FasterRCNN, MaskRCNN, "
        "RetinaNet, FCN, DeepLabV3 or a wrapper of your own; the backbone is compressed and rebuilt by its family's "
        "adapter"
    )

    def __init__(self, backbone: Optional[str] = None):
        super().__init__()
        if backbone is not None and (not isinstance(backbone, str) or not backbone):
            raise AdapterError(f"backbone= must be the dotted path of the nested model, e.g. 'backbone.body', got {backbone!r}.")
        self.backbone = backbone
        self.path: Optional[str] = None  # set by check(): where the backbone is
        self.inner: Optional[Adapter] = None  # the family adapter that handles it

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return bool(find_backbones(model))

    # ------------------------------------------------------------ finding the backbone
    def check(self, model: nn.Module) -> None:
        found = find_backbones(model)
        if self.backbone is not None:
            try:
                module = model.get_submodule(self.backbone)
            except AttributeError:
                raise AdapterError(f"backbone={self.backbone!r}: this {type(model).__name__} has no such submodule; "
                                   f"backbones found: {[p for p, _ in found] or 'none'}.") from None
            family = next((f for f in FAMILIES if adapter_class(f).matches(module)), None)
            if family is None:
                raise AdapterError(f"backbone={self.backbone!r} is a {type(module).__name__}, which none of the "
                                   f"adapters {list(FAMILIES)} recognises; backbones found: {[p for p, _ in found] or 'none'}.")
            found = [(self.backbone, family)]
        if not found:
            raise AdapterError(
                f"The backbone adapter found no {' or '.join(FAMILIES)} model inside this {type(model).__name__}; it "
                f"supports: {self.supports}. Use adapter='generic' with container=... instead.")
        if len(found) > 1:
            raise AdapterError(
                f"This {type(model).__name__} holds several backbones ({', '.join(f'{p} ({f})' for p, f in found)}); "
                f"name the one to compress: Theseus(model, adapter='backbone', backbone={found[0][0]!r}, ...).")
        (path, family), = found
        for prefix in _ancestors(path):
            if _instance_of(model.get_submodule(prefix), _BY_INDEX):
                raise AdapterError(
                    f"The {family} model at {path!r} sits in a {type(model.get_submodule(prefix)).__name__}, which "
                    "selects its blocks by index (out_indices): a shallower model would return other blocks' features. "
                    "Compress the plain model (created without features_only), export it, and take its features from the shallower model (timm: forward_intermediates(indices=...)).")
        self.path, self.inner = path, adapter_class(family)()
        self.inner.check(model.get_submodule(path))
        self.default_recipe = self.inner.default_recipe  # the family's recipe
        self.state_kwarg = self.inner.state_kwarg
        self.budget_init = self.inner.budget_init

    def _family(self, model: nn.Module) -> Adapter:
        if self.inner is None:
            self.check(model)
        return self.inner

    # ------------------------------------------------------------ planning, delegated with the path prefix
    def containers(self, model: nn.Module, sample: Optional[Any] = None) -> List[str]:
        inner = self._family(model)
        return [f"{self.path}.{p}" for p in inner.containers(model.get_submodule(self.path))]

    def sample_input(self, model: nn.Module) -> Optional[Any]:
        """The family's sample (a small image batch) where the whole model is known to take one:
        torchvision detection and segmentation models. None for other wrappers (pass sample=)."""
        if not _instance_of(model, _IMAGE_MODELS):
            return None
        images = self._family(model).sample_input(model.get_submodule(self.path))
        if images is not None and not _instance_of(model, _IMAGE_MODELS[-1:]):
            images = list(images)  # detectors take a list of images
        return images

    def check_successor(self, group_blocks: List[nn.Module], successor: nn.Module) -> Optional[str]:
        return self.inner.check_successor(group_blocks, successor)

    def width_of(self, block: nn.Module) -> Optional[int]:
        return self.inner.width_of(block) if self.inner is not None else None

    def narrow(self, block: nn.Module, keep: int) -> nn.Module:
        return self.inner.narrow(block, keep)

    def width_reference(self, group_blocks: List[nn.Module], successor: nn.Module) -> nn.Module:
        return self.inner.width_reference(group_blocks, successor)

    def prepare_successor(self, group_blocks: List[nn.Module], successor: nn.Module) -> None:
        self.inner.prepare_successor(group_blocks, successor)

    def width_export_problem(self, model: nn.Module, widths: dict) -> Optional[str]:
        return self._family(model).width_export_problem(
            model.get_submodule(self.path), {_strip(p, self.path): w for p, w in widths.items()})

    # ------------------------------------------------------------ export
    def finalize_export(self, model: nn.Module, depths: dict, native: Optional[bool] = None) -> nn.Module:
        """The family adapter rebuilds the backbone (natively unless native=False); it replaces the
        copy's backbone, on the copy's device and dtype, and the copy is returned."""
        inner = self._family(model)
        rebuilt = inner.finalize_export(model.get_submodule(self.path),
                                        {_strip(p, self.path): d for p, d in depths.items()}, native=native)
        parent, _, name = self.path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, rebuilt)
        return model.eval()


def _ancestors(path: str) -> List[str]:
    """'' and every proper prefix of `path`: the modules that hold it."""
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts))]


__all__ = ["BackboneAdapter", "find_backbones", "FAMILIES"]
