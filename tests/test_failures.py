"""A failed run stops clearly and leaves the caller's model intact."""

import pytest
import torch

from theseus_general import (
    ConstantScheduler, EngineStateError, LinearScheduler, NonFiniteLossError, ScheduleError,
    SuccessorMismatchError, Theseus,
)

from conftest import ChainModel, assert_same_state, bert_batch, state_snapshot, tiny_bert


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_stops_the_run_naming_the_step(bad):
    model = tiny_bert(num_layers=4)
    before = state_snapshot(model)
    th = Theseus(model, successor_depth=2, scheduler=0.5)
    model.train()
    for _ in range(3):
        th.step(loss=model(**bert_batch()).loss)
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        th.step(loss=torch.tensor(bad))
    for call in (th.step, th.export):
        with pytest.raises(EngineStateError, match="failed.*step 3"):
            call()
    th.unwrap()
    assert_same_state(before, model)


def test_validate_after_wrapping_names_the_group():
    model = tiny_bert(num_layers=4)
    th = Theseus(model, successor_depth=2)
    sample = {"input_ids": bert_batch()["input_ids"]}
    th.validate(sample)  # successors as built: fine
    th.successors()[1].double()
    with pytest.raises(SuccessorMismatchError, match=r"group 1 .*blocks \[2, 3\].*failed on the group.s input.*Double"):
        th.validate(sample)
    th.successors()[1].float()
    calls = []
    hooks = [b.register_forward_hook(lambda *a: calls.append(1)) for g in th.groups for b in g.predecessor]
    th.model.eval()
    with torch.no_grad():
        th.model(**sample)
    assert calls == []  # validation's predecessor-only mode ended with the error: eval runs successors only
    for h in hooks:
        h.remove()


