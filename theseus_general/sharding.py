"""Sharded models (FSDP2's ``fully_shard``, any DTensor parameters): a whole, plain copy for export.

``fully_shard`` changes a module tree in place: a sharded module's class becomes ``FSDP<Class>``,
which refuses ``copy.deepcopy``; its parameters become DTensor shards; FSDP's hooks, state and
flags are added to the modules. `plain_copy` copies such a tree without any of it:

  * every module with its own class (``FSDP<Class>`` -> ``Class``) and attributes;
  * every DTensor gathered whole with ``full_tensor()``, one tensor at a time, kept on the CPU of
    rank 0 only (what torch's ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``
    does); every other tensor copied to the CPU;
  * every hook except those torch.distributed registered, and none of FSDP's attributes.

The gather is a collective: every rank calls `plain_copy` on the same module tree; rank 0 gets
the copy, every other rank None. The sharded model is left as it was.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch build without distributed support: nothing can be sharded
    _FSDPModule = _DTensor = None

# FSDP's own attributes on a module it manages (flags for dynamo, and torch's composable-API state)
_FSDP_FLAGS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")
_COMPOSABLE_STATE = "__composable_api_state_key"


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter and buffer of the tree, in module order (the same on every rank)."""
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            yield from (t for t in store.values() if t is not None)


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` holds an FSDP2 module or a DTensor parameter/buffer (deepcopy would fail or copy shards)."""
    if _DTensor is None:
        return False
    return (any(isinstance(m, _FSDPModule) for m in model.modules())
            or any(isinstance(t, _DTensor) for t in _tensors(model)))


def _own_class(cls: type) -> type:
    """``FSDP<Class>`` -> ``Class``; any other class as it is."""
    if _FSDPModule is not None and issubclass(cls, _FSDPModule):
        return next(c for c in cls.__mro__ if not issubclass(c, _FSDPModule))
    return cls


def _from_torch_distributed(hook: Any) -> bool:
    fn = getattr(hook, "hook", hook)  # nn.Module wraps some hooks (_WrappedHook)
    fn = getattr(fn, "func", fn)  # functools.partial
    fn = getattr(fn, "__func__", fn)  # a bound method
    return (getattr(fn, "__module__", None) or "").startswith("torch.distributed.")


def _own_state(module: nn.Module) -> Dict[str, Any]:
    """The module's attributes without FSDP's: its flags, its state, its hooks."""
    state = {k: v for k, v in vars(module).items() if k not in _FSDP_FLAGS and not k.startswith(_COMPOSABLE_STATE)}
    hook_dicts = [k for k, v in state.items() if "hooks" in k and isinstance(v, dict)]
    # hook handles' ids are unique across a module's hook dicts; the *_with_kwargs / *_always_called
    # dicts hold flags under the same ids
    dropped = {i for k in hook_dicts for i, hook in state[k].items() if _from_torch_distributed(hook)}
    for k in hook_dicts:
        if dropped & set(state[k]):
            state[k] = type(state[k])((i, h) for i, h in state[k].items() if i not in dropped)
    return state


def _whole_on_rank_zero(tensors: Iterator[torch.Tensor], rank_zero: bool) -> Dict[int, torch.Tensor]:
    """id(tensor) -> a whole CPU copy (a Parameter for a parameter), on rank 0; every rank joins each gather."""
    copies: Dict[int, torch.Tensor] = {}
    seen = set()
    with torch.no_grad():
        for t in tensors:
            if id(t) in seen:  # tied: gathered once, the same copy in every place
                continue
            seen.add(id(t))
            whole = t.full_tensor() if isinstance(t, _DTensor) else t  # a collective for a DTensor
            if rank_zero:
                plain = whole.detach().to("cpu", copy=True)
                copies[id(t)] = nn.Parameter(plain, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else plain
            del whole  # on rank 0 too: at most one whole tensor on the device at a time
    return copies


def plain_copy(model: nn.Module) -> Optional[nn.Module]:
    """A copy of the sharded `model` without FSDP, whole and on the CPU, on rank 0; None on the other
    ranks. A collective: every rank must call it (see the module docstring)."""
    import torch.distributed as dist

    for m in model.modules():
        if isinstance(m, _FSDPModule):
            m.reshard()  # a module left unsharded after a forward registers its shards again; no communication
    rank_zero = not dist.is_initialized() or dist.get_rank() == 0
    memo: Dict[int, Any] = _whole_on_rank_zero(_tensors(model), rank_zero)
    if not rank_zero:
        return None
    modules: Tuple[nn.Module, ...] = tuple(model.modules())
    for m in modules:  # every module first: a parent's copy then finds its children's in the memo
        cls = _own_class(type(m))
        memo[id(m)] = cls.__new__(cls)
    for m in modules:  # as deepcopy restores a module: its class's __setstate__ (nn.Module's fills in hook dicts)
        memo[id(m)].__setstate__(copy.deepcopy(_own_state(m), memo))
    return memo[id(model)]
