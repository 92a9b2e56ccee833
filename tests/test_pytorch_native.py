"""A wrapped model behaves like any PyTorch model: compile, checkpointing, autocast,
moves, a fixed trainable set, frozen batch norm and an optimiser that skips idle successors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from theseus_general import LinearScheduler, Theseus
from theseus_general.replacement import uniform

from conftest import ChainModel, ConvBlock, assert_same_state, bert_batch, state_snapshot, tiny_bert


def _train(model, th, batches, steps, lr=1e-2, loss_fn=None, autocast=None):
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=lr)
    th.attach(opt)
    model.train()
    for i in range(steps):
        batch = batches(i)
        if autocast is not None:
            with torch.autocast("cpu", dtype=autocast):
                loss = loss_fn(model, batch)
        else:
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        th.step()


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _bert_loss(model, batch):
    return model(**batch).loss


def _chain_batches(i):
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(i))


def _chain_loss(model, x):
    return model(x).pow(2).mean()


# ---------------------------------------------------------------- torch.compile
def test_compile_does_not_recompile_whatever_the_draws():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = ChainModel(depth=8)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=4, scheduler=0.5, seed=1)
    compiled = torch.compile(model, backend="eager")
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2)
    patterns = []

    def step(i):
        _chain_loss(compiled, _chain_batches(i)).backward()
        patterns.append(tuple(th.last_decisions[g] for g in range(4)))
        opt.step()
        opt.zero_grad()
        th.step()

    for i in range(3):  # warm-up
        step(i)
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    assert graphs > 0  # the blocks are compiled (the dispatch between them stays eager)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(3, 13):
            step(i)
    assert len(set(patterns)) >= 6  # the draws did vary
    assert counters["stats"]["unique_graphs"] == graphs
    assert not counters["recompiles"]
    # dynamo no longer looks at the dispatch frames each call (it used to, one frame per group per forward)
    assert counters["frames"]["total"] == frames
    torch._dynamo.reset()


# ---------------------------------------------------------------- activation checkpointing
def _same_successors(make, enable, batches, loss_fn, steps=4, **theseus_kwargs):
    results = []
    for checkpointed in (False, True):
        model = make()
        th = Theseus(model, scheduler=0.5, seed=2, **theseus_kwargs)
        if checkpointed:
            enable(model)
        _train(model, th, batches, steps, loss_fn=loss_fn)
        results.append([p.detach().clone() for p in th.trainable_parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")
def test_hf_gradient_checkpointing_trains_the_same_successors():
    _same_successors(lambda: _no_dropout(tiny_bert(num_layers=4)), lambda m: m.gradient_checkpointing_enable(),
                     lambda i: bert_batch(seed=i), _bert_loss, successor_depth=2)
    # and layers were in fact recomputed during backward (else the comparison proves nothing):
    # transformers checkpoints each BertLayer's forward itself, inside the group's dispatch, so the
    # groups run once and draw once while the layers that ran run again in backward (seen from a
    # child: the layer's own hooks stay outside its checkpoint)
    model = _no_dropout(tiny_bert(num_layers=4))
    model.gradient_checkpointing_enable()
    th = Theseus(model, successor_depth=2, scheduler=0.5)
    model.train()
    layer_calls, group_calls = [], []
    in_backward = lambda: torch._C._current_graph_task_id() != -1  # noqa: E731
    layers = [b for g in th.groups for b in g.predecessor] + th.successors()
    hooks = [m.attention.register_forward_pre_hook(lambda *a: layer_calls.append(in_backward())) for m in layers]
    hooks += [g.register_forward_pre_hook(lambda *a: group_calls.append(in_backward())) for g in th.groups]
    _bert_loss(model, bert_batch(seed=0)).backward()
    assert layer_calls.count(True) == layer_calls.count(False) > 0, layer_calls  # each layer that ran was recomputed
    assert group_calls == [False, False] and {g: len(d) for g, d in th.decisions().items()} == {0: 1, 1: 1}
    for h in hooks:
        h.remove()


def test_timm_grad_checkpointing_trains_the_same_successors():
    import timm

    def make():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=4, img_size=16, patch_size=4,
                                 embed_dim=32, num_heads=2, num_classes=3)

    def batches(i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(2, 3, 16, 16, generator=g), torch.randint(0, 3, (2,), generator=g)

    _same_successors(make, lambda m: m.set_grad_checkpointing(True), batches,
                     lambda m, b: F.cross_entropy(m(b[0]), b[1]), successor_depth=2)


class CheckpointedChain(ChainModel):
    """torch.utils.checkpoint around each entry of `blocks`, i.e. around each Theseus group."""

    use_checkpoint = False
    reentrant = False

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=self.reentrant) if self.use_checkpoint else block(h)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_around_a_group_trains_the_same_successors_and_does_not_redraw(reentrant):
    def enable(m):
        m.use_checkpoint, m.reentrant = True, reentrant

    _same_successors(lambda: CheckpointedChain(depth=6), enable, _chain_batches, _chain_loss,
                     steps=6, adapter="generic", container="blocks", successor_depth=3)
    model = CheckpointedChain(depth=6)
    enable(model)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=3, scheduler=0.5)
    _chain_loss(model, _chain_batches(0)).backward()  # forward + recomputation in backward
    assert {g: len(d) for g, d in th.decisions().items()} == {0: 1, 1: 1, 2: 1}  # one micro-batch, not two


def test_gradient_accumulation_draws_anew_per_micro_batch():
    model = ChainModel(depth=6)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=3, scheduler=0.5, seed=5)
    model.train()
    differs = 0
    for step in range(6):
        draws = []
        for micro in range(2):
            _chain_loss(model, _chain_batches(micro)).backward()
            draws.append(th.last_decisions)
        differs += draws[0] != draws[1]
        # each micro-batch's draws are a function of (seed, step, group, micro-batch) alone
        assert th.decisions() == {g: [draws[0][g], draws[1][g]] for g in range(3)}
        assert draws == [{g: uniform(5, step, g, m) < 0.5 for g in range(3)} for m in range(2)]
        th.step()
    assert differs > 0


# ---------------------------------------------------------------- mixed precision
def test_bf16_autocast_trains_and_export_keeps_the_dtype():
    model = tiny_bert(num_layers=4)
    th = Theseus(model, successor_depth=2, scheduler=0.5)
    start = [p.detach().clone() for p in th.trainable_parameters()]
    _train(model, th, lambda i: bert_batch(seed=i), 3, loss_fn=_bert_loss, autocast=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in th.trainable_parameters())
    assert sum(not torch.equal(a, p) for a, p in zip(start, th.trainable_parameters())) > len(start) // 2
    exported = th.export()
    assert {p.dtype for p in exported.parameters()} == {torch.float32}


# ---------------------------------------------------------------- moves
def test_double_moves_everything_the_engine_holds():
    model = tiny_bert(num_layers=4)
    keys = set(model.state_dict())
    th = Theseus(model, successor_depth=2, scheduler=LinearScheduler.reaching_one_at(2, base=0.5), train_rest=True)
    assert not any("theseus_originals" in k for k in model.state_dict())  # the kept originals are not state
    kept = set(model._ddp_params_and_buffers_to_ignore)  # and DDP does not broadcast them every step
    assert kept and kept <= {n for n, _ in model.named_buffers()}
    model.double()
    _train(model, th, lambda i: bert_batch(seed=i), 3, loss_fn=_bert_loss)
    exported = th.export()
    assert {p.dtype for p in exported.parameters()} == {torch.float64}
    th.unwrap()
    assert set(model.state_dict()) == keys
    floating = [t for t in model.state_dict().values() if t.is_floating_point()]
    assert {t.dtype for t in floating} == {torch.float64}  # not float32 embeddings around float64 blocks
    assert not any("theseus" in name for name, _ in model.named_modules())
    assert not hasattr(model, "_ddp_params_and_buffers_to_ignore")


def test_unwrap_without_a_move_gives_back_the_callers_objects():
    model = tiny_bert(num_layers=4)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    th = Theseus(model, successor_depth=2, train_rest=True, total_steps=1)
    _train(model, th, lambda i: bert_batch(seed=i), 1, loss_fn=_bert_loss)
    th.unwrap()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())


# ---------------------------------------------------------------- a fixed trainable set
def test_trainable_set_is_fixed_at_wrapping():
    model = tiny_bert(num_layers=4)
    th = Theseus(model, successor_depth=2, scheduler=LinearScheduler.reaching_one_at(3, base=0.3))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("bert.embeddings") for n in trainable) and any(n.startswith("classifier") for n in trainable)
    assert {id(p) for p in th.trainable_parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    _train(model, th, lambda i: bert_batch(seed=i), 5, loss_fn=_bert_loss)
    assert th.phase == "successor"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


# ---------------------------------------------------------------- frozen batch norm
def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Sequential(*[ConvBlock() for _ in range(4)]))


def test_frozen_batch_norm_cannot_update_and_trained_batch_norm_does():
    model = _conv_net()
    predecessor_bn = {k: v.clone() for k, v in model[2].state_dict().items() if "bn." in k}
    th = Theseus(model, adapter="generic", container="2", successor_depth=2, scheduler=1.0, train_rest=True)
    opt = torch.optim.SGD(th.trainable_parameters(), lr=0.1)
    for step in range(3):
        model.train()  # the user's own mode switches are respected, never overridden
        model(torch.randn(2, 1, 6, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        th.step()
        model.eval()
        model(torch.randn(2, 1, 6, 6))
    stem_bn = model[1]
    assert stem_bn.num_batches_tracked.item() == 3  # every train-mode forward, none of the eval ones
    model.train()
    assert all(m.training for m in model.modules())  # no flags flipped behind the user's back
    assert not any(m._forward_pre_hooks for m in model.modules())
    for group in th.groups:
        group.predecessor.train()
        for block in group.predecessor:
            block(torch.randn(2, 4, 6, 6))  # even a direct train-mode call cannot update them
    th.unwrap()
    after = model[2].state_dict()
    assert all(torch.equal(v, after[k]) for k, v in predecessor_bn.items())


def test_rest_batch_norm_stays_frozen_when_the_rest_does_not_train():
    model = _conv_net()
    before = state_snapshot(model)
    th = Theseus(model, adapter="generic", container="2", successor_depth=2, scheduler=0.5, train_rest=False)
    _train(model, th, lambda i: torch.randn(2, 1, 6, 6), 3, loss_fn=lambda m, x: m(x).pow(2).mean())
    exported = th.export()
    assert type(exported[1]) is nn.BatchNorm2d  # a plain batch norm again in the export
    th.unwrap()
    assert_same_state(before, model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[2][0].bn) is nn.BatchNorm2d


# ---------------------------------------------------------------- idle successors
def test_adamw_leaves_idle_successors_unchanged():
    model = ChainModel(depth=8)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=4, scheduler=0.5, seed=4,
                 train_rest=False)
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    th.attach(opt)  # with the rest frozen idle successors get the zero anchor: this optimiser skips them
    idle_steps = active_steps = 0
    for i in range(12):
        _chain_loss(model, _chain_batches(i)).backward()
        idle = {g for g, ran_successor in th.last_decisions.items() if not ran_successor}
        before = [[p.detach().clone() for p in s.parameters()] for s in th.successors()]
        opt.step()
        opt.zero_grad()
        for g, successor in enumerate(th.successors()):
            moved = any(not torch.equal(a, p) for a, p in zip(before[g], successor.parameters()))
            assert moved == (g not in idle), f"step {i} group {g}"
            idle_steps += g in idle
            active_steps += g not in idle
        th.step()
    assert idle_steps > 5 and active_steps > 5


# ---------------------------------------------------------------- FSDP2 (one gloo process)
FSDP2_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from conftest import ChainModel
from theseus_general import Theseus
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.fsdp import fully_shard
model = ChainModel(depth=6)
th = Theseus(model, adapter="generic", container="blocks", successor_depth=3, scheduler=0.5, seed=1)
for successor in th.successors():
    fully_shard(successor)  # its own unit: stays sharded while its group runs the predecessor
fully_shard(model)
opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2, weight_decay=0.1)
idle_seen = 0
for i in range(6):
    model(torch.randn(4, 4)).pow(2).mean().backward()
    idle = {g for g, d in th.decisions().items() if not any(d)}
    before = [[p.full_tensor().clone() for p in s.parameters()] for s in th.successors()]
    opt.step(); opt.zero_grad()
    for g, s in enumerate(th.successors()):
        moved = any(not torch.equal(a, p.full_tensor()) for a, p in zip(before[g], s.parameters()))
        assert moved == (g not in idle), (i, g)
    idle_seen += len(idle)
    th.step()
assert idle_seen > 0
dist.destroy_process_group()
print("FSDP2 OK")
"""


def test_fsdp2_with_successors_as_units_trains_and_leaves_idle_ones_unchanged(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    done = subprocess.run([sys.executable, str(script), os.path.dirname(os.path.abspath(__file__))], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "FSDP2 OK" in done.stdout, done.stdout + done.stderr


def test_the_engine_registers_no_process_wide_optimizer_hook():
    # an unrelated model's optimiser must never touch the engine's gradients
    from torch.optim import optimizer as optim_module

    before = set(optim_module._global_optimizer_pre_hooks)
    model = ChainModel(depth=6)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=3, scheduler=0.5, train_rest=False)
    th.attach(torch.optim.AdamW(th.trainable_parameters(), lr=1e-2))
    assert set(optim_module._global_optimizer_pre_hooks) == before
    _chain_loss(model, _chain_batches(0)).backward()
    grads = {id(p): p.grad for s in th.successors() for p in s.parameters()}
    other = nn.Linear(3, 3)
    other(torch.randn(2, 3)).sum().backward()
    torch.optim.SGD(other.parameters(), lr=0.1).step()  # not the run's optimiser
    assert all(p.grad is grads[id(p)] for s in th.successors() for p in s.parameters())
    th.unwrap()


def test_single_process_runs_with_trained_rest_add_no_anchor():
    # the anchor is for DDP's reducer (and for a loss with nothing else trainable): here an idle
    # successor simply gets no gradient, and no hook is needed
    model = ChainModel(depth=6)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=3, scheduler=0.5, seed=2)
    seen_idle = 0
    for i in range(6):
        _chain_loss(model, _chain_batches(i)).backward()
        for g, d in th.decisions().items():
            idle = not any(d)
            seen_idle += idle
            assert all((p.grad is None) == idle for p in th.successors()[g].parameters()), (i, g)
        model.zero_grad(set_to_none=True)
        th.step()
    assert seen_idle > 0


def test_a_real_gradient_reaching_an_idle_successor_is_kept():
    # an auxiliary loss on a successor (a probe, a regulariser) outside its group's dispatch: the
    # attached optimiser drops only the anchor's exact zeros, never a real gradient
    model = ChainModel(depth=6)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=3, scheduler=0.0, train_rest=False)
    opt = torch.optim.SGD(th.trainable_parameters(), lr=0.1)
    th.attach(opt)
    probe = th.successors()[1]
    before = [p.detach().clone() for s in th.successors() for p in s.parameters()]
    loss = _chain_loss(model, _chain_batches(0)) + probe(torch.randn(3, 8)).pow(2).mean()
    loss.backward()
    assert th.decisions() == {0: [False], 1: [False], 2: [False]}  # p = 0: every successor idle in the dispatch
    opt.step()
    after = [p.detach() for s in th.successors() for p in s.parameters()]
    moved = [not torch.equal(a, b) for a, b in zip(before, after)]
    per = len(list(probe.parameters()))
    assert moved[per:2 * per] == [True] * per  # the probed successor moved
    assert not any(moved[:per] + moved[2 * per:])  # the idle ones did not (their zeros were dropped)
    th.unwrap()


def test_without_attach_an_anchored_run_warns_once():
    model = ChainModel(depth=6)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=3, scheduler=0.0, train_rest=False)
    _chain_loss(model, _chain_batches(0)).backward()
    with pytest.warns(UserWarning, match=r"th.attach\(optimizer\)"):
        th.step()
    _chain_loss(model, _chain_batches(1)).backward()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        th.step()  # once
    th.unwrap()


class MultiViewChain(CheckpointedChain):
    """Each block checkpointed; the loss sums several forwards before one backward (R-Drop, two views)."""


def _multi_forward_grads(views: int, seed: int, use_checkpoint: bool, reentrant: bool):
    torch.manual_seed(0)
    model = MultiViewChain(depth=6)
    model.use_checkpoint, model.reentrant = use_checkpoint, reentrant
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=3, scheduler=0.5, seed=seed)
    model.train()
    xs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(10 * seed + v)) for v in range(views)]
    loss = sum(model(x).pow(2).mean() for x in xs)
    loss.backward()
    grads = [p.grad.clone() if p.grad is not None else None for p in th.trainable_parameters()]
    return grads, th.decisions()


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("views", [2, 3])
def test_several_forwards_before_one_backward_with_checkpointing_give_the_plain_gradients(views, reentrant):
    mixed = 0
    for seed in range(6):
        plain, decisions = _multi_forward_grads(views, seed, use_checkpoint=False, reentrant=reentrant)
        checkpointed, decisions_ckpt = _multi_forward_grads(views, seed, use_checkpoint=True, reentrant=reentrant)
        assert decisions == decisions_ckpt and all(len(d) == views for d in decisions.values())  # recomputes draw nothing
        mixed += any(len(set(d)) == 2 for d in decisions.values())  # forwards of one group that drew differently
        for a, b in zip(plain, checkpointed):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert mixed >= 3  # the case that used to go wrong did occur


def test_a_recompute_that_cannot_tell_its_forward_raises():
    # two forwards hand the first group the very same tensor and draw differently: a recomputation
    # cannot tell which one it repeats, and says so instead of guessing
    class NoStem(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

        def forward(self, x):
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=False)
            return x

    from theseus_general.errors import TrainingError

    for seed in range(20):
        model = NoStem()
        th = Theseus(model, adapter="generic", container="blocks", successor_depth=2, scheduler=0.5, seed=seed)
        model.train()
        x = torch.randn(2, 4)
        loss = model(x).sum() + model(x).sum()
        if len(set(th.decisions()[0])) == 2:
            with pytest.raises(TrainingError, match="same input tensor and drew different modules.*x.clone"):
                loss.backward()
            return
        th.unwrap()
    pytest.fail("no seed drew differently for the two forwards")

def test_an_attached_optimizer_stepped_with_a_closure_skips_idle_successors():
    # Lightning and LBFGS run forward and backward inside optimizer.step(closure), after the step
    # pre-hook: the hook drops the anchor's zeros once the closure has made them
    model = ChainModel(depth=6)
    th = Theseus(model, adapter="generic", container="blocks", successor_depth=3, scheduler=0.0, train_rest=False)
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    th.attach(opt)
    before = [p.detach().clone() for s in th.successors() for p in s.parameters()]

    def closure():
        opt.zero_grad()
        loss = _chain_loss(model, _chain_batches(0))
        loss.backward()
        return loss

    opt.step(closure)
    assert th.decisions() == {0: [False], 1: [False], 2: [False]}
    after = [p.detach() for s in th.successors() for p in s.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # weight decay did not move them
    th.unwrap()
