"""PyTorch Lightning integration (imported on its own, never by ``import theseus_general``, since it
imports lightning).

    from theseus_general.integrations.lightning import TheseusCallback

    th = Theseus(model, successor_depth=3)
    class Module(lightning.LightningModule):
        def __init__(self, th):
            super().__init__(); self.th = th; self.model = th.model   # the wrapped model in the module tree
        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss
        def configure_optimizers(self):                               # the constant trainable set
            return torch.optim.AdamW(self.th.trainable_parameters(), lr=1e-4)
    callback = TheseusCallback(th, export_dir="successor/")
    lightning.Trainer(max_steps=1000, callbacks=[callback]).fit(Module(th), loader)
    successor = callback.successor                                    # also written to export_dir

What `TheseusCallback` does, hook by hook:
  * ``setup``: checks that ``th.model`` is inside the LightningModule (so Lightning's ``.to()``, DDP
    and checkpoints see the successors and the rest's copies);
  * ``on_fit_start`` (the optimisers exist): checks the optimiser holds every one of
    ``th.trainable_parameters()`` (a set fixed at wrapping, so Lightning's DDP wraps the module once)
    and calls ``th.attach(optimizer)``;
  * ``on_train_start`` (loops and checkpoint restored, the train dataloader loaded): tells the engine
    the run's length (``th.set_total_steps(trainer.max_steps)``, or the estimated steps of
    ``max_epochs``), brings a resumed engine to the checkpoint's step, and on a new run does the
    recipe's module matching (``match_successors(th, train_dataloader, th.recipe.match_steps(steps))``)
    before Lightning's first step; under DDP rank 0's matched successors are broadcast to every rank;
  * a successor idle for the whole step gets no update: ``th.attach``'s hook on the optimiser drops the
    anchor's zeros after Lightning's closure has run forward and backward;
  * ``on_train_batch_end``: one ``th.step()`` per optimiser step: it follows ``trainer.global_step``,
    which counts optimiser steps, so gradient accumulation is respected (one optimiser only);
  * ``state_dict`` / ``load_state_dict``: Lightning's own checkpoints hold the engine's step, seed, rate,
    plan and config (the tensors are already in the LightningModule's state dict);
  * ``on_fit_end``: exports the successor on global rank 0 (``callback.successor``), and with
    ``export_dir=`` writes it (``save_pretrained`` when the model has it, else ``torch.save`` of the
    module).

Module matching runs outside Lightning's loop, on the train dataloader's batches: a Mapping batch (its
"labels" dropped), an ``(inputs, labels)`` pair, or the inputs alone, as the wrapped model takes them
(`theseus_general.match_successors`); pass ``match_batches=`` when the dataloader yields something else,
and ``match_steps=0`` to skip it. Its steps come on top of Lightning's ``max_steps``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import lightning as L
import torch

from theseus_general.engine import Theseus
from theseus_general.errors import EngineStateError, TrainingError
from theseus_general.schedulers import RunLinearScheduler
from theseus_general.training import match_successors, planned_match_steps

__all__ = ["TheseusCallback"]


class TheseusCallback(L.Callback):
    """Drives a Theseus run inside ``lightning.Trainer.fit`` (see the module docstring).

    Args:
        theseus: the engine; its ``th.model`` must be an attribute (at any depth) of the LightningModule.
        match_steps: module-matching steps before Lightning's first step; None: the recipe's
            (``th.recipe.match_steps(total_steps)``, 0 for recipes without matching); 0: none.
        match_lr: matching's learning rate (None: the recipe's ``match_lr``, else 1e-3).
        match_batches: what matching reads instead of the train dataloader: an iterable of batches or a
            function ``position -> batch``.
        export_dir: where ``on_fit_end`` writes the exported successor (global rank 0 only); None: not written.
    """

    def __init__(self, theseus: Theseus, *, match_steps: Optional[int] = None, match_lr: Optional[float] = None,
                 match_batches: Union[Iterable[Any], Callable[[int], Any], None] = None,
                 export_dir: Optional[str] = None):
        if not isinstance(theseus, Theseus):
            raise EngineStateError(f"TheseusCallback needs a Theseus engine, got {type(theseus).__qualname__}.")
        if match_steps is not None and (isinstance(match_steps, bool) or not isinstance(match_steps, int) or match_steps < 0):
            raise TrainingError(f"match_steps must be an int >= 0 (0: no module matching), got {match_steps!r}.")
        theseus.recipe.require_fit_loop("the Lightning integration")
        self.theseus = theseus
        self.match_steps = match_steps
        self.match_lr = match_lr
        self.match_batches = match_batches
        self.export_dir = export_dir
        self.matched_steps = 0  # module-matching steps this callback ran
        self.rates: List[float] = []  # the replacement rate of every optimiser step
        self.successor: Optional[torch.nn.Module] = None
        self._saved_meta: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: "L.Trainer", pl_module: "L.LightningModule", stage: str) -> None:
        if not any(m is self.theseus.model for m in pl_module.modules()):
            raise EngineStateError(
                f"th.model is not inside the {type(pl_module).__name__}: assign it as an attribute "
                "(self.model = th.model) so that Lightning moves, wraps and checkpoints the successors with it."
            )

    def on_fit_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if len(trainer.optimizers) != 1:
            raise TrainingError(f"TheseusCallback steps the schedule once per optimiser step of one optimiser; "
                                f"configure_optimizers returned {len(trainer.optimizers)}.")
        optimizer = trainer.optimizers[0]
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [p for p in self.theseus.trainable_parameters() if id(p) not in held]
        if missing:
            raise TrainingError(
                f"The optimiser from configure_optimizers lacks {len(missing)} of the Theseus run's trainable "
                "parameters, which would never train. Build it from them: "
                "torch.optim.AdamW(self.th.trainable_parameters(), lr=...)."
            )
        self.theseus.attach(optimizer)  # it skips successors that sat idle (DDP's zero anchor)

    def on_train_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        th = self.theseus
        steps = self._run_steps(trainer)
        if th.step_count == 0 and th.needs_total_steps and steps:
            th.set_total_steps(steps)  # the default curriculum is relative to the run's length
        if self._saved_meta is not None:  # a resumed run: the weights came with the LightningModule's state
            th.load_state_dict({"tensors": th.state_dict()["tensors"], "meta": self._saved_meta})
            self._saved_meta = None
        if th.step_count != trainer.global_step:
            raise EngineStateError(
                f"The Theseus engine is at step {th.step_count} but the Trainer starts at step {trainer.global_step}; "
                "resume from a checkpoint saved with this callback, or create a new engine for a new run."
            )
        if th.step_count == 0:
            self._match(trainer, pl_module, steps)

    # ------------------------------------------------------------------ training
    def on_train_batch_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # global_step counts optimiser steps: under gradient accumulation it moves on every k-th batch
        while self.theseus.step_count < trainer.global_step:
            self.rates.append(self.theseus.replacement_rate)
            self.theseus.step()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, Any]:
        # step, seed, rate, train_rest, plan and config (JSON-safe); the tensors are in the module's state dict
        return {"engine": self.theseus.state_dict()["meta"], "matched_steps": self.matched_steps}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        # applied in on_train_start, after Lightning restored the weights and the loops
        self._saved_meta = dict(state_dict["engine"])
        self.matched_steps = int(state_dict.get("matched_steps", 0))

    # ------------------------------------------------------------------ export
    def on_fit_end(self, trainer: "L.Trainer", pl_module: "L.LightningModule") -> None:
        if not trainer.is_global_zero:
            return
        self.successor = self.export()
        if self.export_dir is not None:
            os.makedirs(self.export_dir, exist_ok=True)
            if hasattr(self.successor, "save_pretrained"):
                self.successor.save_pretrained(self.export_dir)
            else:
                torch.save(self.successor, os.path.join(self.export_dir, "successor.pt"))

    def export(self) -> torch.nn.Module:
        """The native successor model (`Theseus.export`), in eval mode."""
        return self.theseus.export()

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _run_steps(trainer: "L.Trainer") -> int:
        """The run's optimiser steps: max_steps, else the estimate from max_epochs (0 when unknown)."""
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        estimated = trainer.estimated_stepping_batches
        return int(estimated) if estimated not in (None, float("inf")) else 0

    def _match(self, trainer: "L.Trainer", pl_module: "L.LightningModule", steps: int) -> None:
        th = self.theseus
        if self.match_steps == 0 or not (self.match_steps or th.recipe.match_fraction):
            return
        batches = self.match_batches if self.match_batches is not None else trainer.train_dataloader
        if batches is None:
            raise TrainingError("Module matching needs batches: the Trainer has no train dataloader; pass "
                                "TheseusCallback(match_batches=...) or match_steps=0.")
        if not callable(batches):
            batches = _cycle(batches)
        # the recipe may match only a start that lost the task: it asks the first batches (the stream goes
        # on from the next one); rank 0 decides for every rank, so that all match or none does
        n = self.match_steps if self.match_steps is not None else planned_match_steps(th, steps, batches=batches)
        if trainer.world_size > 1:
            n = trainer.strategy.broadcast(n, src=0)
            if isinstance(th.scheduler, RunLinearScheduler):  # the recipe's phase for this start: rank 0's too
                th.fit_phase_to_start(None, full_at=trainer.strategy.broadcast(th.scheduler.full_at, src=0))
        if n <= 0:
            return
        match_successors(th, batches, n, lr=self.match_lr or th.recipe.match_lr or 1e-3, device=pl_module.device,
                         progress=False, restore_device=False)
        self.matched_steps = n
        if trainer.world_size > 1:  # every rank matched on its own shard: rank 0's successors for all
            with torch.no_grad():
                for p in (p for s in th.successors() for p in s.parameters()):
                    torch.distributed.broadcast(p.data, src=0)
        pl_module.train()


def _cycle(loader: Iterable[Any]) -> Callable[[int], Any]:
    """position -> batch over `loader`, starting again at its end (matching may want more batches)."""
    state = {"it": iter(loader)}

    def batch(position: int) -> Any:
        try:
            return next(state["it"])
        except StopIteration:
            state["it"] = iter(loader)
            return next(state["it"])
    return batch
