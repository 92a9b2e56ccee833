"""Module matching (`Theseus.match_successors`): successors learn their groups' outputs, nothing else moves."""

import itertools

import torch

from theseus_general import Theseus

from conftest import ChainModel, bert_batch, state_snapshot, assert_same_state, tiny_bert


def unlabelled_stream(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(16, 4, generator=g), None  # labels are not used


def group_errors(th: Theseus, x: torch.Tensor) -> list:
    """Each successor's relative squared error against its group, on the predecessor's own hidden states."""
    errors = []
    hooks = [g.register_forward_hook(lambda m, args, out: errors.append(
        ((m.successor(*args) - out).pow(2).mean() / out.pow(2).mean()).item())) for g in th.groups]
    previous, th._state.force = th._state.force, "predecessor"
    try:
        with torch.no_grad():
            th.model(x)
    finally:
        th._state.force = previous
        for h in hooks:
            h.remove()
    return errors


def test_matching_trains_each_successor_towards_its_group_and_moves_nothing_else():
    model = ChainModel(depth=6, seed=0)
    before = state_snapshot(model)
    th = Theseus(model, successor_depth=3, adapter="generic", container="blocks", seed=0)
    rest = {n: p.detach().clone() for n, p in th.model.named_parameters() if "successor" not in n}
    probe = torch.randn(64, 4, generator=torch.Generator().manual_seed(99))
    start = group_errors(th, probe)

    result = th.match_successors(unlabelled_stream(), 60, lr=1e-2, progress=False)

    end = group_errors(th, probe)
    assert len(result.losses) == 60 and result.losses[-1] < result.losses[0]
    assert all(e < s / 2 for s, e in zip(start, end)), (start, end)
    assert th.step_count == 0 and th.replacement_rate == th.scheduler(0)  # the schedule did not advance
    for name, p in th.model.named_parameters():
        if "successor" not in name:
            assert torch.equal(p, rest[name]), f"{name} moved"
    th.unwrap()
    assert_same_state(before, model)


def test_matching_then_fit_on_a_bert_encoder_keeps_the_run_exportable():
    from theseus_general import fit

    model = tiny_bert(num_layers=4)
    th = Theseus(model, successor_depth=2, seed=0)
    batch = bert_batch(batch=4, length=8)
    labels = batch.pop("labels")
    result = th.match_successors(itertools.repeat((batch, labels)), 5, lr=1e-3, progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    fit(th, itertools.repeat((batch, labels)), 3, lr=1e-3, progress=False)
    exported = th.export()
    assert exported.config.num_hidden_layers == 2
    th.unwrap()
