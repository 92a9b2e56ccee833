"""Training-step time of a wrapped model under torch.compile against eager, and its recompiles.

Model: a tiny BERT (8 layers, hidden 32, 2 heads, intermediate 64, vocab 100; random weights),
sequence classification, batch 4, sequence 10, compressed 8 -> 4 (4 groups), constant rate
p = 0.5 so the draw pattern changes every step. One step = forward, loss, backward, AdamW step,
zero_grad, ``th.step()``. Two fresh runs from the same seed: eager, and ``torch.compile(th.model)``
(inductor by default). Reported: median and quartiles of the step time after the warm-up, the
compile (warm-up) time, the number of compiled graphs after the warm-up and at the end, and
dynamo's recompile count (it must stay 0: the dispatch between blocks runs eagerly, the blocks
are compiled once).

    python benchmarks/compile.py                     # writes benchmarks/results/compile.json
    python benchmarks/compile.py --quick             # fewer steps, the "eager" backend: seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, conditions, finish, quiet_transformers  # noqa: E402

from theseus_general import ConstantScheduler, Theseus  # noqa: E402


def build(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=8, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def batch(step: int) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"input_ids": torch.randint(1, 100, (4, 10), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}


def run(backend: Optional[str], warmup: int, steps: int) -> Dict[str, Any]:
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    th = Theseus(build(), successor_depth=4, scheduler=ConstantScheduler(0.5), seed=0)
    model = th.model if backend is None else torch.compile(th.model, backend=backend)
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-3)
    model.train()
    times: List[float] = []
    patterns = set()
    started = time.perf_counter()
    graphs_after_warmup = 0
    for i in range(warmup + steps):
        if i == warmup:
            warm_s = time.perf_counter() - started
            graphs_after_warmup = counters["stats"]["unique_graphs"]
        t = time.perf_counter()
        loss = model(**batch(i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        patterns.add(tuple(sorted(th._state.last_draws.items())))
        th.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    q = statistics.quantiles(times, n=4)
    result = {
        "backend": backend or "none (eager)", "warmup_steps": warmup, "timed_steps": steps,
        "warmup_s": warm_s, "step_s_median": statistics.median(times), "step_s_q1": q[0], "step_s_q3": q[2],
        "draw_patterns": len(patterns), "graphs_after_warmup": graphs_after_warmup,
        "graphs_at_end": counters["stats"]["unique_graphs"], "recompiles": sum(counters["recompiles"].values()),
        "final_loss": float(loss.detach()),
    }
    torch._dynamo.reset()
    return result


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 warm-up + 5 timed steps with the eager backend")
    p.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; eager with --quick)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", default=os.path.join(RESULTS_DIR, "compile.json"))
    args = p.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    quiet_transformers()
    backend = args.backend or ("eager" if args.quick else "inductor")
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    steps = args.steps if args.steps is not None else (5 if args.quick else 20)
    eager = run(None, warmup, steps)
    compiled = run(backend, warmup, steps)
    report = {"conditions": conditions(torch.device("cpu")), "eager": eager, "compiled": compiled,
              "speedup_compiled_vs_eager": eager["step_s_median"] / compiled["step_s_median"]}
    for name, r in (("eager", eager), ("compiled", compiled)):
        print(f"{name:9s} {r['backend']:14s} step {1000 * r['step_s_median']:.1f} ms "
              f"[{1000 * r['step_s_q1']:.1f}, {1000 * r['step_s_q3']:.1f}]  warm-up {r['warmup_s']:.1f} s  "
              f"graphs {r['graphs_after_warmup']} -> {r['graphs_at_end']}  recompiles {r['recompiles']}  "
              f"draw patterns {r['draw_patterns']}")
    return finish(report, args.output, "compile.py", argv, started)


if __name__ == "__main__":
    main()
