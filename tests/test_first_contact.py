"""Edges a first-time user meets: exporting before training, a DataParallel model, fit's numbers."""

import warnings

import pytest
import torch

from theseus_general import AdapterError, Theseus, TrainingError, match_successors
from theseus_general.training import fit

from conftest import ChainModel, assert_same_state, state_snapshot, tiny_bert


def _chain_batches(n: int = 4):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 4, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


def test_export_of_a_never_trained_engine_warns_once():
    th = Theseus(ChainModel(), successor_depth=3, adapter="generic", container="blocks")
    with pytest.warns(UserWarning, match="never trained") as caught:
        th.export()
    assert caught[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        th.export()  # once is enough


def test_export_after_training_or_matching_does_not_warn():
    trained = Theseus(ChainModel(), successor_depth=3, adapter="generic", container="blocks")
    fit(trained, _chain_batches(), steps=4, lr=1e-3, progress=False)
    matched = Theseus(ChainModel(), successor_depth=3, adapter="generic", container="blocks")
    match_successors(matched, _chain_batches(), 2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.export()
        matched.export()


def test_data_parallel_is_refused_with_the_module_to_pass_and_nothing_changes():
    model = tiny_bert(num_layers=4)
    wrapped = torch.nn.DataParallel(model)
    before = state_snapshot(wrapped)
    with pytest.raises(AdapterError, match=r"\.module"):
        Theseus(wrapped, successor_depth=2)
    assert_same_state(before, wrapped)
    Theseus(wrapped.module, successor_depth=2).unwrap()  # what the message says works


@pytest.mark.parametrize("option, value, words", [
    ("lr", -1, "lr"),
    ("lr", float("nan"), "lr"),
    ("weight_decay", -0.1, "weight_decay"),
    ("warmup", 1.5, "warmup"),
    ("max_grad_norm", 0, "max_grad_norm"),
    ("gradient_accumulation", 0, "gradient_accumulation"),
    ("match_lr", -1e-3, "match_lr"),
    ("match_lr", "1e-3", "match_lr"),
    ("checkpoint_every", 1.5, "checkpoint_every"),
])
def test_fit_checks_its_numbers_before_any_weight_changes(option, value, words):
    model = tiny_bert(num_layers=4)
    th = Theseus(model, successor_depth=2)  # the default recipe: matching would change successors first
    before = state_snapshot(th.model)
    batches = [({"input_ids": torch.randint(1, 100, (2, 6))}, torch.tensor([0, 1]))] * 8
    with pytest.raises(TrainingError, match=words) as caught:
        fit(th, batches, steps=4, progress=False, **{option: value})
    assert "got" in str(caught.value)
    assert_same_state(before, th.model)
    assert th.step_count == 0
