"""Replacement-rate schedules: step -> probability p that a group runs its successor.

The paper (Xu et al., 2020) trains with either a constant rate followed by a
successor-only phase, or a linear curriculum p(t) = min(1, k*t + b) (its Eq. 6).
Any callable ``step -> p`` is accepted too; its values are checked on use.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Union

from .errors import ScheduleError


def _check_rate(value: float, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ScheduleError(f"{what} must be a number in [0, 1], got {value!r}.") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ScheduleError(f"{what} must be in [0, 1], got {value!r}. A replacement rate is a probability.")
    return value


class Scheduler:
    """Base class. Subclasses define `rate(step)`; `full_replacement_step` is the first
    step at which p == 1 (None when the schedule never reaches 1)."""

    full_replacement_step: Optional[int] = None

    def rate(self, step: int) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        return self.rate(step)


class ConstantScheduler(Scheduler):
    """p = `rate` until `replace_all_at` (exclusive), then 1.

    `replace_all_at=None` keeps the constant rate forever (no successor-only phase).
    """

    def __init__(self, rate: float = 0.5, replace_all_at: Optional[int] = None):
        self.constant = _check_rate(rate, "ConstantScheduler rate")
        if replace_all_at is not None:
            if isinstance(replace_all_at, bool) or not isinstance(replace_all_at, int) or replace_all_at < 0:
                raise ScheduleError(
                    f"replace_all_at must be a step number >= 0 (or None), got {replace_all_at!r}."
                )
        self.replace_all_at = replace_all_at
        if self.constant == 1.0:
            self.full_replacement_step = 0
        else:
            self.full_replacement_step = replace_all_at

    def rate(self, step: int) -> float:
        if self.replace_all_at is not None and step >= self.replace_all_at:
            return 1.0
        return self.constant

    def __repr__(self) -> str:
        return f"ConstantScheduler(rate={self.constant}, replace_all_at={self.replace_all_at})"

    def to_dict(self) -> Dict[str, Any]:
        return {"type": "constant", "rate": self.constant, "replace_all_at": self.replace_all_at}


class LinearScheduler(Scheduler):
    """Linear curriculum p(t) = min(1, k*t + base) (the paper's Eq. 6).

    The reference code used base=0.3, k=0.0006. `LinearScheduler.reaching_one_at(step, base)`
    picks k so that p reaches 1 at a given step.
    """

    def __init__(self, base: float = 0.3, k: float = 6e-4):
        self.base = _check_rate(base, "LinearScheduler base")
        try:
            k = float(k)
        except (TypeError, ValueError):
            raise ScheduleError(f"LinearScheduler k must be a number > 0, got {k!r}.") from None
        if math.isnan(k) or math.isinf(k) or k < 0:
            raise ScheduleError(
                f"LinearScheduler k must be a finite number >= 0, got {k!r}. "
                "k is the rate's increase per step; use ConstantScheduler for a flat rate."
            )
        self.k = k
        if self.base >= 1.0:
            self.full_replacement_step = 0
        elif k > 0:
            self.full_replacement_step = int(math.ceil((1.0 - self.base) / k - 1e-9))
        else:
            self.full_replacement_step = None

    @classmethod
    def reaching_one_at(cls, step: int, base: float = 0.3) -> "LinearScheduler":
        if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
            raise ScheduleError(f"reaching_one_at needs a step > 0, got {step!r}.")
        base = _check_rate(base, "LinearScheduler base")
        return cls(base=base, k=(1.0 - base) / step)

    def rate(self, step: int) -> float:
        return min(1.0, self.k * step + self.base)

    def __repr__(self) -> str:
        return f"LinearScheduler(base={self.base}, k={self.k})"

    def to_dict(self) -> Dict[str, Any]:
        return {"type": "linear", "base": self.base, "k": self.k}


class RunLinearScheduler(Scheduler):
    """Linear curriculum over a run of known length: p = `base` at step 0, rising linearly to
    1 at `full_at` (a fraction of the run's steps), then 1. The library's default schedule.

    The run's length comes from ``Theseus(..., total_steps=N)``, from `fit` (which passes its
    `steps`), or from `for_run(N)`. Until it is known, the rate follows the paper's fixed slope
    (k = 6e-4, as `LinearScheduler()`) and the engine warns at its first step.
    """

    def __init__(self, full_at: float = 0.5, base: float = 0.3, total_steps: Optional[int] = None):
        self.full_at = _check_rate(full_at, "RunLinearScheduler full_at")
        if self.full_at == 0.0:
            raise ScheduleError("RunLinearScheduler full_at must be > 0 (a fraction of the run); "
                                "use ConstantScheduler(1.0) to run the successors only.")
        self.base = _check_rate(base, "RunLinearScheduler base")
        self.total_steps: Optional[int] = None
        self._fallback = LinearScheduler(base=self.base)
        self.full_replacement_step = self._fallback.full_replacement_step
        if total_steps is not None:
            self.for_run(total_steps)

    def for_run(self, total_steps: int) -> "RunLinearScheduler":
        """Fix the run's length (steps); returns self."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
            raise ScheduleError(f"total_steps must be a number of steps > 0, got {total_steps!r}.")
        self.total_steps = total_steps
        self.full_replacement_step = max(1, int(math.ceil(total_steps * self.full_at - 1e-9))) if self.base < 1 else 0
        return self

    @property
    def knows_run(self) -> bool:
        return self.total_steps is not None

    def rate(self, step: int) -> float:
        if self.total_steps is None:
            return self._fallback.rate(step)
        if step >= self.full_replacement_step:
            return 1.0
        return self.base + (1.0 - self.base) * step / self.full_replacement_step

    def __repr__(self) -> str:
        return f"RunLinearScheduler(full_at={self.full_at}, base={self.base}, total_steps={self.total_steps})"

    def to_dict(self) -> Dict[str, Any]:
        return {"type": "run_linear", "full_at": self.full_at, "base": self.base, "total_steps": self.total_steps}


class CallableScheduler(Scheduler):
    """Wraps any callable step -> p; each value is checked when it is used."""

    def __init__(self, fn: Callable[[int], float]):
        if not callable(fn):
            raise ScheduleError(f"A schedule must be a Scheduler, a number or a callable step -> p, got {fn!r}.")
        self.fn = fn

    def rate(self, step: int) -> float:
        return _check_rate(self.fn(step), f"Schedule value at step {step}")

    def __repr__(self) -> str:
        return f"CallableScheduler({self.fn!r})"


SchedulerLike = Union[Scheduler, float, int, Callable[[int], float], None]


def as_scheduler(schedule: SchedulerLike) -> Scheduler:
    """Turn what a caller passed as `scheduler=` into a Scheduler.

    None gives the paper's reference curriculum, a number a constant rate.
    """
    if schedule is None:
        return LinearScheduler()
    if isinstance(schedule, Scheduler):
        return schedule
    if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
        return ConstantScheduler(schedule)
    return CallableScheduler(schedule)


def callable_schedule(scheduler: Scheduler) -> bool:
    """True for a caller's own function, whose end point cannot be known in advance."""
    return isinstance(scheduler, CallableScheduler)


def scheduler_from_dict(spec: Dict[str, Any]) -> Scheduler:
    """The schedule a `to_dict()` describes (a TheseusConfig's ``schedule``)."""
    kinds = {"constant": lambda d: ConstantScheduler(d["rate"], d.get("replace_all_at")),
             "linear": lambda d: LinearScheduler(d["base"], d["k"]),
             "run_linear": lambda d: RunLinearScheduler(d["full_at"], d["base"], d.get("total_steps"))}
    if not isinstance(spec, dict) or spec.get("type") not in kinds:
        raise ScheduleError(f"A schedule is described as {{'type': one of {sorted(kinds)}, ...}}, got {spec!r}.")
    return kinds[spec["type"]](spec)
