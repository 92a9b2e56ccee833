"""Built-in baselines: successor-shaped copies, the KD loss, and KD / fine-tune-only training."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from theseus_general.baselines import (
    DistillationStep, default_logits, distill, distillation_loss, fine_tune_only, successor_shaped_copy,
)

from theseus_general.training import fit

from conftest import assert_same_state, bert_batch, state_snapshot, tiny_bert


def tiny_vit(seed: int = 0):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=8, in_chans=3, num_classes=3, embed_dim=16, depth=4, num_heads=2)


def bert_stream(seed: int = 1):
    for i in itertools.count():
        batch = bert_batch(seed=seed + i)
        labels = batch.pop("labels")
        yield batch, labels


def image_stream(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 3, (4,), generator=g)


# ------------------------------------------------------------------ successor-shaped copy
def test_bert_copy_has_planned_depth_and_copied_blocks():
    model = tiny_bert(num_layers=6)
    before = state_snapshot(model)
    student = successor_shaped_copy(model, successor_depth=3)
    assert type(student) is type(model)
    assert student.config.num_hidden_layers == 3 and len(student.bert.encoder.layer) == 3
    for i in range(3):  # init="first": successor i is a copy of predecessor block i
        ours, theirs = student.bert.encoder.layer[i].state_dict(), model.bert.encoder.layer[i].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
        assert student.bert.encoder.layer[i].attention.self.query.weight.data_ptr() != \
            model.bert.encoder.layer[i].attention.self.query.weight.data_ptr()
    assert all(p.requires_grad for p in student.parameters())
    assert_same_state(before, model)
    assert all(p.requires_grad for p in model.parameters())  # the caller's flags are restored


def test_vit_copy_follows_init_and_keeps_stem_and_head():
    model = tiny_vit()
    student = successor_shaped_copy(model, successor_depth=2, init="group_last")  # groups [0,1], [2,3]
    assert len(student.blocks) == 2
    for successor, source in zip(student.blocks, (1, 3)):
        theirs = model.blocks[source].state_dict()
        assert all(torch.equal(successor.state_dict()[k], theirs[k]) for k in theirs)
    assert torch.equal(student.head.weight, model.head.weight)
    assert torch.equal(student.patch_embed.proj.weight, model.patch_embed.proj.weight)


# ------------------------------------------------------------------ KD loss
S = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
T = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
Y = torch.tensor([1, 2])


def _by_hand(temperature: float, alpha: float) -> float:
    kl = 0.0
    for s_row, t_row in zip(S.tolist(), T.tolist()):
        zs = sum(math.exp(v / temperature) for v in s_row)
        zt = sum(math.exp(v / temperature) for v in t_row)
        for s, t in zip(s_row, t_row):
            ps, pt = math.exp(s / temperature) / zs, math.exp(t / temperature) / zt
            kl += pt * math.log(pt / ps)
    kl /= len(S)
    ce = 0.0
    for row, y in zip(S.tolist(), Y.tolist()):
        ce += -math.log(math.exp(row[y]) / sum(math.exp(v) for v in row))
    ce /= len(S)
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_kd_loss_matches_hand_computation(temperature, alpha):
    got = distillation_loss(S, T, Y, temperature=temperature, alpha=alpha).item()
    assert got == pytest.approx(_by_hand(temperature, alpha), rel=1e-5)


def test_kd_loss_at_alpha_zero_is_cross_entropy():
    assert torch.allclose(distillation_loss(S, T, Y, temperature=4.0, alpha=0.0), F.cross_entropy(S, Y))


def test_kd_loss_rejects_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(S, T, Y, temperature=0.0)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(S, T, Y, alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(S, T[:, :2], Y)
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(S, T, None, alpha=0.5)


def test_default_logits_reads_hf_outputs_tensors_and_tuples():
    model = tiny_bert(num_layers=2)
    batch = bert_batch()
    batch.pop("labels")
    assert default_logits(model(**batch)).shape == (4, 2)
    assert default_logits((S, None)) is S
    with pytest.raises(TypeError, match="logits="):
        default_logits({"x": 1})


# ------------------------------------------------------------------ training
def test_kd_steps_change_student_and_leave_teacher_bit_identical():
    teacher = tiny_bert(num_layers=4)
    teacher.train()
    before = state_snapshot(teacher)
    student = successor_shaped_copy(teacher, successor_depth=2)
    start = state_snapshot(student)
    step = DistillationStep(student, teacher, temperature=2.0, alpha=0.7)
    losses = fit(student, bert_stream(), 3, loss=step, lr=1e-3, progress=False).losses
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())
    assert_same_state(before, teacher)
    assert teacher.training  # its mode is restored after each teacher forward


def test_one_call_baselines_work_for_a_vision_model():
    teacher = tiny_vit()
    before = state_snapshot(teacher)
    fresh = tiny_vit(seed=5)
    student = distill(teacher, image_stream(), 2, temperature=2.0, alpha=0.5, lr=1e-3, successor_depth=2)
    a = fine_tune_only(teacher, image_stream(), 2, lr=1e-3, successor_depth=2)
    b = fine_tune_only(teacher, image_stream(), 2, initial=fresh, lr=1e-3, successor_depth=2)
    assert [len(m.blocks) for m in (student, a, b)] == [2, 2, 2]
    assert not torch.equal(a.blocks[0].attn.qkv.weight, teacher.blocks[0].attn.qkv.weight)  # it trained
    # (b) starts from the fresh model, (a) from the teacher: they end apart
    assert not torch.equal(a.pos_embed, b.pos_embed)
    assert_same_state(before, teacher)


def test_distillation_needs_two_modules():
    model = tiny_vit()
    with pytest.raises(ValueError, match="same module"):
        DistillationStep(model, model)


def test_a_theseus_run_takes_a_distillation_term_and_leaves_the_teacher_alone():
    """The hybrid of docs/training.md: fit(th, loss=DistillationStep(th.model, teacher)) with a copy
    taken before wrapping. The term changes what the successors learn; the teacher stays as it was."""
    import copy

    from theseus_general import Theseus
    from theseus_general.training import fit

    def run(alpha):
        model = tiny_bert(num_layers=4)
        teacher = copy.deepcopy(model)
        before = state_snapshot(teacher)
        th = Theseus(model, successor_depth=2, seed=0)
        fit(th, itertools.islice(bert_stream(), 6), 6, lr=1e-3, progress=False,
            loss=DistillationStep(th.model, teacher, temperature=2.0, alpha=alpha))
        assert_same_state(before, teacher)
        return th.export().state_dict()

    with_term, without = run(0.5), run(0.0)
    assert any(not torch.equal(with_term[k], without[k]) for k in without)
