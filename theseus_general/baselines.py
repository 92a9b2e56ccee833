"""Built-in baselines for a Theseus run: fine-tune-only and vanilla knowledge distillation.

Every baseline trains a *successor-shaped* student: the model the engine would
export for the same plan (same adapter, depth/ratio/groups, init), so it works
for every adapter and its result is a native model of the family.

    student = successor_shaped_copy(trained, successor_depth=3)       # (a) from the trained blocks
    student = successor_shaped_copy(pretrained, successor_depth=3)    # (b) from the pre-task model
    fine_tune_only(trained, batches, steps=600, successor_depth=3)    # (a), trained, in one call
    distill(trained, batches, steps=600, successor_depth=3, temperature=2.0, alpha=0.5)

`batches` yields ``(inputs, labels)``; inputs are what the model takes (a dict
of keyword arguments, a tuple of positional ones, or one tensor). Use the same
`steps` as the Theseus run to compare at the same step budget. Training is
`theseus_general.training.fit`, the loop a Theseus run uses (device, mixed precision, bar).
"""

from __future__ import annotations

import warnings

from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .engine import Theseus
from .graph import default_logits, run_model
from .training import fit

LogitsFn = Callable[[Any], torch.Tensor]
TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def successor_shaped_copy(model: nn.Module, native: bool = True, **theseus_kwargs: Any) -> nn.Module:
    """The model `Theseus(model, **theseus_kwargs).export(native)` gives before any training:
    same class, the planned depth, its blocks copies of `model`'s blocks (per `init`),
    the rest copied. `model` is left exactly as it was; all parameters of the copy train.

    Pass the trained predecessor for the strong baseline (a), or the model as it was
    before task training (pretrained weights, or a fresh random model) for (b).
    native=False: for shapes the family's constructor cannot build (see `Theseus.export`)."""
    theseus_kwargs.setdefault("validate", False)  # a copy of the model's own blocks needs no shape check
    engine = Theseus(model, **theseus_kwargs)
    try:
        with warnings.catch_warnings():  # the untrained export is what this baseline wants
            warnings.filterwarnings("ignore", message=r"export\(\) of an engine that was never trained")
            student = engine.export(native=native)
    finally:
        engine.unwrap()
    student.train()
    return student


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: Optional[torch.Tensor],
                      temperature: float = 1.0, alpha: float = 0.5,
                      task_loss: TaskLoss = F.cross_entropy) -> torch.Tensor:
    """Vanilla KD (Hinton et al., 2015):
    ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * task_loss(student, labels)``.

    T^2 keeps the soft-target gradients on the scale of the task loss as T changes.
    KL is averaged over the batch (rows = all leading dimensions). alpha = 0 is the task loss
    alone; alpha = 1 needs no labels."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha (the weight of the distillation term) must be in [0, 1], got {alpha}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; the student must predict the same classes.")
    teacher_logits = teacher_logits.detach()
    loss = student_logits.new_zeros(())
    if alpha > 0:
        classes = student_logits.shape[-1]
        s = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1)
        t = F.log_softmax(teacher_logits.reshape(-1, classes).to(s.dtype) / temperature, dim=-1)
        kl = F.kl_div(s, t, reduction="batchmean", log_target=True)
        loss = loss + alpha * temperature ** 2 * kl
    if alpha < 1:
        if labels is None:
            raise ValueError("labels are needed for the task loss when alpha < 1.")
        loss = loss + (1 - alpha) * task_loss(student_logits, labels)
    return loss


class DistillationStep:
    """``loss = step(inputs, labels)``: the student's KD loss on one batch.

    The teacher runs in eval mode under no_grad (its own training flag is restored
    afterwards), so nothing of it changes; only the student gets gradients."""

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 2.0, alpha: float = 0.5,
                 logits: LogitsFn = default_logits, task_loss: TaskLoss = F.cross_entropy):
        if student is teacher:
            raise ValueError("student and teacher are the same module; distil into a copy (successor_shaped_copy).")
        self.student, self.teacher = student, teacher
        self.temperature, self.alpha = float(temperature), float(alpha)
        self.logits, self.task_loss = logits, task_loss
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long),
                          self.temperature, self.alpha)  # bad temperature/alpha fail here, not at step 1

    def teacher_logits(self, inputs: Any) -> torch.Tensor:
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            with torch.no_grad():
                return self.logits(run_model(self.teacher, inputs))
        finally:
            self.teacher.train(was_training)

    def to(self, device: Any) -> "DistillationStep":
        """Moves the teacher (training.fit moves the student, its target, and calls this)."""
        self.teacher.to(device)
        return self

    def __call__(self, inputs: Any, labels: Optional[torch.Tensor]) -> torch.Tensor:
        teacher = self.teacher_logits(inputs) if self.alpha > 0 else None
        student = self.logits(run_model(self.student, inputs))
        if teacher is None:
            teacher = student.detach()  # unused at alpha = 0
        return distillation_loss(student, teacher, labels, self.temperature, self.alpha, self.task_loss)


def fine_tune_only(model: nn.Module, batches: Iterable[Tuple[Any, Any]], steps: int, *,
                   initial: Optional[nn.Module] = None, logits: LogitsFn = default_logits,
                   task_loss: TaskLoss = F.cross_entropy, lr: float = 1e-4, weight_decay: float = 0.01,
                   lr_schedule: str = "linear", warmup: float = 0.0, device: str = "auto", mixed_precision: str = "no",
                   **theseus_kwargs: Any) -> nn.Module:
    """Fine-tune-only baseline in one call: the successor-shaped student trained directly
    on the task loss for `steps` steps (`training.fit`). Initialised from `model` (the trained
    predecessor, form (a)), or from `initial` (the model before task training, form (b)) when given."""
    student = successor_shaped_copy(initial if initial is not None else model, **theseus_kwargs)

    def loss_fn(inputs: Any, labels: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        student_logits = logits(run_model(student, inputs))
        return task_loss(student_logits, labels), student_logits

    fit(student, batches, steps, loss=loss_fn, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule,
        warmup=warmup, device=device, mixed_precision=mixed_precision, desc="baseline: fine-tune only")
    return student.eval()


def distill(model: nn.Module, batches: Iterable[Tuple[Any, Any]], steps: int, *, temperature: float = 2.0,
            alpha: float = 0.5, initial: Optional[nn.Module] = None, logits: LogitsFn = default_logits,
            task_loss: TaskLoss = F.cross_entropy, lr: float = 1e-4, weight_decay: float = 0.01,
            lr_schedule: str = "linear", warmup: float = 0.0, device: str = "auto", mixed_precision: str = "no",
            **theseus_kwargs: Any) -> nn.Module:
    """Vanilla KD baseline in one call: a successor-shaped student (from `model`, or from
    `initial`) trained for `steps` steps (`training.fit`) on `distillation_loss` against the frozen `model`."""
    student = successor_shaped_copy(initial if initial is not None else model, **theseus_kwargs)
    step = DistillationStep(student, model, temperature, alpha, logits, task_loss)
    fit(student, batches, steps, loss=step, lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule,
        warmup=warmup, device=device, mixed_precision=mixed_precision, desc="baseline: distillation")
    return student.eval()
