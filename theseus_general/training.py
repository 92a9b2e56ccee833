"""One training loop for a Theseus engine or a plain model: `fit`.

    from theseus_general.training import fit

    th = Theseus(model, successor_depth=3, scheduler=LinearScheduler.reaching_one_at(300))
    result = fit(th, batches, steps=600, lr=1e-4, device="auto", mixed_precision="bf16",
                 metrics="runs/bert6to3", checkpoints="runs/bert6to3/checkpoints", checkpoint_every=100)
    successor = th.export()

    student = successor_shaped_copy(model, successor_depth=3)            # a plain model: the same loop
    fit(student, batches, steps=600, loss=DistillationStep(student, model))

What it does, so that callers do not: AdamW over the engine's trainable parameters (or the
model's), an LR schedule (linear decay, constant or cosine, after an optional warm-up), the
device (``"auto"``: CUDA when available), autocast (``"bf16"``/``"fp16"``, with a GradScaler
for fp16), gradient accumulation (one optimiser step, one ``th.step()``, per
``gradient_accumulation`` micro-batches), a tqdm bar (loss, batch accuracy, replacement rate),
metrics (`MetricsLogger`: loss, train_accuracy, replacement_rate, lr per step), checkpoints
and resume (`CheckpointManager`; engines and plain models), and a stop on a NaN or infinite loss before
the optimiser applies it (`NonFiniteLossError`).

`batches` is an iterable of ``(inputs, labels)``, inputs as the model's forward takes them (a
Mapping of keyword arguments such as a dict or a BatchEncoding, a tuple of positional ones, or
one argument: a tensor, or a list such as a detection model's images), or of Mappings with
"labels" (a Hugging Face loader's batches), or a function ``position -> batch``: then a resumed run reads exactly the batches an
uninterrupted one would, without replaying the stream. Distributed training stays with
`theseus_general.distributed.wrap_ddp` and the Accelerate / Trainer integrations; this loop
runs one process on one device. It imports no model library.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import CheckpointManager, ModuleState
from .engine import Theseus
from .errors import CollapsedSuccessorWarning, MatchingDivergedWarning, NonFiniteLossError, TrainingError, warn_user
from .graph import default_logits, run_model
from .matching import (MatchGuard, StartCheck, choose_starts, full_precision, group_errors, inputs_of,
                       note_starts, put_back, start_predictions)
from .metrics import MetricsLogger
from .recipes import START_CHECK_MAX_BATCHES

# module matching's lr, when the recipe says "auto" (issue 26): chosen per model by `probe_match_lr` from this grid,
# each lr trying MATCH_LR_PROBE_STEPS matching steps and judged on the next MATCH_LR_PROBE_BATCHES batches
MATCH_LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3)
MATCH_LR_PROBE_STEPS = 8
MATCH_LR_PROBE_BATCHES = 2
MATCH_LR_FALLBACK = 1e-3  # "auto" for a matching of 1-2 steps, too short to probe (the fixed lr before round 13)

# the end check's least run of predictions (the start check's pooled 128): fewer could be one class by chance
END_CHECK_PREDICTIONS = 128

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LR_SCHEDULES = ("linear", "constant", "cosine")

Batch = Tuple[Any, Any]
# loss(inputs, labels) -> loss, or (loss, logits) to get the batch accuracy in the bar and metrics
LossFn = Callable[[Any, Any], Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]]


@dataclass
class StepLog:
    """One optimiser step: the loss (mean over its micro-batches), the batch accuracy when the loss
    gave logits, the replacement rate its draws used (engines only) and the learning rate it used."""

    step: int
    loss: float
    lr: float
    replacement_rate: Optional[float] = None
    accuracy: Optional[float] = None


@dataclass
class FitResult:
    history: List[StepLog] = field(default_factory=list)  # the steps this call ran (after a resume: from there)
    device: str = "cpu"
    resumed_from: Optional[str] = None  # the checkpoint directory a resume started from
    matching: Optional["FitResult"] = None  # the module-matching phase, when this call ran one
    guard: Optional[Any] = None  # a matching phase's `theseus_general.matching.MatchGuard` (errors before/after)
    # what the first batches said about the start, when the recipe asked them whether to match
    # (`theseus_general.matching.check_start`): the successors' agreement with the predecessor, and
    # whether the start collapsed, as the recipe judges it (`StartCheck.collapsed_under`)
    start_agreement: Optional[float] = None
    start_collapsed: Optional[bool] = None
    start_predictions: Optional[int] = None  # how many predictions that check pooled
    start_spread: Optional[float] = None  # the start's logit spread over the predecessor's (`StartCheck.spread_ratio`)
    # whether the trained successors alone (p = 1) answered a single class on each of the run's last training
    # batches, at least END_CHECK_PREDICTIONS predictions, while the labels held several: the compressed model has
    # collapsed (a `CollapsedSuccessorWarning`). None: not measured (no engine, no logits, p never reached 1)
    end_collapsed: Optional[bool] = None
    # a matching phase's learning rate, and the probe that chose it when the lr was "auto" (`probe_match_lr`)
    match_lr: Optional[float] = None
    match_lr_probe: Optional["MatchLrProbe"] = None

    @property
    def losses(self) -> List[float]:
        return [s.loss for s in self.history]


@dataclass
class MatchLrProbe:
    """What `probe_match_lr` measured: each tried lr's mean relative error of the successors against their groups on
    held-out batches after `steps` matching steps at it (inf where matching stopped on a non-finite loss), and
    the lr chosen (the lowest error; a tie goes to the lower lr)."""

    lr: float
    errors: Dict[float, float]
    steps: int


def resolve_device(device: Union[str, torch.device, None] = "auto", model: Optional[nn.Module] = None) -> torch.device:
    """``"auto"`` (or None): the device `model` is on when that is an accelerator, else CUDA when
    available, else the CPU; anything else as torch reads it, checked to exist here."""
    if device is None or device == "auto":
        home = _device_of(model) if model is not None else None
        if home is not None and home.type not in ("cpu", "meta"):
            return home
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise TrainingError(f"device={device!r} is not a torch device ({e}); "
                            "use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device={device!r} but CUDA is not available here; use device='auto' or 'cpu'.")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError(f"device={device!r} but MPS is not available here; use device='auto' or 'cpu'.")
    return resolved


def autocast_dtype(mixed_precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a ``mixed_precision`` setting ("no" -> None), checked against the device."""
    if mixed_precision not in MIXED_PRECISION:
        raise TrainingError(f"mixed_precision must be one of {sorted(MIXED_PRECISION)}, got {mixed_precision!r}.")
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("mixed_precision='bf16' but this GPU has no bfloat16 support; use 'fp16' (with loss "
                            "scaling) or 'no'.")
    return MIXED_PRECISION[mixed_precision]


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors in `obj` (nested mappings, lists, tuples; objects with a `.to`) on `device`. A dict keeps its
    type; another Mapping (a transformers BatchEncoding, a UserDict) moves with its own `.to` when it has one
    and keeps its type when that type can be built from pairs, else becomes a dict."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return type(obj)((k, to_device(v, device)) for k, v in obj.items())
    if isinstance(obj, Mapping):
        if callable(getattr(obj, "to", None)):
            return obj.to(device)
        moved = {k: to_device(v, device) for k, v in obj.items()}
        try:
            return type(obj)(moved)
        except Exception:  # a Mapping type that is not built from a dict
            return moved
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_device(v, device) for v in obj)
    if hasattr(obj, "to") and not isinstance(obj, nn.Module):
        return obj.to(device)
    return obj


def split_batch(batch: Any) -> Batch:
    """A batch as ``(inputs, labels)``: an ``(inputs, labels)`` pair (a tuple or a list, as a DataLoader
    collates it), or a Mapping of the model's keyword arguments (a Hugging Face loader's dict or
    BatchEncoding) whose "labels" are the labels (None without them). The inputs go to the model as
    `theseus_general.graph.model_arguments` says."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != "labels"}, batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TrainingError(
        f"fit() reads each batch as (inputs, labels) or as a mapping of the model's keyword arguments with "
        f"'labels'; got a {type(batch).__name__}{f' of {len(batch)} items' if isinstance(batch, (tuple, list)) else ''}. "
        "Yield (inputs, labels) pairs: inputs a tensor, a tuple of positional arguments, a list (one argument) "
        "or a mapping of keyword arguments."
    )


def add_device_arguments(parser: Any, device: str = "auto") -> None:
    """``--device`` and ``--mixed-precision`` on an argparse parser, as the examples and benchmarks take
    them; pass ``args.device`` and ``args.mixed_precision`` to `fit`."""
    parser.add_argument("--device", default=device, help=f"where to train: auto (CUDA when available, else the CPU), "
                        f"cpu, cuda or cuda:N (default {device})")
    parser.add_argument("--mixed-precision", choices=sorted(MIXED_PRECISION), default="no",
                        help="autocast while training: bf16 (also on the CPU), fp16 (with loss scaling) or no")


def lr_factor(step: int, steps: int, schedule: Union[str, Callable[[int], float]] = "linear",
              warmup: float = 0.0) -> float:
    """The LR multiplier at `step`: a linear warm-up over the first `warmup` fraction of `steps`,
    then linear decay to 0, constant, cosine decay to 0, or what a function ``step -> multiplier`` says."""
    warm = int(warmup * steps)
    if step < warm:
        return (step + 1) / warm
    if callable(schedule):
        return float(schedule(step))
    progress = (step - warm) / max(1, steps - warm)
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)


def cross_entropy_loss(model: nn.Module, logits_of: Optional[Callable[[Any], torch.Tensor]] = None) -> LossFn:
    """The default loss: cross-entropy of the model's logits (``output.logits``, the output itself, or
    its first element), returned with the logits so that the loop can show the batch accuracy."""
    if logits_of is None:
        logits_of = default_logits

    def loss(inputs: Any, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if labels is None:
            raise TrainingError("The default loss (cross-entropy of the logits) needs labels: the batch has none. "
                                "Yield (inputs, labels) pairs or mappings with 'labels', or pass loss=.")
        logits = logits_of(run_model(model, inputs))
        return F.cross_entropy(logits.float(), labels), logits

    return loss


def fit(
    target: Union[Theseus, nn.Module],
    batches: Union[Iterable[Batch], Callable[[int], Batch]],
    steps: int,
    *,
    loss: Optional[LossFn] = None,
    params: Optional[Iterable[nn.Parameter]] = None,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    lr_schedule: Union[str, Callable[[int], float]] = "linear",
    warmup: float = 0.0,
    max_grad_norm: Optional[float] = None,
    gradient_accumulation: int = 1,
    device: Union[str, torch.device, None] = "auto",
    mixed_precision: str = "no",
    metrics: Union[str, MetricsLogger, None] = None,
    checkpoints: Union[str, CheckpointManager, None] = None,
    checkpoint_every: int = 0,
    restore_device: bool = True,
    progress: bool = True,
    desc: str = "train",
    on_step: Optional[Callable[[StepLog], Any]] = None,
    match_steps: Optional[int] = None,
    match_lr: Union[float, str, None] = None,
    choose_start: Optional[bool] = None,
) -> FitResult:
    """Train `target` for `steps` optimiser steps (a Theseus engine: module matching for the recipe's
    share of them, then the mixed phase until ``th.step_count == steps - match_steps``, so a resumed
    run finishes the same budget).

    target: a `Theseus` engine (its wrapped model trains; one ``th.step()`` per optimiser step) or a
        plain ``nn.Module`` (a baseline student, a predecessor being fine-tuned).
    batches: iterable of ``(inputs, labels)`` (or of Mappings of keyword arguments with "labels") with
        at least ``steps * gradient_accumulation`` batches, or a function ``position -> batch`` (resumes
        without replaying). Inputs: a Mapping -> keyword arguments, a tuple -> positional arguments,
        anything else (a tensor, a list) -> one argument (`split_batch`, `graph.model_arguments`).
    loss: ``loss(inputs, labels) -> loss`` or ``-> (loss, logits)`` (logits give the batch accuracy);
        default: cross-entropy of the model's logits. Inputs and labels arrive on the device, inside
        autocast. A loss object with a ``.to(device)`` method (e.g. `DistillationStep`, whose teacher
        must run on the same device) is moved with the model.
    params: what AdamW trains; default ``th.trainable_parameters()``, or all of the model's
        parameters (frozen ones are skipped by the optimiser while they have no gradient).
    lr_schedule: "linear" (decay to 0), "constant" or "cosine", after a linear warm-up over the
        first `warmup` fraction of the steps; or a function ``step -> lr multiplier`` for the steps after
        the warm-up, read once per step (e.g. one that `on_step` lowers when dev stops improving). A
        function's own state is not in the checkpoints: a resumed run must give it back.
    max_grad_norm: clip the gradient norm to this value (None: no clipping).
    device: "auto" (the model's accelerator if it is on one, else CUDA when available, else the CPU),
        "cpu", "cuda", "cuda:1", a torch.device.
    mixed_precision: "no", "bf16" (autocast to bfloat16; works on the CPU too) or "fp16" (autocast to
        float16 with a GradScaler). Weights and optimiser state stay float32.
    metrics: a directory (a `MetricsLogger` is opened there and closed at the end) or a logger of yours.
    checkpoints / checkpoint_every: a directory (or `CheckpointManager`) to resume from and save to every
        N steps and at the end (an engine's state, or a plain model's whole state_dict). The GradScaler's
        state is not saved (it re-calibrates).
    restore_device: move the model (and the loss object) back to the device it came from at the end,
        so evaluation and export code written for the CPU keeps working; False leaves it on `device`.
    on_step: called with each step's `StepLog` after the optimiser step (e.g. an evaluation every N steps).
    match_steps: engines only: how many of the `steps` go to module matching before the mixed phase
        (`theseus_general.match_successors`: each successor learns its group's output, labels unused). None:
        the engine's recipe decides (its ``match_fraction`` of `steps`: none for "default", 20% for "matching"); 0: none.
        The mixed phase then has ``steps - match_steps`` optimiser steps (``th.step_count`` ends there),
        and a resumed run skips matching (its successors come from the checkpoint).
    match_lr: the matching phase's learning rate, or "auto": chosen for this model by a short probe
        (`probe_match_lr`). None: the recipe's ``match_lr``, else `lr`.
    choose_start: before matching, restart each successor from the block of its group that reproduces
        the group best on the first batch (`theseus_general.matching.choose_starts`; the choice is in
        ``th.successor_starts``). None: the recipe's ``choose_start``, for successors the engine copied
        with the default init only (never for ``init=`` or ``successors=`` you gave).

    The model is put in training mode and left in the mode it had before. Raises `NonFiniteLossError`
    (before the optimiser applies the step) when the loss is NaN or infinite.
    """
    engine = target if isinstance(target, Theseus) else None
    model = engine.model if engine is not None else target
    if not isinstance(model, nn.Module):
        raise TrainingError(f"fit() trains a Theseus engine or a torch.nn.Module, got {type(target).__qualname__}.")
    _check_settings(steps, lr_schedule, gradient_accumulation, checkpoint_every)
    _check_numbers(lr=lr, weight_decay=weight_decay, warmup=warmup, max_grad_norm=max_grad_norm,
                   match_lr=None if match_lr == "auto" else match_lr)
    start = None
    if engine is not None and match_steps is None and engine.step_count == 0 and engine.recipe.asks_start:
        # the recipe matches only a start that lost the task: ask the first batches (read once, then
        # handed on as the stream's first batches, so that a resumed run decides the same)
        batches, start = _read_start(engine, batches)
    _fit_phase(engine, start)
    planned_matching = _matching_steps(engine, steps, match_steps, start)
    steps -= planned_matching  # matching comes out of the same budget of optimiser steps
    if engine is not None and engine.step_count == 0 and engine.needs_total_steps:
        engine.set_total_steps(steps)  # the default curriculum reaches p = 1 at its fraction of this run
    matching = shared_source = None
    if planned_matching and engine.step_count == 0 and not _has_checkpoint(checkpoints):
        # matching reads the first batches; the mixed phase goes on from the same stream
        shared_source = _batch_source(batches, 0, (planned_matching + steps) * gradient_accumulation)
        matching = match_successors(
            engine, shared_source, planned_matching, lr=match_lr or engine.recipe.match_lr or lr, weight_decay=weight_decay,
            choose_start=choose_start,
            lr_schedule=lr_schedule, device=device, mixed_precision=mixed_precision, progress=progress,
            restore_device=restore_device, desc=f"{desc}: module matching")
    run_device = resolve_device(device, model)
    dtype = autocast_dtype(mixed_precision, run_device)
    params = list(params if params is not None else (engine.trainable_parameters() if engine else model.parameters()))
    if not params:
        raise TrainingError("No trainable parameters were given to fit(); pass params= or a model with parameters.")
    loss_fn = loss if loss is not None else cross_entropy_loss(model)

    home = _device_of(model)
    movable = [model] + ([loss_fn] if callable(getattr(loss_fn, "to", None)) else [])
    was_training = model.training
    bar = logger = None
    try:
        for thing in movable:  # moves parameters in place: `params` and the engine keep pointing at them
            thing.to(run_device)
        groups, factors = _param_groups(engine, params, lambda s: lr_factor(s, steps, lr_schedule, warmup))
        optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        if engine is not None:
            engine.attach(optimizer)  # idle successors' zero gradients are skipped by this optimiser only
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
        scaler = torch.amp.GradScaler(run_device.type, enabled=mixed_precision == "fp16")
        autocast = ((lambda: torch.autocast(run_device.type, dtype=dtype)) if dtype is not None
                    else contextlib.nullcontext)

        manager = CheckpointManager(checkpoints) if isinstance(checkpoints, str) else checkpoints
        # what a checkpoint holds: the engine's state, or a plain model's weights and step count
        saved_state = engine if engine is not None else ModuleState(model) if manager is not None else None
        resumed = manager.resume(saved_state, optimizer, scheduler) if manager is not None else None
        position = (resumed.data_position or 0) if resumed else planned_matching
        next_batch = shared_source or _batch_source(batches, position, steps * gradient_accumulation)
        logger = MetricsLogger(metrics) if isinstance(metrics, str) else metrics
        agreement, collapsed = _decision(engine, start)  # the judgement _matching_steps acted on
        result = FitResult(device=str(run_device), resumed_from=resumed.path if resumed else None, matching=matching,
                           start_agreement=agreement, start_collapsed=collapsed,
                           start_predictions=start.predictions if start else None,
                           start_spread=start.spread_ratio if start else None)
        if resumed and progress:
            tqdm.write(f"resumed from {resumed.path} (step {resumed.step})")

        step = saved_state.step_count if saved_state is not None else 0
        model.train()
        # progress=True leaves `disable` to tqdm, so that TQDM_DISABLE=1 in the environment still silences the bar
        bar = tqdm(total=steps, initial=step, desc=desc, leave=False, dynamic_ncols=True, **({} if progress else {"disable": True}))
        recent: List[float] = []  # batch accuracies of the last 20 steps: the bar's running mean
        # the end check: how many of the last predictions the successors alone (p = 1) gave, in batches where each
        # answered a single class while the labels held several (a run of them that reaches the end: collapsed)
        one_answer = 0
        counted_at_full = False
        while step < steps:
            rate = engine.replacement_rate if engine is not None else None  # the rate this step's draws use
            lr_now = scheduler.get_last_lr()[0]
            # loss, correct predictions, predictions counted; of those, in batches whose labels hold several classes,
            # and in such batches where the model answered one class (the end check)
            sums = torch.zeros(5, device=run_device)
            for _ in range(gradient_accumulation):
                inputs, labels = to_device(split_batch(next_batch(position)), run_device)
                position += 1
                with autocast():
                    out = loss_fn(inputs, labels)
                value, logits = out if isinstance(out, tuple) else (out, None)
                extra = engine.auxiliary_loss() if engine is not None else None
                if extra is not None:  # the recipe's mixed-phase matching term (off by default)
                    value = value + extra.to(value.dtype)
                scaler.scale(value / gradient_accumulation).backward()
                sums[0] += value.detach().float()
                if logits is not None and isinstance(labels, torch.Tensor):
                    sums[1:] += _hits(logits.detach(), labels, end_check=rate is not None and rate >= 1)
            loss_sum, correct, counted, varied, one_class = sums.tolist()  # the step's one device sync
            loss_value = loss_sum / gradient_accumulation
            if not math.isfinite(loss_value):
                if engine is not None:
                    engine.step(loss_value)  # raises, and marks the run failed so nothing bad is saved
                raise NonFiniteLossError(f"The loss became {loss_value} at step {step}; the run is stopped before "
                                         "the optimiser applied it. Try a lower learning rate or max_grad_norm.")
            if max_grad_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if engine is not None:
                engine.step()
            if rate is not None and rate >= 1 and varied:
                counted_at_full = True
                one_answer = one_answer + one_class if one_class == varied else 0
            elif rate is not None and rate < 1:
                one_answer = 0
            accuracy = correct / counted if counted else None
            record = StepLog(step, loss_value, lr_now, rate, accuracy)
            result.history.append(record)
            step += 1
            if isinstance(saved_state, ModuleState):
                saved_state.step_count = step  # an engine counts its own steps
            if logger is not None:
                logger.log(record.step, loss=loss_value, train_accuracy=accuracy, replacement_rate=rate, lr=lr_now)
            if accuracy is not None:
                recent = (recent + [accuracy])[-20:]
            bar.set_postfix(refresh=False, loss=f"{loss_value:.3f}",  # drawn once, by update()
                            **({"acc": f"{sum(recent) / len(recent):.3f}"} if recent else {}),
                            **({"p": f"{rate:.2f}"} if rate is not None else {}))
            bar.update(1)
            if manager is not None and ((checkpoint_every and step % checkpoint_every == 0) or step == steps):
                manager.save(saved_state, optimizer, scheduler, data_position=position)
            if on_step is not None:
                on_step(record)
        if engine is not None:
            result.end_collapsed = one_answer >= END_CHECK_PREDICTIONS if counted_at_full else None
            if result.end_collapsed:
                _warn_collapsed(one_answer, matched=matching is not None)
    finally:
        if bar is not None:
            bar.close()
        if isinstance(metrics, str) and logger is not None:
            logger.close()
        model.train(was_training)
        if restore_device and home is not None and home != run_device:
            for thing in movable:
                thing.to(home)
    return result


def _param_groups(engine: Optional[Theseus], params: List[nn.Parameter],
                  factor: Callable[[int], float]) -> Tuple[list, Any]:
    """AdamW's parameter groups and LambdaLR's factor(s): one group, unless the engine's recipe
    compensates the successors' learning rate for the steps they sit out (``lr_compensation``: their
    factor is also multiplied by min(cap, 1/p) at the step's replacement rate)."""
    if engine is None or engine.recipe.lr_compensation is None:
        return params, factor
    recipe, scheduler = engine.recipe, engine.scheduler
    theirs = {id(p) for s in engine.successors() for p in s.parameters()}
    successors = [p for p in params if id(p) in theirs]
    rest = [p for p in params if id(p) not in theirs]
    groups, factors = [], []
    if successors:  # LambdaLR's step count is the engine's (resumed runs restore both)
        groups.append({"params": successors})
        factors.append(lambda s: factor(s) * recipe.successor_lr_factor(scheduler(s)))
    if rest:
        groups.append({"params": rest})
        factors.append(factor)
    return groups, factors


def _check_settings(steps: int, lr_schedule: Any, accumulation: int, checkpoint_every: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise TrainingError(f"steps must be an int >= 1, got {steps!r}.")
    if not callable(lr_schedule) and lr_schedule not in LR_SCHEDULES:
        raise TrainingError(f"lr_schedule must be one of {LR_SCHEDULES} or a function step -> lr multiplier, "
                            f"got {lr_schedule!r}.")
    if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
        raise TrainingError(f"gradient_accumulation must be an int >= 1 (micro-batches per optimiser step), "
                            f"got {accumulation!r}.")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise TrainingError(f"checkpoint_every must be an int >= 0 (save every N steps; 0: only at the end), "
                            f"got {checkpoint_every!r}.")


# fit's numbers: name -> (lower bound, whether the bound itself is allowed, upper bound, what it is, an example)
_NUMBERS = {
    "lr": (0.0, True, None, "the learning rate", "lr=1e-4"),
    "weight_decay": (0.0, True, None, "AdamW's decoupled weight decay", "weight_decay=0.01"),
    "warmup": (0.0, True, 1.0, "the fraction of the steps spent warming up the learning rate", "warmup=0.1"),
    "max_grad_norm": (0.0, False, None, "the gradient-norm clip (None: no clipping)", "max_grad_norm=1.0"),
    "match_lr": (0.0, False, None, "module matching's learning rate (None: the recipe's; \"auto\": probed)",
                 "match_lr=1e-3"),
}


def _check_numbers(**values: Any) -> None:
    """Each of fit's numbers a finite real number in its range (None where None means "not set"),
    before module matching or the optimiser changes any weight; the message names the fix."""
    for name, value in values.items():
        low, low_allowed, high, what, example = _NUMBERS[name]
        if value is None and name in ("max_grad_norm", "match_lr"):
            continue
        ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
              and (value >= low if low_allowed else value > low) and (high is None or value <= high))
        if not ok:
            bound = f"{'>=' if low_allowed else '>'} {low:g}" + (f" and <= {high:g}" if high is not None else "")
            raise TrainingError(f"{name} ({what}) must be a finite number {bound}, got {value!r}; e.g. {example}.")


def match_successors(engine: Any, batches: Union[Iterable[Batch], Callable[[int], Batch]], steps: int, *,
                     lr: Union[float, str] = "auto", choose_start: Optional[bool] = None,
                     desc: str = "match successors", **fit_options: Any) -> "FitResult":
    """Train the successors of `engine` for `steps` steps to reproduce their groups' outputs.

    batches: ``(inputs, labels)`` pairs as for `fit` (labels are ignored; ``None`` is fine), dicts of
        model arguments (a Hugging Face loader's batches; "labels" is dropped), or the inputs alone;
        an iterable or a function ``position -> batch``.
    lr and the other options (``weight_decay``, ``lr_schedule``, ``device``, ``mixed_precision``,
    ``progress``, ...) are `fit`'s; the optimiser sees the successors' parameters only. ``lr="auto"``: chosen
        for this model first by `probe_match_lr` (on the first batches, which matching then reads again: 8 steps
        judged on the next 2, fewer in a matching under 10 steps; 1e-3 below 3 steps), its measurements in the
        result's ``match_lr_probe``.
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
    engine.check_open("match_successors()")
    probe = None
    if lr == "auto":
        lr = MATCH_LR_FALLBACK  # for a matching too short to probe (1-2 steps)
        if steps >= 3:
            # the probe reads only batches this matching reads anyway (a shared stream goes on after them)
            held = min(MATCH_LR_PROBE_BATCHES, steps - 2)
            source = _batch_source(batches, 0, steps)
            read = [source(i) for i in range(min(MATCH_LR_PROBE_STEPS + held, steps))]
            probe = probe_match_lr(engine, read, steps=len(read) - held, choose_start=choose_start, desc=desc,
                                   **fit_options)
            lr = probe.lr
            batches = _replaying(read, source)  # matching reads the probe's batches again, then the rest
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
                note_starts(engine.plan, engine.successor_starts)
            first.append(inputs)
            with full_precision(model):
                guard.start.update(group_errors(engine, inputs, training=True))
            saved.update((g.index, {k: v.detach().clone() for k, v in g.successor.state_dict().items()})
                         for g in engine.groups)
        engine.match_errors()
        with torch.no_grad():  # the successors re-enable gradients for themselves
            run_model(model, inputs)
        errors = engine.match_errors()
        if not errors:
            raise TrainingError("match_successors(): the forward pass ran no Theseus group; pass the inputs "
                                "the wrapped model takes.")
        return torch.stack([error for _, error in errors]).mean()

    source = _batch_source(batches, 0, steps)
    user_on_step = fit_options.pop("on_step", None)

    def unlabelled(position: int) -> Tuple[Any, None]:
        return inputs_of(source(position)), None

    def on_step(record: Any) -> None:
        if record.step == steps - 1:  # after the last optimiser step, still on the run's device
            with full_precision(model):
                guard.end.update(group_errors(engine, first[0], training=True))
        if user_on_step is not None:
            user_on_step(record)

    try:
        with engine.matching_mode():
            result = fit(model, unlabelled, steps, loss=matching_loss, params=params, lr=lr, desc=desc,
                         on_step=on_step, **fit_options)
    except NonFiniteLossError as e:
        put_back(engine, saved, list(saved))
        raise NonFiniteLossError(f"Module matching stopped: {e} Every successor is back at its weights from before "
                                 f"matching. Lower match_lr (it was {lr}), or turn matching off with "
                                 "fit(..., match_steps=0).") from None
    engine.mark_trained()
    guard.restored = guard.diverged()
    if guard.restored:
        put_back(engine, saved, guard.restored)
        detail = ", ".join(f"group {g}: {guard.start[g]:.4g} -> {guard.end[g]:.4g}" for g in guard.restored)
        warn_user(f"Module matching diverged ({detail}: relative error on the first batch, before -> after "
                  f"{steps} matching steps at lr {lr}); those successors are back at their weights from before "
                  "matching, and the run goes on from there. Lower match_lr, or turn matching off with "
                  "fit(..., match_steps=0).", MatchingDivergedWarning)
    result.guard, result.match_lr, result.match_lr_probe = guard, lr, probe
    return result


def probe_match_lr(engine: Any, batches: List[Batch], *, steps: int = MATCH_LR_PROBE_STEPS,
                   grid: Tuple[float, ...] = MATCH_LR_GRID, choose_start: Optional[bool] = None,
                   desc: str = "match successors", **fit_options: Any) -> MatchLrProbe:
    """Module matching's learning rate for this model, measured (``match_lr="auto"``). From the successors' present
    weights, each lr of `grid` runs `steps` matching steps (constant lr, the start choice as `match_successors`
    makes it) on the first `steps` of `batches`; the lr whose successors then reproduce their groups best on the
    batches after those (held out; the mean relative error of `group_errors`) wins, a tie going to the lower lr.
    After each try every weight and buffer of the model, the start choice and the random state are put back, so
    the matching that follows runs as it would at a fixed lr. Costs ``len(grid) * steps`` matching steps.

    batches: at least ``steps + 1`` batches, as `match_successors` takes them; the other options are its own."""
    if not grid or any(isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and x > 0)
                       for x in grid):
        raise TrainingError(f"probe_match_lr's grid is a tuple of learning rates > 0, got {grid!r}.")
    if len(batches) <= steps:
        raise TrainingError(f"probe_match_lr needs more batches than its {steps} steps (the rest are held out), "
                            f"got {len(batches)}.")
    model = engine.model
    held_out = [inputs_of(batch) for batch in batches[steps:]]
    options = {k: v for k, v in fit_options.items() if k in ("device", "mixed_precision", "weight_decay",
                                                            "max_grad_norm", "restore_device")}
    # what a try can change: the successors (matching's optimiser sees nothing else) and every buffer (norms' running
    # statistics, which training mode updates); the engine's start choice and whether it counts as trained
    successors = {g.index: {k: v.detach().clone() for k, v in g.successor.state_dict().items()} for g in engine.groups}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    starts, trained = dict(engine.successor_starts), engine._trained
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    errors: Dict[float, float] = {}
    tries = tqdm(sorted(set(grid)), desc=f"{desc}: choosing its lr", disable=not fit_options.get("progress", True),
                 leave=False)
    for lr in tries:
        errors[lr] = math.inf  # a try stopped on a non-finite loss, or ending at a NaN error, loses
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.simplefilter("ignore", MatchingDivergedWarning)  # the try's own put-back; judged below
            try:
                match_successors(engine, lambda position: batches[position], steps, lr=lr,
                                 choose_start=choose_start, lr_schedule="constant", progress=False, **options)
                device = _device_of(model)
                with full_precision(model):
                    measured = [e for inputs in held_out
                                for e in group_errors(engine, to_device(inputs, device), training=True).values()]
                mean = sum(measured) / len(measured)
                errors[lr] = mean if math.isfinite(mean) else math.inf
            except NonFiniteLossError:
                pass
            finally:  # whatever the try did, the next one (and the matching after the probe) starts from here
                _put_back_all(engine, successors, buffers)
                engine.successor_starts, engine._trained = dict(starts), trained
        tries.set_postfix(lr=f"{lr:g}", error=f"{errors[lr]:.4g}")
    chosen = min(errors, key=lambda x: (errors[x], x))
    return MatchLrProbe(lr=chosen, errors=errors, steps=steps)


def _replaying(read: List[Batch], rest: Callable[[int], Batch]) -> Callable[[int], Batch]:
    return lambda position: read[position] if position < len(read) else rest(position)


def _put_back_all(engine: Theseus, successors: Dict[int, Dict[str, torch.Tensor]],
                  buffers: Dict[str, torch.Tensor]) -> None:
    put_back(engine, successors, list(successors))
    with torch.no_grad():
        for name, buffer in engine.model.named_buffers():
            buffer.copy_(buffers[name].to(buffer.device))


def planned_match_steps(engine: Theseus, steps: int, batch: Any = None, *, batches: Any = None) -> int:
    """The module-matching steps `engine`'s recipe takes out of a run of `steps` optimiser steps, for
    loops of your own (the HF Trainer, Accelerate, Lightning; `fit` decides the same way): the recipe's
    share, or none when the recipe matches only a start that lost the task and the run's first batches
    say the start has not (`theseus_general.matching.check_start`); like `fit`, it also applies the recipe's
    short mixed phase to a start that disagrees (`Theseus.fit_phase_to_start`). Give `batches`, the run's batches
    (an iterable such as your DataLoader, or a function ``position -> batch``): the check reads as many
    as the recipe's ``start_check_predictions`` needs, as `fit` does. Or give `batch`, one batch (an
    ``(inputs, labels)`` pair, a mapping with "labels", or the inputs), when one is all you have. Call it
    before training."""
    if (batch is None) == (batches is None):
        raise TrainingError("planned_match_steps needs the run's first batches: give batches= (your DataLoader "
                            "or batch stream) or batch= (one batch), not both.")
    if not engine.recipe.asks_start:
        return engine.recipe.match_steps(steps)
    _, start = _read_start(engine, batches if batches is not None else [batch])
    _fit_phase(engine, start)  # as fit
    return engine.recipe.match_steps(steps, *_decision(engine, start))


def _read_start(engine: Theseus, batches: Any) -> Tuple[Any, Optional[StartCheck]]:
    """What the run's first batches say about the start (`theseus_general.matching.check_start`, pooled over
    batches until the recipe's ``start_check_predictions``, at most START_CHECK_MAX_BATCHES), and batches that
    still start with the ones read (a function of the position as it is): so a resumed run decides the same."""
    device = _device_of(engine.model) or torch.device("cpu")
    function = callable(batches) and not hasattr(batches, "__iter__")
    stream = None if function else iter(batches)
    read: List[Batch] = []
    samples = []
    counted = 0
    # islice asks the stream for one batch at a time: none is read past the last one checked
    for batch in itertools.islice(map(batches, itertools.count()) if function else stream, START_CHECK_MAX_BATCHES):
        read.append(batch)
        samples.append(start_predictions(engine, to_device(inputs_of(batch), device)))
        if samples[-1] is None:  # no logits: nothing to decide on
            break
        counted += samples[-1].predecessor.numel()
        if counted >= engine.recipe.start_check_predictions:
            break
    if not read:
        raise TrainingError("batches is empty; give at least steps x gradient_accumulation batches.")
    return (batches if function else itertools.chain(read, stream)), StartCheck.pooled(samples)


def _decision(engine: Theseus, start: Optional[StartCheck]) -> Tuple[Optional[float], Optional[bool]]:
    """(agreement, collapsed) of the start check, collapsed as the engine's recipe judges it."""
    if start is None:
        return None, None
    return start.agreement, start.collapsed_under(engine.recipe.collapse_spread)


def _fit_phase(engine: Optional[Theseus], start: Optional[StartCheck]) -> None:
    """The recipe's short mixed phase for a start that disagrees (`Theseus.fit_phase_to_start`), from the start
    check as the recipe judges it; nothing when no check was read."""
    if engine is not None and start is not None:
        agreement, collapsed = _decision(engine, start)
        engine.fit_phase_to_start(agreement, collapsed=collapsed)


def _matching_steps(engine: Optional[Theseus], steps: int, match_steps: Optional[int],
                    start: Optional[StartCheck] = None) -> int:
    if engine is None:
        if match_steps:
            raise TrainingError("match_steps= trains successors to match their groups; it needs a Theseus engine "
                                "as the target, not a plain model.")
        return 0
    if match_steps is None:
        return engine.recipe.match_steps(steps, *_decision(engine, start)) if engine.step_count == 0 else 0
    if isinstance(match_steps, bool) or not isinstance(match_steps, int) or not 0 <= match_steps < steps:
        raise TrainingError(f"match_steps must be an int from 0 to steps - 1 (it comes out of the {steps} steps), "
                            f"got {match_steps!r}.")
    return match_steps


def _has_checkpoint(checkpoints: Any) -> bool:
    if checkpoints is None:
        return False
    manager = CheckpointManager(checkpoints) if isinstance(checkpoints, str) else checkpoints
    return manager.latest() is not None


def _batch_source(batches: Any, position: int, needed: int) -> Callable[[int], Batch]:
    """`position -> batch`, from a function as it is, or from an iterable read in order (after a
    resume, the batches before `position` are read and dropped)."""
    if callable(batches) and not hasattr(batches, "__iter__"):
        return batches
    stream = iter(batches)
    for _ in range(position):
        next(stream, None)

    def next_batch(at: int) -> Batch:
        try:
            batch = next(stream)
        except StopIteration:
            raise TrainingError(f"batches ran out after {at} of {needed} batches; give an endless stream "
                                "(e.g. itertools.cycle) or enough batches for steps x gradient_accumulation.") from None
        return batch

    return next_batch


def _hits(logits: torch.Tensor, labels: torch.Tensor, end_check: bool = False) -> torch.Tensor:
    """[correct predictions, predictions counted, and with `end_check`: those counted again when the labels hold
    more than one class, and once more when the model also answered a single class] on the device (no sync);
    labels of -100 (ignored tokens) do not count, and logits that do not match the labels' shape count nothing."""
    if logits.dim() < 1 or logits.shape[:-1] != labels.shape or labels.is_floating_point():
        return torch.zeros(4, device=logits.device)
    valid = labels != -100
    answers = logits.argmax(-1)
    counted = valid.sum()
    if not end_check:  # the successors alone do not run yet (p < 1): nothing for the end check
        return torch.stack([((answers == labels) & valid).sum(), counted, 0 * counted, 0 * counted]).float()
    varied = _spans(labels, valid)
    return torch.stack([((answers == labels) & valid).sum(), counted, counted * varied,
                        counted * varied * ~_spans(answers, valid)]).float()


def _spans(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Whether `values` take more than one value where `valid` (a 0-dim bool on the device, no sync)."""
    low = torch.where(valid, values, torch.iinfo(values.dtype).max).min()
    high = torch.where(valid, values, torch.iinfo(values.dtype).min).max()
    return high > low


def _warn_collapsed(predictions: int, *, matched: bool) -> None:
    fix = ("module matching ran first; a larger successor_depth or more steps may help" if matched else
           "rerun with module matching, fit(..., match_steps=int(0.2 * steps)), or compress less (a larger "
           "successor_depth)")
    warn_user(f"The successors alone (the model export() gives) answered a single class on each of the run's last "
              f"training batches ({int(predictions)} predictions) while the labels held several: the compressed "
              f"model has most likely collapsed to one answer (MPNet truncated below half depth did, without module "
              f"matching). Evaluate it before use; {fix}.", CollapsedSuccessorWarning)


def _device_of(model: nn.Module) -> Optional[torch.device]:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


__all__ = ["FitResult", "StepLog", "TrainingError", "add_device_arguments", "autocast_dtype", "cross_entropy_loss", "fit",
           "match_successors", "planned_match_steps", "probe_match_lr", "MatchLrProbe",
           "lr_factor", "resolve_device", "split_batch", "to_device"]
