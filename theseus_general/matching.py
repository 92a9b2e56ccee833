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

from typing import Any, Callable, Iterable, Mapping, Tuple, Union

import torch

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


def match_successors(engine: Any, batches: Union[Iterable[Batch], Callable[[int], Batch]], steps: int, *,
                     lr: float = 1e-3, desc: str = "match successors", **fit_options: Any) -> FitResult:
    """Train the successors of `engine` for `steps` steps to reproduce their groups' outputs.

    batches: ``(inputs, labels)`` pairs as for `fit` (labels are ignored; ``None`` is fine), dicts of
        model arguments (a Hugging Face loader's batches; "labels" is dropped), or the inputs alone;
        an iterable or a function ``position -> batch``.
    lr and the other options (``weight_decay``, ``lr_schedule``, ``device``, ``mixed_precision``,
    ``progress``, ...) are `fit`'s; the optimiser sees the successors' parameters only.
    Returns fit's `FitResult`; its losses are the mean relative errors over the groups.
    """
    engine._check_open("match_successors()")
    state = engine._state
    model = engine.model
    params = [p for successor in engine.successors() for p in successor.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("match_successors(): the successors have no trainable parameters.")

    def matching_loss(inputs: Any, labels: Any) -> torch.Tensor:
        state.match_errors.clear()
        with torch.no_grad():  # the successors re-enable gradients for themselves
            run_model(model, inputs)
        errors, state.match_errors = state.match_errors, []
        if not errors:
            raise TrainingError("match_successors(): the forward pass ran no Theseus group; pass the inputs "
                                "the wrapped model takes.")
        return torch.stack(errors).mean()

    source = _batch_source(batches, 0, steps)

    def unlabelled(position: int) -> Tuple[Any, None]:
        return _inputs_of(source(position)), None

    previous = state.force
    state.force = "match"
    try:
        return fit(model, unlabelled, steps, loss=matching_loss, params=params, lr=lr, desc=desc, **fit_options)
    finally:
        state.force = previous
        state.match_errors.clear()
