"""One rank of a sharded (FSDP2) run saved and resumed with torch.distributed.checkpoint (gloo, CPU).

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/_fsdp_resume_worker.py OUT_DIR [CKPT]

Without CKPT: trains STEPS steps and saves a sharded checkpoint (OUT_DIR/ckpt) after step SAVE_AT.
With CKPT: resumes from it in fresh processes and trains on to STEPS. Either way each rank writes the
engine's tensors and the optimiser's state, gathered whole, to final-<rank>.safetensors.
Seed 11 draws successors 1 and 2 for the first time after the checkpoint, so at the save they have no
AdamW state yet, and must have none after the resume. The run uses each rank's torch RNG (dropout, input noise; seeded by rank, so the ranks differ) and
Python's `random`, AdamW and an LR schedule: the continuation matches only when every one of them
and the engine's step are restored.
"""

import os
import random
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _fsdp_worker import engine_weights  # noqa: E402
from conftest import ChainModel  # noqa: E402

from theseus_general import LinearScheduler, Theseus  # noqa: E402
from theseus_general.checkpoint import load_sharded_checkpoint, save_sharded_checkpoint  # noqa: E402

STEPS, SAVE_AT, GLOBAL_BATCH = 6, 3, 8


def sharded_run(world_size: int):
    from torch.distributed.fsdp import fully_shard

    model = ChainModel(depth=6, seed=0)
    model.dropout = nn.Dropout(0.2)
    th = Theseus(model, successor_depth=3, adapter="generic", container="blocks",
                 scheduler=LinearScheduler.reaching_one_at(STEPS, base=0.3), seed=11)
    if world_size > 1:
        for group in th.groups:
            fully_shard(group)
        fully_shard(th.model)
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2)
    th.attach(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * STEPS))
    return th, opt, sched


def optimizer_state(opt: torch.optim.Optimizer) -> dict:
    """Every tensor of the optimiser's state, gathered whole (a collective under FSDP)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {f"opt.{i}.{k}": (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone().contiguous()
            for i, p in enumerate(params) for k, v in sorted(opt.state.get(p, {}).items())}


def run(out: str, rank: int = 0, world_size: int = 1, resume: str = "") -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    th, opt, sched = sharded_run(world_size)
    torch.manual_seed(100 + rank)
    random.seed(200 + rank)
    if resume:
        resumed = load_sharded_checkpoint(resume, th, opt, sched)
        assert resumed.step == SAVE_AT == resumed.data_position, resumed
    per_rank = GLOBAL_BATCH // world_size
    th.model.train()
    while th.step_count < STEPS:
        g = torch.Generator().manual_seed(th.step_count)
        x, y = torch.randn(GLOBAL_BATCH, 4, generator=g), torch.randint(0, 2, (GLOBAL_BATCH,), generator=g)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        x = x + random.uniform(0, 0.1) * torch.randn_like(x)
        loss = nn.functional.cross_entropy(th.model.dropout(th.model(x)), y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        th.step()
        if not resume and th.step_count == SAVE_AT:
            never_ran = [p for p in th.trainable_parameters() if p not in opt.state]
            assert len(never_ran) == 4, len(never_ran)  # successors 1 and 2: weight and bias each
            save_sharded_checkpoint(os.path.join(out, "ckpt"), th, opt, sched, data_position=th.step_count)
    final = {**engine_weights(th), **optimizer_state(opt)}
    save_file(final, os.path.join(out, f"final-{rank}.safetensors"))


if __name__ == "__main__":
    from _gloo import run_as_rank

    run_as_rank(run)
