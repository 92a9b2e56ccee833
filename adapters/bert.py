"""BERT-style encoders from Hugging Face transformers.

Supports any `PreTrainedModel` whose base model has ``encoder.layer`` as an
``nn.ModuleList`` of layers and whose config has ``num_hidden_layers``:
`BertModel` and every `BertFor*` head, and encoders built the same way
(RoBERTa, XLM-RoBERTa, ELECTRA, CamemBERT, ...). Native export builds the
model's own class from a copy of its config with ``num_hidden_layers`` set to
the successor depth (``type(model)(config)``) and loads the trained state into
it strictly, in the exported model's dtype and device: ``layer_idx`` and
per-layer config lists are then those of a model built at that depth, and
``save_pretrained`` output loads with plain transformers.
"""

from __future__ import annotations

import copy
from typing import Any, List, Optional

from torch import nn

from theseus_general.adapter import Adapter
from theseus_general.errors import AdapterError, ExportError
from theseus_general.registry import register_adapter

from theseus_general.width import narrow_linear_pair

from ._hf_common import is_pretrained_model, sample_for
from ._native import NATIVE_FALSE, Recipe, export_native


def _encoder_layers(model: nn.Module) -> Optional[nn.ModuleList]:
    base = getattr(model, "base_model", None)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    return layers if isinstance(layers, nn.ModuleList) else None


@register_adapter("bert")
class BertAdapter(Adapter):
    supports = (
        "Hugging Face BertModel, BertFor* and encoders built the same way (RoBERTa, ELECTRA, ...): "
        "a PreTrainedModel whose base model has encoder.layer (nn.ModuleList) and config.num_hidden_layers"
    )

    default_recipe = "bert"  # the default with a short mixed phase for a start that disagrees (issue 26, round 10)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        if not is_pretrained_model(model):
            return False
        return _encoder_layers(model) is not None and hasattr(getattr(model, "config", None), "num_hidden_layers")

    def check(self, model: nn.Module) -> None:
        super().check(model)
        if getattr(model.config, "is_encoder_decoder", False):
            raise AdapterError("The bert adapter does not support encoder-decoder models; use adapter='generic'.")

    def containers(self, model: nn.Module, sample: Optional[Any] = None) -> List[str]:
        layers = _encoder_layers(model)
        for path, module in model.named_modules():
            if module is layers:
                return [path]
        raise AdapterError("Could not locate base_model.encoder.layer inside the model.")  # pragma: no cover

    def sample_input(self, model: nn.Module) -> Optional[Any]:
        return sample_for(model)  # token ids and an attention mask

    def width_of(self, block: nn.Module) -> Optional[int]:
        """A layer's MLP hidden size (config.intermediate_size): intermediate.dense -> output.dense."""
        dense_in = getattr(getattr(block, "intermediate", None), "dense", None)
        dense_out = getattr(getattr(block, "output", None), "dense", None)
        if type(dense_in) is nn.Linear and type(dense_out) is nn.Linear and dense_in.out_features == dense_out.in_features:
            return dense_in.out_features
        return None

    def narrow(self, block: nn.Module, keep: int) -> nn.Module:
        if self.width_of(block) is None:
            return super().narrow(block, keep)
        return narrow_linear_pair(copy.deepcopy(block), ["intermediate.dense"], "output.dense", keep)

    def check_successor(self, group_blocks: List[nn.Module], successor: nn.Module) -> Optional[str]:
        reference = self.width_reference(group_blocks, successor)
        if type(successor) is not type(reference):
            return (f"the successor is a {type(successor).__name__}, not a {type(reference).__name__}, "
                    "so config.num_hidden_layers cannot describe the exported model")
        ours, theirs = successor.state_dict(), reference.state_dict()
        if {k: tuple(v.shape) for k, v in ours.items()} != {k: tuple(v.shape) for k, v in theirs.items()}:
            return "the successor's weights differ in shape from a layer of this config"
        return None

    def finalize_export(self, model: nn.Module, depths: dict, native: Optional[bool] = None) -> nn.Module:
        (depth,) = depths.values()
        widths = sorted({self.width_of(layer) for layer in _encoder_layers(model)}, key=str)
        width = widths[0] if len(widths) == 1 else None
        if len(widths) > 1 and native is not False:
            raise ExportError(f"The successor layers have different MLP widths {widths}, which one "
                              f"config.intermediate_size cannot describe. {NATIVE_FALSE}")
        reason = _per_layer_settings(model.config)
        described = f"num_hidden_layers={depth}" + (f", intermediate_size={width}"
                                                    if width not in (None, model.config.intermediate_size) else "")
        recipe = Recipe([], error=reason) if reason else Recipe.trusted(
            f"{type(model).__name__}(config) with {described}", lambda d: _build_at_depth(model, depth, width))
        return export_native(model, depths, recipe, self.name, native, lambda m: _patch_copy(m, depth, width))


def _depth_config(config, depth: int, width: Optional[int] = None):
    config = copy.deepcopy(config)
    config.num_hidden_layers = depth
    if width is not None and hasattr(config, "intermediate_size"):
        config.intermediate_size = width  # width successors: the layers' MLP hidden size
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list):
        config.layer_types = layer_types[:depth]
    return config


def _build_at_depth(model: nn.Module, depth: int, width: Optional[int] = None) -> nn.Module:
    # The model's own class from its own config: layer_idx, per-layer lists and
    # everything else the constructor derives from num_hidden_layers come out right.
    return type(model)(_depth_config(model.config, depth, width))


def _per_layer_settings(config) -> Optional[str]:
    """Why a per-layer config list cannot be cut to the new depth, or None."""
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(set(layer_types)) > 1:
        return (f"config.layer_types mixes {sorted(set(layer_types))}; which type each successor layer should have "
                "is not recorded in its weights")
    return None


def _patch_copy(model: nn.Module, depth: int, width: Optional[int] = None) -> nn.Module:
    """The copy route (export(native=False)): keep the modules, make the config and indices agree."""
    model.config = _depth_config(model.config, depth, width)
    # Layers keep the index they had in the predecessor; renumber them so that
    # caches and anything keyed by layer index see 0..depth-1.
    for new_index, layer in enumerate(_encoder_layers(model)):
        for module in layer.modules():
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = new_index
    return model
