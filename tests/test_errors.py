"""Bad input fails with a clear error before anything of the caller's changes."""

import pytest
from torch import nn

from theseus_general import (
    AdapterError, EngineStateError, PlanError, ScheduleError, SuccessorMismatchError, Theseus, list_adapters,
)

from conftest import ChainModel, assert_same_state, state_snapshot, tiny_bert


class Narrow(nn.Module):
    """Accepts a BERT layer's arguments but changes the width: a bad successor."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(32, 7)

    def forward(self, hidden_states, *args, **kwargs):
        return self.proj(hidden_states)


def _unchanged(model, before, flags):
    assert_same_state(before, model)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(type(m).__name__ == "TheseusGroup" for m in model.modules())


@pytest.mark.parametrize("kwargs, error, words", [
    ({"successor_depth": 3, "scheduler": 1.5}, ScheduleError, r"\[0, 1\]"),
    ({"successor_depth": 3, "scheduler": float("nan")}, ScheduleError, r"\[0, 1\]"),
    ({"successor_depth": 0}, PlanError, "at least 1"),
    ({"successor_depth": -1}, PlanError, "at least 1"),
    ({"successor_depth": 6}, PlanError, "not smaller than the predecessor's depth"),
    ({"successor_depth": 9}, PlanError, "not smaller than the predecessor's depth"),
    ({"ratio": 0.0}, PlanError, "strictly between 0 and 1"),
    ({"groups": [[0, 1], [1, 2], [3, 4, 5]]}, PlanError, "overlaps"),
    ({"groups": [[0, 1], [3, 4, 5]]}, PlanError, "skips block 2"),
    ({"successor_depth": 3, "init": "middle"}, PlanError, "init must be one of"),
    ({"successor_depth": 3, "successors": [nn.Linear(2, 2), "layer", nn.Linear(2, 2)]}, PlanError, "not a torch.nn.Module"),
    ({"successor_depth": 3, "successors": [nn.Linear(32, 32)] * 2}, PlanError, "one per group"),
    ({"successor_depth": 3, "successors": [Narrow() for _ in range(3)]}, SuccessorMismatchError,
     r"group 0 .*blocks \[0, 1\].*successor Narrow.*predecessor gives tensor\[2, 8, 32\].*successor gives tensor\[2, 8, 7\]"),
    ({"successor_depth": 3, "successors": [nn.Linear(32, 32) for _ in range(3)]}, SuccessorMismatchError,
     "failed on the group's input.*same arguments"),
    ({"successor_depth": 3, "adapter": "nope"}, AdapterError, "No adapter named 'nope'"),
    ({"successor_depth": 3, "adapter": "generic", "container": "bert.encoder.missing"}, AdapterError, "has no submodule 'missing'"),
    ({"successor_depth": 3, "adapter": "generic", "container": "bert.pooler"}, AdapterError, "not a container"),
])
def test_bad_input_raises_before_any_change(kwargs, error, words):
    model = tiny_bert()
    before, flags = state_snapshot(model), [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=words):
        Theseus(model, **kwargs)
    _unchanged(model, before, flags)


def test_unknown_model_lists_adapters_and_routes():
    class Odd(nn.Module):
        def forward(self, x):
            return x

    with pytest.raises(AdapterError) as info:
        Theseus(Odd(), successor_depth=1)
    message = str(info.value)
    for name in list_adapters():
        assert name in message
    assert "adapter='generic'" in message and "register_adapter" in message


def test_wrong_adapter_forced():
    model = ChainModel()
    with pytest.raises(AdapterError, match="'bert' adapter does not support a ChainModel"):
        Theseus(model, adapter="bert", successor_depth=2)


def test_not_a_module():
    with pytest.raises(AdapterError, match="torch.nn.Module"):
        Theseus({"weights": 1}, successor_depth=2)


def test_wrapping_twice_and_using_a_closed_engine():
    model = tiny_bert()
    th = Theseus(model, successor_depth=3)
    th.export()  # exporting leaves the model wrapped, so the advice must not be "export() first"
    with pytest.raises(EngineStateError, match=r"already wrapped.*call its unwrap\(\) first") as refused:
        Theseus(model, successor_depth=2)
    assert "or export()" not in str(refused.value)
    th.unwrap()  # following the advice
    for call in (th.step, th.export, th.trainable_parameters):
        with pytest.raises(EngineStateError, match="closed"):
            call()
    Theseus(model, successor_depth=2)  # after unwrap the model can be wrapped again


def test_callable_schedule_checked_at_construction():
    model = ChainModel()
    with pytest.raises(ScheduleError, match="step 0"):
        Theseus(model, adapter="generic", container="blocks", successor_depth=2, scheduler=lambda t: 2.0)
    assert not any(type(m).__name__ == "TheseusGroup" for m in model.modules())
