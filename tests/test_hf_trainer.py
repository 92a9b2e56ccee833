"""transformers.Trainer drives a Theseus run: one th.step() per optimiser step, only successors train."""

import pytest
import torch
from conftest import assert_same_state, bert_batch, state_snapshot, tiny_bert

pytest.importorskip("transformers")
from transformers import TrainingArguments  # noqa: E402

from theseus_general import LinearScheduler, Theseus  # noqa: E402
from theseus_general.integrations.hf_trainer import TheseusCallback, TheseusTrainer  # noqa: E402


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=16):
        batch = bert_batch(batch=n, length=10, seed=5)
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                logging_steps=2, report_to="none", save_strategy="no", use_cpu=True, seed=0,
                disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**base, **kw})


def test_trainer_steps_the_schedule_and_trains_only_successors(tmp_path):
    model = tiny_bert(num_layers=4)
    frozen = state_snapshot(model)
    th = Theseus(model, successor_depth=2, scheduler=LinearScheduler(base=0.25, k=0.125))
    successors_before = [p.detach().clone() for p in th.trainable_parameters()]
    trainer = TheseusTrainer(theseus=th, model=th.model, args=args(tmp_path, gradient_accumulation_steps=2),
                             train_dataset=Rows())
    trainer.train()
    # 6 optimiser steps (12 micro-batches): the schedule moved once per optimiser step.
    assert th.step_count == 6 and th.replacement_rate == pytest.approx(min(1.0, 0.25 + 6 * 0.125))
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, TheseusCallback))
    assert callback.rates == pytest.approx([0.25 + 0.125 * s for s in range(6)])
    logged = [h["theseus_rate"] for h in trainer.state.log_history if "theseus_rate" in h]
    assert logged == pytest.approx([th.scheduler(2), th.scheduler(4), th.scheduler(6)])
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert optimised == {id(p) for p in th.trainable_parameters()}
    assert any(not torch.equal(a, b) for a, b in zip(successors_before, th.trainable_parameters()))
    # without DeepSpeed, trainer.export() is th.export() (tests/test_deepspeed.py: with ZeRO-2/3)
    exported, direct = trainer.export().state_dict(), th.export().state_dict()
    assert set(exported) == set(direct) and all(torch.equal(exported[k], direct[k]) for k in direct)
    th.unwrap()
    assert_same_state(frozen, model)  # the predecessor was never written


def test_trainer_refuses_a_model_that_is_not_the_wrapped_one(tmp_path):
    th = Theseus(tiny_bert(num_layers=4), successor_depth=2)
    with pytest.raises(ValueError, match="model=th.model"):
        TheseusTrainer(theseus=th, model=tiny_bert(num_layers=4), args=args(tmp_path))


def test_callback_accepts_several_processes_and_the_trainable_set_stays_fixed():
    from types import SimpleNamespace

    model = tiny_bert(num_layers=4)
    before = state_snapshot(model)
    th = Theseus(model, successor_depth=2, train_rest=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    callback = TheseusCallback(th)
    state = SimpleNamespace(global_step=0, max_steps=6)
    callback.on_train_begin(SimpleNamespace(world_size=2), state, None)  # no refusal: DDP wraps once
    assert th.scheduler.total_steps == 6  # the default curriculum learns the run's length
    while th.phase != "successor":
        callback.on_step_end(None, state, None)
    assert th.step_count == 3  # p = 1 at half of the 6 steps
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable
    assert any(n.startswith("bert.embeddings") for n in trainable)
    th.unwrap()
    assert_same_state(before, model)
