"""The recipe's short mixed phase for a start that disagrees with its predecessor (issue 26, round 10): the
bert adapter's family recipe, "bert", moves p = 1 from 50% to 10% of the run when the start check's pooled
agreement is below 2/3; every other recipe leaves it where it is."""

import dataclasses

import pytest
import torch

from theseus_general import RECIPES, ScheduleError, Theseus, fit
from theseus_general.recipes import get_recipe

from conftest import ChainModel, FlatSuccessor, sign_batches


def test_the_recipe_picks_the_phase_from_the_agreement():
    bert = get_recipe("bert")
    assert bert.full_at_for(0.5) == 0.1 and bert.full_at_for(0.9) == 0.5 and bert.full_at_for(None) == 0.5
    assert bert.asks_start
    default = get_recipe("default")
    assert default.full_at_for(0.1) == 0.5
    # "bert" is the default with the one change
    assert bert == dataclasses.replace(default, name="bert", short_phase_below_agreement=2 / 3, short_full_at=0.1,
                                       collapse_spread=1e-2)  # round 12: a nearly collapsed start is matched
    with pytest.raises(ScheduleError, match="short_full_at is a share"):
        dataclasses.replace(default, short_full_at=0.0)


def engine(recipe, **options):
    return Theseus(ChainModel(depth=6, seed=3), adapter="generic", container="blocks", successor_depth=3, seed=1,
                   recipe=recipe, **options)


def batches():
    return sign_batches(16)


def always_short():
    # a threshold above any agreement: this chain's start always counts as disagreeing
    return dataclasses.replace(get_recipe("default"), name="always_short", short_phase_below_agreement=1.0,
                               match_if_collapsed=False, match_fraction=0.0)


def test_fit_moves_the_recipes_curriculum_for_a_start_that_disagrees_and_records_it(tmp_path):
    th = engine(always_short())
    result = fit(th, batches(), 20, lr=1e-2, progress=False)
    assert result.start_agreement is not None and result.matching is None
    assert th.scheduler.full_at == 0.1 and th.recipe.full_at == 0.1
    rates = [record.replacement_rate for record in result.history]
    assert rates[0] < 1 and rates[2] == 1.0  # p = 1 at 10% of 20 steps
    assert th.config.schedule["full_at"] == 0.1  # what a checkpoint saves, so a resumed run keeps it
    rebuilt = Theseus(ChainModel(depth=6, seed=3), th.config)
    assert rebuilt.scheduler.full_at == 0.1
    rebuilt.unwrap()
    th.unwrap()


def test_a_curriculum_given_by_the_user_wins():
    th = engine(always_short(), replace_by=0.5)
    fit(th, batches(), 20, lr=1e-2, progress=False)
    assert th.scheduler.full_at == 0.5
    th.unwrap()
    th = engine(get_recipe("default"))  # no short phase in the default recipe
    fit(th, batches(), 20, lr=1e-2, progress=False)
    assert th.scheduler.full_at == 0.5
    th.unwrap()


def test_the_bert_adapter_names_the_bert_recipe():
    from theseus_general import get_adapter

    assert get_adapter("bert").default_recipe == "bert" and "bert" in RECIPES
    assert get_adapter("vit").default_recipe == "default" and get_adapter("resnet").default_recipe == "resnet"


def test_another_ranks_phase_can_be_applied_and_a_started_run_keeps_its_own():
    th = engine(always_short())
    th.fit_phase_to_start(None, full_at=0.1)  # what rank 0 decided, as the Lightning callback passes it on
    assert th.scheduler.full_at == 0.1 and th.config.schedule["full_at"] == 0.1
    th.unwrap()
    th = engine(always_short(), total_steps=20)
    th.model.train()
    x, y = next(batches())
    torch.nn.functional.cross_entropy(th.model(x), y).backward()
    th.step()
    th.fit_phase_to_start(0.0)  # after the first step the curriculum is fixed
    assert th.scheduler.full_at == 0.5
    th.unwrap()


def test_a_collapsed_start_keeps_the_default_phase_when_the_recipe_says_so():
    # round 11's candidate: a start the recipe matches keeps p = 1 at 50%, the phase matching was measured with
    recipe = dataclasses.replace(get_recipe("bert"), short_phase_below_agreement=1.0)
    assert recipe.full_at_for(0.5, collapsed=True) == 0.1  # round 10's bert: matched or not
    keeps = dataclasses.replace(recipe, short_phase_if_collapsed=False)
    assert keeps.full_at_for(0.5, collapsed=True) == 0.5 and keeps.full_at_for(0.5, collapsed=False) == 0.1
    assert keeps.full_at_for(0.5) == 0.1  # no collapse measured: the agreement alone
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    stream = [(x, (x.sum(1) > 0).long())] * 20
    for chosen, full_at in ((recipe, 0.1), (keeps, 0.5)):
        th = Theseus(ChainModel(depth=4, seed=0), adapter="generic", container="blocks", successor_depth=2,
                     recipe=chosen, successors=[FlatSuccessor(), FlatSuccessor()])
        result = fit(th, list(stream), 10, lr=1e-2, progress=False)
        assert result.start_collapsed and result.matching is not None
        assert th.scheduler.full_at == full_at and th.config.schedule["full_at"] == full_at
        th.unwrap()
    with pytest.raises(ScheduleError, match="short_phase_if_collapsed is True or False"):
        dataclasses.replace(recipe, short_phase_if_collapsed="no")
