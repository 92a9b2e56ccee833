"""ResNets from torchvision and timm (stages ``layer1`` .. ``layer4``).

Each stage is its own container, so groups never cross a stage boundary, and a
target can be one depth per compressed stage (``successor_depth=[2, 2, 3, 2]``
for ``[3, 4, 6, 3]``), one global depth, or a ratio. Stages of a single block
have nothing to merge and are left as they are (they get no entry in a
per-stage list). The first block of a stage is the one that downsamples
(stride, channel change, ``downsample`` branch); the successor of each stage's
first group must be built like it, which ``init='first'`` (the default) and
``'group_first'`` do and ``'group_last'`` does not (that fails at once).

Native export builds the model again with its library's constructor and the
new stage depths, then loads the trained state strictly:
``torchvision.models.resnet.ResNet(block, [2, 2, 3, 2], groups=..., width_per_group=...,
...)``, or for timm ``timm.create_model(name, layers=[2, 2, 3, 2], ...)`` (by the
model's registered name) or ``ResNet(block, layers=[...], ...)``. The arguments
are read off the predecessor when the plan is made and trusted only if they
rebuild it exactly, so timm's drop-path schedule is that of the new depth. A
ResNet whose arguments cannot be read back (a replaced head, a custom block
argument, ...) raises ExportError naming the difference; export(native=False)
then gives the copy.

A ResNet *body* (the feature extractor a detector or segmenter holds: torchvision's
``IntermediateLayerGetter`` over a ResNet, as in ``fasterrcnn_resnet50_fpn().backbone.body``
or ``fcn_resnet50().backbone``, and timm's ``features_only=True`` ResNets, ``FeatureListNet`` /
``FeatureDictNet``) is handled the same way: its stages are compressed by the same rules and
it is rebuilt as the library builds it, ``IntermediateLayerGetter(ResNet(block, layers=[...],
...), return_layers)`` or ``timm.create_model(name, features_only=True, out_indices=...,
layers=[...])``, checked against the predecessor and loaded strictly. A detector or segmenter
holding such a body goes to the backbone adapter (adapters/backbone.py), which uses this one.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, List, Optional

import torch
from torch import nn

from theseus_general.adapter import Adapter
from theseus_general.errors import AdapterError, ExportError
from theseus_general.registry import register_adapter
from theseus_general.width import narrow_conv_chain

from ._native import NATIVE_FALSE, Recipe, export_native, is_identity, read_recipe
from ._structure import first_mismatch, structure_difference

_MODULES = ("torchvision.models.resnet", "timm.models.resnet")
STAGES = ("layer1", "layer2", "layer3", "layer4")
# Feature extractors that keep a ResNet's children (conv1 .. layerN) under their own names.
_BODIES = {"torchvision": ("torchvision.models._utils", "IntermediateLayerGetter"),
           "timm": ("timm.models._features", "FeatureDictNet")}  # FeatureListNet subclasses FeatureDictNet


def _is_resnet(model: nn.Module) -> bool:
    for name in _MODULES:
        module = sys.modules.get(name)  # imported whenever such a model exists
        if module is not None and isinstance(model, module.ResNet):
            return True
    return False


def _block_library(block: nn.Module) -> Optional[str]:
    """'torchvision' or 'timm' for a ResNet BasicBlock / Bottleneck of that library, else None."""
    for library, name in zip(("torchvision", "timm"), _MODULES):
        module = sys.modules.get(name)
        if module is not None and isinstance(block, (module.BasicBlock, module.Bottleneck)):
            return library
    return None


def body_library(model: nn.Module) -> Optional[str]:
    """'torchvision' or 'timm' when `model` is a ResNet body (a feature extractor holding a ResNet's
    stem and stages, see the module docstring) whose blocks come from that same library, else None."""
    for library, (module_name, class_name) in _BODIES.items():
        module = sys.modules.get(module_name)
        if module is None or not isinstance(model, getattr(module, class_name)):
            continue
        stage = getattr(model, "layer1", None)
        if isinstance(stage, nn.Sequential) and len(stage) and _block_library(stage[0]) == library \
                and isinstance(getattr(model, "conv1", None), nn.Module):
            return library
    return None


def _library(model: nn.Module) -> str:
    """Which library built `model` (a ResNet or a ResNet body)."""
    torchvision = sys.modules.get("torchvision.models.resnet")
    if torchvision is not None and isinstance(model, torchvision.ResNet):
        return "torchvision"
    return body_library(model) or "timm"


def _stages(model: nn.Module) -> List[str]:
    return [s for s in STAGES if isinstance(getattr(model, s, None), nn.Sequential)]


@register_adapter("resnet")
class ResNetAdapter(Adapter):
    supports = (
        "torchvision ResNet / ResNeXt / Wide ResNet and timm ResNet (incl. ResNet-D, SE-ResNet, ResNeXt): "
        "stages layer1..layer4 whose blocks after the first share one structure; single-block stages are kept; "
        "also their bodies: torchvision IntermediateLayerGetter (detection / segmentation backbones) and timm "
        "features_only ResNets"
    )
    # rest frozen, no matching, p 0.6 -> 1 at 30%: ahead of the general default on the ResNet dev split
    default_recipe = "resnet"

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return _is_resnet(model) or body_library(model) is not None

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
        # Read the constructor arguments off the predecessor now: the exported stages
        # hold successors and no longer tell the depth-dependent drop-path rates.
        self._recipe = native_recipe(model)
        self._hidden = {s: self.width_of(getattr(model, s)[0]) for s in _stages(model)}  # predecessor widths
        self._library = _library(model)
        if self._library == "torchvision":  # the constructor's width_per_group
            self._base_width = getattr(model, "base_width", None) or _torchvision_kwargs(model)["width_per_group"]
        else:
            first = model.layer1[0]
            self._base_width = _timm_kwargs(model).get("base_width", 64) if hasattr(first, "conv3") else 64
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
        return torch.randn(2, first_conv.in_channels, 32, 32, generator=generator).to(first_conv.weight.device, first_conv.weight.dtype)

    def width_of(self, block: nn.Module) -> Optional[int]:
        """A block's middle channels: Bottleneck conv1 -> conv2 -> conv3 (its width), BasicBlock
        conv1 -> conv2. None for grouped convolutions (ResNeXt) or anti-aliasing on them."""
        chain = _width_chain(block)
        return block.conv1.out_channels if chain else None

    def narrow(self, block: nn.Module, keep: int) -> nn.Module:
        chain = _width_chain(block)
        if chain is None:
            return super().narrow(block, keep)
        return narrow_conv_chain(copy.deepcopy(block), chain, keep)

    def check_successor(self, group_blocks: List[nn.Module], successor: nn.Module) -> Optional[str]:
        # A group's first block is its stage's first block exactly when it is the
        # stage's first group, and that is where a native rebuild puts the stage's
        # downsampling head; every other position holds an ordinary block.
        reason = structure_difference(self.width_reference(group_blocks, successor), successor)
        if reason:
            return (f"the successor is not built like the group's first block ({reason}); a native ResNet puts a "
                    "block like the stage's first (downsampling) block first and ordinary blocks after it")
        return None

    def finalize_export(self, model: nn.Module, depths: dict, native: Optional[bool] = None) -> nn.Module:
        overrides = {} if native is False else self._width_overrides(model)
        return export_native(model, depths, getattr(self, "_recipe", None), self.name, native, lambda m: m, overrides)

    def width_export_problem(self, model: nn.Module, widths: dict) -> Optional[str]:
        if all(w >= 1.0 for w in widths.values()):
            return None
        if not hasattr(model.layer1[0], "conv3"):
            return "a BasicBlock ResNet's constructor has no width setting (torchvision and timm require base width 64)"
        per_stage = {s: widths.get(s, 1.0) for s in _stages(model)}
        if len(set(per_stage.values())) > 1:
            return (f"the stages would have different width fractions {per_stage} (a stage of one block, or one left "
                    "out of successor_width, keeps its width), but the constructor's width_per_group / base_width "
                    "sets one for all")
        return None

    def _width_overrides(self, model: nn.Module) -> dict:
        """Width successors: the constructor's one width setting (torchvision width_per_group, timm
        base_width) that gives every block its exported width, or ExportError saying why none does."""
        hidden = getattr(self, "_hidden", {})
        factors = {(self.width_of(b), hidden.get(s)) for s in _stages(model) for b in getattr(model, s)}
        if all(w == h for w, h in factors):
            return {}
        ratios = {w / h for w, h in factors if w and h}
        base = getattr(self, "_base_width", None)
        new_base = base * ratios.pop() if len(ratios) == 1 and base else None
        if new_base is None or abs(new_base - round(new_base)) > 1e-9:
            raise ExportError(
                "The blocks' widths (middle channels) are not one fraction of the predecessor's in every stage "
                f"(exported / predecessor: {sorted(factors, key=str)}); a ResNet constructor sets them all with one "
                f"width_per_group / base_width. {NATIVE_FALSE}")
        key = "width_per_group" if getattr(self, "_library", _library(model)) == "torchvision" else "base_width"
        if hasattr(model, "base_width"):
            model.base_width = int(round(new_base))  # the copy says what its blocks hold
        return {key: int(round(new_base))}


# ---------------------------------------------------------------- constructor arguments
def _layers(stage_depths: dict, depths: dict) -> List[int]:
    return [depths.get(s, n) for s, n in stage_depths.items()]


def _width_chain(block: nn.Module) -> Optional[list]:
    """(producer, norm, consumer) links of a block's middle channels, or None when they cannot be cut."""
    names = ("conv1", "bn1", "conv2", "bn2", "conv3") if hasattr(block, "conv3") else ("conv1", "bn1", "conv2")
    parts = [getattr(block, n, None) for n in names]
    if not all(isinstance(p, nn.Conv2d) for p in parts[::2]) or not all(isinstance(p, nn.BatchNorm2d) for p in parts[1::2]):
        return None
    if any(p.groups != 1 for p in parts[::2]) or not is_identity(getattr(block, "aa", None)):
        return None
    if len(names) == 5:
        return [("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3")]
    return [("conv1", "bn1", "conv2")]


def _stride(block: nn.Module) -> int:
    return max(m.stride[0] for m in block.modules() if isinstance(m, nn.Conv2d))


def _block_out(block: nn.Module) -> int:
    norms = [m for name, m in block.named_children() if name.startswith("bn")]
    return norms[-1].num_features


def _torchvision_kwargs(model: nn.Module) -> dict:
    """torchvision ResNet(...) arguments read off its blocks (a ResNet or a body that lost its fc)."""
    first = model.layer1[0]
    groups = first.conv2.groups if hasattr(first, "conv3") else 1
    return dict(
        block=type(first), groups=groups,
        # Bottleneck: layer1's width = 64 * width_per_group / 64 * groups; BasicBlock needs 64.
        width_per_group=first.conv1.out_channels // groups if hasattr(first, "conv3") else 64,
        # A stage built with replace_stride_with_dilation starts with a stride-1 block.
        replace_stride_with_dilation=[s in _stages(model) and _stride(getattr(model, s)[0]) == 1 for s in STAGES[1:]],
        norm_layer=type(first.bn1),
    )


def _torchvision_candidates(model: nn.Module):
    stages = {s: len(getattr(model, s)) for s in _stages(model)}
    kwargs, cls = dict(
        _torchvision_kwargs(model), num_classes=model.fc.out_features, groups=model.groups,
        width_per_group=model.base_width, norm_layer=model._norm_layer,
    ), type(model)
    yield (f"{cls.__name__}(block, layers=[...], ...)",
           lambda depths, **over: cls(layers=_layers(stages, depths), **{**kwargs, **over}))


def _all_stages(model: nn.Module) -> dict:
    """Depth per stage for a constructor that always takes four: a body cut after layer3 gets a
    one-block layer4 that the feature extractor drops again."""
    return {s: len(getattr(model, s)) if s in _stages(model) else 1 for s in STAGES}


def _torchvision_body_candidates(body: nn.Module):
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.resnet import ResNet

    kwargs, stages, returned = _torchvision_kwargs(body), _all_stages(body), dict(body.return_layers)
    yield ("IntermediateLayerGetter(ResNet(block, layers=[...], ...), return_layers)",
           lambda depths, **over: IntermediateLayerGetter(ResNet(layers=_layers(stages, depths), **{**kwargs, **over}),
                                                          return_layers=returned))


def _timm_body_candidates(body: nn.Module):
    import timm
    from timm.models._features import FeatureListNet
    from timm.models.resnet import ResNet

    kwargs, stages, cls = _timm_kwargs(body), _all_stages(body), type(body)
    wrap = dict(out_indices=tuple(body.feature_info.out_indices), output_fmt=str(body.output_fmt.value),
                feature_concat=body.concat)
    if not issubclass(cls, FeatureListNet):
        wrap["out_map"] = list(body.return_layers.values())
    arch = (getattr(body, "pretrained_cfg", None) or {}).get("architecture")
    if arch:
        feature_cls = "list" if cls is FeatureListNet else cls
        named = {k: kwargs[k] for k in ("in_chans", "drop_path_rate")}
        yield (f"timm.create_model({arch!r}, features_only=True, layers=[...], ...)",
               lambda depths, **over: timm.create_model(arch, pretrained=False, features_only=True, feature_cls=feature_cls,
                                                        layers=_layers(stages, depths), **wrap, **{**named, **over}))

    def build(depths, **over):
        net = cls(ResNet(layers=_layers(stages, depths), **{**kwargs, **over}), **wrap)
        if hasattr(body, "in_chans"):
            net.in_chans = body.in_chans  # what timm's builder records on a feature model
        return net
    yield f"{cls.__name__}(ResNet(block, layers=[...], ...), out_indices=...)", build


def _timm_kwargs(model: nn.Module) -> dict:
    first, last = model.layer1[0], getattr(model, _stages(model)[-1])[-1]
    channels = tuple(_block_out(getattr(model, s)[0]) // type(first).expansion for s in _stages(model))
    deep = isinstance(model.conv1, nn.Sequential)  # stem_type 'deep' / 'deep_tiered': three 3x3 convolutions
    downsample = getattr(model.layer2[0], "downsample", None)
    kwargs = dict(  # a features_only body has no head: its settings stay at the defaults
        block=type(first), num_classes=getattr(model, "num_classes", 1000), in_chans=model.conv1.in_channels
        if isinstance(model.conv1, nn.Conv2d) else model.conv1[0].in_channels, drop_rate=getattr(model, "drop_rate", 0.0),
        global_pool=getattr(getattr(model, "global_pool", None), "pool_type", "avg") or "", channels=channels,
        cardinality=first.conv2.groups if hasattr(first, "conv3") else 1,
        stem_width=model.conv1[3].out_channels if deep else 64,
        stem_type=("deep_tiered" if model.conv1[0].out_channels != model.conv1[3].out_channels else "deep") if deep else "",
        replace_stem_pool=isinstance(model.maxpool, nn.Sequential),
        avg_down=isinstance(downsample, nn.Sequential) and isinstance(downsample[0], nn.AvgPool2d),
        # timm spreads drop-path rates linearly over all blocks, ending at drop_path_rate.
        drop_path_rate=getattr(getattr(last, "drop_path", None), "drop_prob", 0.0),
    )
    if hasattr(first, "conv3"):  # Bottleneck: width = planes * base_width / 64 * cardinality
        kwargs["base_width"] = first.conv1.out_channels * 64 // (kwargs["cardinality"] * channels[0])
    return kwargs


def _timm_candidates(model: nn.Module):
    import timm

    kwargs, cls, stages = _timm_kwargs(model), type(model), {s: len(getattr(model, s)) for s in _stages(model)}
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch:
        # A registered name carries the arguments that are not read back (block_args, aa_layer, ...).
        named = {k: kwargs[k] for k in ("num_classes", "in_chans", "drop_rate", "global_pool", "drop_path_rate")}
        yield (f"timm.create_model({arch!r}, layers=[...], ...)",
               lambda depths, **over: timm.create_model(arch, pretrained=False, layers=_layers(stages, depths), **{**named, **over}))
    yield (f"{cls.__name__}(block, layers=[...], ...)",
           lambda depths, **over: cls(layers=_layers(stages, depths), **{**kwargs, **over}))


def native_recipe(model: nn.Module) -> Recipe:
    """The constructor call that rebuilds `model`, read off it now and checked at first use."""
    body = body_library(model)
    if body is not None:
        candidates = _torchvision_body_candidates if body == "torchvision" else _timm_body_candidates
    else:
        candidates = _torchvision_candidates if _library(model) == "torchvision" else _timm_candidates
    return read_recipe(model, {s: len(getattr(model, s)) for s in _stages(model)}, lambda: candidates(model))
