"""TheseusConfig: every setting in one JSON-safe object, the recipe resolved into it once, saved in
checkpoints, and an engine rebuilt from a checkpoint without repeating its settings."""

from __future__ import annotations

import json

import pytest
import torch

from theseus_general import ConstantScheduler, Theseus
from theseus_general.checkpoint import save_checkpoint
from theseus_general.config import TheseusConfig
from theseus_general.errors import CheckpointError, ScheduleError

from conftest import ChainModel, assert_same_state, state_snapshot


def _engine(**settings):
    return Theseus(ChainModel(depth=6), adapter="generic", container="blocks", **settings)


def test_a_config_and_keywords_build_the_same_engine():
    by_keywords = _engine(successor_depth=3, seed=5, total_steps=20)
    by_config = Theseus(ChainModel(depth=6), TheseusConfig(successor_depth=3, seed=5, total_steps=20, adapter="generic",
                                                           adapter_options={"container": "blocks"}))
    assert by_keywords.config == by_config.config
    assert by_keywords.plan == by_config.plan
    assert [by_keywords.scheduler(t) for t in range(20)] == [by_config.scheduler(t) for t in range(20)]


def test_the_recipe_is_resolved_into_the_config_and_parts_given_win():
    th = _engine(successor_depth=3)
    config = th.config
    assert config.recipe == "default" and config.train_rest is True
    assert config.recipe_parts == {**th.recipe.__dict__}  # fit and matching read these parts
    assert config.schedule["type"] == "run_linear" and config.schedule["base"] == th.recipe.base
    custom = _engine(successor_depth=3, base_rate=0.6, replace_by=0.25, match_fraction=0.0, train_rest=False)
    assert (custom.recipe.base, custom.recipe.full_at, custom.recipe.match_fraction, custom.train_rest) == (0.6, 0.25, 0.0, False)
    assert custom.config.schedule == {"type": "run_linear", "full_at": 0.25, "base": 0.6, "total_steps": None}
    paper = _engine(successor_depth=3, recipe="paper", replace_by=0.5)  # the paper's fixed slope, made run-relative
    assert paper.config.schedule["type"] == "run_linear" and paper.train_rest is False


def test_keywords_win_over_the_configs_fields():
    th = Theseus(ChainModel(depth=6), TheseusConfig(successor_depth=3, seed=1), adapter="generic", container="blocks", seed=7)
    assert th.config.seed == 7 and th.config.successor_depth == 3


def test_the_config_is_json_and_round_trips():
    config = _engine(successor_depth=3, total_steps=12).config
    again = TheseusConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ScheduleError, match=r"Unknown TheseusConfig fields \['colour'\]"):
        TheseusConfig.from_dict({**config.to_dict(), "colour": "red"})


def _train(th, steps):
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2)
    th.attach(opt)
    th.model.train()
    for i in range(steps):
        th.model(torch.randn(4, 4, generator=torch.Generator().manual_seed(i))).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        th.step()
    return opt


def test_from_checkpoint_rebuilds_the_engine_without_its_settings(tmp_path):
    th = _engine(successor_depth=3, seed=9, total_steps=8, base_rate=0.5, train_rest=False)
    opt = _train(th, 3)
    save_checkpoint(str(tmp_path / "ck"), th, opt)
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["engine"]["config"] == th.config.to_dict()
    saved = {k: v.clone() for k, v in th.state_dict()["tensors"].items()}
    th.unwrap()

    rebuilt = Theseus.from_checkpoint(ChainModel(depth=6), str(tmp_path / "ck"))
    assert rebuilt.config == th.config and rebuilt.step_count == 3
    assert rebuilt.replacement_rate == th.scheduler(3)
    for name, value in rebuilt.state_dict()["tensors"].items():
        assert torch.equal(value, saved[name]), name


def test_from_checkpoint_asks_for_a_callable_schedule_and_changes_nothing(tmp_path):
    th = _engine(successor_depth=3, scheduler=lambda step: 0.5)
    assert th.config.schedule is None  # a callable cannot be written as JSON
    save_checkpoint(str(tmp_path / "ck"), th, _train(th, 1))
    model = ChainModel(depth=6)
    before = state_snapshot(model)
    with pytest.raises(CheckpointError, match=r"callable schedule.*scheduler=\.\.\."):
        Theseus.from_checkpoint(model, str(tmp_path / "ck"))
    assert_same_state(before, model)
    rebuilt = Theseus.from_checkpoint(model, str(tmp_path / "ck"), scheduler=lambda step: 0.5)
    assert rebuilt.step_count == 1


def test_a_saved_constant_schedule_comes_back():
    th = _engine(successor_depth=3, scheduler=ConstantScheduler(0.4, replace_all_at=5))
    again = Theseus(ChainModel(depth=6), TheseusConfig.from_dict(th.config.to_dict()))
    assert [again.scheduler(t) for t in range(8)] == [th.scheduler(t) for t in range(8)]


def test_from_checkpoint_keeps_the_chosen_start_blocks(tmp_path):
    import itertools

    from theseus_general import fit

    th = _engine(successor_depth=3, recipe="matching")  # matching chooses each successor's start block
    fit(th, itertools.repeat((torch.randn(8, 4), torch.zeros(8, dtype=torch.long))), 5, lr=1e-3,
        checkpoints=str(tmp_path / "run"), progress=False)
    assert th.successor_starts  # some group did restart from another block (else this shows nothing)
    saved = sorted((tmp_path / "run").glob("step-*"))[-1]
    rebuilt = Theseus.from_checkpoint(ChainModel(depth=6), str(saved))
    assert rebuilt.successor_starts == th.successor_starts
    rows = str(rebuilt.plan).splitlines()[3:6]
    for group, block in th.successor_starts.items():
        assert f"copy of block {block} (chosen)" in rows[group]
