"""How the cost of compressing grows with depth and width (a small sweep).

For BERT encoders of several depths and widths (random weights, sequence classification,
batch 8, sequence 64, compressed to half the layers), measures:

  * wrap_s: the time `Theseus(model, ratio=0.5)` takes (plan, copies, checks, wrapping);
  * step_s at p = 0.5 and the plain fine-tuning step of the same model, alternating, median,
    and their ratio;
  * extra_mb: the memory the engine adds, counted exactly from tensors: the successor copies
    plus the AdamW state (2 tensors per trained parameter), against plain fine-tuning's
    AdamW state on every parameter.

    python benchmarks/scaling.py            # writes benchmarks/results/scaling.json
    python benchmarks/scaling.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, conditions, write_json  # noqa: E402

from theseus_general import ConstantScheduler, Theseus, count_parameters  # noqa: E402


def build(layers: int, hidden: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden, num_labels=2))


def mb(params) -> float:
    return sum(p.numel() * p.element_size() for p in params) / 2**20


def step_time(model, params, batch, warmup: int, repeats: int, after=None) -> List[float]:
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if after:
            after()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def measure(layers: int, hidden: int, batch_size: int, length: int, repeats: int) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (batch_size, length), generator=g)
    batch = {"input_ids": ids, "labels": torch.randint(0, 2, (batch_size,), generator=g)}
    plain = build(layers, hidden).train()
    model = build(layers, hidden)
    start = time.perf_counter()
    th = Theseus(model, ratio=0.5, scheduler=ConstantScheduler(0.5))
    wrap_s = time.perf_counter() - start
    th.model.train()
    trained = th.trainable_parameters()
    plain_t, theseus_t = [], []
    for _ in range(repeats):  # alternate one step each, so a slow moment hits both
        plain_t += step_time(plain, list(plain.parameters()), batch, 0, 1)
        theseus_t += step_time(th.model, trained, batch, 0, 1, th.step)
    return {
        "layers": layers, "hidden": hidden, "successor_layers": sum(th.plan.successor_depth.values()),
        "parameters": count_parameters(plain), "wrap_s": wrap_s,
        "plain_step_s": statistics.median(plain_t), "theseus_step_s": statistics.median(theseus_t),
        "step_ratio": statistics.median(theseus_t) / statistics.median(plain_t),
        "extra_mb": mb(trained) * 3,  # successor copies + AdamW's two moments
        "plain_optimizer_mb": mb(plain.parameters()) * 2,
    }


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    grid = [(2, 32), (4, 32)] if args.quick else [(l, h) for h in (128, 256) for l in (4, 8, 12)]
    batch_size, length, repeats = (2, 8, 3) if args.quick else (8, 64, 10)
    started = time.time()
    report = {"benchmark": "scaling", "quick": args.quick, "batch": batch_size, "sequence": length,
              "conditions": conditions(torch.device("cpu")), "rows": []}
    for layers, hidden in tqdm(grid, desc="scaling"):
        report["rows"].append(measure(layers, hidden, batch_size, length, repeats + (0 if args.quick else 2)))
    report["loadavg_1_5_15_at_end"] = list(os.getloadavg())
    report["total_s"] = time.time() - started
    path = args.output or os.path.join(RESULTS_DIR, "scaling_quick.json" if args.quick else "scaling.json")
    write_json(report, path)
    print(f"\nCompression cost vs size, BERT, batch {batch_size}, sequence {length}, {args.threads} thread(s), "
          f"load avg {report['conditions']['loadavg_1_5_15'][0]:.2f}")
    print(f"{'layers':>6} {'hidden':>6} {'params':>11} {'wrap s':>7} {'plain step ms':>13} {'p=0.5 step ms':>13} "
          f"{'ratio':>6} {'extra MB':>8} {'plain Adam MB':>13}")
    for r in report["rows"]:
        print(f"{r['layers']:>6} {r['hidden']:>6} {r['parameters']:>11,} {r['wrap_s']:>7.3f} {1e3 * r['plain_step_s']:>13.1f} "
              f"{1e3 * r['theseus_step_s']:>13.1f} {r['step_ratio']:>6.2f} {r['extra_mb']:>8.1f} {r['plain_optimizer_mb']:>13.1f}")
    print(f"wrote {path} ({report['total_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
