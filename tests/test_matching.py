"""Module matching (`Theseus.match_successors`): successors learn their groups' outputs, nothing else moves."""

import dataclasses
import itertools

import pytest
import torch

from theseus_general import Theseus, match_successors

from conftest import ChainModel, bert_batch, state_snapshot, assert_same_state, tiny_bert


def unlabelled_stream(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(16, 4, generator=g), None  # labels are not used


def group_errors(th: Theseus, x: torch.Tensor) -> list:
    """Each successor's relative squared error against its group, on the predecessor's own hidden states."""
    with th.matching_mode(), torch.no_grad():
        th.model(x)
        return [float(error) for _, error in sorted(th.match_errors(), key=lambda pair: pair[0])]


def test_matching_trains_each_successor_towards_its_group_and_moves_nothing_else():
    model = ChainModel(depth=6, seed=0)
    before = state_snapshot(model)
    th = Theseus(model, successor_depth=3, adapter="generic", container="blocks", seed=0)
    rest = {n: p.detach().clone() for n, p in th.model.named_parameters() if "successor" not in n}
    probe = torch.randn(64, 4, generator=torch.Generator().manual_seed(99))
    start = group_errors(th, probe)

    result = match_successors(th, unlabelled_stream(), 60, lr=1e-2, progress=False)

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
    result = match_successors(th, itertools.repeat((batch, labels)), 5, lr=1e-3, progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    fit(th, itertools.repeat((batch, labels)), 3, lr=1e-3, progress=False)
    exported = th.export()
    assert exported.config.num_hidden_layers == 2
    th.unwrap()


def chain_with_weak_even_blocks() -> ChainModel:
    """6 residual blocks where blocks 0, 2, 4 barely change their input and 1, 3, 5 do the work:
    each group of two is best reproduced by a copy of its second block, not by the default
    init's copy of block i."""
    model = ChainModel(depth=6, seed=0)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.linear.weight.mul_(0.01 if i % 2 == 0 else 3.0)
    return model


def test_choose_starts_keeps_the_candidate_with_the_least_error_and_copies_only_tensors():
    from theseus_general.matching import choose_starts

    model = chain_with_weak_even_blocks()
    th = Theseus(model, successor_depth=3, adapter="generic", container="blocks", seed=0)
    probe = torch.randn(64, 4, generator=torch.Generator().manual_seed(5))
    successors = [id(s) for s in th.successors()]
    # every candidate's error, measured independently of choose_starts
    measured = []
    for group in th.groups:
        errors = {}
        for position, block in enumerate(group.predecessor):
            saved = {k: v.clone() for k, v in group.successor.state_dict().items()}
            group.successor.load_state_dict(block.state_dict())
            errors[th.plan.groups[group.index].blocks[position]] = group_errors(th, probe)[group.index]
            group.successor.load_state_dict(saved)
        errors[None] = group_errors(th, probe)[group.index]  # the default start (copy of block i)
        measured.append(errors)

    chosen = choose_starts(th, probe)

    for group, errors in zip(th.groups, measured):
        best = min(errors, key=errors.get)
        assert chosen.get(group.index) == best, (group.index, errors, chosen)
        assert best == th.plan.groups[group.index].blocks[-1]  # the strong block, as built
        for name, tensor in group.successor.state_dict().items():
            assert torch.equal(tensor, group.predecessor[-1].state_dict()[name])
    assert [id(s) for s in th.successors()] == successors  # the same modules: only their tensors changed
    assert th.model.training and th.match_errors() == []
    th.model(probe)  # matching mode is over: a training forward draws again
    assert all(len(d) == 1 for d in th.decisions().values()) and len(th.decisions()) == len(th.groups)
    th.unwrap()


def test_fit_chooses_starts_for_default_copies_only():
    from theseus_general import fit
    from dataclasses import replace

    from theseus_general.planning import check_plan_matches
    from theseus_general.recipes import RECIPES

    choosing = replace(RECIPES["default"], name="choosing", choose_start=True)

    def run(**options):
        options.setdefault("recipe", choosing)
        th = Theseus(chain_with_weak_even_blocks(), successor_depth=3, adapter="generic", container="blocks", seed=0,
                     **options)
        fit(th, itertools.repeat((torch.randn(16, 4), torch.zeros(16, dtype=torch.long))), 10, lr=1e-3,
            match_steps=2, progress=False)
        return th

    th = run()
    assert th.successor_starts == {0: 1, 1: 3, 2: 5}
    # print(th.plan) says so: the table shows each successor's actual start, a note says how it was chosen
    assert str(th.plan).splitlines()[-1] == ("start blocks chosen by matching error on the first batch: group 0 "
                                            "from block 1, group 1 from block 3, group 2 from block 5")
    rows = str(th.plan).splitlines()[3:6]
    assert [row.split()[0] for row in rows] == ["0", "1", "2"]
    for row, block in zip(rows, (1, 3, 5)):
        assert f"copy of block {block} (chosen)" in row
    assert "copy of block 0" not in str(th.plan)
    # the plan as made, which checkpoints compare, is unchanged: a fresh engine's plan still matches it
    fresh = Theseus(chain_with_weak_even_blocks(), successor_depth=3, adapter="generic", container="blocks",
                    recipe=choosing)
    assert fresh.plan.to_dict() == th.plan.to_dict()
    check_plan_matches(fresh.plan.to_dict(), th.plan.to_dict())  # what loading a checkpoint checks
    from theseus_general.matching import note_starts
    note_starts(th.plan, {1: 3})  # not every group restarted: the note says the rest kept theirs
    assert str(th.plan).splitlines()[-1].endswith("group 1 from block 3; the other groups kept theirs")
    note_starts(th.plan, th.successor_starts)
    match_successors(th, itertools.repeat(torch.randn(16, 4)), 1, choose_start=True, progress=False)
    assert sum(note.startswith("start blocks") for note in th.plan.notes) == 1  # replaced, not repeated
    assert run(init="first").successor_starts == {}  # an init the user chose is kept
    paper = run(recipe="paper")  # matching asked for, but the paper's recipe keeps block i
    assert paper.successor_starts == {} and not any(n.startswith("start blocks") for n in paper.plan.notes)


def test_choose_starts_skips_successors_with_other_tensors():
    from theseus_general.matching import choose_starts

    model = tiny_bert(num_layers=4)
    batch = bert_batch(batch=2, length=6)
    batch.pop("labels")
    th = Theseus(model, successor_width=0.5, seed=0)  # narrower MLPs: no block of the group loads into them
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in th.successors()]
    assert choose_starts(th, batch) == {}
    for saved, successor in zip(before, th.successors()):
        assert all(torch.equal(saved[k], v) for k, v in successor.state_dict().items())
    th.unwrap()


def bn_cnn(seed: int = 0):
    """A tiny BN-heavy CNN: conv + batch-norm stem, 4 residual conv + batch-norm blocks (1 and 3 nearly
    identity maps, so each group of two is reproduced well by a copy of its first block), a linear
    head; running statistics settled on the data, as in a trained model."""
    from torch import nn

    from conftest import ConvBlock

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Sequential(*[ConvBlock() for _ in range(4)]), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    with torch.no_grad():
        for i in (1, 3):
            model[3][i].bn.weight.mul_(0.01)
            model[3][i].bn.bias.mul_(0.01)
        for x, _ in itertools.islice(image_stream(seed + 100), 30):
            model(x)
    return model


def image_stream(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(8, 1, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_matching_guard_puts_back_diverged_successors_and_names_the_option():
    import pytest

    from theseus_general import MatchingDivergedWarning

    th = Theseus(bn_cnn(), adapter="generic", container="3", successor_depth=2, seed=0)
    before = [{k: v.clone() for k, v in s.state_dict().items()} for s in th.successors()]
    with pytest.warns(MatchingDivergedWarning, match=r"fit\(\.\.\., match_steps=0\)"):
        result = match_successors(th, image_stream(), 20, lr=100.0, choose_start=False, progress=False)
    guard = result.guard
    assert guard.restored and guard.restored == guard.diverged()
    for index in guard.restored:
        assert guard.end[index] > guard.start[index]
    for index, (saved, successor) in enumerate(zip(before, th.successors())):
        same = all(torch.equal(saved[k], v) for k, v in successor.state_dict().items())
        assert same == (index in guard.restored), index  # put back exactly; the others keep their training
    th.unwrap()


def test_matching_guard_stays_quiet_when_matching_helps():
    import warnings

    from theseus_general import fit

    th = Theseus(bn_cnn(), adapter="generic", container="3", successor_depth=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any MatchingDivergedWarning fails the test
        result = fit(th, image_stream(), 40, lr=1e-2, match_steps=20, match_lr=1e-2, progress=False)
    guard = result.matching.guard
    assert guard.restored == [] and set(guard.start) == {0, 1}
    assert all(guard.end[g] < guard.start[g] for g in guard.start), guard


def test_fit_goes_on_after_the_guard_put_successors_back():
    import pytest

    from theseus_general import MatchingDivergedWarning, fit

    th = Theseus(bn_cnn(), adapter="generic", container="3", successor_depth=2, seed=0)
    with pytest.warns(MatchingDivergedWarning, match="match_lr"):
        result = fit(th, image_stream(), 30, lr=1e-3, match_steps=10, match_lr=100.0, progress=False)
    assert result.matching.guard.restored and len(result.history) == 20
    assert all(torch.isfinite(torch.tensor(result.losses)))
    th.unwrap()


class _Flat(torch.nn.Module):
    """A successor that has lost its input: the same output for every example."""

    def __init__(self):
        super().__init__()
        self.level = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        return torch.zeros_like(x) + self.level


def test_check_start_tells_a_collapsed_start_from_one_that_kept_the_task():
    from theseus_general.matching import StartCheck, check_start

    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    kept = Theseus(ChainModel(depth=4, seed=0), adapter="generic", container="blocks", successor_depth=2)
    check = check_start(kept, x)
    assert check.start_classes == 2 and check.predecessor_classes == 2 and not check.collapsed
    assert check.predictions == 64
    pooled = check_start(kept, x[:40], x[40:])  # several batches' predictions pool into one check
    assert dataclasses.replace(pooled, spread_ratio=None) == dataclasses.replace(check, spread_ratio=None)
    assert pooled.spread_ratio == pytest.approx(check.spread_ratio, rel=1e-6) and check.spread_ratio > 0.05
    kept.unwrap()
    lost = Theseus(ChainModel(depth=4, seed=0), adapter="generic", container="blocks", successor_depth=2,
                   successors=[_Flat(), _Flat()])
    check = check_start(lost, x)
    assert check.start_classes == 1 and check.predecessor_classes == 2 and check.collapsed
    lost.unwrap()
    # a predecessor that answers one class on the batch too is no evidence of a lost start
    assert not StartCheck(agreement=1.0, start_classes=1, predecessor_classes=1).collapsed
    # many classes (a language model's tokens): at most half of the predecessor's distinct answers
    assert StartCheck(agreement=0.2, start_classes=16, predecessor_classes=121).collapsed
    assert not StartCheck(agreement=0.5, start_classes=8, predecessor_classes=10).collapsed


class _Offset(torch.nn.Module):
    """A successor whose output still follows its input, shifted far to one side: one class for every example."""

    def __init__(self):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.full((8,), 100.0))

    def forward(self, x):
        return x + self.shift


def test_the_start_spread_pools_batches_and_survives_a_large_offset():
    from theseus_general.matching import _moments, _spread

    # logits near 10 that vary by 1e-4 (MiniLM 6 -> 3's start varies 7e-5 of its predecessor's): a raw sum of
    # squares in float32 would cancel to noise; the centred, pooled moments give the spread over all rows
    x = 10.0 + 1e-4 * torch.randn(300, 5, generator=torch.Generator().manual_seed(0))
    direct = x.double().std(0, unbiased=False).mean().item()
    assert _spread([_moments(x[:7]), _moments(x[7:100]), _moments(x[100:])]) == pytest.approx(direct, rel=1e-3)
    assert _spread([_moments(x)]) == pytest.approx(direct, rel=1e-3)
    assert _spread([_moments(torch.zeros(4, 3)), _moments(torch.zeros(2, 3))]) == 0.0


def test_a_binary_start_that_answers_one_class_through_an_offset_is_not_collapsed_under_a_spread_limit():
    from theseus_general.matching import StartCheck, check_start

    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    checks = {}
    for name, successors in (("flat", [_Flat(), _Flat()]), ("offset", [_Offset(), _Offset()])):
        th = Theseus(ChainModel(depth=4, seed=0), adapter="generic", container="blocks", successor_depth=2,
                     successors=successors)
        checks[name] = check_start(th, x)
        th.unwrap()
    flat, offset = checks["flat"], checks["offset"]
    assert flat.start_classes == offset.start_classes == 1 and flat.collapsed and offset.collapsed
    # the flat start's logits do not move with the input; the offset one's move as much as a real start's
    assert flat.spread_ratio < 1e-5 and offset.spread_ratio > 0.05  # (float32 rounding: not exactly 0)
    assert flat.collapsed_under(1e-3) and not offset.collapsed_under(1e-3)
    assert offset.collapsed_under(None)  # no limit: the class count alone, as before
    # many classes (a language model's tokens): the count alone, whatever the spread
    many = StartCheck(agreement=0.2, start_classes=16, predecessor_classes=121, predictions=256, spread_ratio=0.9)
    assert many.collapsed_under(1e-3)
    # a start that kept its classes is never collapsed; a check without a spread falls back to the count
    assert not StartCheck(agreement=0.8, start_classes=2, predecessor_classes=2, spread_ratio=0.0).collapsed_under(1e-3)
    assert StartCheck(agreement=0.5, start_classes=1, predecessor_classes=2).collapsed_under(1e-3)
