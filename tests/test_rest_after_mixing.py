"""The recipe option `rest_after_mixing` (issue 26, round 10): with train_rest, the rest's copies take no
optimiser step while the replacement rate is below 1, then train with the successors."""

import dataclasses
import warnings

import pytest
import torch

from theseus_general import ScheduleError, Theseus, fit
from theseus_general.recipes import get_recipe

from conftest import ChainModel, sign_batches


def recipe(**options):
    return dataclasses.replace(get_recipe("default"), rest_after_mixing=True, **options)


def engine(rest_recipe, **options) -> Theseus:
    return Theseus(ChainModel(depth=4, seed=0), successor_depth=2, adapter="generic", container="blocks",
                   recipe=rest_recipe, **options)


def batches():
    return sign_batches()


def snapshot(tensors):
    return [t.detach().clone() for t in tensors]


def moved(before, tensors):
    return any(not torch.equal(a, b.detach()) for a, b in zip(before, tensors))


def test_a_bad_value_fails_with_the_fix():
    with pytest.raises(ScheduleError, match="rest_after_mixing is True or False"):
        dataclasses.replace(get_recipe("default"), rest_after_mixing="yes")
    assert get_recipe("default").rest_after_mixing is False


def test_the_rest_waits_for_p_one_and_then_trains():
    th = engine(recipe(full_at=0.5), total_steps=8)
    rest = [p for p in th._wrapping.rest_tensors() if isinstance(p, torch.nn.Parameter)]
    successors = [p for s in th.successors() for p in s.parameters()]
    assert rest, "the chain's stem and head are trained copies"
    rest_start, successors_start = snapshot(rest), snapshot(successors)
    rates = []

    def check(record):
        rates.append(record.replacement_rate)
        if record.replacement_rate < 1:  # every step so far ran below p = 1: the rest has not moved
            assert not moved(rest_start, rest), record

    fit(th, batches(), 8, lr=1e-2, progress=False, match_steps=0, on_step=check)
    assert rates[0] < 1 and rates[-1] == 1.0 and any(r < 1 for r in rates)
    assert moved(rest_start, rest)  # it trained once p reached 1
    assert moved(successors_start, successors)
    th.unwrap()


def test_without_the_option_the_rest_trains_from_step_0():
    th = engine(get_recipe("default"), total_steps=8)
    rest = [p for p in th._wrapping.rest_tensors() if isinstance(p, torch.nn.Parameter)]
    start = snapshot(rest)
    fit(th, batches(), 1, lr=1e-2, progress=False, match_steps=0)
    assert th.replacement_rate < 1 and moved(start, rest)
    th.unwrap()


def test_a_users_own_loop_gets_it_through_attach_and_a_warning_without():
    th = engine(recipe(), total_steps=8)
    rest = [p for p in th._wrapping.rest_tensors() if isinstance(p, torch.nn.Parameter)]
    start = snapshot(rest)
    optimizer = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2)
    th.attach(optimizer)
    x, y = next(batches())
    th.model.train()
    torch.nn.functional.cross_entropy(th.model(x), y).backward()
    optimizer.step()
    th.step()
    assert not moved(start, rest)
    th.unwrap()

    th = engine(recipe(), total_steps=8)
    optimizer = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2)  # not attached
    th.model.train()
    torch.nn.functional.cross_entropy(th.model(x), y).backward()
    optimizer.step()
    with pytest.warns(UserWarning, match="rest_after_mixing"):
        th.step()
    th.unwrap()


def test_it_is_a_no_op_with_the_rest_frozen_and_survives_a_checkpoint(tmp_path):
    th = engine(recipe(), total_steps=8, train_rest=False)
    assert th._state.rest_waits is False
    th.unwrap()
    th = engine(recipe(), total_steps=8)
    assert th.recipe.rest_after_mixing and th._state.rest_waits
    rebuilt = Theseus(ChainModel(depth=4, seed=0), th.config)
    assert rebuilt.recipe.rest_after_mixing and rebuilt._state.rest_waits
    rebuilt.unwrap()
    th.unwrap()
