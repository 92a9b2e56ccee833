"""Training step time of a Theseus run, compiled against eager, on the CPU.

A small random BERT (8 layers -> 4: a plan of 4 groups), ``ConstantScheduler(0.5)``
so that every step mixes predecessor and successor draws, AdamW, float32.
Each variant runs warm-up steps, then measured steps; the step time is the median
of the measured ones. For the compiled run the JSON also records what dynamo did:
graphs compiled during warm-up and after it (each one past the first is a
recompile), frames it gave up on, and whether it hit the recompile limit (then
it silently runs those frames eagerly, and its fast steps are not compiled ones).
Plain fine-tuning of the same model, eager and compiled, is the reference.

    python benchmarks/compile.py                       # inductor; writes benchmarks/results/compile.json
    python benchmarks/compile.py --quick               # tiny BERT, few steps
    python benchmarks/compile.py --quick --backend eager   # the test suite: dynamo only, no code generation

Inductor on the CPU needs a C++ compiler and takes minutes to compile on a small
machine; ``--backend aot_eager`` checks the autograd tracing without it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, conditions, finish, quiet_transformers  # noqa: E402
from _training import batch_maker, plain_and_theseus_runs  # noqa: E402



def bert(quick: bool):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    if quick:
        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=8, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=32)
    else:
        config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=8, num_attention_heads=2,
                            intermediate_size=512, max_position_embeddings=64)
    return BertForSequenceClassification(config)


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny BERT, 2 warm-up + 3 measured steps")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 12: past dynamo's recompile limit of 8)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 20)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=900.0, help="seconds per compiled run before it stops")
    parser.add_argument("--output", default=os.path.join(RESULTS_DIR, "compile.json"))
    args = parser.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    quiet_transformers()
    device = torch.device("cpu")
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 12)
    steps = args.steps or (3 if args.quick else 20)
    batch, seq = (4, 8) if args.quick else (8, 32)

    make_batch = batch_maker(batch, seq, 100 if args.quick else 1000, device)
    report: Dict[str, Any] = {
        "conditions": conditions(device),
        "setup": {"model": "BertForSequenceClassification, random init", "layers": 8, "successor_depth": 4,
                  "batch": batch, "seq": seq, "warmup": warmup, "steps": steps, "backend": args.backend,
                  "scheduler": "ConstantScheduler(0.5)", "dtype": "float32"},
    }
    print(f"CPU, {args.threads} thread(s), backend {args.backend}: {warmup} warm-up + {steps} measured steps")
    runs, th = plain_and_theseus_runs(lambda: bert(args.quick), 4, make_batch, device, warmup, steps, args.backend,
                                      args.budget, autocast=False)
    torch._dynamo.reset()
    th.unwrap()
    for eager, compiled_run in (("plain_eager", "plain_compiled"), ("theseus_eager", "theseus_compiled")):
        e, c = runs[eager].get("step_s"), runs[compiled_run].get("step_s")
        if e and c:
            runs[compiled_run]["speedup_vs_eager"] = e / c
    report["runs"] = runs
    finish(report, args.output, "compile.py", argv, started)
    print(f"wrote {args.output} ({report['total_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
