"""Vision Transformers from timm and torchvision.

Supports timm's ``VisionTransformer`` (and the DeiT / distilled variants timm
builds from it; blocks in ``blocks``) and torchvision's ``VisionTransformer``
(blocks in ``encoder.layers``). Native export builds the model again with its
library's constructor at the new depth and loads the trained state strictly:
``timm.create_model(name, depth=n, ...)`` (or ``VisionTransformer(depth=n, ...)``
for a model built without a name) for timm, ``VisionTransformer(num_layers=n,
...)`` for torchvision. The constructor arguments are read off the predecessor
when the plan is made and trusted only if they rebuild it exactly (same modules,
settings and weight shapes), so the drop-path schedule and ``feature_info`` are
those of a model built at the new depth. What cannot be read back (a timm ViT
with a custom block, a torchvision ViT with a convolutional stem, ...) raises
ExportError naming it at export(); export(native=False) then gives the copy.

Other ViT-like classes are not claimed here: Hugging Face ViT goes to the hf adapter;
timm's Eva, BEiT and Swin to adapter='generic' with container=....
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
from theseus_general.width import narrow_linear_pair

from ._native import NATIVE_FALSE, Recipe, export_native, is_identity, read_recipe
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
        # Read the constructor arguments off the predecessor now: the exported model's
        # blocks are successors and no longer tell the depth-dependent rates.
        self._recipe = native_recipe(model)
        self._hidden = self.width_of(model.get_submodule(_PATHS[_family(model)])[0])  # the predecessor's MLP width
        return [_PATHS[_family(model)]]

    def sample_input(self, model: nn.Module) -> Optional[Any]:
        like = next(model.parameters())  # the sample takes the model's device and dtype
        if _family(model) == "torchvision":
            stem = next(m for m in model.conv_proj.modules() if isinstance(m, nn.Conv2d))  # a Conv2d or a conv stem
            size, channels = (model.image_size, model.image_size), stem.in_channels
        else:
            size = getattr(model.patch_embed, "img_size", None)
            proj = getattr(model.patch_embed, "proj", None)
            if size is None or not isinstance(proj, nn.Conv2d):
                return None  # dynamic size or a hybrid stem: the caller's sample= is needed
            channels = proj.in_channels
        generator = torch.Generator().manual_seed(0)
        return torch.randn(2, channels, *size, generator=generator).to(like.device, like.dtype)

    def width_of(self, block: nn.Module) -> Optional[int]:
        """A block's MLP hidden size: timm ``mlp.fc1`` -> ``mlp.fc2`` (a plain Mlp without a hidden
        norm), torchvision ``mlp[0]`` -> ``mlp[3]``."""
        pair = _mlp_pair(block)
        return block.get_submodule(pair[0]).out_features if pair else None

    def narrow(self, block: nn.Module, keep: int) -> nn.Module:
        pair = _mlp_pair(block)
        if pair is None:
            return super().narrow(block, keep)
        return narrow_linear_pair(copy.deepcopy(block), [pair[0]], pair[1], keep)

    def check_successor(self, group_blocks: List[nn.Module], successor: nn.Module) -> Optional[str]:
        reason = structure_difference(self.width_reference(group_blocks, successor), successor)
        if reason:
            return f"the successor is not built like a block of this model ({reason}), so no depth=n constructor rebuilds it"
        return None

    def finalize_export(self, model: nn.Module, depths: dict, native: Optional[bool] = None) -> nn.Module:
        family, (path,) = _family(model), depths
        widths = sorted({self.width_of(b) for b in model.get_submodule(path)}, key=str)
        overrides = {}
        if len(widths) > 1:
            if native is not False:
                raise ExportError(f"The successor blocks have different MLP widths {widths}; the {family} "
                                  f"VisionTransformer constructor builds every block with one. {NATIVE_FALSE}")
        elif family == "timm" and widths[0] is not None and widths[0] != getattr(self, "_hidden", widths[0]):
            overrides["mlp_ratio"] = widths[0] / model.embed_dim
        elif family == "torchvision" and widths[0] is not None and widths[0] != model.mlp_dim:
            model.mlp_dim = overrides["mlp_dim"] = widths[0]  # the copy says what its blocks hold
        return export_native(model, depths, getattr(self, "_recipe", None), self.name, native, _patch_copy, overrides)


def _mlp_pair(block: nn.Module) -> Optional[tuple]:
    mlp = getattr(block, "mlp", None)
    if mlp is None:
        return None
    if type(mlp).__name__ == "Mlp" and type(getattr(mlp, "fc1", None)) is nn.Linear and is_identity(getattr(mlp, "norm", None)):
        return "mlp.fc1", "mlp.fc2"
    if type(mlp).__name__ == "MLPBlock" and len(mlp) == 5 and type(mlp[0]) is nn.Linear and type(mlp[3]) is nn.Linear:
        return "mlp.0", "mlp.3"
    return None


def _patch_copy(model: nn.Module) -> nn.Module:
    """The copy route (export(native=False)): timm keeps one feature_info entry per block."""
    feature_info = getattr(model, "feature_info", None)
    if _family(model) == "timm" and isinstance(feature_info, list):
        model.feature_info = [dict(info, module=f"blocks.{i}") for i, info in enumerate(feature_info[:len(model.blocks)])]
    return model


# ---------------------------------------------------------------- constructor arguments
def _timm_kwargs(model: nn.Module) -> dict:
    """timm VisionTransformer(...) arguments read off a built model (the depth is set by the recipe)."""
    block, patch = model.blocks[0], model.patch_embed
    attn, mlp = block.attn, block.mlp
    last_drop_path = model.blocks[-1].drop_path1
    kwargs = dict(
        img_size=patch.img_size, patch_size=patch.patch_size, in_chans=patch.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=model.embed_dim,
        num_heads=attn.num_heads, qkv_bias=attn.qkv.bias is not None, qk_norm=not is_identity(attn.q_norm),
        scale_attn_norm=not is_identity(getattr(attn, "norm", None)), proj_bias=attn.proj.bias is not None,
        init_values=None if is_identity(block.ls1) else getattr(block.ls1, "init_values", 1.0),
        class_token=model.has_class_token, pos_embed="learn" if model.pos_embed is not None else "none",
        no_embed_class=model.no_embed_class, reg_tokens=model.num_reg_tokens, pre_norm=not is_identity(model.norm_pre),
        final_norm=not (is_identity(model.norm) and is_identity(model.fc_norm)), fc_norm=not is_identity(model.fc_norm),
        pool_include_prefix=model.pool_include_prefix, dynamic_img_size=model.dynamic_img_size,
        dynamic_img_pad=patch.dynamic_img_pad, drop_rate=model.head_drop.p, pos_drop_rate=model.pos_drop.p,
        patch_drop_rate=getattr(model.patch_drop, "prob", 0.0), proj_drop_rate=attn.proj_drop.p,
        attn_drop_rate=attn.attn_drop.p,
        # timm spreads drop-path rates linearly from 0 to drop_path_rate over the blocks.
        drop_path_rate=getattr(last_drop_path, "drop_prob", 0.0),
    )
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and type(mlp).__name__ == "Mlp":
        kwargs["mlp_ratio"] = mlp.fc1.out_features / model.embed_dim
        kwargs["scale_mlp_norm"] = not is_identity(getattr(mlp, "norm", None))
    return kwargs


def _timm_candidates(model: nn.Module):
    import timm

    kwargs, cls = _timm_kwargs(model), type(model)
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if arch:
        yield (f"timm.create_model({arch!r}, depth=n, ...)",
               lambda depths, **over: timm.create_model(arch, pretrained=False, depth=depths["blocks"], **{**kwargs, **over}))
    yield f"{cls.__name__}(depth=n, ...)", lambda depths, **over: cls(depth=depths["blocks"], **{**kwargs, **over})


def _torchvision_candidates(model: nn.Module):
    if not isinstance(model.conv_proj, nn.Conv2d):
        raise ExportError("a convolutional stem (conv_stem_configs) is not recorded on the model")
    kwargs, cls = dict(
        image_size=model.image_size, patch_size=model.patch_size, num_heads=model.encoder.layers[0].num_heads,
        hidden_dim=model.hidden_dim, mlp_dim=model.mlp_dim, dropout=model.dropout,
        attention_dropout=model.attention_dropout, num_classes=model.num_classes,
        representation_size=model.representation_size, norm_layer=model.norm_layer,
    ), type(model)
    yield (f"{cls.__name__}(num_layers=n, ...)",
           lambda depths, **over: cls(num_layers=depths["encoder.layers"], **{**kwargs, **over}))


def native_recipe(model: nn.Module) -> Recipe:
    """The constructor call that rebuilds `model`, read off it now and checked at first use."""
    family = _family(model)
    path = _PATHS[family]
    candidates = _timm_candidates if family == "timm" else _torchvision_candidates
    return read_recipe(model, {path: len(model.get_submodule(path))}, lambda: candidates(model))
