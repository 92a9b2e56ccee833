"""Module matching: train each successor to reproduce its group, before the mixed phase.

With the engine in matching mode, a forward pass runs the predecessor blocks of every
group (no gradient) and hands each group's input to its successor too; the successor's
error against the group's output (squared error relative to the output's mean square) is
the loss. Labels are not used, so unlabelled in-domain data works as well.

Groups see the predecessor's own hidden states, so all successors learn at once from
one forward pass, and the non-replaced parts do not change. The replacement schedule
does not advance: ``th.step_count`` is the same afterwards.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .errors import TrainingError
from .graph import run_model
from .training import Batch, FitResult, _batch_source, fit


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
    model = engine.model
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
    errors: Dict[Tuple[int, int], List[float]] = {}
    was_training = model.training
    model.eval()
    try:
        with engine.matching_mode(), torch.no_grad():
            for round_ in range(max(len(o) for o in options.values())):
                for index, candidates in options.items():
                    groups[index].successor.load_state_dict(candidates[min(round_, len(candidates) - 1)][1])
                engine.match_errors()
                run_model(model, inputs)
                for index, error in engine.match_errors():
                    errors.setdefault((index, round_), []).append(float(error))
        chosen = {}
        for index, candidates in options.items():
            measured = [sum(errors[(index, r)]) if (index, r) in errors else float("inf") for r in range(len(candidates))]
            best = min(range(len(candidates)), key=measured.__getitem__)
            groups[index].successor.load_state_dict(candidates[best][1])
            if candidates[best][0] is not None:
                chosen[index] = engine.plan.groups[index].blocks[candidates[best][0]]
        return chosen
    finally:
        model.train(was_training)


START_NOTE = "start blocks chosen by matching error on the first batch: "


def _note_starts(plan: Any, starts: Dict[int, int]) -> None:
    """Show in print(plan) where the successors now start: the table's successor column says "copy of
    block j (chosen)" for each restarted one, and a note under it says how they were chosen. The plan as
    made (`Plan.to_dict`, what checkpoints compare) keeps the init's block."""
    plan.starts = dict(starts)
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
    Returns fit's `FitResult`; its losses are the mean relative errors over the groups.
    """
    engine.check_open("match_successors()")
    model = engine.model
    params = [p for successor in engine.successors() for p in successor.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("match_successors(): the successors have no trainable parameters.")

    if choose_start is None:
        choose_start = engine.recipe.choose_start and engine.may_choose_starts

    def matching_loss(inputs: Any, labels: Any) -> torch.Tensor:
        nonlocal choose_start
        if choose_start:  # on the first batch: here it is on the run's device, under its autocast
            choose_start = False
            # a later choice that keeps a successor's current weights keeps the block it came from
            engine.successor_starts.update(choose_starts(engine, inputs))
            _note_starts(engine.plan, engine.successor_starts)
        engine.match_errors()
        with torch.no_grad():  # the successors re-enable gradients for themselves
            run_model(model, inputs)
        errors = engine.match_errors()
        if not errors:
            raise TrainingError("match_successors(): the forward pass ran no Theseus group; pass the inputs "
                                "the wrapped model takes.")
        return torch.stack([error for _, error in errors]).mean()

    source = _batch_source(batches, 0, steps)

    def unlabelled(position: int) -> Tuple[Any, None]:
        return _inputs_of(source(position)), None

    with engine.matching_mode():
        result = fit(model, unlabelled, steps, loss=matching_loss, params=params, lr=lr, desc=desc, **fit_options)
    engine.mark_trained()
    return result
