"""The end check (issue 26, round 11): after training, `fit` says when the successors alone answered a single
class on the run's last training batches while the labels held several (`FitResult.end_collapsed`, a
`CollapsedSuccessorWarning`): the compressed model collapsed, as MPNet truncated below half depth did without
module matching."""

import warnings

import pytest
import torch

from theseus_general import CollapsedSuccessorWarning, Theseus, fit
from theseus_general.recipes import get_recipe

from conftest import ChainModel, FlatSuccessor


def stream():
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    return [(x, (x.sum(1) > 0).long())] * 20


def engine(recipe="default", successors=None):
    return Theseus(ChainModel(depth=4, seed=0), adapter="generic", container="blocks", successor_depth=2,
                   recipe=get_recipe(recipe), successors=successors)


def test_fit_warns_when_the_trained_successors_answer_one_class():
    # the successors alone (p = 1 from half the run) answered one class on each of the last training batches, at
    # least 128 predictions in a row, while the labels held both
    th = engine(successors=[FlatSuccessor(), FlatSuccessor()])
    with pytest.warns(CollapsedSuccessorWarning, match=r"single class .* match_steps=int\(0.2 \* steps\)"):
        result = fit(th, stream(), 8, lr=1e-2, match_steps=0, progress=False)
    assert result.end_collapsed is True
    th.unwrap()
    th = engine()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapsedSuccessorWarning)
        result = fit(th, stream(), 8, lr=1e-2, progress=False)
    assert result.end_collapsed is False
    th.unwrap()
    # p below 1 to the end (the paper's slope over 8 steps): the successors alone never ran; nothing measured
    th = engine("paper", successors=[FlatSuccessor(), FlatSuccessor()])
    assert fit(th, stream(), 8, lr=1e-2, progress=False).end_collapsed is None
    th.unwrap()


def test_fewer_than_128_predictions_in_one_class_do_not_count_as_collapsed():
    # 4 steps at p = 1 on batches of 16: 64 predictions, which one class could cover by chance
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    th = engine(successors=[FlatSuccessor(), FlatSuccessor()])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapsedSuccessorWarning)
        result = fit(th, [(x, (x.sum(1) > 0).long())] * 20, 8, lr=1e-2, match_steps=0, progress=False)
    assert result.end_collapsed is False
    th.unwrap()
