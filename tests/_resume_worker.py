"""A tiny Theseus run that checkpoints every step; tests kill it and resume it.

    python tests/_resume_worker.py --steps 30 --ckpt DIR --result OUT.safetensors [--delay 0.05]

It resumes from DIR's latest checkpoint when there is one. It uses the global torch
RNG (input noise, dropout) and Python's `random`, so a resume is bit-identical only
when every RNG, the data position and the optimiser/LR state are restored.
"""

import argparse
import os
import random
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ChainModel  # noqa: E402

from theseus_general import LinearScheduler, Theseus  # noqa: E402
from theseus_general.checkpoint import CheckpointManager  # noqa: E402


def batches_of_epoch(data, epoch, batch_size=8):
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1000 + epoch))
    return [order[i:i + batch_size] for i in range(0, len(data), batch_size)]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--delay", type=float, default=0.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    model = ChainModel(depth=6, seed=0)
    model.dropout = nn.Dropout(0.1)
    th = Theseus(model, successor_depth=3, adapter="generic", container="blocks",
                 scheduler=LinearScheduler.reaching_one_at(args.steps // 2, base=0.3), train_rest=True, seed=7)
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / (2 * args.steps))
    ckpt = CheckpointManager(args.ckpt, keep=2)
    resumed = ckpt.resume(th, opt, sched)
    position = resumed.data_position if resumed else 0
    if resumed is None:  # a resume restores both RNGs from the checkpoint
        torch.manual_seed(0)
        random.seed(0)

    data = torch.randn(40, 4, generator=torch.Generator().manual_seed(3))
    target = (data.sum(1) > 0).long()
    per_epoch = len(batches_of_epoch(data, 0))
    th.model.train()
    while th.step_count < args.steps:
        idx = batches_of_epoch(data, position // per_epoch)[position % per_epoch]
        x = data[idx] + random.uniform(0, 0.1) * torch.randn(len(idx), 4)  # both RNGs in play
        logits = th.model(x)
        loss = nn.functional.cross_entropy(model.dropout(logits), target[idx])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        th.step()
        position += 1
        ckpt.save(th, opt, sched, data_position=position)
        if argv is None:
            print(f"saved {th.step_count}", flush=True)
        time.sleep(args.delay)

    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in th.state_dict()["tensors"].items()}, args.result)


if __name__ == "__main__":
    main()
