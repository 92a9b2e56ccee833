"""Train a predecessor until its dev accuracy stops improving, and record the curve (issue 23's rule 1).

The rule, fixed before any run: AdamW at a constant learning rate after a linear warm-up (a decaying
schedule would decide the end point in advance; --lr-plateau cuts it only when dev stops improving), dev
accuracy every --eval-every steps; training stops once the best dev accuracy is older than --patience of
the steps run (no gain over the last 20%), and not before --min-steps. The best-on-dev weights are kept and
saved (safetensors), with the whole curve and the test accuracy of those weights in the JSON. A run that
reaches --max-steps or --max-seconds first says "converged": false.

With --lr-plateau STEPS the learning rate is cut (x --lr-plateau-factor) at an evaluation when neither a new
best dev score nor a cut has come in the last STEPS steps (torch's ReduceLROnPlateau, counted in steps); the
stopping rule is the same. With --checkpoints DIR the run saves its weights, optimiser, lr schedule and data
position at every evaluation (with the curve and the best weights so far), and the same command run again
goes on from there: a run too long for one sitting converges over several, each with its own --max-seconds.
A later sitting may raise --max-steps or turn on --lr-plateau (the lr is constant until a cut, so the steps
already run are the same either way); each change starts a phase, recorded with the step it starts from.

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
import json
import os
import sys
import time
from typing import Any, Dict, List

import torch
from safetensors.torch import load_model, save_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402
from _common import conditions, finish  # noqa: E402

from theseus_general.checkpoint import CheckpointManager  # noqa: E402
from theseus_general.training import fit, resolve_device  # noqa: E402


class Converged(Exception):
    """Raised from the step callback to end fit() when the stopping rule holds."""


class Plateau:
    """The learning-rate multiplier of --lr-plateau, read by fit() once per step: cut by `factor` at an evaluation
    when neither a new best dev score nor a cut has come in the last `patience` steps; 1 without `patience`."""

    def __init__(self, patience, factor: float, cuts=None):
        self.patience, self.factor = patience, factor
        self.cuts: List[List[float]] = list(cuts or [])  # [step, multiplier from then on]: all the state there is

    @property
    def scale(self) -> float:
        return self.cuts[-1][1] if self.cuts else 1.0

    @property
    def last_cut(self) -> int:
        return self.cuts[-1][0] if self.cuts else 0

    def __call__(self, step: int) -> float:
        return self.scale

    def update(self, step: int, best_step: int) -> None:
        if self.patience is not None and step - max(best_step, self.last_cut) >= self.patience:
            self.cuts.append([step, self.scale * self.factor])

    def state(self) -> Dict[str, Any]:
        return {"scale": self.scale, "last_cut": self.last_cut, "cuts": self.cuts}


class Sittings:
    """What a run in several sittings keeps beside fit()'s checkpoints (--checkpoints DIR): the dev curve, the
    best weights so far and each sitting's seconds, written at every evaluation, right after fit()'s own save."""

    def __init__(self, root: str, model: torch.nn.Module, settings: Dict[str, Any]):
        self.root, self.model, self.settings = root, model, settings
        self.curve_path, self.best_path = os.path.join(root, "curve.json"), os.path.join(root, "best.safetensors")
        self.sittings: List[float] = []
        self.phases: List[Dict[str, Any]] = [{"from_step": 0, **_phase(settings)}]
        self.cuts: List[List[float]] = []  # the saved Plateau's cuts

    def restore(self):
        """(curve, best, seconds spent) as the latest checkpoint left them; nothing when there is none."""
        at = CheckpointManager(self.root).latest_step()  # fit() goes on from here
        if at is None or not os.path.exists(self.curve_path):
            return [], {"dev": -1.0, "step": 0, "state": None}, 0.0
        with open(self.curve_path) as f:
            saved = json.load(f)
        changed = sorted(k for k in set(saved["settings"]) | set(self.settings)
                         if k not in _PER_PHASE and saved["settings"].get(k) != self.settings.get(k))
        if changed:
            raise SystemExit(f"{self.root} holds a run with other settings ({', '.join(changed)}): run the same command "
                             f"again to go on with it, or give a new --checkpoints directory")
        curve = [point for point in saved["curve"] if point["step"] <= at]
        self.sittings = saved["sittings"]
        self.phases = saved.get("phases") or [{"from_step": 0, **_phase(saved["settings"])}]
        if _phase(self.settings) != {k: v for k, v in self.phases[-1].items() if k != "from_step"}:
            self.phases.append({"from_step": at, **_phase(self.settings)})
        self.cuts = saved.get("plateau", {}).get("cuts", [])
        holder = copy.deepcopy(self.model)  # the best weights, loaded beside the model fit() resumes
        load_model(holder, self.best_path)
        best = {"dev": saved["best"]["dev"], "step": saved["best"]["step"], "state": holder.state_dict()}
        return curve, best, sum(self.sittings)

    def record(self, curve, best, seconds: float, new_best: bool, plateau: Plateau) -> None:
        if new_best:  # the model holds the best weights right now
            tmp = self.best_path + ".tmp"
            save_model(self.model, tmp)
            os.replace(tmp, self.best_path)
        state = {"settings": self.settings, "curve": curve, "best": {"dev": best["dev"], "step": best["step"]},
                 "sittings": self.sittings + [round(seconds, 1)], "phases": self.phases, "plateau": plateau.state()}
        with open(self.curve_path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(self.curve_path + ".tmp", self.curve_path)


# what may change between sittings of one run: where things go, the cap, the hardware
_PER_SITTING = {"save_to", "output", "checkpoints", "max_seconds", "threads", "device", "data_dir", "sharing"}
# what a later sitting may change for the rest of the run (the steps run so far are the same either way)
_PER_PHASE = ("max_steps", "lr_plateau", "lr_plateau_factor")


def _phase(settings: Dict[str, Any]) -> Dict[str, Any]:
    return {k: settings.get(k) for k in _PER_PHASE}


def run_settings(own: argparse.Namespace, args: argparse.Namespace) -> Dict[str, Any]:
    """The settings a later sitting must share with the first (the rule, the task, the model, the optimiser)."""
    merged = {**vars(args), **vars(own)}
    return json.loads(json.dumps({k: v for k, v in merged.items() if k not in _PER_SITTING}, default=str))


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
    p.add_argument("--lr-plateau", type=int, default=None, metavar="STEPS",
                   help="cut the lr when neither a new best dev score nor a cut has come in this many steps "
                        "(default: constant lr)")
    p.add_argument("--lr-plateau-factor", type=float, default=0.5, help="the cut's multiplier")
    p.add_argument("--checkpoints", default=None,
                   help="a directory: save the run at every evaluation and go on from its latest save when run again")
    own, rest = p.parse_known_args(argv)
    if own.task == "text" and "--quick" in rest:
        p.error("--quick is the vision task's smoke run; for text give small --max-steps / --min-steps instead")
    args = quality.parse_args(["--task", own.task, *rest])
    if own.task == "text" and args.device != "cpu":
        p.error("--task text evaluates on the CPU (the text example's accuracy); drop --device")
    if own.task == "vision" and "--pretrain-lr" not in rest and not args.quick:
        args.pretrain_lr = 1e-3  # constant lr: half the examples' peak of their cosine schedule
    if own.lr_plateau is not None and (own.lr_plateau < 1 or not 0 < own.lr_plateau_factor < 1):
        p.error("--lr-plateau takes a number of steps >= 1 and --lr-plateau-factor a number between 0 and 1, "
                f"got {own.lr_plateau} and {own.lr_plateau_factor}")
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
    sitting_started = started
    earlier = Sittings(own.checkpoints, model, run_settings(own, args)) if own.checkpoints else None
    cuts: List[List[float]] = []
    if earlier is not None:
        curve, best, spent = earlier.restore()
        cuts = earlier.cuts
        started -= spent  # the curve's seconds and total_s count every sitting; --max-seconds this one only
        print(f"going on from step {curve[-1]['step'] if curve else 0} ({len(earlier.sittings)} earlier sittings)")
    # the cuts so far go on with the run while --lr-plateau is on
    plateau = Plateau(own.lr_plateau, own.lr_plateau_factor, cuts if own.lr_plateau is not None else None)

    def should_stop(step: int) -> bool:
        return step >= own.min_steps and step - best["step"] > own.patience * step

    def on_step(record) -> None:
        step = record.step + 1  # steps done
        if step % own.eval_every:
            return
        score = dev_accuracy()  # leaves the model in eval mode
        model.train()  # fit() set train mode once, before its first step
        curve.append({"step": step, "dev": score, "loss": float(record.loss), "seconds": time.time() - started})
        if score > best["dev"]:
            best.update(dev=score, step=step, state=copy.deepcopy(model.state_dict()))
        plateau.update(step, best["step"])  # the next steps' lr (the one after this step was set already)
        curve[-1]["lr_multiplier"] = plateau.scale
        if earlier is not None:  # fit() has just saved this step's checkpoint
            earlier.record(curve, best, time.time() - sitting_started, new_best=best["step"] == step, plateau=plateau)
        print(f"  step {step:>6}: dev {score:.4f} (best {best['dev']:.4f} at {best['step']}; lr x{plateau.scale:g})",
              flush=True)
        if should_stop(step):
            stop["reason"] = "converged"
            raise Converged
        if own.max_seconds is not None and time.time() - sitting_started > own.max_seconds:
            stop["reason"] = "max_seconds"
            raise Converged

    if curve and should_stop(curve[-1]["step"]):
        stop["reason"] = "converged"  # an earlier sitting ended it: report again, train no further
    else:
        try:
            fit(model, task.batches(args.split_seed), own.max_steps, lr=args.pretrain_lr, weight_decay=weight_decay,
                lr_schedule=plateau if own.lr_plateau is not None else "constant",
                warmup=own.warmup_steps / own.max_steps, device=device,
                mixed_precision=args.mixed_precision, on_step=on_step, desc=f"converge {name}",
                checkpoints=own.checkpoints, checkpoint_every=own.eval_every if own.checkpoints else 0,
                progress=False)
        except Converged:
            pass
    if best["state"] is None:
        raise SystemExit("no evaluation was reached: give --max-steps at least --eval-every")
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
                                                "lr_schedule": f"constant after {own.warmup_steps} warm-up steps",
                                                "lr_plateau": own.lr_plateau,
                                                "lr_plateau_factor": own.lr_plateau_factor},
        "lr_cuts": plateau.cuts, "phases": earlier.phases if earlier is not None else [],
        "converged": stop["reason"] == "converged", "stopped_by": stop["reason"],
        "steps_run": curve[-1]["step"] if curve else 0, "best_step": best["step"],
        "dev": scores["dev"], "test": scores["test"], "curve": curve, "saved_to": own.save_to,
        "sittings": (earlier.sittings if earlier is not None else []) + [round(time.time() - sitting_started, 1)],
        "conditions": conditions(device),
    }
    output = own.output or os.path.splitext(os.path.normpath(own.save_to))[0] + ".json"
    finish(report, output, "converge_predecessor.py", argv, started)
    print(f"{name}: {stop['reason']} after {report['steps_run']} steps; best dev {scores['dev']:.4f} at step "
          f"{best['step']}, test {scores['test']:.4f} -> {own.save_to}")
    return report


if __name__ == "__main__":
    main()
