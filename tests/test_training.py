"""`training.fit`: one loop for engines and plain models (precision, accumulation, NaN stop, resume)."""

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from theseus_general import LinearScheduler, NonFiniteLossError, Theseus
from theseus_general.errors import CheckpointError
from theseus_general.metrics import read_metrics
from theseus_general.training import TrainingError, fit, lr_factor

from conftest import ChainModel, assert_same_state, state_snapshot


def batch_at(position: int):
    """The batch at a data position: a function of the position alone (resumable)."""
    g = torch.Generator().manual_seed(position)
    x = torch.randn(8, 4, generator=g)
    return x, (x.sum(1) > 0).long()


def stream(start: int = 0):
    return (batch_at(i) for i in itertools.count(start))


def engine(seed: int = 7) -> Theseus:
    return Theseus(ChainModel(depth=6, seed=0), successor_depth=3, adapter="generic", container="blocks",
                   scheduler=LinearScheduler.reaching_one_at(4, base=0.3), train_rest=True, seed=seed)


def test_engine_trains_in_bf16_autocast_on_the_cpu_with_one_engine_step_per_optimiser_step(tmp_path):
    th = engine()
    dtypes = []

    def loss(x, y):
        logits = th.model(x)
        dtypes.append(logits.dtype)
        return F.cross_entropy(logits.float(), y), logits

    start = [p.detach().clone() for p in th.trainable_parameters()]
    result = fit(th, stream(), 5, loss=loss, lr=1e-2, mixed_precision="bf16", gradient_accumulation=2, match_steps=0,
                 metrics=str(tmp_path), progress=False)
    assert set(dtypes) == {torch.bfloat16} and len(dtypes) == 10  # 5 steps x 2 micro-batches, all autocast
    assert th.step_count == 5 and [s.step for s in result.history] == [0, 1, 2, 3, 4]
    assert [s.replacement_rate for s in result.history] == [th.scheduler(i) for i in range(5)]
    assert all(0 <= s.accuracy <= 1 and math.isfinite(s.loss) for s in result.history)
    assert all(p.dtype == torch.float32 for p in th.trainable_parameters())  # weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(start, th.trainable_parameters()))
    logged = read_metrics(str(tmp_path))
    assert [v for _, v in logged["loss"]] == result.losses
    assert [v for _, v in logged["lr"]] == pytest.approx([1e-2 * lr_factor(i, 5) for i in range(5)])
    th.unwrap()


def test_accumulating_two_half_batches_equals_one_whole_batch():
    def run(accumulation: int):
        model = ChainModel(depth=2, seed=0)
        x, y = batch_at(0)
        halves = [(x[:4], y[:4]), (x[4:], y[4:])]
        batches = halves if accumulation == 2 else [(x, y)]
        fit(model, iter(batches), 1, gradient_accumulation=accumulation, lr=1e-2, weight_decay=0.0, progress=False)
        return model

    one, two = run(1), run(2)
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("use_engine", [False, True])
def test_a_nan_loss_stops_before_the_optimiser_applies_it(use_engine):
    th = engine() if use_engine else None
    model = th.model if th else ChainModel(seed=0)
    calls = []

    def loss(x, y):
        calls.append(1)
        value = F.cross_entropy(model(x), y)
        return value * float("nan") if len(calls) == 3 else value

    snapshots = []
    with pytest.raises(NonFiniteLossError, match="step 2"):
        fit(th or model, stream(), 5, loss=loss, progress=False,
            on_step=lambda record: snapshots.append(state_snapshot(model)))
    assert len(snapshots) == 2
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in snapshots[-1].items())  # the NaN step changed nothing
    if th:
        with pytest.raises(Exception, match="loss was nan"):
            th.export()


def test_a_resumed_run_ends_where_an_uninterrupted_one_ends(tmp_path):
    whole = engine()
    fit(whole, batch_at, 6, lr=1e-2, progress=False, match_steps=0)

    first = engine()

    def crash(record):
        if record.step == 3:  # after step 4's checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(first, batch_at, 6, lr=1e-2, checkpoints=str(tmp_path), checkpoint_every=2, progress=False, on_step=crash,
            match_steps=0)
    first.unwrap()
    resumed = engine()  # as a new process would: a fresh engine on a fresh model
    result = fit(resumed, batch_at, 6, lr=1e-2, checkpoints=str(tmp_path), checkpoint_every=2, progress=False,
                 match_steps=0)
    assert result.resumed_from.endswith("step-00000004") and [s.step for s in result.history] == [4, 5]
    for a, b in zip(whole.trainable_parameters(), resumed.trainable_parameters()):
        torch.testing.assert_close(a, b)


def test_a_plain_model_resumes_where_an_uninterrupted_run_ends(tmp_path):
    # a baseline or a predecessor trained with fit() and checkpoints=: its weights, optimiser, lr schedule and
    # data position come back, so two sittings end where one does
    whole = ChainModel(seed=0)
    fit(whole, stream(), 6, lr=1e-2, lr_schedule="constant", warmup=0.5, progress=False)

    def crash(record):
        if record.step == 3:  # after step 4's checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(ChainModel(seed=0), stream(), 6, lr=1e-2, lr_schedule="constant", warmup=0.5, checkpoints=str(tmp_path),
            checkpoint_every=2, progress=False, on_step=crash)
    resumed = ChainModel(seed=0)  # as a new process would: the untrained model, its weights from the checkpoint
    result = fit(resumed, stream(), 6, lr=1e-2, lr_schedule="constant", warmup=0.5, checkpoints=str(tmp_path),
                 checkpoint_every=2, progress=False)
    assert result.resumed_from.endswith("step-00000004") and [s.step for s in result.history] == [4, 5]
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


def test_a_checkpoint_resumes_only_the_kind_of_run_that_saved_it(tmp_path):
    plain, engine_run = str(tmp_path / "plain"), str(tmp_path / "engine")
    fit(ChainModel(seed=0), stream(), 2, lr=1e-2, checkpoints=plain, progress=False)
    fit(engine(), batch_at, 2, lr=1e-2, checkpoints=engine_run, match_steps=0, progress=False)
    model = ChainModel(seed=1)
    before = state_snapshot(model)
    with pytest.raises(CheckpointError, match="holds a Theseus run"):
        fit(model, stream(), 4, lr=1e-2, checkpoints=engine_run, progress=False)
    with pytest.raises(CheckpointError, match="do not fit this ChainModel"):
        fit(ChainModel(depth=3, seed=0), stream(), 4, lr=1e-2, checkpoints=plain, progress=False)
    th = engine()
    with pytest.raises(CheckpointError, match="holds a plain model's training state"):
        fit(th, batch_at, 4, lr=1e-2, checkpoints=plain, match_steps=0, progress=False)
    with pytest.raises(CheckpointError, match="holds a plain model's training state"):
        Theseus.from_checkpoint(ChainModel(depth=6, seed=0), os.path.join(plain, "step-00000002"))
    assert th.step_count == 0
    assert_same_state(before, model)


def test_settings_are_checked_before_anything_changes():
    model = ChainModel(seed=0)
    before = state_snapshot(model)
    with pytest.raises(TrainingError, match="mixed_precision must be one of"):
        fit(model, stream(), 2, mixed_precision="fp8", progress=False)
    with pytest.raises(TrainingError, match="gradient_accumulation"):
        fit(model, stream(), 2, gradient_accumulation=0, progress=False)
    with pytest.raises(TrainingError, match="lr_schedule"):
        fit(model, stream(), 2, lr_schedule="step", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="CUDA is not available"):
            fit(model, stream(), 2, device="cuda", progress=False)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    with pytest.raises(TrainingError, match="ran out after 3 of 4 batches"):
        fit(model, itertools.islice(stream(), 3), 2, gradient_accumulation=2, progress=False)


def test_lr_schedules():
    assert [lr_factor(s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert [lr_factor(s, 4, warmup=0.5) for s in range(4)] == [0.5, 1.0, 1.0, 0.5]
    assert lr_factor(3, 4, "constant") == 1.0
    assert lr_factor(0, 4, "cosine") == 1.0 and lr_factor(2, 4, "cosine") == pytest.approx(0.5)
    function = [lr_factor(s, 4, lambda step: 0.1 * step, warmup=0.5) for s in range(4)]
    assert function == pytest.approx([0.5, 1.0, 0.2, 0.3])  # the warm-up, then the function


def test_a_function_schedule_sets_each_steps_lr_and_can_be_lowered_from_on_step():
    # e.g. a cut when dev stops improving: what on_step changes applies from the step after next (the next
    # step's lr was set when this one ended)
    scale = {"now": 1.0}

    def halve_at_step_2(record):
        if record.step == 1:
            scale["now"] = 0.5

    result = fit(ChainModel(seed=0), stream(), 5, lr=1e-2, lr_schedule=lambda step: scale["now"], progress=False,
                 on_step=halve_at_step_2)
    assert [s.lr for s in result.history] == pytest.approx([1e-2, 1e-2, 1e-2, 5e-3, 5e-3])




def test_the_progress_bar_shows_unless_the_run_or_the_environment_turns_it_off(capsys):
    def run(**kwargs):
        fit(ChainModel(), stream(), 2, lr=1e-2, match_steps=0, **kwargs)
        return capsys.readouterr().err

    assert "0/2" in run(progress=True)  # the bar draws on stderr
    assert run(progress=False) == ""
    # tqdm reads TQDM_DISABLE when it is imported: a fresh process, as a user's job would start
    script = ("import torch; from theseus_general.training import fit\n"
              "x = torch.randn(8, 4); fit(torch.nn.Linear(4, 2), iter([(x, (x.sum(1) > 0).long())] * 2), 2, lr=1e-2)\n")
    for env, shown in (({}, True), ({"TQDM_DISABLE": "1"}, False)):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env={k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"} | env)
        assert done.returncode == 0, done.stderr
        assert ("0/2" in done.stderr) == shown
