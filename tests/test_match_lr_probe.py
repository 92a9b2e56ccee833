"""match_lr="auto" (issue 26): module matching's lr chosen per model by a short measured probe."""

import itertools
import math

import pytest
import torch

from theseus_general import Theseus, match_successors
from theseus_general.errors import TrainingError
from theseus_general.training import MATCH_LR_GRID, probe_match_lr

from conftest import ChainModel, state_snapshot, assert_same_state


def batches(n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=g), None) for _ in range(n)]


def engine(seed: int = 0) -> Theseus:
    return Theseus(ChainModel(depth=6, seed=seed), successor_depth=3, adapter="generic", container="blocks", seed=0)


def test_the_probe_measures_every_lr_of_the_grid_and_puts_everything_back():
    th = engine()
    before = state_snapshot(th.model)
    rng = torch.get_rng_state()
    probe = probe_match_lr(th, batches(6), steps=4, progress=False)
    assert sorted(probe.errors) == sorted(MATCH_LR_GRID) and probe.steps == 4
    assert all(math.isfinite(e) and e > 0 for e in probe.errors.values())
    assert probe.errors[probe.lr] == min(probe.errors.values())
    assert len(set(probe.errors.values())) > 1  # the lrs were really tried: they end in different places
    assert_same_state(before, th.model)  # successors, predecessor and buffers as they were
    assert torch.equal(rng, torch.get_rng_state())
    with pytest.warns(UserWarning, match="never trained"):  # the probe's tries do not count as training
        th.export()
    th.unwrap()


def test_the_probe_puts_back_batch_norm_statistics_and_the_start_choice_on_a_cnn():
    import itertools

    from test_matching import bn_cnn, image_stream

    th = Theseus(bn_cnn(), adapter="generic", container="3", successor_depth=2, seed=0)
    before = state_snapshot(th.model)
    probe = probe_match_lr(th, list(itertools.islice(image_stream(), 6)), steps=4, choose_start=True,
                           progress=False)
    assert all(math.isfinite(e) for e in probe.errors.values())
    assert th.successor_starts == {}  # the tries' start choices are undone too
    assert_same_state(before, th.model)  # running means and variances included
    th.unwrap()


def test_the_probe_prefers_the_lr_that_matches_better_and_a_diverging_one_loses():
    # on this chain 1e-2 learns within 4 steps and 1e-6 barely moves; 1e4 blows up (put back or non-finite)
    th = engine()
    probe = probe_match_lr(th, batches(6), steps=4, grid=(1e-6, 1e-2, 1e4), progress=False)
    assert probe.lr == 1e-2, probe.errors
    assert probe.errors[1e-2] < probe.errors[1e-6]
    th.unwrap()


def test_auto_matching_equals_matching_at_the_lr_the_probe_chose():
    data = batches(30, seed=1)
    auto = engine()
    result = match_successors(auto, iter(data), 20, lr="auto", progress=False)
    assert result.match_lr == result.match_lr_probe.lr and result.match_lr in MATCH_LR_GRID
    fixed = engine()
    reference = match_successors(fixed, iter(data), 20, lr=result.match_lr, progress=False)
    assert reference.match_lr_probe is None
    assert result.losses == reference.losses  # the probe left nothing behind: the same run, step for step
    for a, b in zip(auto.successors(), fixed.successors()):
        for x, y in zip(a.parameters(), b.parameters()):
            assert torch.equal(x, y)
    auto.unwrap()
    fixed.unwrap()


def test_fit_takes_match_lr_auto():
    from theseus_general import fit

    th = engine()
    data = [(x, torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(i))) for i, (x, _) in
            enumerate(batches(40))]
    result = fit(th, itertools.cycle(data), 20, lr=1e-3, match_steps=10, match_lr="auto", progress=False,
                 loss=lambda x, y: th.model(x).pow(2).mean())
    assert result.matching.match_lr == result.matching.match_lr_probe.lr
    assert len(result.matching.history) == 10 and th.step_count == 10
    th.unwrap()


@pytest.mark.parametrize("grid", [(), (0.0,), (float("nan"),), (True,)])
def test_a_bad_grid_is_refused_before_any_weight_changes(grid):
    th = engine()
    before = state_snapshot(th.model)
    with pytest.raises(TrainingError, match="grid"):
        probe_match_lr(th, batches(6), steps=4, grid=grid, progress=False)
    assert_same_state(before, th.model)
    th.unwrap()


def test_the_probe_needs_a_held_out_batch():
    th = engine()
    with pytest.raises(TrainingError, match="held out"):
        probe_match_lr(th, batches(4), steps=4, progress=False)
    th.unwrap()


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("inf"), "fast", True])
def test_a_recipe_refuses_a_match_lr_that_is_not_a_rate_or_auto(bad):
    from theseus_general.errors import ScheduleError
    from theseus_general.recipes import RECIPES
    import dataclasses

    with pytest.raises(ScheduleError, match="match_lr"):
        dataclasses.replace(RECIPES["default"], match_lr=bad)
    assert dataclasses.replace(RECIPES["default"], match_lr="auto").match_lr == "auto"


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 12])
def test_auto_reads_no_batch_beyond_the_matching_steps(steps):
    # a finite stream of exactly `steps` batches is enough, as at a fixed lr, and a shared stream goes on in order
    data = batches(steps + 1, seed=2)
    stream = iter(data)
    th = engine()
    result = match_successors(th, stream, steps, lr="auto", progress=False)
    assert next(stream) is data[steps]  # the next batch is the one after matching's own
    if steps < 3:
        assert result.match_lr_probe is None and result.match_lr == 1e-3
    else:
        assert result.match_lr_probe.steps == min(8, steps - min(2, steps - 2))
    th.unwrap()
