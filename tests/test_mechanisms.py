"""Issue 23's recipe options (off by default): the annealed blend, mixed-phase matching and the
successors' effective-lr compensation."""

import dataclasses

import pytest
import torch

from theseus_general import ScheduleError, Theseus, TrainingError, fit
from theseus_general.recipes import get_recipe

from conftest import ChainModel


def with_options(**options):
    return dataclasses.replace(get_recipe("default"), **options)


def chain_engine(recipe, seed: int = 0) -> Theseus:
    return Theseus(ChainModel(depth=4, seed=seed), successor_depth=2, adapter="generic", container="blocks",
                   recipe=recipe, total_steps=10)


def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield x, (x.sum(1) > 0).long()


def test_bad_option_values_fail_with_the_fix():
    with pytest.raises(ScheduleError, match="mixing must be one of"):
        with_options(mixing="average")
    with pytest.raises(ScheduleError, match="lr_compensation"):
        with_options(lr_compensation=0.5)
    with pytest.raises(ScheduleError, match="mixed_matching"):
        with_options(mixed_matching=-1.0)
    recipe = get_recipe("default")
    assert (recipe.mixing, recipe.mixed_matching, recipe.lr_compensation) == ("random", 0.0, None)


def test_blend_mixes_the_group_and_its_successor_by_the_rate():
    th = chain_engine(with_options(mixing="blend"))
    rate = th.replacement_rate
    assert 0 < rate < 1
    group = th.groups[0]
    x = torch.randn(3, 8)
    th.model.train()
    expected = (1 - rate) * group.run_predecessor(x) + rate * group.successor(x)
    torch.testing.assert_close(group(x), expected)
    assert th.decisions() == {}  # nothing drawn
    th.model.eval()
    torch.testing.assert_close(group(x), group.successor(x))  # eval: the successor alone
    th.unwrap()


def test_mixed_matching_trains_each_successor_towards_its_group_only():
    th = chain_engine(with_options(mixed_matching=1.0))
    th.model.train()
    x, y = next(batches())
    out = th.model(x)
    extra = th.auxiliary_loss()
    assert extra is not None and torch.isfinite(extra) and extra.item() > 0
    assert th.auxiliary_loss() is None  # read once
    extra.backward()
    successors = {id(p) for s in th.successors() for p in s.parameters()}
    for name, p in th.model.named_parameters():
        if not p.requires_grad:
            continue
        moved = p.grad is not None and p.grad.abs().sum().item() > 0
        # the successors learn from it; the stem and head (trained copies) get nothing from the matching term
        assert moved == (id(p) in successors), name
    del out
    # no matching term without the option, or once p = 1
    plain = chain_engine(get_recipe("default"))
    plain.model.train()
    plain.model(x)
    assert plain.auxiliary_loss() is None
    plain.unwrap()
    th.unwrap()


def test_fit_adds_the_matching_term_to_the_loss():
    def losses(recipe):
        th = chain_engine(recipe)
        history = fit(th, batches(), 4, lr=1e-2, progress=False, match_steps=0).history
        th.unwrap()
        return [s.loss for s in history]

    plain, matched = losses(get_recipe("default")), losses(with_options(mixed_matching=1.0))
    assert matched[0] > plain[0]  # same weights and batch at step 0: the difference is the term


def test_lr_compensation_scales_the_successors_lr_by_one_over_p_capped():
    th = chain_engine(with_options(lr_compensation=2.0))
    history = fit(th, batches(), 10, lr=1e-2, lr_schedule="constant", progress=False, match_steps=0).history
    # StepLog.lr is the first parameter group's: the successors'
    for record in history:
        assert record.lr == pytest.approx(1e-2 * min(2.0, 1 / record.replacement_rate))
    assert history[0].lr == pytest.approx(2e-2) and history[-1].lr == pytest.approx(1e-2)
    th.unwrap()


def test_lr_compensation_leaves_the_rest_at_the_runs_lr():
    from theseus_general.training import _param_groups

    th = chain_engine(with_options(lr_compensation=3.0))
    params = th.trainable_parameters()
    groups, factors = _param_groups(th, params, lambda s: 1.0)
    successors = {id(p) for s in th.successors() for p in s.parameters()}
    assert {id(p) for p in groups[0]["params"]} == successors
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in params} - successors
    assert factors[0](0) == pytest.approx(3.0) and factors[1](0) == 1.0
    th.unwrap()


def test_integrations_refuse_options_they_would_drop():
    from integrations.hf_trainer import TheseusCallback

    th = chain_engine(with_options(lr_compensation=2.0))
    with pytest.raises(TrainingError, match="lr_compensation take effect in theseus_general.fit only"):
        TheseusCallback(th)
    th.unwrap()
    th = chain_engine(with_options(mixing="blend"))  # the blend needs no loop of its own
    TheseusCallback(th)
    th.unwrap()


def test_prefix_mixing_runs_the_successors_of_a_prefix_of_the_groups():
    # round 10 (issue 26): the paper's draws count how many groups, from the first, run their successors
    from theseus_general.replacement import ReplacementState

    state = ReplacementState(seed=3)
    state.mixing, state.group_count = "prefix", 6
    shares = []
    for step in range(400):
        state.advance(step, 0.4)
        decisions = [state.decision(g, 0) for g in range(6)]
        k = sum(decisions)
        assert decisions == [True] * k + [False] * (6 - k), decisions  # a prefix, never a gap
        shares.append(k / 6)
    assert abs(sum(shares) / len(shares) - 0.4) < 0.03  # the paper's share of successors, on average
    state.mixing = "random"  # the paper's draws do leave gaps
    gaps = 0
    for step in range(50):
        state.advance(step, 0.4)
        decisions = [state.decision(g, 0) for g in range(6)]
        gaps += decisions != sorted(decisions, reverse=True)
    assert gaps > 0

    th = chain_engine(with_options(mixing="prefix"))
    assert th._state.group_count == 2
    fit(th, batches(), 10, lr=1e-2, progress=False, match_steps=0)
    th.unwrap()
