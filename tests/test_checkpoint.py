"""Checkpoints: round trip, clear errors that change nothing, and a real kill-and-resume."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ChainModel, assert_same_state, state_snapshot

from theseus_general import CheckpointError, ConstantScheduler, EngineStateError, NonFiniteLossError, Theseus
from theseus_general.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_resume_worker.py")


def make_run(depth=6, successor_depth=3, seed=0, train_rest=True):
    model = ChainModel(depth=depth, seed=seed)
    th = Theseus(model, successor_depth=successor_depth, adapter="generic", container="blocks",
                 scheduler=ConstantScheduler(0.5, replace_all_at=4), train_rest=train_rest, seed=3)
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, th, opt, sched


def train(model, th, opt, sched, steps):
    g = torch.Generator().manual_seed(th.step_count)
    for _ in range(steps):
        loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        th.step()


def test_round_trip_restores_weights_step_optimizer_and_rng(tmp_path):
    model, th, opt, sched = make_run()
    train(model, th, opt, sched, 5)  # past replace_all_at: the rest-copies train too
    torch.manual_seed(123)
    save_checkpoint(str(tmp_path / "ck"), th, opt, sched, data_position=5, extra={"best": 0.5})
    expected_rand = torch.rand(3)
    saved = {k: v.clone() for k, v in th.state_dict()["tensors"].items()}

    model2, th2, opt2, sched2 = make_run()
    resumed = load_checkpoint(str(tmp_path / "ck"), th2, opt2, sched2)
    assert (resumed.step, resumed.data_position, resumed.extra) == (5, 5, {"best": 0.5})
    assert th2.step_count == 5 and th2.replacement_rate == 1.0
    assert all(p.requires_grad for p in th2.trainable_parameters())  # rest-copies train after p reaches 1
    for k, v in th2.state_dict()["tensors"].items():
        assert torch.equal(v, saved[k]), k
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(torch.rand(3), expected_rand)
    # Continuing both runs gives the same weights: optimiser moments were restored.
    train(model, th, opt, sched, 2)
    train(model2, th2, opt2, sched2, 2)
    for (k, a), b in zip(th.state_dict()["tensors"].items(), th2.state_dict()["tensors"].values()):
        assert torch.equal(a, b), k


def test_different_plan_names_the_difference_and_changes_nothing(tmp_path):
    model, th, opt, sched = make_run(successor_depth=3)
    train(model, th, opt, sched, 1)
    save_checkpoint(str(tmp_path / "ck"), th, opt, sched)
    model2, th2, opt2, _ = make_run(successor_depth=2)
    before = state_snapshot(th2.model)
    with pytest.raises(CheckpointError, match=r"group 1 blocks: checkpoint \[2, 3\], this model \[3, 4, 5\]"):
        load_checkpoint(str(tmp_path / "ck"), th2, opt2)
    assert_same_state(before, th2.model)
    assert th2.step_count == 0 and opt2.state_dict()["state"] == {}


def test_another_train_rest_is_named_and_changes_nothing(tmp_path):
    model, th, opt, sched = make_run(train_rest=False)
    train(model, th, opt, sched, 1)
    save_checkpoint(str(tmp_path / "ck"), th, opt, sched)
    model2, th2, opt2, _ = make_run()
    before = state_snapshot(th2.model)
    with pytest.raises(CheckpointError, match="saved with train_rest=False, this engine has train_rest=True"):
        load_checkpoint(str(tmp_path / "ck"), th2, opt2)
    assert_same_state(before, th2.model)
    assert th2.step_count == 0


def test_truncated_file_is_named_and_changes_nothing(tmp_path):
    model, th, opt, sched = make_run()
    train(model, th, opt, sched, 2)
    path = save_checkpoint(str(tmp_path / "ck"), th, opt, sched)
    target = os.path.join(path, "engine.safetensors")
    with open(target, "r+b") as f:
        f.truncate(os.path.getsize(target) // 2)
    model2, th2, opt2, sched2 = make_run()
    before = state_snapshot(th2.model)
    with pytest.raises(CheckpointError, match="engine.safetensors is corrupted or truncated"):
        load_checkpoint(path, th2, opt2, sched2)
    assert_same_state(before, th2.model)


def test_bad_json_and_missing_directory(tmp_path):
    model, th, opt, sched = make_run()
    path = save_checkpoint(str(tmp_path / "ck"), th, opt, sched)
    with open(os.path.join(path, "state.json"), "w") as f:
        f.write('{"format": 1, "engi')
    with pytest.raises(CheckpointError, match="state.json is not valid JSON"):
        load_checkpoint(path, th)
    with pytest.raises(CheckpointError, match="No checkpoint directory"):
        load_checkpoint(str(tmp_path / "nowhere"), th)
    assert CheckpointManager(str(tmp_path / "nowhere")).resume(th) is None  # a fresh start
    assert CheckpointManager(str(tmp_path / "nowhere")).latest_step() is None


def test_manager_keeps_newest_and_ignores_half_written(tmp_path):
    model, th, opt, sched = make_run()
    manager = CheckpointManager(str(tmp_path), keep=2)
    for _ in range(3):
        train(model, th, opt, sched, 1)
        manager.save(th, opt, sched, data_position=th.step_count)
    os.makedirs(tmp_path / ".tmp-step-00000009-crashed")  # what a crash mid-write leaves
    assert [os.path.basename(p) for p in manager.checkpoints()] == ["step-00000002", "step-00000003"]
    with open(os.path.join(manager.latest(), "state.json")) as f:
        assert json.load(f)["data_position"] == 3


def _run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, WORKER, *args], env=env, stdout=subprocess.PIPE, text=True, **kw)


def test_kill_and_resume_is_bit_identical(tmp_path):
    from safetensors.torch import load_file

    import _resume_worker

    steps = 16
    victim = _run(["--steps", str(steps), "--ckpt", str(tmp_path / "run"), "--result", str(tmp_path / "run.st"),
                   "--delay", "0.05"])
    for line in victim.stdout:  # kill once a few checkpoints exist, wherever the loop then is
        if line.strip() == "saved 4":
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait()
    victim.stdout.close()
    assert victim.returncode == -signal.SIGKILL
    latest = CheckpointManager(str(tmp_path / "run")).latest()
    assert latest is not None and int(latest.rsplit("-", 1)[1]) < steps
    resumed = _run(["--steps", str(steps), "--ckpt", str(tmp_path / "run"), "--result", str(tmp_path / "run.st")])
    # The uninterrupted reference runs here meanwhile (same code, one thread, CPU).
    _resume_worker.main(["--steps", str(steps), "--ckpt", str(tmp_path / "ref"), "--result", str(tmp_path / "ref.st")])
    resumed.communicate(timeout=120)
    assert resumed.returncode == 0
    ours, theirs = load_file(str(tmp_path / "run.st")), load_file(str(tmp_path / "ref.st"))
    assert set(ours) == set(theirs) and any(k.startswith("rest.") for k in ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_nan_loss_stops_the_run_and_the_last_good_checkpoint_stays(tmp_path):
    before = state_snapshot(ChainModel(depth=6, seed=0))  # the same weights make_run() wraps
    model, th, opt, sched = make_run()
    manager = CheckpointManager(str(tmp_path / "ckpts"), keep=2)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        for step in range(6):
            loss = model(torch.randn(8, 4, generator=g)).pow(2).mean()
            if step == 3:
                loss = loss * float("nan")  # what a diverging run produces
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            th.step(loss)
            manager.save(th, opt, sched, data_position=step + 1)
    last = manager.latest()
    assert os.path.basename(last) == "step-00000003"
    assert manager.latest_step() == 3
    with pytest.raises(EngineStateError, match="failed"):
        manager.save(th, opt, sched)  # a failed run writes nothing more
    assert manager.latest() == last
    _, th2, opt2, sched2 = make_run()
    assert load_checkpoint(last, th2, opt2, sched2).step == 3
    assert all(torch.isfinite(t).all() for t in th2.state_dict()["tensors"].values())
    th.unwrap()
    assert_same_state(before, model)
