"""Train a vision predecessor until its dev accuracy stops improving, and record the curve (issue 23's rule 1).

The rule, fixed before any run: AdamW at a constant learning rate after a linear warm-up (a decaying
schedule would decide the end point in advance), dev accuracy every --eval-every steps; training stops
once the best dev accuracy is older than --patience of the steps run (no gain over the last 20%), and
not before --min-steps. The best-on-dev weights are kept and saved (safetensors), with the whole curve
and the test accuracy of those weights in the JSON. A run that reaches --max-steps or --max-seconds
first says "converged": false.

Uses quality.py's vision task (the examples' ViT / ResNet on Fashion-MNIST, split seed 0), so that
quality.py --predecessor PATH starts from the saved weights:

    python benchmarks/converge_predecessor.py --arch vit --device cuda --save-to preds/vit.safetensors
    python benchmarks/converge_predecessor.py --arch resnet --device cuda --save-to preds/resnet.safetensors
    python benchmarks/converge_predecessor.py --arch vit --quick --save-to /tmp/vit.safetensors   # seconds, CPU
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any, Dict, List

import torch
from safetensors.torch import save_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402
from _common import conditions, finish  # noqa: E402

from theseus_general.training import fit, resolve_device  # noqa: E402


class Converged(Exception):
    """Raised from the step callback to end fit() when the stopping rule holds."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--save-to", required=True, help="the best-on-dev weights (.safetensors)")
    p.add_argument("--output", default=None, help="the curve JSON (default: --save-to with .json)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--min-steps", type=int, default=3000)
    p.add_argument("--max-steps", type=int, default=40000)
    p.add_argument("--max-seconds", type=float, default=None, help="stop (not converged) after this much wall time")
    p.add_argument("--patience", type=float, default=0.2, help="stop when the best dev score is older than this share of the steps")
    p.add_argument("--warmup-steps", type=int, default=500)
    own, rest = p.parse_known_args(argv)
    args = quality.parse_args(["--task", "vision", *rest])
    if "--pretrain-lr" not in rest and not args.quick:
        args.pretrain_lr = 1e-3  # constant lr: half the examples' peak of their cosine schedule
    if args.quick:
        own.eval_every, own.min_steps, own.max_steps, own.warmup_steps = 5, 10, 60, 5
    return own, args


def main(argv=None) -> Dict[str, Any]:
    own, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    task = quality.VisionTask(args)
    device = resolve_device(args.device)
    model = task._build(args.split_seed)
    dev = [t.to(device) for t in task.data.dev]
    curve: List[Dict[str, float]] = []
    best: Dict[str, Any] = {"dev": -1.0, "step": 0, "state": None}
    stop = {"reason": "max_steps"}

    def on_step(record) -> None:
        step = record.step + 1  # steps done
        if step % own.eval_every:
            return
        score = task.vc.accuracy(model, *dev)  # the example's own evaluation (it leaves the model in eval mode)
        model.train()  # fit() set train mode once, before its first step
        curve.append({"step": step, "dev": score, "loss": float(record.loss), "seconds": time.time() - started})
        if score > best["dev"]:
            best.update(dev=score, step=step, state=copy.deepcopy(model.state_dict()))
        print(f"  step {step:>6}: dev {score:.4f} (best {best['dev']:.4f} at {best['step']})", flush=True)
        if step >= own.min_steps and step - best["step"] > own.patience * step:
            stop["reason"] = "converged"
            raise Converged
        if own.max_seconds is not None and time.time() - started > own.max_seconds:
            stop["reason"] = "max_seconds"
            raise Converged

    try:
        fit(model, task.batches(args.split_seed), own.max_steps, lr=args.pretrain_lr, weight_decay=0.05,
            lr_schedule="constant", warmup=own.warmup_steps / own.max_steps, device=device,
            mixed_precision=args.mixed_precision, on_step=on_step, desc=f"converge {args.arch}",
            progress=False)
    except Converged:
        pass
    model.load_state_dict(best["state"])
    model.to("cpu").eval()
    os.makedirs(os.path.dirname(os.path.abspath(own.save_to)), exist_ok=True)
    save_model(model, own.save_to)
    scores = task.evaluate(model)
    report = {
        "arch": args.arch, "width": args.width, "depth_pred": args.depth_pred, "lr": args.pretrain_lr,
        "batch_size": args.batch_size, "rule": {"eval_every": own.eval_every, "min_steps": own.min_steps,
                                                "patience": own.patience, "max_steps": own.max_steps,
                                                "lr_schedule": f"constant after {own.warmup_steps} warm-up steps"},
        "converged": stop["reason"] == "converged", "stopped_by": stop["reason"],
        "steps_run": curve[-1]["step"] if curve else 0, "best_step": best["step"],
        "dev": scores["dev"], "test": scores["test"], "curve": curve, "saved_to": own.save_to,
        "conditions": conditions(device),
    }
    output = own.output or os.path.splitext(own.save_to)[0] + ".json"
    finish(report, output, "converge_predecessor.py", argv, started)
    print(f"{args.arch}: {stop['reason']} after {report['steps_run']} steps; best dev {scores['dev']:.4f} at step "
          f"{best['step']}, test {scores['test']:.4f} -> {own.save_to}")
    return report


if __name__ == "__main__":
    main()
