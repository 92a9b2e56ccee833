"""A training loop on a model left in eval mode (from_pretrained returns models in eval mode) is
refused at th.step(): in eval mode every group runs its successor, so nothing would be replaced at
random. Evaluation between steps stays allowed."""

import pytest
import torch

from theseus_general import EngineStateError, Theseus, match_successors
from theseus_general.training import fit

from conftest import bert_batch, tiny_bert


def _engine(model):
    return Theseus(model, successor_depth=3, total_steps=20)


def _train_step(th, opt, batch):
    loss = th.model(**batch).loss
    loss.backward(); opt.step(); opt.zero_grad(); th.step()


def test_the_readme_loop_on_an_eval_mode_model_is_refused_at_the_first_step():
    model = tiny_bert(num_layers=6).eval()  # as from_pretrained returns it
    th = _engine(model)
    match_successors(th, [bert_batch(seed=i) for i in range(2)], 1, progress=False)
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-4)
    loss = th.model(**bert_batch(seed=5)).loss
    loss.backward(); opt.step(); opt.zero_grad()
    with pytest.raises(EngineStateError, match=r"call `th\.model\.train\(\)`"):
        th.step()
    assert th.step_count == 0  # the schedule did not advance on a step that replaced nothing


def test_after_train_the_same_loop_runs_and_the_predecessor_blocks_are_used():
    model = tiny_bert(num_layers=6).eval()
    th = _engine(model)
    calls = []
    for block in model.bert.encoder.layer[0].predecessor:
        block.register_forward_hook(lambda *a: calls.append(1))
    th.model.train()
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-4)
    for i in range(4):
        _train_step(th, opt, bert_batch(seed=i))
    assert th.step_count == 4 and calls  # p starts at 0.3: the first group ran its own blocks


def test_evaluation_between_steps_stays_allowed():
    model = tiny_bert(num_layers=6)
    th = _engine(model)
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-4)
    for i in range(3):
        th.model.train()
        _train_step(th, opt, bert_batch(seed=i))
        th.model.eval()
        with torch.no_grad():  # an evaluation pass between steps
            th.model(**bert_batch(seed=10 + i))
    # a step whose only forwards were an evaluation under no_grad refuses nothing either
    th.step()
    # and an evaluation with gradients on beside a training forward is no eval-mode loop
    th.model.train()
    th.model(**bert_batch(seed=20)).loss.backward()
    th.model.eval()
    th.model(**bert_batch(seed=21)).loss.backward()
    th.step()
    assert th.step_count == 5


def test_fit_puts_an_eval_mode_model_in_training_mode_and_back():
    model = tiny_bert(num_layers=4).eval()
    th = Theseus(model, successor_depth=2, recipe="matching")
    batches = [(({k: v for k, v in b.items() if k != "labels"}), b["labels"])
               for b in (bert_batch(seed=i) for i in range(6))]
    fit(th, batches, steps=6, lr=1e-4, progress=False)
    assert th.step_count == 6 - th.recipe.match_steps(6) and not th.model.training
