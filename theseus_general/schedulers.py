"""Replacement-rate schedules: step -> probability p that a group runs its successor.

The paper (Xu et al., 2020) trains with either a constant rate followed by a
successor-only phase, or a linear curriculum p(t) = min(1, k*t + b) (its Eq. 6).
Any callable ``step -> p`` is accepted too; its values are checked on use.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

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
