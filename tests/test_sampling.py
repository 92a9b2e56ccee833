"""Per-group Bernoulli draws, eval behaviour and the all-predecessor forward."""

import torch

from theseus_general import ConstantScheduler, Theseus

from conftest import ChainModel, bert_batch, tiny_bert


def _count_calls(modules):
    counts = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_pre_hook(lambda mod, args, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_each_group_draws_independently_at_rate_p():
    model = ChainModel(depth=6)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=3, scheduler=ConstantScheduler(0.3))
    successor_calls = _count_calls(th.successors())
    x = torch.randn(2, 4)
    steps = 2000
    joint = differ = 0
    model.train()
    for _ in range(steps):
        before = list(successor_calls)
        th.model(x)
        th.step()
        ran = [a - b for a, b in zip(successor_calls, before)]
        joint += ran[0] * ran[1]
        differ += ran[0] != ran[1]
    freqs = [c / steps for c in successor_calls]
    # binomial sd at n=2000, p=0.3 is ~0.010: 0.04 is four sd
    assert all(abs(f - 0.3) < 0.04 for f in freqs), freqs
    # independent gates: P(both) ~ p^2 = 0.09; a shared gate would give 0.3
    assert abs(joint / steps - 0.09) < 0.03
    # not one gate for all groups: their draws differ on 2 p (1 - p) = 42% of steps
    assert abs(differ / steps - 0.42) < 0.04


def test_draws_differ_between_groups_and_repeat_for_same_seed():
    def draws(seed):
        model = ChainModel(depth=4)
        th = Theseus(model, adapter="generic", container="blocks", successor_depth=2, scheduler=0.5, seed=seed)
        out = []
        model.train()
        for _ in range(50):
            th.model(torch.randn(1, 4))
            out.append(tuple(th.last_decisions[g] for g in range(2)))
            th.step()
        return out

    a, b, c = draws(0), draws(0), draws(1)
    assert a == b  # (seed, step) decide the draws, not the global RNG
    assert a != c
    assert any(x[0] != x[1] for x in a)  # groups draw separately


def test_eval_runs_successors_only():
    model = tiny_bert(num_layers=6)
    th = Theseus(model, successor_depth=3, scheduler=0.0)  # p = 0: training would use predecessors only
    predecessor_calls = _count_calls([b for g in th.groups for b in g.predecessor])
    successor_calls = _count_calls(th.successors())
    model.eval()
    with torch.no_grad():
        model(input_ids=bert_batch()["input_ids"])
    assert predecessor_calls == [0] * 6
    assert successor_calls == [1, 1, 1]
    model.train()
    model(**bert_batch())
    assert predecessor_calls == [1] * 6 and successor_calls == [1, 1, 1]


def test_all_predecessor_forward_backward_does_not_crash():
    model = tiny_bert(num_layers=4)
    th = Theseus(model, successor_depth=2, scheduler=0.0, train_rest=False)  # nothing else trains
    successors = [p for s in th.successors() for p in s.parameters()]
    before = [p.detach().clone() for p in successors]
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-3)
    th.attach(opt)
    model.train()
    loss = model(**bert_batch()).loss
    loss.backward()  # every group ran its predecessor: no successor in the graph but for the zero anchor
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in successors)
    opt.step()  # the attached optimiser's hook drops the idle successors' zero gradients
    assert all(p.grad is None for p in successors)
    assert all(torch.equal(a, p) for a, p in zip(before, successors))


def test_gradients_flow_through_frozen_predecessor_to_earlier_successor():
    model = ChainModel(depth=4)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=2, scheduler=0.5, seed=3)
    model.train()
    for _ in range(40):  # find a step where group 0 runs its successor and group 1 its predecessor
        out = model(torch.randn(3, 4))
        if th.last_decisions == {0: True, 1: False}:
            out.sum().backward()
            assert torch.count_nonzero(th.successors()[0].linear.weight.grad) > 0
            assert th.successors()[1].linear.weight.grad is None  # idle, and no anchor in one process
            return
        th.step()
    raise AssertionError("no step drew successor, predecessor")


def test_every_group_runs_its_successor_at_the_rate():
    model = ChainModel(depth=8)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=4, scheduler=ConstantScheduler(0.4))
    calls = _count_calls(th.successors())
    x = torch.randn(2, 4)
    model.train()
    for _ in range(1500):
        th.model(x)
        th.step()
    assert all(abs(c / 1500 - 0.4) < 0.05 for c in calls), calls
