"""Wrapping and restoring: inject Theseus groups into a model, and undo it exactly.

Like PEFT's inject/unload, `Wrapping.inject()` changes the caller's model in
place and `Wrapping.restore()` gives it back as it was. Injection:

  * swaps every replaced container (e.g. ``bert.encoder.layer``) for a container of
    the same type holding one `TheseusGroup` per group;
  * freezes every parameter of the model (``requires_grad=False``); the successors
    train, and with ``train_rest=True`` so do copies of the non-replaced parts
    (embeddings, stem, head). The set of trainable parameters is fixed here, once:
    DDP, Accelerate and the Trainer can wrap the model once;
  * with ``train_rest=True``, swaps the non-replaced parameters and buffers for
    copies; the caller's own tensors are kept in the module tree (the
    ``theseus_originals`` child of the first group, non-persistent buffers, so not in ``state_dict()``)
    so that ``model.to(...)`` moves them too, and are never written;
  * makes frozen batch norm (in the predecessor blocks, and in the rest when it does
    not train) a frozen-statistics module (`frozen_norm`): it normalises with its
    running statistics whatever ``.train()`` says and never updates them. Batch norm
    in parts that train behaves as usual.

Everything the engine holds lives in the module tree, so ``.to()``, ``.double()``,
``state_dict()`` and FSDP see it.
"""

from __future__ import annotations

import copy
import re
import weakref
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .graph import set_submodule
from .plan import Plan
from .replacement import ReplacementState, TheseusGroup

ORIGINALS = "theseus_originals"  # child of the first group holding the caller's swapped tensors


# ---------------------------------------------------------------- frozen batch norm
class _FrozenNorm:
    """Mixed into a norm class: always normalise with the running statistics, never update them.

    The class's own forward runs in eval mode for the call (``training`` is set back afterwards, so
    the module's mode stays the one the caller set). A norm whose forward does more than normalise
    keeps doing it: timm's BatchNormAct2d applies its activation inside forward, and a forward of
    our own here (a plain batch_norm call) silently dropped it, so a frozen predecessor block
    computed another function than the trained one (issue 27).
    """

    def forward(self, *args, **kwargs):
        training = self.training
        self.training = False
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.training = training


_FROZEN_CLASSES: Dict[type, type] = {}


def _frozen_class(cls: type) -> type:
    if cls not in _FROZEN_CLASSES:
        name = f"Frozen{cls.__name__}"
        if cls.__module__ != "torch.nn.modules.batchnorm" and cls.__module__ != "torch.nn.modules.instancenorm":
            name = f"Frozen_{cls.__module__.replace('.', '_')}_{cls.__name__}"
        frozen = type(name, (_FrozenNorm, cls), {"_theseus_unfrozen": cls, "__module__": __name__})
        globals()[name] = frozen  # importable by name, so a wrapped model still pickles (torch.save)
        _FROZEN_CLASSES[cls] = frozen
    return _FROZEN_CLASSES[cls]


def has_running_stats(module: nn.Module) -> bool:
    return (isinstance(module, (_BatchNorm, _InstanceNorm)) and module.track_running_stats
            and module.running_mean is not None)


def freeze_norm(module: nn.Module) -> None:
    """Make `module` (a batch/instance norm with running statistics) frozen, in place: same
    object, parameters, buffers and state-dict keys; only its class changes (like torchvision's
    FrozenBatchNorm2d, but reversible with `unfreeze_norm`)."""
    module.__class__ = _frozen_class(type(module))


def unfreeze_norm(module: nn.Module) -> None:
    if isinstance(module, _FrozenNorm):
        module.__class__ = type(module)._theseus_unfrozen


# ---------------------------------------------------------------- the caller's tensors
class OriginalTensors(nn.Module):
    """The caller's tensors that wrapping swapped for trainable copies, as non-persistent
    buffers: in the module tree (moved by ``.to()``), out of ``state_dict()``, never trained."""

    def __init__(self) -> None:
        super().__init__()
        self.places: List[Tuple[nn.Module, str, bool]] = []  # (module, name, is_parameter), by buffer index
        self.requires_grad: List[bool] = []

    def keep(self, module: nn.Module, name: str, tensor: torch.Tensor, requires_grad: bool) -> None:
        self.register_buffer(str(len(self.places)), tensor, persistent=False)
        self.places.append((module, name, isinstance(tensor, nn.Parameter)))
        self.requires_grad.append(requires_grad)

    def put_back(self) -> None:
        """Put every kept tensor back where it was. Unmoved, these are the caller's own
        objects; after ``.to()``/``.double()`` a parameter comes back as a new Parameter
        holding the moved tensor (the module tree is consistent; old references are stale)."""
        for i, (module, name, is_param) in reversed(list(enumerate(self.places))):
            tensor = self._buffers[str(i)]
            if is_param:
                if not isinstance(tensor, nn.Parameter):
                    tensor = nn.Parameter(tensor, requires_grad=False)
                tensor.requires_grad_(self.requires_grad[i])
                module._parameters[name] = tensor
            else:
                module._buffers[name] = tensor

    def forward(self, *args, **kwargs):
        raise RuntimeError("theseus_originals holds tensors; it is not meant to be called.")


# ---------------------------------------------------------------- containers
def same_container(like: nn.Module, modules: List[nn.Module]) -> nn.Module:
    """A container of the same type as `like` holding `modules`. A Sequential whose
    children are named ``<prefix><i>`` (torchvision's ``encoder_layer_0``, ...) keeps
    that naming, so state-dict keys match a natively built model of the new depth."""
    if not isinstance(like, nn.Sequential):
        return nn.ModuleList(modules)
    names = [name for name, _ in like.named_children()]
    match = re.fullmatch(r"(.*?)(\d+)", names[0]) if names else None
    prefix = match.group(1) if match else None
    if prefix and names == [f"{prefix}{i}" for i in range(len(names))]:
        return nn.Sequential(OrderedDict((f"{prefix}{i}", m) for i, m in enumerate(modules)))
    return nn.Sequential(*modules)


# ---------------------------------------------------------------- inject / restore
class Wrapping:
    """One injection into one model; `restore()` undoes it."""

    def __init__(self, model: nn.Module, containers: Dict[str, nn.Module], plan: Plan, successors: List[nn.Module],
                 state: ReplacementState, state_kwarg: str, train_rest: bool):
        self.model = model
        self.originals = dict(containers)  # path -> the caller's container (its blocks live on in the groups)
        self.train_rest = train_rest
        self.wrapped: Dict[str, nn.Module] = {}
        self.groups: List[TheseusGroup] = []
        self.kept: Optional[OriginalTensors] = None
        self._requires_grad = {p: p.requires_grad for p in model.parameters()}
        self._training = {m: m.training for m in model.modules()}
        self._frozen: List[nn.Module] = []
        self._ddp_ignore_before = getattr(model, "_ddp_params_and_buffers_to_ignore", None)
        # the run's optimisers (th.attach) -> their hook; weak, as an optimiser of a finished fit() goes away
        self._hooks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
        self.restored = False
        try:
            self._inject(plan, successors, state, state_kwarg)
        except BaseException:
            self.restore()
            raise

    def _inject(self, plan: Plan, successors: List[nn.Module], state: ReplacementState, state_kwarg: str) -> None:
        model = self.model
        predecessor_modules = {id(m) for c in self.originals.values() for m in c.modules()}
        rest_modules = [m for m in model.modules() if id(m) not in predecessor_modules]
        for p in model.parameters():
            p.requires_grad_(False)
        frozen_parts = [m for c in self.originals.values() for m in c.modules()]
        if self.train_rest:
            self._copy_rest(rest_modules)
        else:
            frozen_parts += rest_modules
        for m in frozen_parts:
            if has_running_stats(m) and not isinstance(m, _FrozenNorm):
                freeze_norm(m)
                self._frozen.append(m)
        for path, container in self.originals.items():
            groups = [TheseusGroup(g.index, [container[i] for i in g.blocks], successors[g.index], state, state_kwarg)
                      for g in plan.groups_in(path)]
            wrapped = same_container(container, groups)
            wrapped.train(container.training)
            set_submodule(model, path, wrapped)
            self.wrapped[path] = wrapped
            self.groups.extend(groups)
        for g in self.groups:
            for p in g.successor.parameters():
                p.requires_grad_(True)
        if self.kept is not None:
            # A child of the first group (a module of ours whose forward never iterates its
            # children), not of the caller's root, which may be an nn.Sequential.
            self.groups[0].add_module(ORIGINALS, self.kept)
            prefix = next(name for name, m in self.model.named_modules() if m is self.kept)
            # DDP (also under Accelerate and the Trainer) would otherwise broadcast them every step.
            self.model._ddp_params_and_buffers_to_ignore = list(self._ddp_ignore_before or []) + [
                f"{prefix}.{name}" for name in self.kept._buffers]
        self._state = state

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook `optimizer` (the run's own, once) so that it skips idle successors' zero gradients (and the
        rest's while the recipe's rest_after_mixing holds them back)."""
        if optimizer not in self._hooks:
            self._hooks[optimizer] = optimizer.register_step_pre_hook(
                _drop_idle_gradients(weakref.ref(self), self._state))

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def _copy_rest(self, rest_modules: List[nn.Module]) -> None:
        """Swap the non-replaced parameters and buffers for copies that train; the
        caller's tensors go to `theseus_originals`. Tied tensors stay tied."""
        kept = OriginalTensors()
        copies: Dict[int, torch.Tensor] = {}
        for module in rest_modules:
            for store in (module._parameters, module._buffers):
                for name, tensor in list(store.items()):
                    if tensor is None:
                        continue
                    if id(tensor) not in copies:
                        if isinstance(tensor, nn.Parameter):
                            copies[id(tensor)] = nn.Parameter(tensor.detach().clone(), requires_grad=True)
                        else:
                            copies[id(tensor)] = tensor.clone()
                    # OriginalTensors restores the flag; the engine holds no reference outside the tree
                    kept.keep(module, name, tensor, bool(self._requires_grad.pop(tensor, False)))
                    store[name] = copies[id(tensor)]
        if kept.places:
            self.kept = kept

    def rest_tensors(self) -> List[torch.Tensor]:
        """The trained copies of the rest (parameters and buffers), each once, in wrapping order."""
        if self.kept is None:
            return []
        seen, out = set(), []
        for module, name, is_param in self.kept.places:
            tensor = (module._parameters if is_param else module._buffers).get(name)
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                out.append(tensor)
        return out

    def copy_with_successors(self, copier: Callable[[nn.Module], Optional[nn.Module]] = copy.deepcopy
                             ) -> Optional[nn.Module]:
        """A deep copy of the model with the successors in containers like the caller's, and
        none of the wrapping's parts (groups, kept originals, frozen batch norm); every
        parameter requires gradients. The wrapped model is left as it was. `copier` makes the
        copy (a sharded model's: `theseus_general.sharding.plain_copy`, None on ranks other than 0)."""
        model = self.model
        ignore = model.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)
        try:
            for path, wrapped in self.wrapped.items():
                set_submodule(model, path, same_container(self.originals[path], [g.successor for g in wrapped]))
            copied = copier(model)
        finally:
            for path, wrapped in self.wrapped.items():
                set_submodule(model, path, wrapped)
            if ignore is not None:
                model._ddp_params_and_buffers_to_ignore = ignore
        if copied is None:
            return None
        for m in copied.modules():
            unfreeze_norm(m)  # the rest's frozen batch norm (train_rest=False) is a plain one again
        for p in copied.parameters():
            p.requires_grad_(True)
        return copied

    def restore(self) -> nn.Module:
        """Give the model back as it was before injection (in its current dtype/device)."""
        if self.restored:
            return self.model
        for handle in list(self._hooks.values()):
            handle.remove()
        self._hooks = weakref.WeakKeyDictionary()
        for path, original in self.originals.items():
            if path in self.wrapped:
                set_submodule(self.model, path, original)
        if self.kept is not None:
            self.kept.put_back()
            if self._ddp_ignore_before is None:
                self.model.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)
            else:
                self.model._ddp_params_and_buffers_to_ignore = self._ddp_ignore_before
        for m in self._frozen:
            unfreeze_norm(m)
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)
        for m, flag in self._training.items():
            m.training = flag
        self.restored = True
        return self.model


def _drop_idle_gradients(wrapping: "weakref.ref[Wrapping]", state: ReplacementState):
    def drop() -> None:
        # A successor idle for the whole step got only the anchor's exact zeros (kept so that DDP's
        # reducer sees every parameter): None makes the optimiser skip it, so AdamW's momentum and
        # weight decay leave it unchanged, as in the reference code. A successor whose gradient is
        # not all zeros got it some other way (an auxiliary loss, a regulariser): it is kept.
        alive = wrapping()
        if alive is None:
            return
        if state.rest_idle:  # the recipe's rest_after_mixing: the rest's copies wait for p = 1
            for tensor in alive.rest_tensors():
                if isinstance(tensor, nn.Parameter):
                    tensor.grad = None
        for index in state.idle_groups():
            grads = [p.grad for p in alive.groups[index].successor.parameters() if p.grad is not None and p.grad.numel()]
            if grads and not bool(torch.stack([g.detach().abs().amax() for g in grads]).amax() > 0):
                for p in alive.groups[index].successor.parameters():
                    p.grad = None

    def hook(optimizer, args, kwargs):
        # torch passes the optimiser itself as args[0]; a positional closure follows it
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            drop()
            return None

        # step(closure) (Lightning, LBFGS): forward and backward run inside the step, after this hook;
        # drop the idle zeros once the closure has made them, before the update reads them
        def closure_then_drop():
            loss = closure()
            drop()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_drop}
        return (args[0], closure_then_drop) + tuple(args[2:]), kwargs

    return hook
