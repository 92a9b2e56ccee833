"""Train a predecessor until its dev accuracy stops improving, and record the curve (issue 23's rule 1).

The rule, fixed before any run: AdamW at a constant learning rate after a linear warm-up (a decaying
schedule would decide the end point in advance), dev accuracy every --eval-every steps; training stops
once the best dev accuracy is older than --patience of the steps run (no gain over the last 20%), and
not before --min-steps. The best-on-dev weights are kept and saved (safetensors), with the whole curve
and the test accuracy of those weights in the JSON. A run that reaches --max-steps or --max-seconds
first says "converged": false.

Uses quality.py's tasks, so that quality.py / recipe_lr.py --predecessor PATH start from the saved weights:
the vision task (the examples' ViT / ResNet on Fashion-MNIST, split seed 0; a .safetensors file) or, with
--task text, the text task (a pretrained HF encoder fine-tuned on Rotten Tomatoes from --model; an HF
directory written by save_pretrained, safetensors inside):

    python benchmarks/converge_predecessor.py --arch vit --device cuda --save-to preds/vit.safetensors
    python benchmarks/converge_predecessor.py --arch resnet --device cuda --save-to preds/resnet.safetensors
    python benchmarks/converge_predecessor.py --arch vit --quick --save-to /tmp/vit.safetensors   # seconds, CPU
    python benchmarks/converge_predecessor.py --task text --model DIR --pretrain-lr 2e-5 --batch-size 16 \
        --max-length 32 --dev-size 500 --test-size 1500 --eval-every 100 --min-steps 1000 --warmup-steps 100 \
        --save-to preds/mpnet_converged
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
    p.add_argument("--task", choices=("vision", "text"), default="vision")
    p.add_argument("--save-to", required=True, help="the best-on-dev weights (vision: .safetensors; text: an HF directory)")
    p.add_argument("--output", default=None, help="the curve JSON (default: --save-to with .json)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--min-steps", type=int, default=3000)
    p.add_argument("--max-steps", type=int, default=40000)
    p.add_argument("--max-seconds", type=float, default=None, help="stop (not converged) after this much wall time")
    p.add_argument("--patience", type=float, default=0.2, help="stop when the best dev score is older than this share of the steps")
    p.add_argument("--warmup-steps", type=int, default=500)
    own, rest = p.parse_known_args(argv)
    if own.task == "text" and "--quick" in rest:
        p.error("--quick is the vision task's smoke run; for text give small --max-steps / --min-steps instead")
    args = quality.parse_args(["--task", own.task, *rest])
    if own.task == "text" and args.device != "cpu":
        p.error("--task text evaluates on the CPU (the text example's accuracy); drop --device")
    if own.task == "vision" and "--pretrain-lr" not in rest and not args.quick:
        args.pretrain_lr = 1e-3  # constant lr: half the examples' peak of their cosine schedule
    if args.quick:
        own.eval_every, own.min_steps, own.max_steps, own.warmup_steps = 5, 10, 60, 5
    return own, args


def main(argv=None) -> Dict[str, Any]:
    own, args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.time()
    device = resolve_device(args.device)
    if own.task == "text":
        task = quality.TextTask(args)
        torch.manual_seed(args.split_seed)  # the new classification head, as TextTask.predecessor seeds it
        model = task.auto.from_pretrained(task.model_path, num_labels=task.num_labels).to(device)
        name, weight_decay = os.path.basename(os.path.normpath(task.model_path)), 0.01  # the text example's

        def dev_accuracy() -> float:
            return task.tc.accuracy(model, task.dev)
    else:
        task = quality.VisionTask(args)
        model = task._build(args.split_seed)
        dev = [t.to(device) for t in task.data.dev]
        name, weight_decay = args.arch, 0.05

        def dev_accuracy() -> float:
            return task.vc.accuracy(model, *dev)  # the example's own evaluation
    curve: List[Dict[str, float]] = []
    best: Dict[str, Any] = {"dev": -1.0, "step": 0, "state": None}
    stop = {"reason": "max_steps"}

    def on_step(record) -> None:
        step = record.step + 1  # steps done
        if step % own.eval_every:
            return
        score = dev_accuracy()  # leaves the model in eval mode
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
        fit(model, task.batches(args.split_seed), own.max_steps, lr=args.pretrain_lr, weight_decay=weight_decay,
            lr_schedule="constant", warmup=own.warmup_steps / own.max_steps, device=device,
            mixed_precision=args.mixed_precision, on_step=on_step, desc=f"converge {name}",
            progress=False)
    except Converged:
        pass
    model.load_state_dict(best["state"])
    model.to("cpu").eval()
    if own.task == "text":
        model.save_pretrained(own.save_to)  # an HF directory (safetensors), for --predecessor
    else:
        os.makedirs(os.path.dirname(os.path.abspath(own.save_to)), exist_ok=True)
        save_model(model, own.save_to)
    scores = task.evaluate(model)
    report = {
        "task": own.task, "model": name, "arch": args.arch, "width": args.width, "depth_pred": args.depth_pred, "lr": args.pretrain_lr,
        "weight_decay": weight_decay, "batch_size": args.batch_size, "rule": {"eval_every": own.eval_every, "min_steps": own.min_steps,
                                                "patience": own.patience, "max_steps": own.max_steps,
                                                "lr_schedule": f"constant after {own.warmup_steps} warm-up steps"},
        "converged": stop["reason"] == "converged", "stopped_by": stop["reason"],
        "steps_run": curve[-1]["step"] if curve else 0, "best_step": best["step"],
        "dev": scores["dev"], "test": scores["test"], "curve": curve, "saved_to": own.save_to,
        "conditions": conditions(device),
    }
    output = own.output or os.path.splitext(os.path.normpath(own.save_to))[0] + ".json"
    finish(report, output, "converge_predecessor.py", argv, started)
    print(f"{name}: {stop['reason']} after {report['steps_run']} steps; best dev {scores['dev']:.4f} at step "
          f"{best['step']}, test {scores['test']:.4f} -> {own.save_to}")
    return report


if __name__ == "__main__":
    main()
