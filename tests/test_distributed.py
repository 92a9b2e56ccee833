"""DDP on CPU (gloo, 2 real processes): same draws, same weights, same result as one process."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import _ddp_worker
from _gloo import run_two_ranks

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ddp_worker.py")


def test_two_ranks_match_each_other_and_one_process(tmp_path):
    single = run_two_ranks(WORKER, _ddp_worker.run, tmp_path)  # and one process, the whole batch, no DDP

    draws = [json.loads((tmp_path / f"draws-{r}.json").read_text()) for r in range(2)]
    assert draws[0] == draws[1] == json.loads((single / "draws-0.json").read_text())
    # Some group ran its predecessor before the last step: with find_unused_parameters=False,
    # DDP would have failed on the next step if the successor had left the graph.
    assert any(not used for step in draws[0][:-1] for used in step.values())

    w0, w1 = (load_file(str(tmp_path / f"weights-{r}.safetensors")) for r in range(2))
    reference = load_file(str(single / "weights-0.safetensors"))
    initial = _ddp_worker.ChainModel(depth=6, seed=0)
    assert not torch.equal(w0["successors.0.linear.weight"], initial.blocks[0].linear.weight)  # it trained
    assert not torch.equal(w0["rest.0"], initial.stem.weight)  # the rest trained too, in the same DDP wrap
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
        torch.testing.assert_close(w0[k], reference[k], rtol=1e-5, atol=1e-6)


def test_a_pair_of_ranks_that_hangs_is_started_once_more_and_a_second_hang_fails(tmp_path):
    once = tmp_path / "hang_once.py"  # each rank hangs on its first start only
    once.write_text("import os, sys, time\n"
                    "marker = os.path.join(sys.argv[1], 'tried-' + os.environ['RANK'])\n"
                    "if not os.path.exists(marker):\n"
                    "    open(marker, 'w').close()\n"
                    "    time.sleep(60)\n")
    run_two_ranks(str(once), None, tmp_path, timeout=3)
    assert sorted(p.name for p in tmp_path.glob("tried-*")) == ["tried-0", "tried-1"]
    always = tmp_path / "hang_always.py"
    always.write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(AssertionError, match="twice on fresh ports"):
        run_two_ranks(str(always), None, tmp_path, timeout=3)
