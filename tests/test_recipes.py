"""Named recipes and the run-relative default curriculum."""

import itertools
import warnings

import pytest
import torch

from theseus_general import LinearScheduler, RunLinearScheduler, ScheduleError, Theseus, fit, planned_match_steps

from conftest import ChainModel, tiny_resnet


def chain_engine(**kwargs) -> Theseus:
    return Theseus(ChainModel(depth=4, seed=0), successor_depth=2, adapter="generic", container="blocks", **kwargs)


def batches():
    g = torch.Generator().manual_seed(0)
    while True:
        x = torch.randn(8, 4, generator=g)
        yield x, (x.sum(1) > 0).long()


def test_run_linear_scheduler_reaches_one_at_its_fraction_of_the_run():
    s = RunLinearScheduler(full_at=0.25, base=0.2).for_run(40)
    assert s.full_replacement_step == 10
    assert [s(t) for t in (0, 5, 9, 10, 39)] == pytest.approx([0.2, 0.6, 0.92, 1.0, 1.0])
    assert s(10) == 1.0  # exactly 1, not 0.9999...: the phase turns "successor" at that step
    with pytest.raises(ScheduleError, match="total_steps"):
        s.for_run(0)
    with pytest.raises(ScheduleError, match="full_at"):
        RunLinearScheduler(full_at=0.0)


def test_default_recipe_trains_the_rest_and_fit_tells_the_curriculum_the_runs_length():
    th = chain_engine()
    assert th.recipe.name == "default" and th.train_rest
    assert isinstance(th.scheduler, RunLinearScheduler) and not th.scheduler.knows_run
    result = fit(th, batches(), 8, lr=1e-2, progress=False, match_steps=0)
    full_at = int(8 * th.recipe.full_at)
    assert [s.replacement_rate for s in result.history][full_at:] == [1.0] * (8 - full_at)
    assert result.history[full_at - 1].replacement_rate < 1.0
    th.unwrap()


def test_paper_recipe_freezes_the_rest_and_keeps_the_papers_fixed_slope():
    th = chain_engine(recipe="paper")
    assert not th.train_rest and isinstance(th.scheduler, LinearScheduler)
    assert (th.scheduler.base, th.scheduler.k) == (0.3, 6e-4)
    assert {n for n, p in th.model.named_parameters() if p.requires_grad} == \
        {n for n, p in th.model.named_parameters() if ".successor." in n}
    th.unwrap()
    # explicit settings win over the recipe's
    th = chain_engine(recipe="paper", train_rest=True, scheduler=0.5)
    assert th.train_rest and th.scheduler(100) == 0.5
    th.unwrap()


def test_a_resnet_gets_its_familys_recipe_unless_one_is_named():
    th = Theseus(tiny_resnet(), ratio=0.5)
    assert th.recipe.name == "resnet" and not th.train_rest  # stem and head stay frozen
    assert th.recipe.match_fraction == 0.0 and not th.recipe.choose_start
    assert (th.scheduler.full_at, th.scheduler.base) == (0.3, 0.6)
    result = fit(th, ((torch.randn(2, 3, 16, 16), torch.tensor([0, 1])) for _ in range(10)), 10, progress=False)
    assert result.matching is None and [s.replacement_rate for s in result.history][3:] == [1.0] * 7
    assert {n for n, p in th.model.named_parameters() if p.requires_grad} == \
        {n for n, p in th.model.named_parameters() if ".successor." in n}
    th.unwrap()
    th = Theseus(tiny_resnet(), ratio=0.5, recipe="default")  # named: the general recipe
    assert th.recipe.name == "default" and th.train_rest
    th.unwrap()
    assert chain_engine().recipe.name == "default"  # families without their own get the general one


def test_unknown_recipe_is_refused_before_wrapping():
    model = ChainModel(depth=4, seed=0)
    with pytest.raises(ScheduleError, match="Unknown recipe 'fast'.*default.*paper"):
        Theseus(model, successor_depth=2, adapter="generic", container="blocks", recipe="fast")
    assert not any("Theseus" in type(m).__name__ for m in model.modules())


def test_own_loop_without_total_steps_warns_once_and_total_steps_silences_it():
    th = chain_engine()
    with pytest.warns(UserWarning, match="total_steps"):
        th.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        th.step()  # once is enough
    th.unwrap()

    th = chain_engine(total_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rates = [th.step() for _ in range(10)]
    assert rates[4:] == [1.0] * 6 and rates[3] < 1.0
    with pytest.raises(ScheduleError, match="before training"):
        th.set_total_steps(20)
    th.unwrap()


def test_fit_runs_the_recipes_module_matching_out_of_the_same_step_budget(tmp_path):
    from dataclasses import replace

    from theseus_general import RECIPES

    th = chain_engine(recipe=replace(RECIPES["matching"], match_fraction=0.25, match_lr=1e-2))
    result = fit(th, batches(), 8, lr=1e-2, progress=False)
    assert len(result.matching.history) == 2 and len(result.history) == 6  # 8 steps in all
    assert th.recipe.match_steps(8) == 2 and th.recipe.match_steps(3) == 0  # the examples' count, rounded down
    assert th.step_count == 6 and th.scheduler.total_steps == 6
    assert result.matching.history[0].lr == pytest.approx(1e-2)  # the recipe's matching lr
    th.unwrap()

    th = chain_engine(recipe="paper")  # the paper's recipe does no matching; match_steps= asks for it
    result = fit(th, batches(), 8, lr=1e-2, match_steps=3, match_lr=5e-3, progress=False)
    assert len(result.matching.history) == 3 and result.matching.history[0].lr == pytest.approx(5e-3)
    assert th.step_count == 5
    th.unwrap()
    with pytest.raises(Exception, match="match_steps must be an int from 0 to steps - 1"):
        fit(chain_engine(), batches(), 4, match_steps=4, progress=False)
    with pytest.raises(Exception, match="needs a Theseus engine"):
        fit(ChainModel(depth=2), batches(), 4, match_steps=2, progress=False)


def test_a_resumed_run_skips_matching_and_ends_where_the_uninterrupted_one_ends(tmp_path):
    from dataclasses import replace

    from theseus_general import RECIPES

    recipe = replace(RECIPES["matching"], match_fraction=0.25)
    first = chain_engine(recipe=recipe, seed=3)
    fit(first, batches(), 8, lr=1e-2, checkpoints=str(tmp_path), checkpoint_every=2, progress=False)
    again = chain_engine(recipe=recipe, seed=3)
    result = fit(again, batches(), 8, lr=1e-2, checkpoints=str(tmp_path), progress=False)
    assert result.resumed_from is not None and result.matching is None and again.step_count == 6
    first.unwrap(); again.unwrap()


# ---------------------------------------------------------------- the README's path at usual learning rates
def teacher_task(steps: int, batch: int = 16, length: int = 8):
    """A task with a real signal that truncation loses: labels are a 4-layer BERT's own predictions
    (its weights drawn at std 0.07, so each layer changes them; its bias centred so both classes occur).
    The teacher is the predecessor (accuracy 1); its bottom 2 layers with its head score about 0.89."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                                     initializer_range=0.07)
    teacher = transformers.BertForSequenceClassification(config).eval()

    def draw(seed: int, n: int, size: int):
        g = torch.Generator().manual_seed(seed)
        return [torch.randint(1, 100, (size, length), generator=g) for _ in range(n)]

    with torch.no_grad():
        logits = teacher(input_ids=torch.cat(draw(0, 8, 64))).logits
        teacher.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
        labelled = lambda seed, n, size: [({"input_ids": ids}, teacher(input_ids=ids).logits.argmax(-1))  # noqa: E731
                                          for ids in draw(seed, n, size)]
        return teacher, labelled(3, steps, batch), labelled(2, 8, 64)


def held_out_accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(**inputs).logits.argmax(-1) == labels).sum().item() for inputs, labels in data)
    return hits / sum(len(labels) for _, labels in data)


@pytest.mark.parametrize("lr", [3e-5, 1e-4])  # a BERT user's usual lr, and fit()'s default
def test_readme_path_at_default_settings_is_not_worse_than_fine_tune_only(lr):
    """Theseus(model, successor_depth=2) + fit at default settings against the trained model's bottom
    2 layers fine-tuned in the same fit on the same batches: held-out accuracy no more than 2 points
    (10 of 512 examples) below. It can fail: a default that matched for 20% of the steps at lr 5e-2
    scored 0.848 against fine-tune-only's 0.893 at lr 3e-5."""
    from theseus_general.baselines import successor_shaped_copy

    steps = 40
    teacher, train, test = teacher_task(steps)
    assert held_out_accuracy(teacher, test) == 1.0
    baseline = successor_shaped_copy(teacher, successor_depth=2)
    assert held_out_accuracy(baseline, test) < 0.95  # truncation loses: there is something to recover
    fit(baseline, train, steps, lr=lr, progress=False)
    th = Theseus(teacher, successor_depth=2, seed=0)
    assert th.recipe.name == "bert"  # the bert adapter's family recipe: the default, short phase if the start disagrees
    result = fit(th, train, steps, lr=lr, progress=False)
    # the start keeps both classes (its bottom 2 layers score about 0.89), so the default does not match;
    # it agrees with the predecessor on at least 2/3, so the mixed phase keeps the default's length
    assert result.start_collapsed is False and result.matching is None and result.start_spread > 0.05
    assert result.start_agreement >= 2 / 3 and th.scheduler.full_at == 0.5
    successor = th.export()
    th.unwrap()
    theseus, fine_tuned = held_out_accuracy(successor, test), held_out_accuracy(baseline, test)
    assert theseus >= fine_tuned - 0.02, (theseus, fine_tuned)


def test_match_below_agreement_matches_only_a_start_that_disagrees_with_the_predecessor():
    # the default's trigger before round 7 (issue 26), an option since: fit asks the first batch, the successors
    # alone (eval mode) against the predecessor. A start that agrees on at least 2/3 of the predictions trains
    # exactly as with match_steps=0; one that does not gets the recipe's module matching first
    import dataclasses

    from theseus_general import RECIPES, Theseus, fit
    from theseus_general.matching import start_agreement

    from conftest import ChainModel

    recipe = dataclasses.replace(RECIPES["default"], match_below_agreement=2 / 3, match_if_collapsed=False)

    def engine():
        return Theseus(ChainModel(depth=6, seed=3), adapter="generic", container="blocks", successor_depth=3, seed=1,
                       recipe=recipe)

    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    batches = [(x, torch.zeros(64, dtype=torch.long))] * 20
    th = engine()
    agreement = start_agreement(th, x)
    assert 0 <= agreement <= 1
    auto = fit(th, list(batches), 10, lr=1e-2, progress=False)
    assert auto.start_agreement == agreement
    th_off = engine()
    fit(th_off, list(batches), 10, lr=1e-2, match_steps=0, progress=False)
    if agreement >= 2 / 3:
        assert auto.matching is None
        assert all(torch.equal(a, b) for a, b in zip(th.trainable_parameters(), th_off.trainable_parameters()))
    else:
        assert len(auto.matching.history) == 2
    # the rule itself, on both sides of the threshold
    assert recipe.match_steps(100, agreement=0.8) == 0 and recipe.match_steps(100, agreement=0.5) == 20
    assert recipe.match_steps(100) == 20  # no agreement measured: the recipe's share


def test_the_default_matches_only_a_start_that_collapsed():
    # fit asks the first batch: a start (the successors alone) that still answers as many classes as the
    # predecessor trains exactly as with match_steps=0; one that lost its classes gets module matching first
    from theseus_general import RECIPES, Theseus, fit

    from conftest import ChainModel

    recipe = RECIPES["default"]
    assert recipe.match_if_collapsed and recipe.match_below_agreement is None and recipe.asks_start
    assert recipe.start_check_predictions == 128  # pooled over the first batches (round 8)
    assert recipe.collapse_spread == 1e-3  # a binary start's one class counts only if its logits no longer vary (round 9)
    assert recipe.match_steps(100, collapsed=False) == 0 and recipe.match_steps(100, collapsed=True) == 20
    assert recipe.match_steps(100) == 20  # nothing measured: the recipe's share

    class Flat(torch.nn.Module):  # a successor that lost its input: one answer for every example
        def __init__(self):
            super().__init__()
            self.level = torch.nn.Parameter(torch.ones(8))

        def forward(self, x):
            return torch.zeros_like(x) + self.level

    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    batches = [(x, (x.sum(1) > 0).long())] * 20
    for successors, collapsed in ((None, False), ([Flat(), Flat()], True)):
        th = Theseus(ChainModel(depth=4, seed=0), adapter="generic", container="blocks", successor_depth=2,
                     recipe=recipe, successors=successors)
        result = fit(th, list(batches), 10, lr=1e-2, progress=False)
        assert result.start_collapsed is collapsed
        assert (result.matching is not None) is collapsed and th.step_count == (8 if collapsed else 10)
        if not collapsed:  # the check reads the first batch without changing the stream: as if never asked
            off = Theseus(ChainModel(depth=4, seed=0), adapter="generic", container="blocks", successor_depth=2,
                          recipe=recipe)
            fit(off, list(batches), 10, lr=1e-2, match_steps=0, progress=False)
            assert all(torch.equal(a, b) for a, b in zip(th.trainable_parameters(), off.trainable_parameters()))
            off.unwrap()
        th.unwrap()


def test_a_recipe_with_a_collapse_spread_does_not_match_a_binary_start_whose_one_class_is_an_offset():
    import dataclasses

    from theseus_general import RECIPES

    from conftest import ChainModel

    class Offset(torch.nn.Module):  # follows its input, shifted to one side: one class, logits that still vary
        def __init__(self):
            super().__init__()
            self.shift = torch.nn.Parameter(torch.full((8,), 100.0))

        def forward(self, x):
            return x + self.shift

    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    batches = [(x, (x.sum(1) > 0).long())] * 20
    for limit, matched in ((None, True), (1e-3, False)):
        recipe = dataclasses.replace(RECIPES["default"], collapse_spread=limit)
        th = Theseus(ChainModel(depth=4, seed=0), adapter="generic", container="blocks", successor_depth=2,
                     recipe=recipe, successors=[Offset(), Offset()])
        result = fit(th, list(batches), 10, lr=1e-2, progress=False)
        assert result.start_collapsed is matched and (result.matching is not None) is matched
        assert result.start_spread > 0.05  # recorded whatever the recipe
        assert planned_match_steps(th, 10, batches=list(batches)) == (2 if matched else 0)
        th.unwrap()
    for bad in (0, -1e-3, 2.0, True, "1e-3"):
        with pytest.raises(ScheduleError, match="collapse_spread"):
            dataclasses.replace(RECIPES["default"], collapse_spread=bad)


class _BatchMean(torch.nn.Module):
    """A successor that answers with the batch's mean for every example: one class within a batch, which
    may differ between batches (a start that looks collapsed on one batch and not over several)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x.mean(0, keepdim=True).expand_as(x) * self.scale


def test_the_start_check_pools_the_first_batches_and_hands_them_all_on():
    import dataclasses

    from theseus_general import RECIPES
    from theseus_general.recipes import START_CHECK_MAX_BATCHES

    from conftest import ChainModel

    g = torch.Generator().manual_seed(1)
    stream = []
    for _ in range(20):
        x = torch.randn(4, 4, generator=g)
        stream.append((x, (x.sum(1) > 0).long()))

    def engine(predictions):
        recipe = dataclasses.replace(RECIPES["default"], start_check_predictions=predictions)
        return Theseus(ChainModel(depth=4, seed=0), adapter="generic", container="blocks", successor_depth=2,
                       recipe=recipe, successors=[_BatchMean(), _BatchMean()])

    one = engine(1)
    read_one = fit(one, iter(stream), 10, lr=1e-2, progress=False)
    assert read_one.start_predictions == 4 and read_one.start_collapsed  # batch 0: one answer for all 4
    assert read_one.matching is not None
    pooled = engine(16)
    read_four = fit(pooled, iter(stream), 10, lr=1e-2, progress=False)  # a generator: read once, then chained
    assert read_four.start_predictions == 16 and not read_four.start_collapsed  # batches 0-3: both classes
    assert read_four.matching is None
    # the 4 batches read went on to train, in order: the run equals one that never asked
    off = engine(16)
    fit(off, iter(stream), 10, lr=1e-2, match_steps=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(pooled.trainable_parameters(), off.trainable_parameters()))
    # a function of the position is read at positions 0, 1, ... and used as it is; no more than the cap
    asked = []
    many = engine(10_000)
    fit(many, lambda i: asked.append(i) or stream[i % len(stream)], 2, lr=1e-2, match_steps=None, progress=False)
    # the check stops at the cap although 10,000 predictions were asked; then training reads from position 0
    assert asked == list(range(START_CHECK_MAX_BATCHES)) + [0, 1]
    for th in (one, pooled, off, many):
        th.unwrap()
    with pytest.raises(ScheduleError, match="start_check_predictions"):
        dataclasses.replace(RECIPES["default"], start_check_predictions=0)


def test_planned_match_steps_reads_the_batches_fit_would():
    import dataclasses

    from theseus_general import RECIPES, TrainingError, planned_match_steps

    from conftest import ChainModel

    g = torch.Generator().manual_seed(1)
    stream = [(x, (x.sum(1) > 0).long()) for x in (torch.randn(4, 4, generator=g) for _ in range(8))]
    recipe = dataclasses.replace(RECIPES["default"], start_check_predictions=16)
    th = Theseus(ChainModel(depth=4, seed=0), adapter="generic", container="blocks", successor_depth=2,
                 recipe=recipe, successors=[_BatchMean(), _BatchMean()])
    assert planned_match_steps(th, 100, batches=stream) == 0  # 4 batches: both classes, as fit reads them
    assert planned_match_steps(th, 100, stream[0]) == 20  # one batch: one class, so it matches
    with pytest.raises(TrainingError, match="batches="):
        planned_match_steps(th, 100)
    with pytest.raises(TrainingError, match="not both"):
        planned_match_steps(th, 100, stream[0], batches=stream)
    th.unwrap()


class _NoLogits(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from conftest import ChainModel

        self.inner = ChainModel(depth=4, seed=0)
        self.blocks = self.inner.blocks

    def forward(self, x):
        return {"features": self.inner(x)}  # no logits: the start check has nothing to read


def test_planned_match_steps_without_logits_keeps_the_recipes_share_and_phase():
    from theseus_general import RECIPES, planned_match_steps

    recipe = RECIPES["bert"]  # it asks the start about matching and about its phase
    th = Theseus(_NoLogits(), adapter="generic", container="blocks", successor_depth=2, recipe=recipe)
    assert planned_match_steps(th, 100, (torch.randn(4, 4), None)) == 20
    assert th.scheduler.full_at == recipe.full_at
    th.unwrap()
