"""Hugging Face `transformers.Trainer` integration (imported on its own, never by
``import theseus_general``, since it imports transformers).

    from theseus_general.integrations.hf_trainer import TheseusTrainer

    th = Theseus(model, successor_depth=3)
    trainer = TheseusTrainer(theseus=th, model=th.model, args=args, train_dataset=train)
    trainer.train()
    successor = trainer.export()   # th.export(), gathering ZeRO-3's partitioned parameters first

With ``TrainingArguments(deepspeed=config)`` (ZeRO stages 0 to 3) use ``trainer.export()`` (every
rank calls it; see `theseus_general.integrations.deepspeed`); without DeepSpeed it is ``th.export()``.

`TheseusTrainer` is a `Trainer` whose optimiser covers exactly ``th.trainable_parameters()``
(the successors and, with train_rest=True, the copies of embeddings and head; that set is
fixed when Theseus wraps the model, so the Trainer wraps it in DDP once, with any number of
processes), which adds `TheseusCallback` (one ``th.step()`` per optimiser step) and logs
the replacement rate as ``theseus_rate``.
With a plain Trainer instead: ``opt = AdamW(th.trainable_parameters()); th.attach(opt)``, then
``Trainer(..., optimizers=(opt, None), callbacks=[TheseusCallback(th)])``.

The callback does not read the run's first batches. So the recipe's start check (module matching of a collapsed
start; the bert recipe's short mixed phase for a start that disagrees) happens only if you ask for it before
``trainer.train()``: ``n = planned_match_steps(th, max_steps, batches=trainer.get_train_dataloader())``, then
``match_successors(th, ..., n)`` when n > 0 (`theseus_general.training`).
"""

from __future__ import annotations

from typing import Any, List

from torch import nn
from transformers import Trainer, TrainerCallback

from theseus_general.engine import Theseus
from theseus_general.errors import EngineStateError
from theseus_general.integrations.deepspeed import ZeroExport


class TheseusCallback(TrainerCallback):
    """Advances the replacement schedule once per optimiser step (not per micro-batch
    under gradient accumulation), and records the rate of every step in `rates`."""

    def __init__(self, theseus: Theseus):
        if not isinstance(theseus, Theseus):
            raise EngineStateError(f"TheseusCallback needs a Theseus engine, got {type(theseus).__qualname__}.")
        theseus.recipe.require_fit_loop("the Hugging Face Trainer integration")
        self.theseus = theseus
        self.rates: List[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        # resume_from_checkpoint restores the wrapped model's weights (successors included) and
        # the global step; the draws are a pure function of (seed, step), so stepping the
        # schedule forward restores them.
        if self.theseus.step_count > state.global_step:
            raise EngineStateError(
                f"The Theseus engine is at step {self.theseus.step_count} but the Trainer starts at step "
                f"{state.global_step}; create a new engine for a new run."
            )
        max_steps = getattr(state, "max_steps", 0)
        if self.theseus.step_count == 0 and max_steps and max_steps > 0 and self.theseus.needs_total_steps:
            self.theseus.set_total_steps(max_steps)  # the default curriculum is relative to the run
        while self.theseus.step_count < state.global_step:
            self.theseus.step()

    def on_step_end(self, args, state, control, **kwargs):
        self.rates.append(self.theseus.replacement_rate)
        self.theseus.step()


class TheseusTrainer(Trainer):
    """A Trainer for a Theseus run: pass ``theseus=th`` and ``model=th.model``."""

    def __init__(self, *args: Any, theseus: Theseus, **kwargs: Any):
        model = kwargs.get("model", args[0] if args else None)
        if model is not theseus.model:
            raise EngineStateError("TheseusTrainer needs model=th.model (the wrapped model) with theseus=th.")
        self.theseus = theseus
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, TheseusCallback) for c in callbacks):
            callbacks.append(TheseusCallback(theseus))
        # DeepSpeed changes the model in train(); record the model's own module state before that
        self.zero_export = ZeroExport(theseus)
        super().__init__(*args, callbacks=callbacks, **kwargs)

    def export(self, native: bool = True) -> nn.Module:
        """The successor, ``th.export(native)``; under DeepSpeed ZeRO-3 from the gathered parameters
        (a collective: every rank calls it)."""
        return self.zero_export.export(native=native)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            target = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(target))
            names = {id(p): n for n, p in target.named_parameters(remove_duplicate=False)}
            params = self.theseus.trainable_parameters()
            groups = [
                {"params": [p for p in params if names.get(id(p)) in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for p in params if names.get(id(p)) not in decay], "weight_decay": 0.0},
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
            self.optimizer = optimizer_cls([g for g in groups if g["params"]], **optimizer_kwargs)
            self.theseus.attach(self.optimizer)  # it skips successors that sat idle under DDP's zero anchor
        return self.optimizer

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # training logs only, not eval metrics
            logs["theseus_rate"] = self.theseus.replacement_rate
        super().log(logs, *args, **kwargs)
