"""Only successors train; the caller's tensors never change."""

import torch
from torch import nn

from theseus_general import LinearScheduler, Theseus

from conftest import ConvBlock, assert_same_state, bert_batch, state_snapshot, tiny_bert


def _train(th, steps=12, lr=1e-2, batch_fn=bert_batch):
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=lr)
    th.model.train()
    for i in range(steps):
        loss = th.model(**batch_fn(seed=i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        th.step()


def test_predecessor_and_rest_bit_identical_while_successors_change():
    model = tiny_bert(num_layers=6)
    before = state_snapshot(model)
    th = Theseus(model, successor_depth=3, scheduler=LinearScheduler.reaching_one_at(6, base=0.3), train_rest=False)
    start = [p.detach().clone() for p in th.trainable_parameters()]
    _train(th)
    assert th.phase == "successor"
    changed = [not torch.equal(a, p) for a, p in zip(start, th.trainable_parameters())]
    assert sum(changed) > len(changed) // 2
    for group in th.groups:
        for block in group.predecessor:
            assert all(not p.requires_grad for p in block.parameters())
    th.export()
    th.unwrap()
    assert_same_state(before, model)


def test_train_rest_trains_copies_not_the_callers_tensors():
    model = tiny_bert(num_layers=4)
    before = state_snapshot(model)
    word_embeddings = model.bert.embeddings.word_embeddings.weight
    th = Theseus(model, successor_depth=2, scheduler=LinearScheduler.reaching_one_at(4, base=0.5), train_rest=True)
    copy_ = model.bert.embeddings.word_embeddings.weight
    assert copy_ is not word_embeddings and copy_.requires_grad  # trains from step 0
    assert any(p is copy_ for p in th.trainable_parameters())
    start = copy_.detach().clone()
    _train(th, steps=2)
    assert th.phase == "replacing" and not torch.equal(start, copy_)
    _train(th, steps=8)
    exported = th.export()
    assert not torch.equal(exported.bert.embeddings.word_embeddings.weight, word_embeddings)
    th.unwrap()
    assert model.bert.embeddings.word_embeddings.weight is word_embeddings
    assert_same_state(before, model)


def test_frozen_batch_norm_statistics_are_not_updated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Sequential(*[ConvBlock() for _ in range(4)]))
    before = state_snapshot(model)
    th = Theseus(model, adapter="generic", container="2", successor_depth=2, scheduler=0.5)
    opt = torch.optim.SGD(th.trainable_parameters(), lr=0.1)
    model.train()
    for _ in range(5):
        model(torch.randn(2, 1, 6, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        th.step()
    # successors' own batch norm does learn statistics
    assert any(s.bn.num_batches_tracked.item() > 0 for s in th.successors())
    th.unwrap()
    assert_same_state(before, model)
    assert model.training and model[1].training


class _NormAct(nn.BatchNorm2d):
    """A batch norm whose forward also applies its activation, as timm's BatchNormAct2d does."""

    def forward(self, x):
        return torch.relu(super().forward(x) - 0.5)


def test_frozen_norm_runs_the_norm_class_own_forward():
    # Freezing replaced forward with a plain batch_norm call, dropping timm's in-norm activation:
    # a frozen predecessor block computed another function than the trained one (issue 27).
    torch.manual_seed(0)
    block = lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), _NormAct(4))
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Sequential(*[block() for _ in range(4)]))
    model.train()
    x = torch.randn(3, 1, 6, 6)
    model(x)  # running statistics away from their init
    model.eval()
    with torch.no_grad():
        hidden = model[0](x)
        wanted = model[1][1](model[1][0](hidden))
    model.train()
    th = Theseus(model, adapter="generic", container="1", successor_depth=2, scheduler=0.0)
    stats = th.groups[0].predecessor[0][1].running_mean.clone()
    with torch.no_grad():
        got = th.groups[0].run_predecessor(hidden)  # in train mode: frozen norm uses running stats
    torch.testing.assert_close(got, wanted)
    assert torch.equal(stats, th.groups[0].predecessor[0][1].running_mean)
    assert th.groups[0].predecessor[0][1].training  # the mode stays the caller's
    th.unwrap()
    assert type(model[1][0][1]) is _NormAct and model[1][0][1].training
