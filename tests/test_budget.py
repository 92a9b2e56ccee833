"""Budget targets (target_flops=, target_speedup=) and width successors (successor_width=), on
every built-in adapter: the plan meets the FLOPs target within one block's cost, an impossible
target is refused with the numbers, and width successors pass the conformance contract."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from theseus_general import CheckpointError, ConstantScheduler, ExportError, PlanError, Theseus, count_flops
from theseus_general.budget import groups_around, profile_blocks
from theseus_general.graph import get_submodule
from theseus_general.measure import count_parameters

from conftest import assert_same_state, state_snapshot, tiny_bert
from test_conformance import LLAMA, SWIN, _ce, _pixels, _images, _lm_loss, _out, _out_logits, _timm_resnet, _timm_vit, _tokens, _tv_resnet, _tv_vit


class Residual(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def _chain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Sequential(*[Residual(32, 64) for _ in range(6)]), nn.Linear(32, 3))


def _seeded(build, *args):
    def make():
        torch.manual_seed(0)
        return build(*args)
    return make


def _bert():
    return tiny_bert(num_layers=6)


def _vectors(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 8, generator=g), torch.randint(0, 3, (4,), generator=g)


# (adapter, make, batch, extra Theseus keywords)
FAMILIES = {
    "bert": (_bert, _tokens(100, 2), {}),
    "timm-vit": (_seeded(_timm_vit, 6), _images(3, 16, 3), {}),
    "torchvision-vit": (_seeded(_tv_vit, 4), _images(3, 16, 3), {}),
    "timm-resnet": (_seeded(_timm_resnet, [3, 4, 6, 3]), _images(3, 32, 3), {}),
    "torchvision-resnet": (_seeded(_tv_resnet, [2, 3, 3, 2]), _images(3, 32, 3), {}),
    "hf-llama": (lambda: LLAMA(6), _tokens(96, 2), {}),
    "generic-chain": (_chain, _vectors, {"adapter": "generic", "container": "1"}),
    # stages of 2, 4, 2 blocks whose windows shift by position: successor k starts as block k
    "hf-swin-stages": (lambda: SWIN([2, 4, 2]), _pixels(32), {}),
}
# a FLOPs target each tiny model can meet (the timm ResNet's stem is 85% of its FLOPs)
TARGET = {"timm-resnet": 0.98, "torchvision-resnet": 0.7, "hf-swin-stages": 0.8}
ADAPTER = {"bert": "bert", "timm-vit": "vit", "torchvision-vit": "vit", "timm-resnet": "resnet",
           "torchvision-resnet": "resnet", "hf-llama": "hf", "generic-chain": "generic",
           "hf-swin-stages": "hf"}


def _largest_block(model, th, sample):
    profile = profile_blocks(model, {p: get_submodule(model, p) for p in th.plan.containers}, sample)
    return max(max(c) for c in profile.costs.values())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_flops_target_is_met_within_one_block(family):
    make, batch, extra = FAMILIES[family]
    model = make()
    x, _ = batch(0)
    before, total = state_snapshot(model), count_flops(model, x)
    target = TARGET.get(family, 0.6)
    th = Theseus(model, target_flops=target, sample=x, **extra)
    assert th.adapter.name == ADAPTER[family]
    budget = th.plan.budget
    assert "predicted FLOPs" in str(th.plan) and "predicted speed-up" in str(th.plan)
    assert budget.total_flops == total
    exported = th.export(native=family != "generic-chain")
    measured = count_flops(exported, x)
    # the prediction is the exported model's own count, and it is within the budget
    assert measured == pytest.approx(budget.predicted_flops, rel=1e-6)
    assert measured <= target * total
    th.unwrap()
    # the planner leaves less than one block of the budget unused
    assert measured > target * total - _largest_block(model, th, x)
    assert_same_state(before, model)


@pytest.mark.parametrize("family", ["bert", "timm-resnet", "hf-llama", "generic-chain"])
def test_impossible_target_is_refused_with_the_numbers(family):
    make, batch, extra = FAMILIES[family]
    model = make()
    x, _ = batch(0)
    before = state_snapshot(model)
    with pytest.raises(PlanError, match="cannot be met") as error:
        Theseus(model, target_flops=0.01, sample=x, **extra)
    message = str(error.value)
    assert "closest achievable target is target_flops=" in message and "not replaced alone cost" in message
    closest = float(message.split("target_flops=")[-1].split(";")[0].rstrip("."))
    th = Theseus(model, target_flops=closest, sample=x, **extra)  # the closest target is achievable
    assert all(c.depth >= 1 for c in th.plan.budget.choices.values())
    th.unwrap()
    with pytest.raises(PlanError, match="target_speedup=.*cannot be met"):
        Theseus(model, target_speedup=1000.0, sample=x, **extra)
    assert_same_state(before, model)


def test_speedup_target_predicts_from_flops():
    model = _bert()
    x, _ = _tokens(100, 2)(0)
    th = Theseus(model, target_speedup=2.0, sample=x)
    assert th.plan.budget.predicted_speedup >= 2.0
    assert th.plan.budget.predicted_speedup == pytest.approx(1 / th.plan.budget.predicted_flops_fraction)


def test_latency_measure_plans_from_timings(monkeypatch):
    # the timings are fixed here so that the plan is a function of them alone (real timings move with
    # the machine's load): the whole model 10 s, each of the 6 blocks 1.4 s, so 1.6 s outside them
    from theseus_general import budget as budget_module

    def timed(model, containers, sample, device):
        return 10.0, {path: [1.4] * len(container) for path, container in containers.items()}

    monkeypatch.setattr(budget_module, "_timed_in_place", timed)
    model = _bert()
    x, _ = _tokens(100, 2)(0)
    th = Theseus(model, target_speedup=1.5, measure="latency", sample=x)
    budget = th.plan.budget
    # 1.6 + 3 x 1.4 = 5.8 s (1.72x) meets 1.5x; 4 blocks (7.2 s, 1.39x) would not
    assert budget.measure == "latency" and th.plan.successor_depth == {"bert.encoder.layer": 3}
    assert budget.predicted_speedup == pytest.approx(10.0 / 5.8)
    assert "latency per block" in str(th.plan)


def test_bad_budget_arguments():
    model = _bert()
    x, _ = _tokens(100, 2)(0)
    before = state_snapshot(model)
    for kwargs, pattern in [
        ({"target_flops": 0.5, "successor_depth": 3}, "cannot be combined with successor_depth"),
        ({"target_flops": 0.5, "ratio": 0.5}, "cannot be combined with ratio"),
        ({"target_speedup": 2.0, "groups": [[0, 1], [2, 3], [4, 5]]}, "cannot be combined with groups"),
        ({"target_flops": 0.5, "target_speedup": 2.0}, "Give one budget"),
        ({"target_flops": 1.5}, "strictly between 0 and 1"),
        ({"target_speedup": 0.5}, "above 1"),
        ({"target_flops": 0.5, "measure": "latency"}, "goes with target_speedup"),
        ({"successor_width": "auto", "successor_depth": 3}, "needs a budget"),
        ({"successor_width": 1.5, "successor_depth": 3}, r"fraction in \(0, 1\]"),
        ({"successor_width": 1.0}, "Give exactly one target"),  # nothing would be compressed
        ({"successor_width": {"bert.encoder.lyer": 0.5}}, "not compressed"),
    ]:
        with pytest.raises(PlanError, match=pattern):
            Theseus(model, sample=x, **kwargs)
    assert_same_state(before, model)


def test_budget_needs_a_sample_when_the_adapter_cannot_make_one():
    with pytest.raises(PlanError, match="pass sample="):
        Theseus(_chain(), target_flops=0.5, adapter="generic", container="1")


def test_groups_are_consecutive_around_the_kept_blocks():
    assert groups_around([1, 2, 4], 6) == [(0, 1), (2, 3), (4, 5)]
    assert groups_around([0, 3], 4) == [(0, 1, 2), (3,)]
    assert groups_around([2], 3) == [(0, 1, 2)]


def test_least_important_blocks_are_dropped():
    """A block made to be the identity has importance 0 and is the first to go."""
    model = _chain()
    with torch.no_grad():
        for i in (1, 4):
            model[1][i].fc2.weight.zero_()
            model[1][i].fc2.bias.zero_()
    x, _ = _vectors(0)
    th = Theseus(model, target_flops=0.75, sample=x, adapter="generic", container="1")
    kept = th.plan.budget.choices["1"].kept
    assert 1 not in kept and 4 not in kept and len(kept) == 4


def test_auto_width_mixes_depth_and_width():
    model = _bert()
    x, _ = _tokens(100, 2)(0)
    total = count_flops(model, x)
    th = Theseus(model, target_flops=0.5, sample=x, successor_width="auto")
    budget = th.plan.budget
    assert len(budget.alternatives) == 3 and sum("<- chosen" in a for a in budget.alternatives) == 1
    exported = th.export()
    assert count_flops(exported, x) <= 0.5 * total


# ---------------------------------------------------------------- width successors: the contract
WIDTH_CASES = {
    # family: (target, native export expected, native rebuild for strict reload or None)
    "bert": ({"successor_depth": 3, "successor_width": 0.5}, True),
    "timm-vit": ({"successor_depth": 3, "successor_width": 0.5}, True),
    "torchvision-vit": ({"ratio": 0.5, "successor_width": 0.5}, True),
    "timm-resnet": ({"successor_width": 0.5}, True),  # same depth, every block at half width
    "torchvision-resnet": ({"successor_depth": [1, 2, 2, 1], "successor_width": 0.5}, False),  # BasicBlock: fixed width
    "hf-llama": ({"successor_depth": 3, "successor_width": 0.5}, True),
    "bert-budget": ({"target_flops": 0.5, "successor_width": "auto"}, True),
}


def _loss(family, model, x, y):
    if family.startswith("bert"):
        return model(**x, labels=y).loss
    if family == "hf-llama":
        return _lm_loss(model, x, y)
    return _ce(model, x, y)


def _logits(family, model, x):
    return _out_logits(model, x) if family.startswith("bert") or family == "hf-llama" else _out(model, x)


@pytest.mark.parametrize("family", list(WIDTH_CASES))
def test_width_successors_pass_the_contract(family):
    make, batch, extra = FAMILIES[family.replace("-budget", "")]
    target, native = WIDTH_CASES[family]
    model = make()
    before, params = state_snapshot(model), count_parameters(model)
    x, y = batch(0)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        th = Theseus(model, scheduler=ConstantScheduler(0.5, replace_all_at=2), sample=x, **target, **extra)
    # a plan whose widths cannot be exported natively says so before training, and only then
    assert any("cannot be exported natively" in str(w.message) for w in caught) == (not native)
    assert all("width" in g.successor for g in th.plan.groups) or family == "bert-budget"
    optimizer = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2)
    th.model.train()
    for step in range(3):
        xb, yb = batch(step)
        loss = _loss(family, th.model, xb, yb)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        th.step()
    th.model.eval()
    with torch.no_grad():
        engine_out = _logits(family, th.model, x)
    if native:
        exported = th.export()
    else:
        with pytest.raises(ExportError, match="native=False"):
            th.export()
        exported = th.export(native=False)
    assert type(exported) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(_logits(family, exported, x), engine_out, rtol=1e-5, atol=1e-6)
    replaced = sum(g.predecessor_params - g.successor_params for g in th.plan.groups)
    assert count_parameters(exported) == params - replaced
    for path, depth in th.plan.successor_depth.items():
        assert len(get_submodule(exported, path)) == depth
    if native and hasattr(exported, "save_pretrained"):
        import tempfile

        with tempfile.TemporaryDirectory() as directory:  # the config describes the narrower layers
            exported.save_pretrained(directory)
            reloaded = type(exported).from_pretrained(directory).eval()
        with torch.no_grad():
            torch.testing.assert_close(_logits(family, reloaded, x), engine_out, rtol=1e-5, atol=1e-6)
    th.unwrap()
    assert_same_state(before, model)


def test_width_keeps_the_largest_units():
    """A hidden neuron with zero weights is the first a width successor drops."""
    model = _chain()
    with torch.no_grad():
        for block in model[1]:
            block.fc1.weight[:32].mul_(0.01)  # the first half of the neurons is nearly silent
    x, _ = _vectors(0)
    from theseus_general.width import narrow_linear_pair

    narrow = narrow_linear_pair(__import__("copy").deepcopy(model[1][0]), ["fc1"], "fc2", 32)
    torch.testing.assert_close(narrow.fc1.weight, model[1][0].fc1.weight[32:])
    torch.testing.assert_close(narrow.fc2.weight, model[1][0].fc2.weight[:, 32:])


def test_generic_adapter_has_no_width_successors():
    x, _ = _vectors(0)
    with pytest.raises(PlanError, match="no width successors"):
        Theseus(_chain(), adapter="generic", container="1", successor_depth=3, successor_width=0.5, sample=x)
    # "auto" then plans depth only, and says why
    th = Theseus(_chain(), adapter="generic", container="1", target_flops=0.6, successor_width="auto", sample=x)
    assert {c.width for c in th.plan.budget.choices.values()} == {1.0}
    assert "width 0.5: not available" in str(th.plan)


def test_mixed_widths_refuse_native_export():
    model = _bert()
    x, _ = _tokens(100, 2)(0)
    th = Theseus(model, successor_depth=3, sample=x)
    from theseus_general.width import narrow_linear_pair

    narrow_linear_pair(th.groups[0].successor, ["intermediate.dense"], "output.dense", 32)
    with pytest.raises(ExportError, match="native=False"):
        th.export()
    exported = th.export(native=False)
    assert exported.bert.encoder.layer[0].intermediate.dense.out_features == 32


def test_budget_plan_resumes_from_a_checkpoint():
    """A FLOPs plan is deterministic, so a resumed run rebuilds the same plan and loads its state."""
    x, _ = _tokens(100, 2)(0)
    th = Theseus(_bert(), target_flops=0.5, sample=x, successor_width="auto")
    with torch.no_grad():
        for p in th.trainable_parameters():
            p.add_(0.01)
    state = th.state_dict()
    again = Theseus(_bert(), target_flops=0.5, sample=x, successor_width="auto")
    assert again.plan == th.plan
    again.load_state_dict(state)
    for a, b in zip(again.trainable_parameters(), th.trainable_parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- groups="importance" at a given depth
def _chain_with_identities(*identities):
    """The chain with the given blocks made the identity (importance 0)."""
    model = _chain()
    with torch.no_grad():
        for i in identities:
            model[1][i].fc2.weight.zero_()
            model[1][i].fc2.bias.zero_()
    return model


def _most_important(model, container, sample, depth):
    importance = profile_blocks(model, {container: get_submodule(model, container)}, sample).importance[container]
    return tuple(sorted(sorted(range(len(importance)), key=lambda i: -importance[i])[:depth]))


def test_importance_groups_keep_the_most_important_blocks_at_the_depth_given():
    model = _chain_with_identities(1, 4)
    x, _ = _vectors(0)
    kept = _most_important(model, "1", x, 3)
    assert 1 not in kept and 4 not in kept
    before, blocks = state_snapshot(model), [state_snapshot(model[1][i]) for i in kept]
    th = Theseus(model, successor_depth=3, groups="importance", sample=x, adapter="generic", container="1")
    assert [g.blocks for g in th.plan.groups] == groups_around(kept, 6)
    assert f"1 keeps {list(kept)}" in str(th.plan)
    # each successor starts as a copy of its group's kept block, and fit may not restart it from another
    for block, successor in zip(blocks, th.successors()):
        assert_same_state(block, successor)
    assert not th.may_choose_starts
    with pytest.warns(UserWarning, match="never trained"):
        exported = th.export(native=False)
    th.unwrap()
    assert_same_state(before, model)
    layer_removed = nn.Sequential(model[0], nn.Sequential(*[model[1][i] for i in kept]), model[2])
    with torch.no_grad():
        assert torch.allclose(exported(x), layer_removed(x), atol=1e-6)


def test_importance_groups_on_a_decoder_export_its_kept_layers_natively():
    torch.manual_seed(0)
    model = LLAMA(6)
    x, _ = _tokens(96, 2)(0)
    kept = _most_important(model, "model.layers", x, 3)
    assert kept != (0, 1, 2)  # so that the copies below are not the default's
    mlps = [state_snapshot(model.model.layers[i].mlp) for i in kept]
    th = Theseus(model, ratio=0.5, groups="importance", sample=x)
    assert [g.blocks for g in th.plan.groups] == groups_around(kept, 6)
    with pytest.warns(UserWarning, match="never trained"):
        exported = th.export()
    th.unwrap()
    assert exported.config.num_hidden_layers == 3
    for position, mlp in enumerate(mlps):
        assert_same_state(mlp, exported.model.layers[position].mlp)


def test_importance_groups_refuse_what_they_cannot_honour():
    model = _chain()
    x, _ = _vectors(0)
    before = state_snapshot(model)
    common = {"adapter": "generic", "container": "1"}
    for kwargs, pattern in [
        ({"successor_depth": 3, "groups": "importance"}, "pass sample= with a typical batch"),
        ({"successor_depth": 3, "groups": "importants", "sample": x}, "groups= takes groups of block indices"),
        ({"target_flops": 0.5, "groups": "importance", "sample": x}, "give one or the other"),
        ({"successor_depth": 3, "groups": "importance", "sample": x, "init": "group_last"}, "drop successors= and init="),
        ({"groups": "importance", "sample": x}, "add successor_depth=N or ratio=R"),
        ({"successor_depth": 3, "ratio": 0.5, "groups": "importance", "sample": x}, "one of them"),
    ]:
        with pytest.raises(PlanError, match=pattern):
            Theseus(model, **common, **kwargs)
    assert_same_state(before, model)


def test_importance_groups_refuse_blocks_that_behave_by_position():
    """Swin's blocks alternate shifted windows: a kept block cannot start in another position."""
    make, batch, _ = FAMILIES["hf-swin-stages"]
    model = make()
    x, _ = batch(0)
    before = state_snapshot(model)
    with pytest.raises(PlanError, match="behave by position"):
        Theseus(model, ratio=0.5, groups="importance", sample=x)
    assert_same_state(before, model)


def test_importance_groups_resume_from_a_checkpoint_given_the_sample_again(tmp_path):
    from theseus_general.checkpoint import save_checkpoint

    x, _ = _vectors(0)
    th = Theseus(_chain_with_identities(2), successor_depth=3, groups="importance", sample=x, adapter="generic",
                 container="1")
    with torch.no_grad():
        for p in th.trainable_parameters():
            p.add_(0.01)
    save_checkpoint(str(tmp_path / "ck"), th)
    saved = {k: v.clone() for k, v in th.state_dict()["tensors"].items()}
    th.unwrap()
    with pytest.raises(PlanError, match="pass sample="):
        Theseus.from_checkpoint(_chain_with_identities(2), str(tmp_path / "ck"))
    rebuilt = Theseus.from_checkpoint(_chain_with_identities(2), str(tmp_path / "ck"), sample=x)
    assert rebuilt.plan == th.plan
    for name, value in rebuilt.state_dict()["tensors"].items():
        assert torch.equal(value, saved[name]), name
    rebuilt.unwrap()
    # blocks ranked otherwise (here: another block is the identity) give another plan, and the error says why
    with pytest.raises(CheckpointError, match="give the run's own sample= again"):
        Theseus.from_checkpoint(_chain_with_identities(5), str(tmp_path / "ck"), sample=x)
