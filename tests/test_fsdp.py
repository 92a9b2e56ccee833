"""FSDP2 (fully_shard) on CPU (gloo, 2 real processes): same draws on both ranks, same successor as one process,
th.export() of the sharded model, and a save/resume through torch.distributed.checkpoint."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import _fsdp_worker
from _gloo import run_two_ranks

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_fsdp_worker.py")
RESUME_WORKER = os.path.join(HERE, "_fsdp_resume_worker.py")


def test_fully_shard_ranks_match_each_other_and_one_process(tmp_path):
    single = run_two_ranks(WORKER, _fsdp_worker.run, tmp_path)  # and one process, the whole batch, no sharding

    draws = [json.loads((tmp_path / f"draws-{r}.json").read_text()) for r in range(2)]
    assert draws[0] == draws[1] == json.loads((single / "draws-0.json").read_text())
    # both outcomes occurred, so a group whose successor sat idle still synchronised
    assert {used for step in draws[0] for used in step.values()} == {True, False}

    w0, w1 = (load_file(str(tmp_path / f"weights-{r}.safetensors")) for r in range(2))
    reference = load_file(str(single / "weights-0.safetensors"))
    initial = _fsdp_worker.ChainModel(depth=6, seed=0)
    assert not torch.equal(w0["successors.0.linear.weight"], initial.blocks[0].linear.weight)  # it trained
    # the stem's copy trained too (train_rest, the default): the optimiser got the sharded copies
    assert not torch.equal(w0["rest.0"], initial.stem.weight)
    assert w0.keys() == reference.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
        torch.testing.assert_close(w0[k], reference[k], rtol=1e-5, atol=1e-6)

    # th.export() of the sharded model: rank 0 gets the successor, rank 1 took part in the gather and got None
    exported, expected = load_file(str(tmp_path / "exported.safetensors")), load_file(str(single / "exported.safetensors"))
    twin = load_file(str(tmp_path / "twin.safetensors"))
    assert (tmp_path / "export-1.txt").read_text() == "None"
    assert exported.keys() == expected.keys() == twin.keys()
    for k in exported:
        assert torch.equal(exported[k], twin[k]), k  # what an unsharded twin with the gathered state exports
        torch.testing.assert_close(exported[k], expected[k], rtol=1e-5, atol=1e-6)


def test_export_of_a_sharded_model_is_a_plain_model_equal_to_the_unsharded_export():
    """One process (world size 1): fully_shard, train, export; the same run unsharded exports the same weights."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    def train(th, steps):
        opt = torch.optim.SGD(th.trainable_parameters(), lr=0.1)
        th.attach(opt)
        th.model.train()
        for step in range(steps):
            g = torch.Generator().manual_seed(step)
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
            torch.nn.functional.cross_entropy(th.model(x), y).backward()
            opt.step()
            opt.zero_grad()
            th.step()

    unsharded = _fsdp_worker.engine()
    train(unsharded, 3)
    expected = unsharded.export()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        th = _fsdp_worker.engine()
        for group in th.groups:
            fully_shard(group)
        fully_shard(th.model)
        train(th, 3)

        def users_hook(module, args, output):  # a hook of the user's: copied, as by an unsharded export
            return None

        th.model.head.register_forward_hook(users_hook)
        exported = th.export()
        assert type(exported) is type(expected) and len(exported.blocks) == 3
        assert not any(isinstance(m, FSDPModule) for m in exported.modules())
        assert not any(isinstance(p, DTensor) for p in exported.parameters())
        assert not any(hasattr(m, "_is_fsdp_managed_module") for m in exported.modules())
        assert list(exported.head._forward_hooks.values()) == [users_hook]
        assert th.model._forward_pre_hooks and any(m._load_state_dict_post_hooks for m in th.model.modules())
        assert not any(h for m in exported.modules() if m is not exported.head  # FSDP's hooks are gone
                       for h in (m._forward_pre_hooks, m._forward_hooks, m._state_dict_pre_hooks,
                                 m._load_state_dict_pre_hooks, m._load_state_dict_post_hooks))
        assert exported.state_dict().keys() == expected.state_dict().keys()
        for k, v in exported.state_dict().items():
            assert torch.equal(v, expected.state_dict()[k]), k
        x = torch.randn(5, 4)
        assert torch.equal(exported(x), expected(x))
        # the wrapped model is still sharded and trains on
        assert all(isinstance(p, DTensor) for p in th.trainable_parameters())
        train(th, 1)
        assert th.step_count == 4
    finally:
        dist.destroy_process_group()


def test_a_sharded_run_resumes_bit_identically_through_dcp(tmp_path):
    """2 ranks save with DCP after step 3 and run on to step 6; 2 fresh ranks resume from the checkpoint
    and run to step 6: the engine's tensors and AdamW's state equal the uninterrupted run's bit for bit."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    first.mkdir()
    resumed.mkdir()
    run_two_ranks(RESUME_WORKER, None, first)
    run_two_ranks(RESUME_WORKER, None, resumed, args=[str(first / "ckpt")])
    for rank in range(2):
        a = load_file(str(first / f"final-{rank}.safetensors"))
        b = load_file(str(resumed / f"final-{rank}.safetensors"))
        assert a.keys() == b.keys()
        assert any(k.startswith("opt.") for k in a) and any(k.startswith("rest.") for k in a)
        for k in a:
            assert torch.equal(a[k], b[k]), (rank, k)


def test_a_sharded_checkpoint_of_another_plan_is_refused_before_anything_changes(tmp_path):
    """One process (world size 1): save with DCP, then load into an engine of another plan, and into one
    from a directory that is not a sharded checkpoint: CheckpointError, the engine and optimiser unchanged."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from theseus_general import ConstantScheduler, Theseus
    from theseus_general.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
    from theseus_general.errors import CheckpointError

    def sharded(depth):
        th = Theseus(_fsdp_worker.ChainModel(depth=6, seed=0), successor_depth=depth, adapter="generic",
                     container="blocks", scheduler=ConstantScheduler(0.5), seed=11)
        for group in th.groups:
            fully_shard(group)
        fully_shard(th.model)
        return th, torch.optim.AdamW(th.trainable_parameters(), lr=1e-2)

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        th, opt = sharded(3)
        save_sharded_checkpoint(str(tmp_path / "ckpt"), th, opt)
        other, other_opt = sharded(2)
        before = {k: v.full_tensor().clone() for k, v in other.state_dict()["tensors"].items()}
        with pytest.raises(CheckpointError, match="plan"):
            load_sharded_checkpoint(str(tmp_path / "ckpt"), other, other_opt)
        with pytest.raises(CheckpointError, match="no state.json"):
            load_sharded_checkpoint(str(tmp_path), other, other_opt)
        assert other.step_count == 0 and not other_opt.state
        for k, v in other.state_dict()["tensors"].items():
            assert torch.equal(v.full_tensor(), before[k]), k
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family", ["bert", "resnet"])
def test_a_sharded_model_exports_the_families_native_model(family):
    """One process: the hf and resnet adapters rebuild their own model from the sharded engine's export,
    equal to the unsharded engine's export (same weights, same outputs)."""
    import torch.distributed as dist
    from conftest import bert_batch, tiny_bert, tiny_resnet
    from torch.distributed.fsdp import fully_shard

    from theseus_general import Theseus

    def engine():
        if family == "bert":
            return Theseus(tiny_bert(num_layers=4), successor_depth=2, seed=0)
        return Theseus(tiny_resnet(), ratio=0.5, seed=0)

    unsharded = engine()
    unsharded.mark_trained()  # the initial successors are enough for an equality
    expected = unsharded.export()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        th = engine()
        for group in th.groups:
            fully_shard(group)
        fully_shard(th.model)
        th.mark_trained()
        exported = th.export()
    finally:
        dist.destroy_process_group()
    assert type(exported) is type(expected)
    assert exported.state_dict().keys() == expected.state_dict().keys()
    for k, v in exported.state_dict().items():
        assert torch.equal(v, expected.state_dict()[k]), k
    if family == "bert":
        batch = {k: v for k, v in bert_batch().items() if k != "labels"}
        assert exported.config.num_hidden_layers == 2
        assert torch.equal(exported(**batch).logits, expected(**batch).logits)
    else:
        x = torch.randn(2, 3, 32, 32)
        assert torch.equal(exported(x), expected(x))
