"""Module matching's parts: what it measures, the start-block choice and the divergence guard.

The training loop itself is `theseus_general.training.match_successors` (it trains with `fit`);
this module sits below it and knows the engine only through its public matching mode
(`Theseus.matching_mode`, `Theseus.match_errors`).

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
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .graph import default_logits, run_model
from .wrapping import has_running_stats


def inputs_of(batch: Any) -> Any:
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


def full_precision(model: nn.Module) -> Any:
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
    model = engine.model
    was_training = model.training
    model.train(training)
    norms = [m for m in model.modules() if has_running_stats(m)] if training else []
    kept = [{k: v.clone() for k, v in m._buffers.items() if v is not None} for m in norms]
    devices = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    try:
        with engine.matching_mode(), torch.no_grad(), torch.random.fork_rng(devices=devices, enabled=training):
            if training:
                torch.manual_seed(0)
            run_model(model, inputs)
            errors: Dict[int, float] = {}
            for index, error in engine.match_errors():
                errors[index] = errors.get(index, 0.0) + float(error.detach())
        return errors
    finally:
        for module, buffers in zip(norms, kept):
            for name, value in buffers.items():
                module._buffers[name].copy_(value)
        model.train(was_training)


@dataclass(frozen=True)
class StartSample:
    """What one batch says about the start: the predictions of the predecessor and of the successors alone
    (the logits' argmax, flattened), and each one's logit moments over those predictions (`_moments`), so
    that batches pool into one spread (`StartCheck.spread_ratio`)."""

    predecessor: torch.Tensor
    start: torch.Tensor
    predecessor_moments: Tuple[int, torch.Tensor, torch.Tensor]  # (count, mean, sum of squared deviations) per class
    start_moments: Tuple[int, torch.Tensor, torch.Tensor]


def _moments(logits: torch.Tensor) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(count, per-class mean, per-class sum of squared deviations from it) of `logits`' predictions. Centred
    on the model's device in float32 (no cancellation: a spread 1e-4 of a logit's size survives it; MPS has no
    float64), and only the per-class vectors go to the CPU, as float64."""
    flat = logits.detach().reshape(-1, logits.shape[-1]).float()
    mean = flat.mean(0)
    return flat.shape[0], mean.to("cpu", torch.float64), ((flat - mean) ** 2).sum(0).to("cpu", torch.float64)


def _spread(moments: List[Tuple[int, torch.Tensor, torch.Tensor]]) -> float:
    """Each class's logit standard deviation over all the predictions of `moments`, averaged over classes
    (batches pooled with Chan et al.'s parallel update)."""
    count, mean, deviations = moments[0]
    for n, m, d in moments[1:]:
        delta = m - mean
        total = count + n
        mean = mean + delta * n / total
        deviations = deviations + d + delta * delta * count * n / total
        count = total
    return float((deviations / count).sqrt().mean())


@dataclass(frozen=True)
class StartCheck:
    """What the first batches say about the truncated start (the successors alone) against the predecessor:
    predictions are the logits' argmax, per example (a classifier) or per token (a language model)."""

    agreement: float  # the share of predictions on which the start and the predecessor agree
    start_classes: int  # how many distinct classes (tokens) the start predicts on them
    predecessor_classes: int  # how many the predecessor predicts
    predictions: int = 0  # how many predictions it pooled
    # how much the start's logits vary over the predictions, as a share of how much the predecessor's do
    # (each class's standard deviation, averaged over classes); None when not measured or the predecessor's is 0
    spread_ratio: Optional[float] = None

    @classmethod
    def pooled(cls, samples: List[Optional[StartSample]]) -> Optional["StartCheck"]:
        """From `start_predictions` samples, pooled; None when there are none or one had no logits."""
        if not samples or any(sample is None for sample in samples):
            return None
        wanted, got = torch.cat([s.predecessor for s in samples]), torch.cat([s.start for s in samples])
        reference = _spread([s.predecessor_moments for s in samples])
        ratio = _spread([s.start_moments for s in samples]) / reference if reference > 0 else None
        return cls(agreement=float((wanted == got).float().mean()), start_classes=int(got.unique().numel()),
                   predecessor_classes=int(wanted.unique().numel()), predictions=int(wanted.numel()),
                   spread_ratio=ratio)

    @property
    def collapsed(self) -> bool:
        """The start has lost the task: it answers at most half as many distinct classes (tokens) on the
        predictions read as the predecessor, which answers several. For a binary classifier: one class for
        all of them (MiniLM-L6 truncated to 3 layers; fine-tuning it stays at the majority class)."""
        return self.predecessor_classes > 1 and 2 * self.start_classes <= self.predecessor_classes

    def collapsed_under(self, spread_limit: Optional[float] = None) -> bool:
        """`collapsed`, where for a binary classifier (the predecessor answers 2 classes) with `spread_limit`
        one class on every prediction counts only when the start's logits also no longer vary with the input:
        `spread_ratio` below `spread_limit`. One class is also what a start whose logits vary but carry an
        offset answers (all-mpnet-base-v2 12 -> 6: spread 0.087 of the predecessor's; fine-tuning fixes it in
        a few steps), where MiniLM-L6 6 -> 3's answer does not depend on its input (7e-5). Not measured
        (None): the class count alone. Many classes (tokens): the count alone."""
        if not self.collapsed:
            return False
        if spread_limit is None or self.predecessor_classes != 2 or self.spread_ratio is None:
            return True
        return self.spread_ratio < spread_limit


def start_predictions(engine: Any, inputs: Any) -> Optional[StartSample]:
    """The predecessor's and the successors' alone predictions on `inputs` (`StartSample`): the logits'
    argmax per example (a classifier) or per token (a language model), and their logits' moments. On the
    model's own device, without gradients, in eval mode (so only the successors run outside matching mode).
    None when the output has no logits."""
    model = engine.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            with engine.matching_mode():  # every group runs its predecessor blocks: the predecessor's output
                predecessor = default_logits(run_model(model, inputs))
            start = default_logits(run_model(model, inputs))
    except TypeError:  # no logits in this model's output
        return None
    finally:
        model.train(was_training)
    if predecessor.shape != start.shape or predecessor.dim() < 1:
        return None
    return StartSample(predecessor.argmax(-1).flatten(), start.argmax(-1).flatten(),
                       _moments(predecessor), _moments(start))


def check_start(engine: Any, *inputs: Any) -> Optional[StartCheck]:
    """`StartCheck` of the successors alone (the truncated start) against the predecessor, on the
    predictions of all `inputs` (batches' model inputs) pooled (`start_predictions`). None when the
    output has no logits."""
    return StartCheck.pooled([start_predictions(engine, one) for one in inputs])


def start_agreement(engine: Any, inputs: Any) -> Optional[float]:
    """The share of `inputs`' predictions on which the successors alone agree with the predecessor
    (`check_start`'s ``agreement``); None when the output has no logits."""
    check = check_start(engine, inputs)
    return None if check is None else check.agreement


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


def note_starts(plan: Any, starts: Dict[int, int]) -> None:
    """Show in print(plan) where the successors now start: the table's successor column says "copy of
    block j (chosen)" for each restarted one, and a note under it says how they were chosen. The plan as
    made (`Plan.to_dict`, what checkpoints compare) keeps the init's block."""
    plan.starts = dict(starts)
    plan.notes[:] = [note for note in plan.notes if not note.startswith(START_NOTE)]
    if starts:
        chosen = ", ".join(f"group {index} from block {block}" for index, block in sorted(starts.items()))
        plan.notes.append(START_NOTE + chosen + ("" if len(starts) == len(plan.groups) else "; the other groups kept theirs"))


def put_back(engine: Any, saved: Dict[int, Dict[str, torch.Tensor]], indices: List[int]) -> None:
    groups = {g.index: g for g in engine.groups}
    for index in indices:
        groups[index].successor.load_state_dict(saved[index])
