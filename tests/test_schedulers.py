import math

import pytest

from theseus_general import ConstantScheduler, LinearScheduler, ScheduleError
from theseus_general.schedulers import CallableScheduler, as_scheduler


def test_linear_matches_paper_equation():
    s = LinearScheduler(base=0.3, k=6e-4)
    for t in (0, 1, 10, 500, 1166, 1167, 5000):
        assert s(t) == min(1.0, 6e-4 * t + 0.3)
    assert s(0) == 0.3
    assert s(5000) == 1.0
    assert s.full_replacement_step == 1167  # first t with 0.3 + 6e-4 t >= 1
    assert s(1167) == 1.0 and s(1166) < 1.0


def test_linear_reaching_one_at():
    s = LinearScheduler.reaching_one_at(300, base=0.3)
    assert s(0) == 0.3
    assert s(299) < 1.0
    assert s(300) == pytest.approx(1.0)
    assert s(10_000) == 1.0


def test_constant_until_step_then_one():
    s = ConstantScheduler(0.5, replace_all_at=100)
    assert [s(t) for t in (0, 50, 99)] == [0.5, 0.5, 0.5]
    assert s(100) == 1.0 and s(1000) == 1.0
    assert s.full_replacement_step == 100
    forever = ConstantScheduler(0.7)
    assert forever(10**6) == 0.7 and forever.full_replacement_step is None


def test_callable_values_are_checked():
    s = as_scheduler(lambda t: t / 10)
    assert isinstance(s, CallableScheduler)
    assert s(5) == 0.5
    with pytest.raises(ScheduleError, match=r"step 11.*\[0, 1\]"):
        s(11)
    with pytest.raises(ScheduleError, match="in \\[0, 1\\]"):
        as_scheduler(lambda t: float("nan"))(0)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "high"])
def test_bad_rates_rejected(bad):
    with pytest.raises(ScheduleError, match="ConstantScheduler rate"):
        ConstantScheduler(bad)
    with pytest.raises(ScheduleError, match="LinearScheduler base"):
        LinearScheduler(base=bad)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), math.inf])
def test_bad_slope_rejected(bad):
    with pytest.raises(ScheduleError, match="k must be"):
        LinearScheduler(base=0.3, k=bad)


def test_number_becomes_constant_and_none_the_reference_curriculum():
    assert as_scheduler(0.4)(123) == 0.4
    ref = as_scheduler(None)
    assert isinstance(ref, LinearScheduler) and ref.base == 0.3 and ref.k == 6e-4
