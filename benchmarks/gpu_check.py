"""The GPU check: a BERT-base 12 -> 6 Theseus run on CUDA, bf16 autocast, eager and compiled.

One script for a lent GPU machine, about 6 minutes on one H200 (random init, no
downloads: ``BertConfig()`` defaults, 12 layers, hidden 768, sequence 128):

  * training step time (median after warm-up) of plain fine-tuning and of a
    Theseus run (``ConstantScheduler(0.5)``: both kinds of draw every step), each
    eager and ``torch.compile``d (inductor), under ``torch.autocast("cuda", bfloat16)``;
    for compiled runs, the graphs dynamo compiled during warm-up and after it;
  * the exported successor's inference speed-up over the predecessor at batch 1,
    8 and 64 (``measure_latency``, bf16 weights, inference mode), and its FLOPs ratio
    (``count_flops``);
  * DeepSpeed ZeRO-2 and ZeRO-3 runs of the same model through TheseusTrainer, each
    exported with ``trainer.export()`` and compared with the unsharded export of the same
    weights (``benchmarks/deepspeed_check.py``, in its own process; "deepspeed" in the JSON;
    ``--no-deepspeed`` skips it).

A compiled run gets a wall-clock budget (``--compile-budget``): when compiling
keeps going (a recompile every step) it stops there and the JSON says so.

    python benchmarks/gpu_check.py                       # CUDA; writes benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --toy --backend eager # tiny config on the CPU, seconds (the test suite)

Without CUDA and without --toy it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, conditions, finish, quiet_transformers  # noqa: E402
from _training import batch_maker, plain_and_theseus_runs  # noqa: E402

from theseus_general.measure import count_flops, count_parameters, measure_latency  # noqa: E402

INFERENCE_BATCHES = (1, 8, 64)


def bert_config(toy: bool):
    from transformers import BertConfig

    if toy:
        return BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                          intermediate_size=128, max_position_embeddings=64)
    return BertConfig()  # BERT-base: 12 layers, hidden 768, 12 heads, intermediate 3072


def build(config, device: torch.device) -> nn.Module:
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(config).to(device)


def deepspeed_runs(toy: bool) -> Dict[str, Any]:
    """benchmarks/deepspeed_check.py in its own process (DeepSpeed's process group and Accelerate's
    process-wide state stay out of this one): its report, or why there is none."""
    if importlib.util.find_spec("deepspeed") is None:
        return {"skipped": "deepspeed is not installed (pip install deepspeed, or the project's [deepspeed] extra)"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deepspeed_check.py")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "deepspeed_check.json")
        env = dict(os.environ, **({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""} if toy else {}))
        if "MASTER_PORT" not in env:  # its one-process group: a port nothing else holds
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                env["MASTER_PORT"] = str(s.getsockname()[1])
        command = [sys.executable, script, *(["--toy"] if toy else []), "--output", path]
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
        if done.returncode != 0 or not os.path.exists(path):
            return {"error": f"deepspeed_check.py exited with status {done.returncode}", "output_tail": done.stdout[-4000:]}
        with open(path) as f:
            return json.load(f)


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="tiny BERT on the CPU, a few steps (seconds)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 32; toy 4)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 128; toy 16)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; toy 1)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 20; toy 2)")
    parser.add_argument("--compile-budget", type=float, default=90.0, help="seconds per compiled training run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (toy default 1)")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed ZeRO-2/3 runs")
    parser.add_argument("--output", default=os.path.join(RESULTS_DIR, "gpu_check.json"))
    args = parser.parse_args(argv)
    started = time.time()

    if not args.toy and not torch.cuda.is_available():
        print("error: gpu_check.py needs a CUDA device (torch sees none). Run it on the GPU machine, "
              "or pass --toy for the tiny CPU run.", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cpu" if args.toy else "cuda")
    if args.threads or args.toy:
        torch.set_num_threads(args.threads or 1)
    batch = args.batch or (4 if args.toy else 32)
    seq = args.seq or (16 if args.toy else 128)
    warmup = args.warmup if args.warmup is not None else (1 if args.toy else 5)
    steps = args.steps or (2 if args.toy else 20)
    quiet_transformers()
    config = bert_config(args.toy)
    depth = config.num_hidden_layers // 2
    make_batch = batch_maker(batch, seq, config.vocab_size, device)
    report: Dict[str, Any] = {
        "conditions": conditions(device),
        "setup": {"model": "BertForSequenceClassification(BertConfig(...)) random init", "layers": config.num_hidden_layers,
                  "hidden": config.hidden_size, "successor_depth": depth, "batch": batch, "seq": seq, "warmup": warmup,
                  "steps": steps, "autocast": "bfloat16", "backend": args.backend, "scheduler": "ConstantScheduler(0.5)",
                  "optimizer": "AdamW(lr=1e-5)"},
    }
    print(f"training: batch {batch} x {seq}, bf16 autocast, {warmup} warm-up + {steps} measured steps on {device}")

    # plain fine-tuning of the whole model (the cost Theseus is compared with), then the Theseus run
    training, th = plain_and_theseus_runs(lambda: build(config, device), depth, make_batch, device, warmup, steps,
                                          args.backend, args.compile_budget, autocast=True)
    model = th.model  # the predecessor, wrapped (the same object unwrap() gives back)
    plain_step = training["plain_eager"].get("step_s")
    for name, result in training.items():
        if plain_step and result.get("step_s"):
            result["vs_plain_eager"] = result["step_s"] / plain_step
    report["training"] = training
    torch._dynamo.reset()

    # export the successor, restore the predecessor, compare inference
    successor = th.export()
    th.unwrap()
    report["export"] = {"type": type(successor).__name__, "layers": successor.config.num_hidden_layers,
                        "dtype": str(next(successor.parameters()).dtype),
                        "predecessor_params": count_parameters(model), "successor_params": count_parameters(successor)}
    inference_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model.to(inference_dtype).eval()
    successor.to(inference_dtype).eval()
    rows = []
    for b in INFERENCE_BATCHES:
        sample = {k: v for k, v in batch_maker(b, seq, config.vocab_size, device)(0).items() if k != "labels"}
        latency = measure_latency({"predecessor": model, "successor": successor}, sample,
                                  warmup=1 if args.toy else 3, repeats=3 if args.toy else 20)
        rows.append({"batch": b, "predecessor_s": latency["predecessor"], "successor_s": latency["successor"],
                     "speedup": latency["predecessor"] / latency["successor"]})
        print(f"  inference batch {b:>2}: {latency['predecessor'] * 1e3:.2f} ms -> {latency['successor'] * 1e3:.2f} ms "
              f"({rows[-1]['speedup']:.2f}x)", flush=True)
    sample = {k: v for k, v in batch_maker(1, seq, config.vocab_size, device)(0).items() if k != "labels"}
    with torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext():
        flops = {"predecessor": count_flops(model, sample), "successor": count_flops(successor, sample)}
    report["inference"] = {"dtype": str(inference_dtype), "seq": seq, "rows": rows, "flops_batch1": flops,
                           "flops_ratio": flops["predecessor"] / flops["successor"]}
    if not args.no_deepspeed:
        print("DeepSpeed ZeRO-2 and ZeRO-3 through TheseusTrainer (benchmarks/deepspeed_check.py):", flush=True)
        report["deepspeed"] = deepspeed_runs(args.toy)
        for name, stage in report["deepspeed"].get("stages", {}).items():
            print(f"  {name}: " + (stage["error"] if "error" in stage else
                  f"{stage['step_s'] * 1e3:.1f} ms/step, export equal to the unsharded one: "
                  f"{stage['export']['equals_unsharded_export']}"), flush=True)
        if "stages" not in report["deepspeed"]:
            print(f"  {report['deepspeed']}", flush=True)
    finish(report, args.output, "gpu_check.py", argv, started)
    print(f"wrote {args.output} ({report['total_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
