"""Which groups should a budget plan use? A quick check on a tiny trained model.

A residual MLP chain (8 blocks) is trained on a synthetic 4-class task, then compressed to
4 blocks three ways, each trained with the same Theseus run (constant p=0.5 then 1, AdamW):

  * ``kept``: the budget planner's groups (one group around each of the 4 most important
    blocks by 1 - cos(input, output); the successor starts as that block);
  * ``even-first``: even splits [0-1][2-3][4-5][6-7], successor i = block i (the paper's init);
  * ``even-group_first``: even splits, successor = the group's first block.

Reported: test accuracy of the export right after planning (no training) and after the run.

    python benchmarks/budget_grouping.py            # 3 seeds, ~1 minute on one CPU thread
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, conditions, finish  # noqa: E402

from theseus_general import ConstantScheduler, Theseus, fit  # noqa: E402


class Residual(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def model(depth: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.Sequential(*[Residual(64, 128) for _ in range(depth)]), nn.Linear(64, 4))


def data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    teacher = [torch.randn(16, 48, generator=g), torch.randn(48, 4, generator=g)]
    x = torch.randn(n, 16, generator=g)
    y = (torch.tanh(x @ teacher[0]) @ teacher[1]).argmax(1)
    return x, y


def accuracy(m: nn.Module, x, y) -> float:
    m.eval()
    with torch.no_grad():
        return float((m(x).argmax(1) == y).float().mean())


def train(target, x, y, steps: int, lr: float = 3e-3) -> None:
    """`fit` on a model or an engine: AdamW at a constant lr, batches of 128 drawn from one seeded stream
    (the same batches for every variant), no module matching (these runs compare groupings alone)."""
    g = torch.Generator().manual_seed(1)

    def batches():
        for _ in range(steps):
            idx = torch.randint(0, len(x), (128,), generator=g)
            yield x[idx], y[idx]

    fit(target, batches(), steps, lr=lr, lr_schedule="constant", weight_decay=0.01, device="cpu", progress=False,
        **({"match_steps": 0} if isinstance(target, Theseus) else {}))


def run(seed: int, pre_steps: int, steps: int) -> dict:
    x, y = data(seed, 21000)
    (xt, yt), (xs, ys) = (x[:20000], y[:20000]), (x[20000:], y[20000:])
    torch.manual_seed(seed)
    predecessor = model()
    train(predecessor, xt, yt, pre_steps)
    out = {"predecessor": accuracy(predecessor, xs, ys)}
    variants = {
        "kept": dict(target_flops=0.55, sample=xt[:256]),
        "even-first": dict(successor_depth=4, init="first", sample=xt[:256]),
        "even-group_first": dict(successor_depth=4, init="group_first", sample=xt[:256]),
    }
    for name, kwargs in variants.items():
        th = Theseus(predecessor, adapter="generic", container="1", scheduler=ConstantScheduler(0.5, replace_all_at=steps // 2),
                     seed=seed, **kwargs)
        assert th.plan.successor_depth == {"1": 4}, th.plan
        at_start = accuracy(th.export(), xs, ys)
        train(th, xt, yt, steps)
        out[name] = {"at_start": at_start, "after": accuracy(th.export(), xs, ys),
                     "groups": [list(g.blocks) for g in th.plan.groups], "sources": [g.successor for g in th.plan.groups]}
        th.unwrap()
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pre-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output", default=os.path.join(RESULTS_DIR, "budget_grouping.json"))
    args = parser.parse_args(argv)
    started = time.time()
    torch.set_num_threads(1)
    report = {"conditions": conditions(torch.device("cpu")), "runs": []}
    for seed in range(args.seeds):
        result = run(seed, args.pre_steps, args.steps)
        report["runs"].append(result)
        print(f"seed {seed}: predecessor {result['predecessor']:.3f}; " + "; ".join(
            f"{k} {v['at_start']:.3f} -> {v['after']:.3f}" for k, v in result.items() if isinstance(v, dict)))
    names = [k for k, v in report["runs"][0].items() if isinstance(v, dict)]
    report["mean"] = {k: {s: sum(r[k][s] for r in report["runs"]) / len(report["runs"]) for s in ("at_start", "after")}
                      for k in names}
    for k, v in report["mean"].items():
        print(f"mean {k:18s} at start {v['at_start']:.3f}  after {v['after']:.3f}")
    return finish(report, args.output, "budget_grouping.py", argv, started)


if __name__ == "__main__":
    main()
