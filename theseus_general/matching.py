"""Module matching: train each successor to reproduce its group, before the mixed phase.

With the engine in matching mode, a forward pass runs the predecessor blocks of every
group (no gradient) and hands each group's input to its successor too; the successor's
error against the group's output (squared error relative to the output's mean square) is
the loss. Labels are not used, so unlabelled in-domain data works as well.

Groups see the predecessor's own hidden states, so all successors learn at once from
one forward pass, and the non-replaced parts do not change. The replacement schedule
does not advance: ``th.step_count`` is the same afterwards.

Matching is guarded: each group's error is measured on the first batch (as matching trains:
training mode, but with the random state fixed and no running statistic updated; full precision)
before its first step and after its last. A group whose error ended above where it
started diverged; its successor goes back to its weights from before matching (what
``match_steps=0`` would have trained from), and a `MatchingDivergedWarning` names the groups and
the options (``fit(..., match_steps=0)``, ``match_lr=``). The caller's model is never touched by
matching (the successors and the rest's copies are the engine's), so nothing of theirs needs
undoing; the check is in ``FitResult.guard``.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .errors import MatchingDivergedWarning, NonFiniteLossError, TrainingError, warn_user
from .graph import run_model
from .training import Batch, FitResult, _batch_source, fit
from .wrapping import has_running_stats


def _inputs_of(batch: Any) -> Any:
    """The model inputs of a batch: ``(inputs, labels)`` pairs as `fit` takes them, a dict of model
    arguments (Hugging Face style; its "labels" are dropped) or the inputs alone."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0]
    return batch


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    """Whether `b`'s weights load into `a` as they are: the same state-dict names, shapes and dtypes."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and sa[k].dtype == sb[k].dtype for k in sa)


# A group diverged when its error on the first batch ended above (1 + tolerance) x its start
# (+ a floor, so that a start already near 0 is not judged on noise).
DIVERGED_TOLERANCE = 0.1
DIVERGED_FLOOR = 1e-3


@dataclass
class MatchGuard:
    """What the matching guard measured: each group's relative error on the first batch before
    the first step and after the last, and the groups whose successors were put back."""

    start: Dict[int, float] = field(default_factory=dict)
    end: Dict[int, float] = field(default_factory=dict)
    restored: List[int] = field(default_factory=list)

    def diverged(self) -> List[int]:
        return [g for g, e in sorted(self.end.items())
                if not e <= self.start[g] * (1 + DIVERGED_TOLERANCE) + DIVERGED_FLOOR]  # NaN diverged too


def _full_precision(model: nn.Module) -> Any:
    """Autocast off, whatever the caller's context: the guard compares numbers taken in and out of it."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return torch.autocast(tensor.device.type, enabled=False)
    return contextlib.nullcontext()


def group_errors(engine: Any, inputs: Any, training: bool = False) -> Dict[int, float]:
    """{group: its successor's relative error against the group on `inputs`}, as matching measures it,
    all groups in one forward pass on the predecessor's own hidden states. In eval mode (no dropout,
    norms on their running statistics), or with `training` in training mode as matching trains (batch
    norm on the batch's statistics) with the random state fixed (the same dropout masks every call)
    and every running statistic put back afterwards. The model's mode and the engine's switch are
    put back."""
    model, state = engine.model, engine._state
    was_training = model.training
    model.train(training)
    norms = [m for m in model.modules() if has_running_stats(m)] if training else []
    kept = [{k: v.clone() for k, v in m._buffers.items() if v is not None} for m in norms]
    previous, state.force = state.force, "match"
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    try:
        state.match_errors.clear()
        with torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=training):
            if training:
                torch.manual_seed(0)
            run_model(model, inputs)
        errors: Dict[int, float] = {}
        for index, error in state.match_errors:
            errors[index] = errors.get(index, 0.0) + float(error.detach())
        return errors
    finally:
        for module, buffers in zip(norms, kept):
            for name, value in buffers.items():
                module._buffers[name].copy_(value)
        state.force = previous
        state.match_errors.clear()
        model.train(was_training)


def choose_starts(engine: Any, inputs: Any) -> Dict[int, int]:
    """Start each successor from the block of its group whose weights best reproduce the group's output.

    For each group, the candidates are the successor's current weights and those of each of the
    group's predecessor blocks with the same tensors (names, shapes, dtypes: a narrower successor or
    a downsampling block is no candidate). Every candidate is loaded into the successor in turn and
    its relative error on `inputs` is measured as matching measures it, all groups in one forward
    pass per round (each group sees the predecessor's own hidden states), in eval mode (no dropout,
    no running-statistics update). The successor keeps the best candidate. Only tensors are copied:
    the successor module, and any per-position attribute of it (a layer index), stays its own.

    Returns {group index: index of the block in its container} for the groups whose start changed.
    """
    groups = {g.index: g for g in engine.groups}
    options: Dict[int, List[Tuple[Any, Dict[str, torch.Tensor]]]] = {}
    for index, group in groups.items():
        blocks = [(position, block.state_dict()) for position, block in enumerate(group.predecessor)
                  if _same_tensors(group.successor, block)]
        if blocks:  # the successor's own weights first: kept unless a block does better
            current = {k: v.detach().clone() for k, v in group.successor.state_dict().items()}
            options[index] = [(None, current)] + blocks
    if not options:
        return {}
    errors: Dict[Tuple[int, int], float] = {}
    for round_ in range(max(len(o) for o in options.values())):
        for index, candidates in options.items():
            groups[index].successor.load_state_dict(candidates[min(round_, len(candidates) - 1)][1])
        for index, error in group_errors(engine, inputs).items():
            errors[(index, round_)] = error
    chosen = {}
    for index, candidates in options.items():
        measured = [errors.get((index, r), float("inf")) for r in range(len(candidates))]
        best = min(range(len(candidates)), key=measured.__getitem__)
        groups[index].successor.load_state_dict(candidates[best][1])
        if candidates[best][0] is not None:
            chosen[index] = engine.plan.groups[index].blocks[candidates[best][0]]
    return chosen


START_NOTE = "start blocks chosen by matching error on the first batch: "


def _note_starts(plan: Any, starts: Dict[int, int]) -> None:
    """Say in print(plan) which successors now start from another block than the table's
    "copy of block i" (the table itself stays as planned: checkpoints compare it)."""
    plan.notes[:] = [note for note in plan.notes if not note.startswith(START_NOTE)]
    if starts:
        chosen = ", ".join(f"group {index} from block {block}" for index, block in sorted(starts.items()))
        plan.notes.append(START_NOTE + chosen + ("" if len(starts) == len(plan.groups) else "; the other groups kept theirs"))


def match_successors(engine: Any, batches: Union[Iterable[Batch], Callable[[int], Batch]], steps: int, *,
                     lr: float = 1e-3, choose_start: Optional[bool] = None, desc: str = "match successors",
                     **fit_options: Any) -> FitResult:
    """Train the successors of `engine` for `steps` steps to reproduce their groups' outputs.

    batches: ``(inputs, labels)`` pairs as for `fit` (labels are ignored; ``None`` is fine), dicts of
        model arguments (a Hugging Face loader's batches; "labels" is dropped), or the inputs alone;
        an iterable or a function ``position -> batch``.
    lr and the other options (``weight_decay``, ``lr_schedule``, ``device``, ``mixed_precision``,
    ``progress``, ...) are `fit`'s; the optimiser sees the successors' parameters only.
    choose_start: first, on the first batch, start each successor from the block of its group whose
        weights reproduce the group best (`choose_starts`); the choice is kept in
        ``engine.successor_starts`` ({group: block}, the block each restarted successor last started
        from) and named in ``print(engine.plan)``. None: the recipe's ``choose_start``, and only for successors the
        engine copied with the default init (True overwrites any successor's weights).
    Returns fit's `FitResult`; its losses are the mean relative errors over the groups, its ``guard``
    the `MatchGuard` (each group's error on the first batch before and after; the groups put back).

    A group whose error on the first batch ends above where it started (matching diverged, e.g. at too
    high a ``lr``) gets its successor's weights from before matching back, with a
    `MatchingDivergedWarning`; a NaN or infinite loss stops matching with `NonFiniteLossError` and puts
    every successor back.
    """
    engine._check_open("match_successors()")
    state = engine._state
    model = engine.model
    params = [p for successor in engine.successors() for p in successor.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("match_successors(): the successors have no trainable parameters.")

    if choose_start is None:
        choose_start = engine.recipe.choose_start and engine.may_choose_starts
    guard = MatchGuard()
    first: List[Any] = []  # the first batch's inputs, on the run's device
    saved: Dict[int, Dict[str, torch.Tensor]] = {}  # each successor's tensors before its first matching step

    def matching_loss(inputs: Any, labels: Any) -> torch.Tensor:
        if not first:  # on the first batch: here it is on the run's device, under its autocast
            if choose_start:
                # a later choice that keeps a successor's current weights keeps the block it came from
                engine.successor_starts.update(choose_starts(engine, inputs))
                _note_starts(engine.plan, engine.successor_starts)
            first.append(inputs)
            with _full_precision(model):
                guard.start.update(group_errors(engine, inputs, training=True))
            saved.update((g.index, {k: v.detach().clone() for k, v in g.successor.state_dict().items()})
                         for g in engine.groups)
        state.match_errors.clear()
        with torch.no_grad():  # the successors re-enable gradients for themselves
            run_model(model, inputs)
        errors, state.match_errors = state.match_errors, []
        if not errors:
            raise TrainingError("match_successors(): the forward pass ran no Theseus group; pass the inputs "
                                "the wrapped model takes.")
        return torch.stack([error for _, error in errors]).mean()

    source = _batch_source(batches, 0, steps)
    user_on_step = fit_options.pop("on_step", None)

    def unlabelled(position: int) -> Tuple[Any, None]:
        return _inputs_of(source(position)), None

    def on_step(record: Any) -> None:
        if record.step == steps - 1:  # after the last optimiser step, still on the run's device
            with _full_precision(model):
                guard.end.update(group_errors(engine, first[0], training=True))
        if user_on_step is not None:
            user_on_step(record)

    previous = state.force
    state.force = "match"
    try:
        result = fit(model, unlabelled, steps, loss=matching_loss, params=params, lr=lr, desc=desc,
                     on_step=on_step, **fit_options)
    except NonFiniteLossError as e:
        _put_back(engine, saved, list(saved))
        raise NonFiniteLossError(f"Module matching stopped: {e} Every successor is back at its weights from before "
                                 f"matching. Lower match_lr (it was {lr}), or turn matching off with "
                                 "fit(..., match_steps=0).") from None
    finally:
        state.force = previous
        state.match_errors.clear()
    guard.restored = guard.diverged()
    if guard.restored:
        _put_back(engine, saved, guard.restored)
        detail = ", ".join(f"group {g}: {guard.start[g]:.4g} -> {guard.end[g]:.4g}" for g in guard.restored)
        warn_user(f"Module matching diverged ({detail}: relative error on the first batch, before -> after "
                  f"{steps} matching steps at lr {lr}); those successors are back at their weights from before "
                  "matching, and the run goes on from there. Lower match_lr, or turn matching off with "
                  "fit(..., match_steps=0).", MatchingDivergedWarning)
    result.guard = guard
    return result


def _put_back(engine: Any, saved: Dict[int, Dict[str, torch.Tensor]], indices: List[int]) -> None:
    groups = {g.index: g for g in engine.groups}
    for index in indices:
        groups[index].successor.load_state_dict(saved[index])
