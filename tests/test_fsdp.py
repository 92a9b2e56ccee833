"""FSDP2 (fully_shard) on CPU (gloo, 2 real processes): same draws on both ranks, same successor as one process."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import _fsdp_worker
from _gloo import run_two_ranks

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fsdp_worker.py")


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

    exported, expected = load_file(str(tmp_path / "exported.safetensors")), load_file(str(single / "exported.safetensors"))
    assert exported.keys() == expected.keys()
    for k in exported:
        torch.testing.assert_close(exported[k], expected[k], rtol=1e-5, atol=1e-6)


def test_a_sharded_model_cannot_be_deep_copied_so_export_needs_the_twin():
    """The reason for export_through_twin: FSDP2's own refusal, recorded (one process, world size 1)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        th = _fsdp_worker.engine()
        fully_shard(th.model)
        with pytest.raises(AssertionError, match="FSDP does not support deepcopy"):
            th.export()
    finally:
        dist.destroy_process_group()
