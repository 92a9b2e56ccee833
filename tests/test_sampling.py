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
    model.train()
    loss = model(**bert_batch()).loss
    loss.backward()  # every group ran its predecessor: no successor in the graph but for the zero anchor
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in successors)
    opt.step()  # the engine's pre-step hook drops the idle successors' zero gradients
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
            assert torch.count_nonzero(th.successors()[1].linear.weight.grad) == 0
            return
        th.step()
    raise AssertionError("no step drew successor, predecessor")


def _successor_frequencies(order, rate, groups=4, steps=1500):
    model = ChainModel(depth=2 * groups)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=groups,
                 scheduler=ConstantScheduler(rate), replacement_order=order)
    calls = _count_calls(th.successors())
    x = torch.randn(2, 4)
    model.train()
    for _ in range(steps):
        th.model(x)
        th.step()
    return [c / steps for c in calls]


def test_ordered_replacement_fills_the_groups_from_one_side_at_the_same_mean_rate():
    # 4 groups at p = 0.4: 1.6 groups replaced on average; bottom-up: the first group always,
    # the second with probability 0.6, the others never; top-down the same from the output side
    bottom_up = _successor_frequencies("bottom_up", 0.4)
    assert bottom_up[0] == 1.0 and bottom_up[2] == bottom_up[3] == 0.0 and abs(bottom_up[1] - 0.6) < 0.05, bottom_up
    top_down = _successor_frequencies("top_down", 0.4)
    assert top_down[3] == 1.0 and top_down[0] == top_down[1] == 0.0 and abs(top_down[2] - 0.6) < 0.05, top_down
    random = _successor_frequencies("random", 0.4)
    assert all(abs(f - 0.4) < 0.05 for f in random), random
    assert abs(sum(bottom_up) - 1.6) < 0.05 and abs(sum(top_down) - 1.6) < 0.05


def test_a_bad_replacement_order_fails_before_the_model_changes():
    import pytest

    from theseus_general import ScheduleError

    model = ChainModel(depth=4)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ScheduleError, match="replacement_order must be one of random, bottom_up, top_down; got 'inside_out'"):
        Theseus(model, adapter="generic", container="blocks", successor_depth=2, replacement_order="inside_out")
    assert [type(m) for m in model.modules()] == before
