"""One rank of a tiny DDP Theseus run (gloo, CPU); tests start it with torchrun-style env vars.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/_ddp_worker.py OUT_DIR

Each rank trains on its slice of the same global batch and writes its per-step
replacement draws (draws-<rank>.json) and final successor and rest weights (weights-<rank>.safetensors).
The model is wrapped in DDP once: the rest (stem, head) trains from step 0 on copies, and
AdamW with weight decay must leave successors idle for a step unchanged on every rank.
With WORLD_SIZE unset, run(out, world_size=1) trains without DDP on the whole batch.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gloo import train_on_rank_slice  # noqa: E402
from conftest import ChainModel  # noqa: E402

from theseus_general import ConstantScheduler, Theseus  # noqa: E402

STEPS, GLOBAL_BATCH = 6, 8


def run(out: str, rank: int = 0, world_size: int = 1) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    model = ChainModel(depth=6, seed=0)
    th = Theseus(model, successor_depth=3, adapter="generic", container="blocks",
                 scheduler=ConstantScheduler(0.5), seed=11)
    if world_size > 1:
        from theseus_general.distributed import wrap_ddp

        forward = wrap_ddp(th)  # once; find_unused_parameters=False: the zero anchor keeps successors in the graph
    else:
        forward = th.model
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=0.05, weight_decay=0.1)
    train_on_rank_slice(th, forward, opt, out, rank, world_size, STEPS, GLOBAL_BATCH)
    save_file({k: v.contiguous() for k, v in th.state_dict()["tensors"].items()},
              os.path.join(out, f"weights-{rank}.safetensors"))


if __name__ == "__main__":
    from _gloo import run_as_rank

    run_as_rank(run)
