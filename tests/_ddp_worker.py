"""One rank of a tiny DDP Theseus run (gloo, CPU); tests start it with torchrun-style env vars.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/_ddp_worker.py OUT_DIR

Each rank trains on its slice of the same global batch and writes its per-step
replacement draws (draws-<rank>.json) and final successor and rest weights (weights-<rank>.safetensors).
The model is wrapped in DDP once: the rest (stem, head) trains from step 0 on copies, and
AdamW with weight decay must leave successors idle for a step unchanged on every rank.
With WORLD_SIZE unset, run(out, world_size=1) trains without DDP on the whole batch.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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
    per_rank = GLOBAL_BATCH // world_size
    draws = []
    forward.train()
    for step in range(STEPS):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(GLOBAL_BATCH, 4, generator=g), torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        loss = torch.nn.functional.cross_entropy(forward(x), y)  # mean per rank; DDP averages over ranks
        loss.backward()
        opt.step()
        opt.zero_grad()
        draws.append({str(k): v for k, v in sorted(th._state.last_draws.items())})
        th.step()
    with open(os.path.join(out, f"draws-{rank}.json"), "w") as f:
        json.dump(draws, f)
    save_file({k: v.contiguous() for k, v in th.state_dict()["tensors"].items()},
              os.path.join(out, f"weights-{rank}.safetensors"))


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        run(sys.argv[1], dist.get_rank(), dist.get_world_size())
    finally:
        dist.destroy_process_group()
