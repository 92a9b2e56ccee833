"""DeepSpeed ZeRO: export a successor from a model that DeepSpeed trained (stages 0 to 3).

Imported on its own, never by ``import theseus_general``; it imports ``deepspeed`` only when it
gathers ZeRO-3 parameters. `TheseusTrainer` (``integrations/hf_trainer.py``) uses it for its
``export()``, so a Trainer run with ``TrainingArguments(deepspeed=...)`` needs nothing more:

    trainer = TheseusTrainer(theseus=th, model=th.model, args=args_with_deepspeed, train_dataset=train)
    trainer.train()
    successor = trainer.export()            # on every rank (ZeRO-3 gathers: a collective)

With ``deepspeed.initialize`` or ``accelerate`` directly:

    zero = ZeroExport(th)                   # before deepspeed.initialize / accelerator.prepare
    engine, optimizer, _, _ = deepspeed.initialize(model=th.model, optimizer=opt, config=config)
    ...                                     # train; th.step() after each engine.step()
    successor = zero.export()               # on every rank

Why ``th.export()`` alone is not enough under ZeRO-3: DeepSpeed partitions every parameter across
the processes (each rank's ``param.data`` is an empty tensor, its shard lives in ``param.ds_tensor``),
hooks every module to gather and release its parameters around its forward, replaces each module's
``_parameters`` with its own dict type and adds bookkeeping attributes (``ds_id``,
``ds_grads_remaining``, ...). ``th.export()`` copies the model, so it would copy empty tensors and
DeepSpeed's hooks and attributes (the native export then refuses the copy: "'ds_grads_remaining'
is 0 in the model but '<unset>' in the rebuild"). `ZeroExport` records the model's own module state
when it is created, before DeepSpeed changes it; `export()` gathers the full parameters
(``deepspeed.zero.GatheredParameters``, read-only, on every rank), sets aside what DeepSpeed added
to each module, runs ``th.export()`` and puts everything back, so training can go on. The successor
is a plain model of the predecessor's class, equal to what ``th.export()`` gives for the same
weights without DeepSpeed. Stages 0 to 2 keep whole parameters on every rank; only the hooks are
set aside there.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

from torch import nn

from theseus_general.engine import Theseus
from theseus_general.errors import EngineStateError


def zero3_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters of `model` that ZeRO stage 3 partitioned (they carry DeepSpeed's ``ds_id``)."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def _hook_dicts(module: nn.Module) -> Dict[str, dict]:
    """The module's hook registries (``_forward_pre_hooks``, ``_forward_hooks``, ``_forward_hooks_with_kwargs``,
    ...), by attribute name."""
    return {name: value for name, value in vars(module).items() if "_hooks" in name and isinstance(value, dict)}


class _ModuleState:
    """What a module holds before DeepSpeed: its attribute names, its hooks, its ``_parameters`` dict."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.attributes = set(vars(module))
        self.hooks = {name: set(hooks) for name, hooks in _hook_dicts(module).items()}
        self.parameters_dict = module._parameters

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        """The module as it was recorded, for the duration; what was added since comes back after."""
        module = self.module
        added = {name: module.__dict__.pop(name) for name in list(vars(module)) if name not in self.attributes}
        removed_hooks: List[Tuple[dict, object, object]] = []
        for name, hooks in _hook_dicts(module).items():
            for key in [k for k in hooks if k not in self.hooks.get(name, ())]:
                removed_hooks.append((hooks, key, hooks.pop(key)))
        swapped = module._parameters
        if type(swapped) is not type(self.parameters_dict):  # ZeRO-3's own dict type
            module._parameters = type(self.parameters_dict)(swapped.items())
        try:
            yield
        finally:
            module._parameters = swapped
            for hooks, key, hook in reversed(removed_hooks):
                hooks[key] = hook
            module.__dict__.update(added)


class ZeroExport:
    """Exports `theseus`'s successor after DeepSpeed training (any ZeRO stage). Create it before
    DeepSpeed sees the model (``deepspeed.initialize``, ``accelerator.prepare``, ``Trainer.train``)."""

    def __init__(self, theseus: Theseus):
        if not isinstance(theseus, Theseus):
            raise EngineStateError(f"ZeroExport needs a Theseus engine, got {type(theseus).__qualname__}.")
        if zero3_parameters(theseus.model):
            raise EngineStateError(
                "The model's parameters are already partitioned by ZeRO-3 (deepspeed.initialize, accelerator.prepare, "
                "or from_pretrained while a ZeRO-3 TrainingArguments exists, which loads into deepspeed.zero.Init), so "
                "ZeroExport cannot tell the model's own module state from DeepSpeed's. Load the predecessor, wrap it "
                "and create ZeroExport(th) (TheseusTrainer does) before any of those."
            )
        self.theseus = theseus
        self._modules = [_ModuleState(m) for m in theseus.model.modules()]

    @contextlib.contextmanager
    def gathered(self) -> Iterator[nn.Module]:
        """The wrapped model with its full parameters and without DeepSpeed's hooks and attributes, for
        the duration (read-only: changes to the gathered parameters are lost under ZeRO-3). Under ZeRO-3
        it is a collective: every rank enters it."""
        params = zero3_parameters(self.theseus.model)
        with contextlib.ExitStack() as stack:
            if params:
                import deepspeed

                # modifier_rank=None: every rank gets the full tensors and nothing is written back
                stack.enter_context(deepspeed.zero.GatheredParameters(params, modifier_rank=None))
            for state in self._modules:
                stack.enter_context(state.restored())
            yield self.theseus.model

    def export(self, native: bool = True) -> nn.Module:
        """``th.export(native)`` from the gathered model: the successor on every rank (ZeRO-3: every
        rank calls it). The wrapped model stays as DeepSpeed left it, so training can go on."""
        with self.gathered():
            return self.theseus.export(native=native)

    def state_dict(self) -> dict:
        """``th.state_dict()`` with full tensors (CPU copies): what `theseus_general.checkpoint` and
        ``th.load_state_dict`` take, also under ZeRO-3 (every rank calls it)."""
        with self.gathered():
            state = self.theseus.state_dict()
            state["tensors"] = {k: v.detach().to("cpu", copy=True) for k, v in state["tensors"].items()}
            return state
