"""Any Hugging Face transformers model with one stack of repeated layers.

Claims every ``transformers.PreTrainedModel`` that no more specific adapter
(bert) claims: decoder LLMs (Llama, Qwen2, Mistral, GPT-2, OPT, ...), encoders
(DistilBERT, ...) and vision transformers (HF ViT, ...). The layer stack is
found from the model's own metadata, not from attribute names:

* the layer class: ``_no_split_modules`` (the classes accelerate never cuts);
* the depth: ``config.num_hidden_layers`` (``n_layer``, ``n_layers``, ... through
  the config's ``attribute_map``);
* the stack: the one ``nn.ModuleList`` holding that many layers of that class.

Models where this is ambiguous (encoder-decoders: two stacks) or where layers
cannot run in a chain (each layer gets arguments the previous layer computed,
like T5's position bias) are refused with an `AdapterError` naming what was
found; ``adapter="generic", container=...`` remains for those.

Export builds the model natively: the config is updated for the new depth, the
model's class is constructed from it and loads the exported tensors strictly,
so ``save_pretrained`` -> ``from_pretrained`` gives the same model, and
``layer_idx`` (used by the KV cache in ``generate()``) runs 0..depth-1.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from theseus_general.adapter import Adapter
from theseus_general.errors import AdapterError
from theseus_general.graph import run_model
from theseus_general.registry import register_adapter
from theseus_general.errors import ExportError
from theseus_general.width import narrow_linear_pair

from ._hf_common import (depth_field, is_pretrained_model, layer_class_names, layer_index, native_config,
                         per_layer_lists, rebuild_native, sample_for, stage_config)
from ._structure import first_mismatch, structure_difference

_GENERIC = "Use adapter='generic', container='path.to.layers' to name the layers to compress."


def find_layer_stack(model: nn.Module) -> str:
    """The dotted path of the ModuleList holding config.num_hidden_layers layers of the
    model's ``_no_split_modules`` class. Raises AdapterError saying what was found otherwise."""
    name = type(model).__name__
    config = model.config
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_decoder") and hasattr(model, "get_encoder") \
            and model.get_encoder() is not model.get_decoder() and model.get_decoder() is not None:
        raise AdapterError(
            f"{name} is an encoder-decoder model; the hf adapter compresses a single layer stack. "
            f"{_GENERIC} Name the encoder's or the decoder's layers, or both as a list; export(native=False) "
            "then gives the model, whose config you update yourself."
        )
    classes = layer_class_names(model)
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int):
        raise AdapterError(f"{name}'s config has no layer count (config.num_hidden_layers={depth!r}). {_GENERIC}")
    lists = [(path, m) for path, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    stacks = [(p, m) for p, m in lists if len(m) == depth and len({type(b) for b in m}) == 1]
    # The layer class the model declares decides; a model that declares none (DistilBERT) is
    # taken when exactly one ModuleList holds `depth` layers of one class.
    found = [p for p, m in stacks if type(m[0]).__name__ in classes] if classes else [p for p, _ in stacks]
    seen = "; ".join(f"{p}: {len(m)} x {'/'.join(sorted({type(b).__name__ for b in m}))}" for p, m in lists[:8]) or "none"
    if not found:
        raise AdapterError(
            f"No nn.ModuleList of {name} holds config.{depth_field(config)}={depth} layers of one class"
            f"{f' in its _no_split_modules {classes}' if classes else ''}. ModuleLists found: {seen}. {_GENERIC}"
        )
    if len(found) > 1:
        raise AdapterError(
            f"{name} has {len(found)} ModuleLists of {depth} layers{f' of {classes}' if classes else ''}: {found}; "
            f"which one to compress is ambiguous. {_GENERIC}"
        )
    layers = list(model.get_submodule(found[0]))
    odd = first_mismatch(layers[1:]) if len(layers) > 2 else None
    if odd is not None:
        # Layer 0 may hold something the others share (T5's position bias table); after it, a
        # stack that a depth=n constructor can rebuild has layers of one structure.
        raise AdapterError(
            f"The layers of {name} ({found[0]}) are not alike: layer {odd + 1} differs from layer 1 "
            f"({structure_difference(layers[1], layers[odd + 1])}), as in a model of stages of different widths "
            f"(Swin, ConvNeXt). {_GENERIC[:-1]}, e.g. one stage's blocks."
        )
    return found[0]


def find_stages(model: nn.Module) -> Optional[Dict[str, int]]:
    """For a model of stages whose config lists the blocks per stage (``config.depths``: Swin,
    ConvNeXt, ...): stage block list path -> stage index, for the ModuleLists of one block class
    whose lengths, in order, are config.depths. None for other models."""
    depths = getattr(model.config, "depths", None)
    if not isinstance(depths, (list, tuple)) or not depths or not all(isinstance(d, int) for d in depths):
        return None
    by_class: Dict[type, List[str]] = {}
    for path, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1:
            by_class.setdefault(type(m[0]), []).append(path)
    for paths in by_class.values():
        if [len(model.get_submodule(p)) for p in paths] == list(depths):
            return {p: i for i, p in enumerate(paths)}
    return None


def _mlp_linears(block: nn.Module) -> Optional[tuple]:
    """(input Linear paths, output Linear path) of a layer's simple MLP, or None."""
    def linear(path: str) -> bool:
        try:
            return type(block.get_submodule(path)) is nn.Linear
        except AttributeError:
            return False
    if all(linear(p) for p in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")):
        return ["mlp.gate_proj", "mlp.up_proj"], "mlp.down_proj"
    if all(linear(p) for p in ("intermediate.dense", "output.dense")):
        return ["intermediate.dense"], "output.dense"
    return None


def _chain_difference(model: nn.Module, layers: nn.ModuleList, sample: Any) -> Optional[str]:
    """Why the layers cannot run as a chain, or None. A group runs its layers one after the
    other, passing on the hidden state and giving each the same other arguments as the first;
    that is only right when the model itself gives every layer the same other arguments."""
    calls: List[tuple] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}))

    hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            run_model(model, sample)
    except Exception:  # the check cannot run; the engine's own validation then reports the bad sample
        return None
    finally:
        for h in hooks:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    if len(calls) != len(layers):
        return f"the sample ran {len(calls)} layer calls for {len(layers)} layers"
    (args0, kwargs0) = calls[0]
    positional = [p for p in inspect.signature(layers[0].forward).parameters][1:]  # after the hidden state
    for i, (args, kwargs) in enumerate(calls[1:], start=1):
        names = [positional[j] if j < len(positional) else f"positional argument {j + 1}"
                 for j in range(max(len(args), len(args0)))
                 if not _same(args[j] if j < len(args) else None, args0[j] if j < len(args0) else None)]
        names += [f"{k}=" for k in sorted(set(kwargs) | set(kwargs0)) if not _same(kwargs.get(k), kwargs0.get(k))]
        if names:
            return f"layer {i} receives {', '.join(names)} different from layer 0 (computed by the model per layer)"
    return None


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (torch.Tensor, tuple, list)) or isinstance(b, (torch.Tensor, tuple, list)):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


@register_adapter("hf")
class HfAdapter(Adapter):
    supports = (
        "any Hugging Face transformers PreTrainedModel with one stack of config.num_hidden_layers layers of its "
        "_no_split_modules class (Llama, Qwen2, Mistral, GPT-2, OPT, DistilBERT, ViT, ...)"
    )

    def __init__(self):
        super().__init__()
        self._paths: List[str] = []
        self._stages: Optional[Dict[str, int]] = None  # stage block list -> index in config.depths

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_pretrained_model(model)

    def check(self, model: nn.Module) -> None:
        super().check(model)
        self._stages = find_stages(model)
        # Blocks of stage models alternate behaviour by position (Swin's shifted windows): a budget
        # plan's successor k must start as block k for the native model to compute the same.
        self.budget_init = "first" if self._stages is not None else "kept"
        if self._stages is not None:
            self._paths = [p for p in self._stages if len(model.get_submodule(p)) >= 2]
            if not self._paths:
                raise AdapterError(f"Every stage of this {type(model).__name__} has a single block "
                                   f"(config.depths={list(model.config.depths)}); there is nothing to merge.")
            return
        self._paths = [find_layer_stack(model)]
        for name, values in per_layer_lists(model.config, model.config.num_hidden_layers).items():
            if len(set(map(repr, values))) > 1:
                # A group runs all its layers with the mask and settings the model prepares for
                # the group's position; layers of another type would compute something else.
                raise AdapterError(
                    f"The layers of {type(model).__name__} differ in config.{name} ({values}); a group mixing them "
                    "would run a layer with another layer's attention mask. Models with mixed layer types (sliding "
                    "and full attention, Gemma-2/3 style) are not supported by the hf adapter yet."
                )

    def containers(self, model: nn.Module, sample: Optional[Any] = None) -> List[str]:
        if not self._paths:
            self.check(model)
        sample = sample if sample is not None else self.sample_input(model)
        for path in self._paths if sample is not None else []:
            reason = _chain_difference(model, model.get_submodule(path), sample)
            if reason:
                raise AdapterError(
                    f"The layers of {type(model).__name__} ({path}) cannot be grouped: {reason}. A group runs its "
                    "layers in a chain and gives each the first layer's other arguments, which would change what "
                    "this model computes (the generic route would run them the same way). Such models are not "
                    "supported."
                )
        return list(self._paths)

    def sample_input(self, model: nn.Module) -> Optional[Any]:
        return sample_for(model)

    def width_of(self, block: nn.Module) -> Optional[int]:
        """A layer's MLP hidden size (config.intermediate_size) for the simple MLPs: gated
        ``mlp.gate_proj``/``mlp.up_proj`` -> ``mlp.down_proj`` (Llama, Qwen2, Mistral) and
        ``intermediate.dense`` -> ``output.dense`` (HF ViT). None for others."""
        found = _mlp_linears(block)
        return block.get_submodule(found[0][0]).out_features if found else None

    def narrow(self, block: nn.Module, keep: int) -> nn.Module:
        found = _mlp_linears(block)
        if found is None:
            return super().narrow(block, keep)
        inputs, output = found
        return narrow_linear_pair(copy.deepcopy(block), inputs, output, keep, sizes=["mlp.intermediate_size"])

    def check_successor(self, group_blocks: List[nn.Module], successor: nn.Module) -> Optional[str]:
        reason = structure_difference(self.width_reference(group_blocks, successor), successor)
        if reason:
            return (f"the successor is not built like the group's first layer ({reason}), so the model's own "
                    "class at the new depth cannot hold it")
        return None

    def prepare_successor(self, group_blocks: List[nn.Module], successor: nn.Module) -> None:
        """Give the successor its group's first layer index (``layer_idx``, the KV-cache slot).
        A copy of layer k keeps index k, which another group's predecessor layer k also writes
        in the same training forward when use_cache is on; the group's first index is used by
        no other group. Export renumbers layers 0..depth-1 by construction."""
        first = layer_index(group_blocks[0])
        if first is not None:
            for module in successor.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = first

    def finalize_export(self, model: nn.Module, depths: dict, native: Optional[bool] = True) -> nn.Module:
        if native is False:  # the shortened copy as it is; its config still describes the old depth
            return model
        if self._stages is not None:
            stage_depths = {self._stages[path]: depth for path, depth in depths.items()}
            return rebuild_native(model, lambda m: stage_config(m, stage_depths), self.sample_input(model))
        ((path, _),) = depths.items()
        widths = sorted({self.width_of(layer) for layer in model.get_submodule(path)}, key=str)
        if len(widths) > 1:
            raise ExportError(f"The successor layers have different MLP widths {widths}, which one "
                              "config.intermediate_size cannot describe. Use export(native=False) to get the "
                              "shortened model as it is.")

        def config_for(m: nn.Module):
            config = native_config(m, list(m.get_submodule(path)))
            if widths[0] is not None and getattr(config, "intermediate_size", None) not in (None, widths[0]):
                config.intermediate_size = widths[0]  # width successors
            return config
        return rebuild_native(model, config_for, self.sample_input(model))
