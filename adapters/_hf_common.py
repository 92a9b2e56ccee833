"""Native rebuild of a shortened Hugging Face transformers model.

Shared by the adapters that compress one layer stack of a `PreTrainedModel`
(the hf adapter, and the generic route when it is given a transformers model).
`rebuild_native` turns the engine's exported model (the predecessor's class
with a shorter ``nn.ModuleList``, but the predecessor's config) into what
``from_pretrained`` would build: the config is updated for the new depth
(``num_hidden_layers`` under whatever name the model stores it, per-layer lists
such as ``layer_types``), ``type(model)(config)`` is constructed, and the
exported tensors are loaded into it strictly. Stage models (Swin) get their
per-stage ``depths`` list updated instead. Everything the constructor derives
from the depth (``layer_idx`` used by the KV cache, per-layer attention types)
is then right by construction. Whatever cannot be described that way raises
`ExportError` with the reason.

transformers is never imported here: a `PreTrainedModel` exists only once it is.
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from theseus_general.errors import ExportError
from theseus_general.graph import first_tensor, run_model

NATIVE_FALSE = "Use export(native=False) to get the shortened model as it is, without a config that describes it."


def is_pretrained_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # a transformers model means it is imported
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def depth_field(config: Any) -> str:
    """The name under which `config` stores its layer count (``n_layer`` for GPT-2, ``n_layers``
    for DistilBERT, ``num_layers`` for T5); ``num_hidden_layers`` reads it through attribute_map."""
    return getattr(config, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")


def layer_class_names(model: nn.Module) -> List[str]:
    """The model's own name for its repeated layer: ``_no_split_modules`` (the classes that
    accelerate must not cut across devices), on the model or its base model."""
    base = getattr(model, "base_model", None)
    names = getattr(model, "_no_split_modules", None) or getattr(base, "_no_split_modules", None)
    return list(names or [])


def per_layer_lists(config: Any, depth: int) -> Dict[str, list]:
    """Config lists with one entry per layer: fields named like ``*layer*`` (``layer_types``,
    ``mlp_layer_types``, ``layers_block_type``) whose length is the layer count."""
    found = {}
    for name in list(vars(config)):
        value = getattr(config, name, None)
        if "layer" in name and isinstance(value, (list, tuple)) and len(value) == depth:
            found[name] = list(value)
    return found


def layer_index(layer: nn.Module) -> Optional[int]:
    """The layer's ``layer_idx`` (its KV-cache slot; a successor copied from predecessor layer k
    keeps k), or None when the layer records none or several."""
    indices = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
    return indices.pop() if len(indices) == 1 else None


def stage_config(model: nn.Module, stage_depths: Dict[int, int]) -> Any:
    """A copy of model.config whose per-stage ``depths`` list (Swin, ConvNeXt, ...) has the new
    block counts: `stage_depths` maps stage index -> exported depth."""
    new = copy.deepcopy(model.config)
    depths = list(model.config.depths)
    for index, depth in stage_depths.items():
        depths[index] = depth
    new.depths = tuple(depths) if isinstance(model.config.depths, tuple) else depths
    return new


def native_config(model: nn.Module, layers: Sequence[nn.Module]) -> Any:
    """A copy of model.config describing `layers` (the exported stack) instead of the predecessor's."""
    config = model.config
    old_depth, depth = int(config.num_hidden_layers), len(layers)
    new = copy.deepcopy(config)
    setattr(new, depth_field(config), depth)
    for name, values in per_layer_lists(config, old_depth).items():
        kept = values[:depth]
        if len(set(map(repr, values))) > 1:
            # A native model puts a layer of type values[k] at position k; a successor built
            # from another position's layer would run as a different type after reloading.
            for k, layer in enumerate(layers):
                source = layer_index(layer)
                if source is None or repr(values[source]) != repr(values[k]):
                    what = "does not record which layer it was copied from" if source is None else \
                        f"was copied from layer {source} ({values[source]!r})"
                    raise ExportError(
                        f"config.{name} differs between layers ({values}); exported layer {k} {what}, but a native "
                        f"{type(model).__name__} puts a {values[k]!r} layer at position {k}. Use init='first' (successor "
                        f"k starts as layer k), or {NATIVE_FALSE[0].lower() + NATIVE_FALSE[1:]}"
                    )
        setattr(new, name, tuple(kept) if isinstance(getattr(config, name), tuple) else kept)
    return new


def _quant_method(model: nn.Module) -> Optional[str]:
    """The quantization method transformers loaded the model with ("gguf", "bitsandbytes", ...), or None."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return None
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", "unknown")
    return str(getattr(method, "value", method))


def _tied_groups(model: nn.Module) -> List[List[str]]:
    """Names of parameters that are one tensor (tied embeddings), in groups."""
    by_id: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def build_on_meta(cls: type, config: Any) -> nn.Module:
    """What from_pretrained would construct from `config`, without memory or random init."""
    with torch.device("meta"):
        return cls(config)


def state_difference(native: nn.Module, model: nn.Module) -> Optional[str]:
    """Why `native`'s state dict (names and shapes) cannot hold `model`'s exactly, or None."""
    reference, ours = native.state_dict(), model.state_dict()
    missing, unexpected = sorted(set(reference) - set(ours)), sorted(set(ours) - set(reference))
    if missing or unexpected:
        return (f"the config's model has {len(reference)} tensors, the export {len(ours)} (missing from the "
                f"export: {missing[:3]}; not in the config's model: {unexpected[:3]})")
    shapes = [k for k in ours if tuple(ours[k].shape) != tuple(reference[k].shape)]
    return f"tensor shapes differ ({shapes[:3]})" if shapes else None


def rebuild_native(model: nn.Module, config_for: Callable[[nn.Module], Any], sample: Any = None) -> nn.Module:
    """`model` (exported: its layer stack already shortened) rebuilt as the model from_pretrained
    would give after save_pretrained: same class, the config ``config_for(model)`` (updated for
    the new depth), the exported tensors themselves (no copy; dtypes and devices kept), eval
    mode. With `sample`, both must compute the same on it."""
    name = type(model).__name__
    quant = _quant_method(model)
    gguf = quant == "gguf"  # transformers dequantizes GGUF files to float tensors on load
    if quant is not None and not gguf:
        raise ExportError(f"This {name} is quantized ({quant}); a native model cannot be rebuilt from "
                          "its quantized tensors. Compress the model in a float dtype. " + NATIVE_FALSE)
    if getattr(model.config, "is_heterogeneous", False):
        raise ExportError(
            f"This {name} has a heterogeneous config (per_layer_config: layers differ in their settings), and which "
            "settings each successor layer should get cannot be described natively. " + NATIVE_FALSE
        )
    config = config_for(model)
    if gguf and hasattr(config, "quantization_config"):
        del config.quantization_config  # the tensors are plain floats: save_pretrained writes safetensors
    try:
        native = build_on_meta(type(model), config)
    except Exception as error:  # the family's constructor refuses the new config
        raise ExportError(f"{name}(config) fails for the exported depth ({type(error).__name__}: {error}). "
                          + NATIVE_FALSE) from error
    reason = state_difference(native, model)
    if reason:
        raise ExportError(f"The exported model does not fit a {name} built natively at its depth: {reason}. "
                          + NATIVE_FALSE)

    tied = _tied_groups(native)
    state = model.state_dict(keep_vars=True)  # the Parameters themselves, so that ties stay ties
    for names in tied:
        first = state[names[0]]
        for name in names[1:]:
            if state[name] is not first and not torch.equal(state[name], first):
                raise ExportError(
                    f"{names[0]} and {name} are one tied tensor in a native {type(model).__name__} "
                    f"(config.tie_word_embeddings), but differ in the export; save_pretrained would keep only one. "
                    "Untie them in the config before compressing, or " + NATIVE_FALSE[0].lower() + NATIVE_FALSE[1:]
                )
            state[name] = first
    native.load_state_dict(state, strict=True, assign=True)
    # Buffers outside the state dict (rotary inv_freq, causal masks) are derived, not trained:
    # take the exported ones, already on the right device and dtype.
    exported_buffers = dict(model.named_buffers())
    for name, buffer in list(native.named_buffers()):
        owner_name, _, leaf = name.rpartition(".")
        owner = native.get_submodule(owner_name)
        if name in exported_buffers and exported_buffers[name].shape == buffer.shape:
            owner._buffers[leaf] = exported_buffers[name]
        elif buffer.is_meta:
            raise ExportError(f"The natively built {type(model).__name__} has a buffer {name} the export lacks. "
                              + NATIVE_FALSE)
    for param in native.parameters():
        param.requires_grad_(True)
    if getattr(model, "generation_config", None) is not None:
        native.generation_config = copy.deepcopy(model.generation_config)
    native.eval()
    if sample is not None:
        _check_same_output(model, native, sample)
    return native


def _run(model: nn.Module, sample: Any) -> Optional[torch.Tensor]:
    if isinstance(sample, Mapping) and "use_cache" in inspect.signature(model.forward).parameters:
        sample = {**sample, "use_cache": False}  # one forward: a cache only adds layer-index bookkeeping
    with torch.no_grad():
        out = run_model(model, sample)
    return first_tensor(out)


def _check_same_output(exported: nn.Module, native: nn.Module, sample: Any) -> None:
    want, got = _run(exported, sample), _run(native, sample)
    if want is None or got is None:
        return
    if want.shape != got.shape or not torch.allclose(want.float(), got.float(), rtol=1e-4, atol=1e-5):
        diff = (want.float() - got.float()).abs().max().item() if want.shape == got.shape else "shape"
        raise ExportError(
            f"The natively rebuilt {type(native).__name__} computes differently from the exported model "
            f"on a sample (max difference {diff}). A layer's behaviour can depend on its position (Swin's shifted "
            "windows, per-layer attention types): the native model gives layer k the behaviour of position k, and a "
            "successor copied from another position (init='group_first' / 'group_last') keeps its source's. Train "
            "with init='first', or " + NATIVE_FALSE[0].lower() + NATIVE_FALSE[1:]
        )


def sample_for(model: nn.Module) -> Optional[dict]:
    """A small input for a transformers model, from its main input name and config (token ids
    or pixel values); None when unknown."""
    config = model.config
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(0)
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 100) or 100)
        input_ids = torch.randint(1, min(vocab, 1000), (2, 8), generator=generator).to(param.device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", 3)
    if main == "pixel_values" and isinstance(size, int) and isinstance(channels, int):
        return {"pixel_values": torch.randn(2, channels, size, size, generator=generator).to(param.device, param.dtype)}
    return None


def finalize_generic(model: nn.Module, depths: Dict[str, int]) -> nn.Module:
    """The generic route's export of a transformers model, which must reload as exported.

    When a model built from the config holds the exported tensors exactly, the model is returned
    as it is. When the shortened container is the stack that config.num_hidden_layers counts, it
    is rebuilt natively as the hf adapter does. Otherwise save_pretrained -> from_pretrained
    would build another model, and ExportError says so."""
    reference = build_on_meta(type(model), model.config)
    reason = state_difference(reference, model)
    if reason is None:
        return model
    if len(depths) == 1:
        (path,) = depths
        try:
            counted = len(reference.get_submodule(path)) == model.config.num_hidden_layers
        except (AttributeError, TypeError):
            counted = False
        if counted:
            return rebuild_native(model, lambda m: native_config(m, list(m.get_submodule(path))), sample_for(model))
    raise ExportError(
        f"This {type(model).__name__} would reload differently: its config still describes the predecessor, and "
        f"{reason}. save_pretrained -> from_pretrained would build the predecessor's layers, some of them random. "
        f"Shorten only the layer stack that config.{depth_field(model.config)} counts (adapter='hf' finds it), "
        f"update the config yourself, or {NATIVE_FALSE[0].lower() + NATIVE_FALSE[1:]}"
    )
