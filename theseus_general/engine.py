"""The Theseus engine: wrap a model in place, replace modules progressively, export.

    th = Theseus(model, successor_depth=3)          # adapter auto-detected
    th = Theseus(model, target_speedup=2.0, sample=batch)   # or a budget: depths chosen by the planner
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-4)
    for batch in data:
        loss = th.model(**batch).loss               # the model's own forward and outputs
        loss.backward(); opt.step(); opt.zero_grad(); th.step()
    successor = th.export()                          # a native model of the same type, shallower

`Theseus` is a thin front over three parts:
  * planning (`theseus_general.planning`, pure): model + target -> plan and successors
    (a budget target first goes through `theseus_general.budget`, width successors through
    `theseus_general.width`);
  * wrapping (`theseus_general.wrapping`): inject the groups into the model and undo it
    exactly with `unwrap()` (see that module for what wrapping changes);
  * export: the successors in the model's own containers, made native by the adapter.

A wrapped model depends only on its inputs and on decisions fixed outside traced code
(`theseus_general.replacement`), so ``torch.compile``, activation checkpointing,
autocast, ``.to()`` and DDP/FSDP work on ``th.model`` as on any model.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .adapter import Adapter
from .checkpoint import load_checkpoint, read_engine_meta
from .config import TheseusConfig
from .errors import AdapterError, CheckpointError, EngineStateError, ExportError, NonFiniteLossError, ScheduleError, warn_user
from .plan import Group, GroupsSpec
from .planning import INIT_CHOICES, check_plan_matches, export_refusal, plan_run
from .registry import detect_adapter, get_adapter
from .replacement import ReplacementState, TheseusGroup
from .recipes import Recipe, get_recipe
from .schedulers import RunLinearScheduler, SchedulerLike, as_scheduler, scheduler_from_dict
from .sharding import is_sharded, plain_copy
from .validation import check_successors
from .wrapping import Wrapping

InitLike = Union[str, Callable[[Group, List[nn.Module]], nn.Module]]
__all__ = ["Theseus", "INIT_CHOICES"]


class Theseus:
    """Progressive module replacement on a model, in place and reversible.

    Args:
        model: the trained predecessor (any ``nn.Module`` an adapter accepts).
        successor_depth: number of successor blocks; an int, or one int per container.
        ratio: successor depth as a fraction of the predecessor's, instead of successor_depth.
        groups: explicit groups of block indices, instead of a depth or ratio; or ``"importance"`` with a
            depth or ratio and ``sample=``: the blocks that change their input most on the sample (``1 - cos``,
            ShortGPT's Block Influence, as a budget target ranks them) are kept, each dropped block joins the
            group of the kept block before it, and each successor starts as a copy of its group's kept block
            (on SmolLM2's decoder this start beat the first blocks' on every seed: docs/results.md).
        adapter: adapter name, an `Adapter` instance, or None to auto-detect.
        scheduler: a `Scheduler`, a constant rate, a callable ``step -> p``, or None for the
            recipe's curriculum (default: ``RunLinearScheduler``, p from 0.3 to 1 at half the run).
        init: how successors start: ``"first"`` (successor i is a copy of predecessor
            block i, as in the paper), ``"group_first"`` / ``"group_last"`` (a copy of
            the first / last block of its group), or a callable ``(group, blocks) -> module``.
            None (default): ``"first"``, and a recipe with ``choose_start`` (the default recipe)
            lets `fit`'s module matching restart each successor from the block of its group that
            reproduces the group best (`theseus_general.matching.choose_starts`).
        successors: modules to use as successors, one per group (overrides ``init``).
        train_rest: also train the non-replaced parts (embeddings, stem, head) from step 0,
            on copies of them (the default). False keeps them frozen throughout, as in the
            paper's replacement phase. Either way the set of trainable parameters is fixed
            at wrapping and never changes during the run.
        recipe: None (the model family's recipe: "resnet" for ResNets, else "default"), "default" (the
            library's recipe, chosen on dev splits: module matching first, then the mixed phase),
            "resnet" (rest frozen, no matching, p from 0.6 to 1 at 30% of the run), "paper"
            (BERT-of-Theseus as published: rest frozen, p = min(1, 0.3 + 6e-4 t), no matching), or a
            `Recipe`; it fills in scheduler= and train_rest= when they are not
            given, and tells `fit` how much module matching to do. See `theseus_general.recipes`.
        total_steps: the run's optimiser steps, for a curriculum relative to the run's length (the
            default recipe's); `fit` passes its own ``steps``. Without it the engine warns at its first step.
        seed: seed of the replacement draws (identical on every process).
        sample: an input to check every successor against its group before any change;
            by default the adapter makes one when it can. Passed as the forward takes it: a Mapping
            (a dict, a BatchEncoding) as keywords, a tuple as positional arguments, anything else (a
            tensor, a list of images) as one argument (`theseus_general.graph.model_arguments`).
        validate: set False to skip that check.
        target_flops: a budget instead of a depth: the successor model's FLOPs on the sample as a
            fraction of the predecessor's (e.g. 0.5). The planner chooses the depth per container
            (and width, with successor_width="auto") with the least removed block importance;
            ``print(th.plan)`` shows the prediction. See `theseus_general.budget`.
        target_speedup: a budget as a speed-up (e.g. 2.0), predicted from FLOPs, or from each
            block's time on the sample with measure="latency".
        measure: "flops" (default) or "latency": what target_speedup is predicted from.
        successor_width: make successors narrower blocks of the same family: a fraction of the
            hidden units kept (MLP neurons, ResNet middle channels), a dict container -> fraction,
            or "auto" with a target (the planner mixes depth and width).
        base_rate, replace_by: the curriculum's start rate and the fraction of the run at which p reaches 1
            (None: the recipe's); a `scheduler` given wins over both.
        match_fraction, match_lr, choose_start: module matching's share of `fit`'s steps, its learning
            rate, and the start-block choice (None: the recipe's; see `theseus_general.recipes`).
        config: a `TheseusConfig` holding any of the settings above (also as the second positional
            argument); keywords given here win over its fields. ``th.config`` is the resolved one, saved
            in checkpoints; `Theseus.from_checkpoint` rebuilds an engine from it.
        **adapter_options: passed to the adapter (e.g. ``container=`` for the generic one).
    """

    def __init__(
        self,
        model: nn.Module,
        successor_depth: Union[int, Sequence[int], TheseusConfig, None] = None,
        *,
        config: Optional[TheseusConfig] = None,
        ratio: Optional[float] = None,
        groups: Optional[GroupsSpec] = None,
        adapter: Union[str, Adapter, None] = None,
        scheduler: SchedulerLike = None,
        init: Optional[InitLike] = None,
        successors: Optional[Sequence[nn.Module]] = None,
        train_rest: Optional[bool] = None,
        recipe: Union[str, Recipe, None] = None,
        total_steps: Optional[int] = None,
        seed: int = 0,
        sample: Any = None,
        validate: bool = True,
        target_flops: Optional[float] = None,
        target_speedup: Optional[float] = None,
        measure: str = "flops",
        successor_width: Union[float, str, Dict[str, float], None] = None,
        base_rate: Optional[float] = None,
        replace_by: Optional[float] = None,
        match_fraction: Optional[float] = None,
        match_lr: Optional[float] = None,
        choose_start: Optional[bool] = None,
        **adapter_options: Any,
    ):
        # Everything below up to Wrapping() only reads the model: bad input fails here,
        # before any parameter, flag or module of the caller's changes.
        if not isinstance(model, nn.Module):
            raise AdapterError(f"Theseus needs a torch.nn.Module, got {type(model).__qualname__}.")
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            # Wrapping the replica wrapper's .module would leave its replicas (DataParallel) or its
            # reducer (DDP, built for the parameters as they were) stale: refuse, and say the order.
            raise AdapterError(
                f"Theseus got a {type(model).__name__}; pass the model inside it, Theseus(model.module, ...), "
                "and wrap th.model in DataParallel / DistributedDataParallel afterwards (the trainable "
                "parameters are fixed at wrapping; see docs/training.md)."
            )
        if any(isinstance(m, TheseusGroup) for m in model.modules()):
            raise EngineStateError(
                "This model is already wrapped by a Theseus engine. Use that engine, or call its unwrap() first "
                "(export() leaves the model wrapped); wrapping twice would replace groups of groups."
            )
        if isinstance(successor_depth, TheseusConfig):  # Theseus(model, config)
            config, successor_depth = successor_depth, None
        if config is not None and not isinstance(config, TheseusConfig):
            raise ScheduleError(f"config must be a TheseusConfig, got {type(config).__qualname__}.")
        recipe_given = get_recipe(recipe) if recipe is not None else None  # an unknown name fails first
        # keywords given here win over the config's fields; the config's win over the defaults
        explicit = {k: v for k, v in dict(
            successor_depth=successor_depth, ratio=ratio, groups=groups, train_rest=train_rest,
            total_steps=total_steps, target_flops=target_flops, target_speedup=target_speedup,
            successor_width=successor_width, init=init if isinstance(init, str) else None,
            base_rate=base_rate, replace_by=replace_by, match_fraction=match_fraction, match_lr=match_lr,
            choose_start=choose_start,
            adapter=adapter if isinstance(adapter, str) else None,
            recipe=recipe_given.name if recipe_given is not None else None).items() if v is not None}
        explicit.update({k: v for k, v in dict(seed=seed, validate=validate, measure=measure).items()
                         if v != _DEFAULTS[k]})
        if adapter_options:
            explicit["adapter_options"] = dict(adapter_options)
        config = (config or TheseusConfig()).replace(**explicit)
        if isinstance(config.seed, bool) or not isinstance(config.seed, int):
            raise ScheduleError(f"seed must be an int, got {config.seed!r}.")
        self.adapter = _resolve_adapter(model, adapter if isinstance(adapter, Adapter) else config.adapter,
                                        dict(config.adapter_options))
        # no recipe named: the family's (the adapter's default_recipe; "default" unless the dev splits chose another)
        resolved_before = config.resolved or config.schedule is not None
        config = config.resolve(self.adapter.default_recipe, recipe=recipe_given,
                                scheduler=as_scheduler(scheduler) if scheduler is not None else None)
        self.scheduler = (as_scheduler(scheduler) if scheduler is not None
                          else scheduler_from_dict(config.schedule) if config.schedule is not None
                          else get_recipe(config.recipe).scheduler())
        if config.total_steps is not None and self.needs_total_steps:
            self.scheduler.for_run(config.total_steps)
        self._config = config
        # whether the curriculum is the recipe's own (no scheduler=, schedule or replace_by given, not a saved
        # run's): only then may `fit_phase_to_start` move where p reaches 1
        self._phase_from_recipe = (scheduler is None and not resolved_before and config.replace_by is None
                                   and isinstance(self.scheduler, RunLinearScheduler))
        first_rate = self.scheduler(0)
        self._model = model
        successor_depth, ratio, groups = config.successor_depth, config.ratio, config.groups
        init = init if init is not None and not isinstance(init, str) else config.init
        target_flops, target_speedup, measure = config.target_flops, config.target_speedup, config.measure
        successor_width, validate, seed = config.successor_width, config.validate, config.seed

        planned = plan_run(model, self.adapter, successor_depth=successor_depth, ratio=ratio, groups=groups,
                           init="first" if init is None else init, successors=successors, sample=sample, validate=validate,
                           target_flops=target_flops, target_speedup=target_speedup, measure=measure,
                           successor_width=successor_width)
        containers, built = planned.containers, planned.successors
        self.plan = planned.plan
        self.plan.rest_trains = self.train_rest

        for group, successor in zip(self.plan.groups, built):  # our copies, or modules given for this run
            self.adapter.prepare_successor([containers[group.container][i] for i in group.blocks], successor)
        # whether the successors are the engine's own default copies: only those may be restarted
        # from another block of their group (recipe.choose_start); what was chosen is kept here
        self.may_choose_starts = init is None and successors is None and not planned.starts_fixed
        self.successor_starts: Dict[int, int] = {}
        self._state = ReplacementState(seed, anchor_always=not self.train_rest)
        recipe = self.recipe
        self._state.mixing, self._state.mixed_matching = recipe.mixing, float(recipe.mixed_matching)
        self._state.rest_waits = bool(recipe.rest_after_mixing) and self.train_rest
        self._state.group_count = len(self.plan.groups)
        self._state.advance(0, first_rate)
        self._step = 0
        self._failed: Optional[str] = None
        self._warned_unattached = False
        # whether anything trained the successors (a step, module matching, a loaded checkpoint);
        # export() before that warns once
        self._trained = False
        self._warned_untrained = False
        self._wrapping = Wrapping(model, containers, self.plan, built, self._state,
                                  self.adapter.state_kwarg, self.train_rest)

    # ------------------------------------------------------------------ public API
    @classmethod
    def from_checkpoint(cls, model: nn.Module, path: str, **settings: Any) -> "Theseus":
        """Rebuild the engine of a saved run on `model` (the same predecessor) from the `TheseusConfig` in
        the checkpoint at `path`, and load its weights and step: no settings repeated. `settings` are
        the ones a config cannot hold (``scheduler=`` for a callable schedule, ``successors=``,
        ``adapter=`` instance, ``sample=``) or overrides. The optimiser's state stays in the checkpoint:
        `load_checkpoint(path, th, optimizer)` or `fit(..., checkpoints=)` restore it."""
        meta = read_engine_meta(path)
        if "config" not in meta:
            raise CheckpointError(f"{path} was saved before checkpoints held the engine's config; create the engine "
                                  "with the run's settings and call load_checkpoint(path, th).")
        saved = TheseusConfig.from_dict(meta["config"])
        if saved.schedule is None and "scheduler" not in settings:
            raise CheckpointError(f"{path} was saved from a run with a callable schedule, which a config cannot "
                                  "hold; pass it again: Theseus.from_checkpoint(model, path, scheduler=...).")
        th = cls(model, saved, **settings)
        try:
            load_checkpoint(path, th, restore_rng=False)
        except BaseException:
            th.unwrap()
            raise
        return th

    @property
    def config(self) -> TheseusConfig:
        """Every JSON-safe setting of this run, with the recipe resolved (see `theseus_general.config`)."""
        schedule = self.scheduler.to_dict() if hasattr(self.scheduler, "to_dict") else None
        return self._config.replace(schedule=schedule)

    @property
    def recipe(self) -> Recipe:
        """The resolved recipe (its parts as this run uses them; `fit` and module matching read it)."""
        return self._config.recipe_object()

    @property
    def train_rest(self) -> bool:
        return bool(self._config.train_rest)

    @property
    def model(self) -> nn.Module:
        """The caller's model, wrapped: same object, same forward signature and outputs."""
        return self._model

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def replacement_rate(self) -> float:
        """p at the current step."""
        return self._state.rate

    @property
    def phase(self) -> str:
        """"replacing" while p < 1, "successor" once only successors run."""
        return "successor" if self._state.rate >= 1.0 else "replacing"

    @property
    def groups(self) -> List[TheseusGroup]:
        return list(self._wrapping.groups)

    def successors(self) -> List[nn.Module]:
        return [g.successor for g in self._wrapping.groups]

    def trainable_parameters(self) -> List[nn.Parameter]:
        """Parameters to give the optimiser: the successors', plus the copies of the
        non-replaced parts with train_rest=True. The same set for the whole run. Read from the
        module tree at each call, so that it names the live parameters after a wrapper that
        replaces them (FSDP2's fully_shard): call it after sharding."""
        self.check_open("trainable_parameters()")
        params = [p for g in self._wrapping.groups for p in g.successor.parameters()]
        seen = {id(p) for p in params}
        for p in self._wrapping.rest_tensors():
            if not isinstance(p, nn.Parameter):
                continue
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def step(self, loss: Optional[torch.Tensor] = None) -> float:
        """Advance the schedule by one optimiser step (call it after ``optimizer.step()``);
        returns the new replacement rate. The decisions of the coming step are fixed
        from here: a pure function of (seed, step, group, micro-batch).

        With `loss`, a NaN or infinite value stops the run: the engine is marked
        failed (step(), export() and checkpointing then refuse, so no bad state is
        saved) and NonFiniteLossError names the step. Passing it costs one
        device-to-host copy of the loss per step."""
        self.check_open("step()")
        if loss is not None:
            value = float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss)
            if math.isnan(value) or math.isinf(value):
                self._failed = f"the loss was {value} at step {self._step}"
                raise NonFiniteLossError(
                    f"The loss became {value} at step {self._step} (replacement rate {self.replacement_rate:.3f}); "
                    "the run is stopped and nothing more can be saved from it. Resume from the last good "
                    "checkpoint, e.g. with a lower learning rate."
                )
        self._check_training_mode()
        if self._step == 0 and self.needs_total_steps:
            warn_user(
                "The engine does not know how many steps this run has, so its curriculum follows the paper's "
                f"fixed slope (p = 1 at step {self.scheduler.full_replacement_step}) instead of reaching 1 at "
                f"{self.scheduler.full_at:.0%} of the run. Pass Theseus(..., total_steps=N), call "
                "th.set_total_steps(N), or train with theseus_general.fit (which does it)."
            )
        if not self._warned_unattached and not self._wrapping.attached:
            problem = self._what_the_hook_would_drop()
            if problem:
                self._warned_unattached = True
                warn_user(f"{problem} Call th.attach(optimizer) once after creating the optimiser (fit and the "
                          "integrations do it).")
        self._step += 1
        self._trained = True
        rate = self.scheduler(self._step)
        self._state.advance(self._step, rate)
        return rate

    def _what_the_hook_would_drop(self) -> Optional[str]:
        """What this step's gradients hold that `attach`'s optimiser hook would drop (None: nothing)."""
        if self._state.rest_idle:
            return ("The recipe trains the embeddings/stem and head only once the replacement rate reaches 1 "
                    "(rest_after_mixing), and this engine's optimiser hook drops their gradients until then; no "
                    "optimiser is attached, so yours updates them now.")
        idle = self._state.idle_groups()
        if idle:
            return (f"Successors of groups {sorted(idle)} sat idle this step but got zero gradients (kept in the "
                    "graph for DDP, or because nothing else trains with train_rest=False); an optimiser that does "
                    "not know them applies momentum and weight decay to them.")
        return None

    @property
    def needs_total_steps(self) -> bool:
        """True while the schedule is relative to the run's length (`RunLinearScheduler`) and does not
        know it yet: `fit` and the Trainer integration then call `set_total_steps`."""
        return isinstance(self.scheduler, RunLinearScheduler) and not self.scheduler.knows_run

    def fit_phase_to_start(self, agreement: Optional[float], *, collapsed: Optional[bool] = None,
                           full_at: Optional[float] = None) -> None:
        """Apply the recipe's short mixed phase for a start that disagrees with its predecessor
        (`Recipe.full_at_for`, from the start check's `agreement` and whether the recipe judges it
        `collapsed`): p then reaches 1 at the recipe's
        ``short_full_at`` of the run. Before the first step, and only to the recipe's own curriculum (a
        schedule or ``replace_by`` you gave wins); the config records it, so a resumed run keeps it.
        `full_at`: the phase another process decided (several ranks follow rank 0's), instead of `agreement`."""
        self.check_open("fit_phase_to_start()")
        full_at = self.recipe.full_at_for(agreement, collapsed) if full_at is None else full_at
        if (self._step > 0 or not self._phase_from_recipe or full_at is None
                or full_at == self.scheduler.full_at):
            return
        total = self.scheduler.total_steps
        self.scheduler = RunLinearScheduler(full_at=full_at, base=self.scheduler.base, total_steps=total)
        parts = dict(self._config.recipe_parts, full_at=full_at)
        self._config = self._config.replace(schedule=self.scheduler.to_dict(), recipe_parts=parts)
        self._state.advance(self._step, self.scheduler(self._step))

    def set_total_steps(self, total_steps: int) -> None:
        """Tell the default curriculum (`RunLinearScheduler`) how many optimiser steps the run has,
        so that p reaches 1 at its fraction of them. Other schedules do not use it. Before the first step only."""
        self.check_open("set_total_steps()")
        if not isinstance(self.scheduler, RunLinearScheduler):
            return
        if self._step > 0 and self.scheduler.total_steps != total_steps:
            raise ScheduleError(f"set_total_steps({total_steps}) after {self._step} steps would change the rates "
                                "already used; set it before training.")
        self.scheduler.for_run(total_steps)
        self._state.advance(self._step, self.scheduler(self._step))

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs from the engine: ``{"tensors": {name: tensor}, "meta": {...}}``.

        tensors: every successor's state (``successors.<group>.<key>``) and, with
        train_rest, the copies of the rest (``rest.<n>``, in wrapping order). The
        tensors are the live ones (no copy); `theseus_general.checkpoint` writes them.
        meta (JSON-safe): step, seed, rate at that step, train_rest, the plan and the config. The replacement draws are a pure function of (seed, step, group, micro-batch), so
        step and seed restore them."""
        self.check_open("state_dict()")
        tensors: Dict[str, torch.Tensor] = {}
        for g in self._wrapping.groups:
            for key, value in g.successor.state_dict().items():
                tensors[f"successors.{g.index}.{key}"] = value
        for i, tensor in enumerate(self._wrapping.rest_tensors()):
            tensors[f"rest.{i}"] = tensor
        meta = {"step": self._step, "seed": self._state.seed, "rate": self._state.rate,
                "train_rest": self.train_rest, "plan": self.plan.to_dict(), "config": self.config.to_dict(),
                "successor_starts": {str(g): block for g, block in sorted(self.successor_starts.items())}}
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore `state_dict()` output. Everything is checked before anything changes:
        a different plan, schedule, or tensor names/shapes raise
        CheckpointError naming the difference, and the engine and model stay as they were."""
        self.check_open("load_state_dict()")
        rate = self.check_state_dict(state)
        live, tensors, step = self.state_dict()["tensors"], state["tensors"], int(state["meta"]["step"])
        with torch.no_grad():
            for name, value in live.items():
                value.copy_(tensors[name])
        self._state.seed = int(state["meta"]["seed"])
        starts = {int(g): int(block) for g, block in (state["meta"].get("successor_starts") or {}).items()}
        if starts:  # the blocks the saved successors started from, for print(th.plan)
            self.successor_starts = starts
            self.plan.starts = dict(starts)
        self._step = step
        self._trained = True
        self._state.advance(step, rate)

    def check_state_dict(self, state: Dict[str, Any]) -> float:
        """The checks of load_state_dict() alone: raises CheckpointError, changes nothing.
        Returns the rate at the saved step."""
        self.check_open("check_state_dict()")
        tensors, meta = state["tensors"], state["meta"]
        chosen_on_sample = self._config.groups == "importance" or self.plan.budget is not None
        check_plan_matches(self.plan.to_dict(), meta["plan"], chosen_on_sample)
        saved_rest = bool(meta["train_rest"])
        if saved_rest != self.train_rest:
            raise CheckpointError(
                f"The checkpoint was saved with train_rest={saved_rest}, this engine has "
                f"train_rest={self.train_rest}; create the engine with the same setting."
            )
        step = int(meta["step"])
        rate = self.scheduler(step)
        if not math.isclose(rate, float(meta["rate"]), rel_tol=0, abs_tol=1e-12):
            raise CheckpointError(
                f"At the checkpoint's step {step} this engine's schedule {self.scheduler!r} gives p={rate}, "
                f"but the checkpoint was at p={meta['rate']}; create the engine with the schedule of the saved run."
            )
        live = self.state_dict()["tensors"]
        missing, unexpected = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
        if missing or unexpected:
            raise CheckpointError(
                f"The checkpoint's tensors do not match this engine's: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}. Was it saved from the same model and successors?"
            )
        for name, value in live.items():
            saved = tensors[name]
            if saved.shape != value.shape or saved.dtype != value.dtype:
                raise CheckpointError(
                    f"Tensor {name!r}: the checkpoint has {tuple(saved.shape)} {saved.dtype}, this engine "
                    f"{tuple(value.shape)} {value.dtype}. Was it saved from the same model and successors?"
                )
        return rate

    def export(self, native: bool = True) -> Optional[nn.Module]:
        """A standalone successor model of the model's own type (in eval mode), in the
        wrapped model's current dtype and device.

        The engine hands the adapter a copy of the model whose containers hold the
        successors (with the trained rest copies when train_rest=True); the adapter
        returns the native model. The wrapped model is left as it was (still wrapped).
        With native=True the adapter first checks every successor can be exported natively and
        builds the family's own model at the new depth (or raises ExportError); native=False
        returns the copy with the successor modules as they are, made as consistent with its
        depth as the adapter can (see each adapter's finalize_export).

        A sharded model (FSDP2's ``fully_shard``, DTensor parameters): export() is then a
        collective, so **every rank must call it**, at the same point of the run. It gathers the
        full state one tensor at a time to the CPU of rank 0 (`theseus_general.sharding`) and
        returns the successor on rank 0, on the CPU in the dtype of the sharded parameters
        (FSDP's full-precision ones under a MixedPrecisionPolicy); every other rank gets None.
        Called on one rank alone it waits forever for the others: this cannot be detected cheaply.
        The sharded model stays sharded and can train on.
        """
        self.check_open("export()")
        wrapping = self._wrapping
        refusal = export_refusal(self.adapter, wrapping.originals, self.plan, self.successors()) if native else None
        if refusal:
            group, reason = refusal
            raise ExportError(
                f"Group {group.index} ({group.container} blocks {list(group.blocks)}): {reason}. "
                "Use export(native=False) to get the model with the successor modules as they are."
            )
        if not self._trained and not self._warned_untrained:
            self._warned_untrained = True
            warn_user(
                "export() of an engine that was never trained: no th.step(), module matching or loaded checkpoint, "
                "so the successors are their initial copies (successor i = predecessor block i by default) and the "
                "exported model is the predecessor with blocks dropped. Train first (theseus_general.fit(th, ...), "
                "or your loop calling th.step() after each optimiser step)."
            )
        exported = wrapping.copy_with_successors(plain_copy if is_sharded(self._model) else copy.deepcopy)
        if exported is None:  # a rank other than 0 of a sharded model: it took part in the gather
            return None
        exported.eval()
        return self.adapter.finalize_export(exported, self.plan.successor_depth, native=native)

    def validate(self, sample: Any) -> None:
        """Check every successor against its group on `sample` (shape, dtype, device and
        output structure); raises SuccessorMismatchError naming the group. Changes nothing."""
        self.check_open("validate()")
        previous = self._state.force
        self._state.force = "predecessor"  # run the predecessor blocks so that hooks see each group's input
        try:
            check_successors(self._model, self._wrapping.originals, self.plan, self.successors(), sample)
        finally:
            self._state.force = previous

    def attach(self, optimizer: torch.optim.Optimizer) -> "Theseus":
        """Hook the run's optimiser (once; `fit` and the integrations do it) so that it skips successors
        that sat idle for the whole step. Only needed where idle successors get the zero anchor: under
        DDP without find_unused_parameters, or with train_rest=False (see `theseus_general.replacement`);
        a gradient that reached a successor any other way is kept. The hook lives on this optimiser
        alone and goes with unwrap()."""
        self.check_open("attach()")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise EngineStateError(f"attach() takes the run's torch.optim.Optimizer, got {type(optimizer).__qualname__}.")
        self._wrapping.attach(optimizer)
        return self

    def decisions(self) -> Dict[int, List[bool]]:
        """{group: [whether its successor ran, per training forward since the last step()]}: one entry
        per micro-batch (a recomputation during backward is not a forward)."""
        return self._state.decisions()

    @property
    def last_decisions(self) -> Dict[int, bool]:
        """{group: whether its successor ran in its latest training forward}, kept across step()."""
        return dict(sorted(self._state.last.items()))

    @contextlib.contextmanager
    def matching_mode(self) -> Iterator["Theseus"]:
        """Module matching's forward (`theseus_general.matching`): while open, every group runs its
        predecessor blocks without gradient, hands the group's input to its successor too and records
        the successor's relative squared error against the group's output; `match_errors()` takes them.
        No draws are made and the schedule does not advance."""
        self.check_open("matching_mode()")
        previous, self._state.force = self._state.force, "match"
        self._state.match_errors.clear()
        try:
            yield self
        finally:
            self._state.force = previous
            self._state.match_errors.clear()

    def match_errors(self) -> List[Tuple[int, torch.Tensor]]:
        """The (group, error) pairs recorded in matching mode since the last call, and clears them."""
        errors, self._state.match_errors = self._state.match_errors, []
        return errors

    def auxiliary_loss(self) -> Optional[torch.Tensor]:
        """The recipe's mixed-phase matching term (``mixed_matching`` times the mean relative squared error
        of the successors against their groups, recorded by the training forwards since the last call),
        to add to the task loss before backward; None when the recipe has none or nothing was recorded.
        `fit` adds it; a loop of yours adds it the same way. Clears what it read."""
        errors, self._state.mixed_errors = self._state.mixed_errors, []
        if not errors:
            return None
        return self._state.mixed_matching * torch.stack([e for _, e in errors]).mean()

    def mark_trained(self) -> None:
        """Say that the successors were trained outside `step()` (module matching does it); `export()` of
        an engine nothing trained warns once."""
        self._trained = True

    def unwrap(self) -> nn.Module:
        """Restore the model as it was before wrapping and close the engine.

        The caller's modules, parameters, buffers, ``requires_grad`` and ``training`` flags
        come back. If the model was moved while wrapped (``.to(device)``, ``.double()``),
        it comes back moved as a whole; the rest's parameters are then new Parameter
        objects holding the moved tensors (the blocks' parameters keep their identity,
        as with ``.to()`` itself)."""
        return self._wrapping.restore()

    close = unwrap

    def __enter__(self) -> "Theseus":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unwrap()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._step}, p={self.replacement_rate:.3f}, phase {self.phase}"
        return f"Theseus({type(self._model).__name__}, adapter={self.adapter.name!r}, {state})"

    # ------------------------------------------------------------------ internals
    def _check_training_mode(self) -> None:
        # In eval mode every group runs its successor and nothing is drawn: a loop that never called
        # .train() (from_pretrained returns models in eval mode) would fine-tune the successors alone.
        # An evaluation between steps (eval mode under torch.no_grad) is not counted; nor is an
        # evaluation beside training forwards.
        state = self._state
        if state.eval_grad_forwards and not state.forwards:
            raise EngineStateError(
                f"th.step() at step {self._step}: the wrapped model ran {state.eval_grad_forwards} group "
                "forward(s) in eval mode with gradients on, and none in training mode, since the last step. "
                "In eval mode every group runs its successor, so no module is replaced at random and dropout "
                "is off. Call `th.model.train()` before the training loop (from_pretrained returns models in "
                "eval mode); evaluate under torch.no_grad() and call `th.model.train()` again afterwards."
            )

    @property
    def _closed(self) -> bool:
        return self._wrapping.restored

    def check_open(self, what: str) -> None:
        """Raise EngineStateError naming `what` when this engine is closed or its run failed."""
        if self._failed and not self._closed:
            raise EngineStateError(
                f"Cannot call {what}: this Theseus run failed ({self._failed}). unwrap() restores the model; "
                "start a new run, e.g. from the last good checkpoint."
            )
        if self._closed:
            raise EngineStateError(
                f"Cannot call {what} on a closed Theseus engine (unwrap() was called). "
                "Create a new Theseus(model, ...) to compress again."
            )


_DEFAULTS = {"seed": 0, "validate": True, "measure": "flops"}


def _resolve_adapter(model: nn.Module, adapter: Union[str, Adapter, None], options: dict) -> Adapter:
    """The adapter for `model`. Keywords Theseus() did not recognise arrive here as `options`: a name
    neither Theseus() nor the adapter takes raises UnknownOptionError with the closest valid name."""
    from .registry import adapter_class, list_adapters
    from .suggest import check_names, keyword_names

    theseus_keywords = keyword_names(Theseus.__init__, exclude=("model",))

    def check(adapter_options: List[str], whose: str) -> None:
        takes = f"{whose} {', '.join(adapter_options) or 'no options'}"
        check_names(options, theseus_keywords + adapter_options, "keyword argument",
                    f"Theseus() takes {', '.join(theseus_keywords)}; {takes}.")

    if isinstance(adapter, Adapter):
        if options:
            check(type(adapter).option_names(), f"the {adapter.name or type(adapter).__name__} adapter takes")
            raise AdapterError(f"Adapter options {sorted(options)} were given with an adapter instance; pass them to its constructor.")
        adapter.check(model)
        return adapter
    if adapter is None:
        if options:
            by_adapter = {name: adapter_class(name).option_names() for name in list_adapters()}
            check(sorted({o for names in by_adapter.values() for o in names}), "adapter options:")
            if "container" in options:
                adapter = "generic"
            else:
                owners = sorted(n for n, names in by_adapter.items() if set(options) & set(names))
                raise AdapterError(
                    f"The options {sorted(options)} belong to the adapter(s) {owners}; pass adapter= with one of them."
                )
        else:
            detected = detect_adapter(model)
            detected.check(model)  # matching is cheap; check() is where an adapter refuses a variant
            return detected
    if not isinstance(adapter, str):
        raise AdapterError(f"adapter must be a registered name, an Adapter instance or None, got {adapter!r}.")
    check(adapter_class(adapter).option_names(), f"the {adapter} adapter takes")
    instance = get_adapter(adapter, **options)
    instance.check(model)
    return instance
