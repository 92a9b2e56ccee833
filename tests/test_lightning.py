"""TheseusCallback drives a Theseus run inside lightning.Trainer: the constant trainable set in the
user's optimiser, one schedule step per optimiser step under gradient accumulation, the recipe's module
matching, Lightning's own checkpoints and resume, the export at the end, and two DDP processes on gloo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

import lightning as L  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from _gloo import run_two_ranks  # noqa: E402
from _lightning_worker import ChainTask, engine, loader, run, trainer  # noqa: E402

from theseus_general import TrainingError  # noqa: E402
from theseus_general.integrations.lightning import TheseusCallback  # noqa: E402

WORKER = str(Path(__file__).with_name("_lightning_worker.py"))


def test_one_schedule_step_per_optimizer_step_under_gradient_accumulation(tmp_path):
    th = engine(recipe="paper")  # no matching: the batches counted below are the Trainer's alone
    callback = TheseusCallback(th, export_dir=str(tmp_path / "successor"))
    task = ChainTask(th)
    trainer(callback, max_steps=4, accumulate_grad_batches=3).fit(task, loader(batch_size=4))
    assert task.batches == 12 and trainer_steps(task) == 4
    assert th.step_count == 4 and callback.rates == [th.scheduler(i) for i in range(4)]
    # exported at the end, on rank 0: the native model at the successor depth
    assert len(callback.successor.blocks) == 3
    saved = torch.load(tmp_path / "successor" / "successor.pt", weights_only=False)
    assert len(saved.blocks) == 3 and torch.equal(saved.head.weight, callback.successor.head.weight)


def trainer_steps(task: L.LightningModule) -> int:
    return task.trainer.global_step


def test_length_of_the_run_reaches_the_engine():
    th = engine()  # the default curriculum: p reaches 1 at half of the run
    callback = TheseusCallback(th, match_steps=0)
    trainer(callback, max_steps=6).fit(ChainTask(th), loader())
    assert callback.rates[:4] == pytest.approx([0.3, 0.3 + 0.7 / 3, 0.3 + 1.4 / 3, 1.0])


def test_module_matching_runs_when_the_recipe_asks_and_not_otherwise():
    th = engine(recipe="matching")  # 20% of the run's steps go to module matching first, always
    callback = TheseusCallback(th)
    trainer(callback, max_steps=10).fit(ChainTask(th), loader())
    assert th.recipe.match_steps(10) == 2 and callback.matched_steps == 2 and th.step_count == 10

    paper = engine(recipe="paper")  # the paper's recipe has no matching
    callback = TheseusCallback(paper)
    trainer(callback, max_steps=2).fit(ChainTask(paper), loader())
    assert callback.matched_steps == 0


def test_matching_changes_the_successors_before_the_first_step():
    th = engine()
    before = [p.detach().clone() for s in th.successors() for p in s.parameters()]
    callback = TheseusCallback(th, match_steps=3)

    class Stop(L.Callback):  # stop once matching is done, before Lightning's first step
        def on_train_start(self, trainer, pl_module):
            trainer.should_stop = True
            self.moved = any(not torch.equal(a, p) for a, p in zip(before, (p for s in th.successors() for p in s.parameters())))

    stop = Stop()
    trainer(callback, max_steps=5, callbacks=[callback, stop]).fit(ChainTask(th), loader())
    assert callback.matched_steps == 3 and stop.moved


def test_an_optimizer_without_the_trainable_set_is_refused_before_training():
    th = engine(recipe="paper")

    class Wrong(ChainTask):
        def configure_optimizers(self):  # the head alone: the successors would never train
            return torch.optim.AdamW(self.model.head.parameters(), lr=0.1)

    before = [p.detach().clone() for p in th.trainable_parameters()]
    with pytest.raises(TrainingError, match="trainable_parameters"):
        trainer(TheseusCallback(th), max_steps=2).fit(Wrong(th), loader())
    assert all(torch.equal(a, p) for a, p in zip(before, th.trainable_parameters()))


def test_lightning_checkpoints_resume_the_run_bit_identically(tmp_path):
    # One batch per epoch: Lightning restarts a plain DataLoader's iteration on resume, so only a loader
    # whose order does not depend on where it stopped resumes the same data; the engine's state is what is tested.
    data = loader(samples=8)
    # uninterrupted: 8 steps, Lightning's ModelCheckpoint saving every 2
    th = engine(recipe="matching")  # one matching step (20% of 8) first, p reaches 1 at step 4
    callback = TheseusCallback(th)
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer(callback, max_steps=8, enable_checkpointing=True, callbacks=[callback, saver]).fit(ChainTask(th), data)
    straight = {k: v.clone() for k, v in th.state_dict()["tensors"].items()}
    checkpoint = tmp_path / "step=2.ckpt"
    saved = torch.load(checkpoint, weights_only=False)
    (state,) = [state for key, state in saved["callbacks"].items() if key.startswith("TheseusCallback")]
    assert state["engine"]["step"] == 2 and state["engine"]["config"]["recipe"] == "matching"
    assert 0 < state["engine"]["rate"] < 1  # saved while modules were still replaced at random

    # resumed from there on a fresh model and engine: no matching again, the same rates and the same end
    th2 = engine(recipe="matching")
    cb2 = TheseusCallback(th2)
    trainer(cb2, max_steps=8).fit(ChainTask(th2), data, ckpt_path=str(checkpoint))
    assert th2.step_count == 8 and cb2.matched_steps == callback.matched_steps == 1
    assert cb2.rates == callback.rates[2:]
    resumed = th2.state_dict()["tensors"]
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []


def test_ddp_with_two_gloo_processes(tmp_path):
    # each rank: 5 optimiser steps on its half of every global batch; one process: the whole batches
    single = run_two_ranks(WORKER, run, tmp_path, timeout=300)
    for name, matched in (("matched", 1), ("plain", 0)):
        runs = [json.loads((tmp_path / f"run-{name}-{rank}.json").read_text()) for rank in (0, 1)]
        alone = json.loads((single / f"run-{name}-0.json").read_text())
        assert runs[0] == runs[1] == alone and alone["steps"] == alone["global_step"] == 5 and alone["matched"] == matched
        w0, w1 = (load_file(tmp_path / f"weights-{name}-{rank}.safetensors") for rank in (0, 1))
        # the ranks hold the same successors and rest: rank 0's matched successors were broadcast, and DDP
        # averaged every gradient
        assert all(torch.equal(w0[k], w1[k]) for k in w0), name
        assert (tmp_path / f"successor-{name}" / "successor.pt").exists()  # rank 0 exported
    # without matching, DDP on two halves trains what one process trains on the whole batches
    ws = load_file(single / "weights-plain-0.safetensors")
    w0 = load_file(tmp_path / "weights-plain-0.safetensors")
    assert all(torch.allclose(w0[k], ws[k], atol=1e-5) for k in ws)
