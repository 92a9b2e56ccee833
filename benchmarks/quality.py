"""Quality side by side over seeds: Theseus against the built-in baselines, same step budget.

Methods (each trains a successor of the same shape for --steps optimiser steps in the same loop,
`theseus_general.training.fit`: AdamW, linear decay, the same batches per seed):

  theseus               the library's default, as `Theseus(model, ...)` + `fit` give it: the family's
                        recipe (theseus_general/recipes.py; "resnet" for ResNets, else "default");
                        --match-fraction / --match-lr / --init / --choose-start / --train-rest
                        override parts
  theseus_kd            the default recipe with a distillation term against a frozen copy of the
                        predecessor's logits (--temperature, --alpha; --kd-grid chooses them as for kd)
  theseus_paper         the paper's recipe: embeddings and head frozen, task loss only, linear curriculum
                        from --base-rate to p = 1 at --replace-by of the steps (the paper's fixed slope,
                        p = 0.3 + 6e-4 t, would not reach 1 within these budgets)
  theseus_linear        the former default (rest trained on copies, linear curriculum, no matching)
  theseus_constant      the same with a constant p = --constant-rate until --replace-by, then 1
  finetune_trained      fine-tune-only, initialised from the trained predecessor's blocks (a)
  finetune_initial      fine-tune-only, initialised from the model before task training (b):
                        the pretrained model (text) or a fresh random model (vision)
  kd                    vanilla distillation from the frozen predecessor (--temperature, --alpha)

--lr-grid (and --kd-grid for KD's temperature and alpha) chooses each method's settings on the
dev split with the first seed, the same grid for every method; the other seeds run the chosen
settings, and test accuracy is reported for those only. The JSON records the grid, every grid
run and the choices.
Tasks reuse the examples' data, models and per-family settings: text = all-MiniLM-L6-v2 on
Rotten Tomatoes, 6 -> --depth layers (examples/text_classification.py); vision = a timm ViT
(8 blocks) or ResNet ([2, 2, 2, 2]) on Fashion-MNIST, --ratio of the blocks
(examples/vision_classification.py). The predecessor is trained once (or loaded with
--predecessor); seeds change the batch order, the replacement draws and new heads.

    python benchmarks/quality.py --task text --predecessor DIR --depth 3   # results/quality_text_d3.json
    python benchmarks/quality.py --task vision --arch vit --ratio 0.25     # results/quality_vit_r0.25.json
    python benchmarks/quality.py --task vision --arch resnet               # results/quality_resnet_r0.5.json
    python benchmarks/quality.py --quick                                   # tiny ViT on a Fashion-MNIST subset, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from safetensors.torch import load_model, save_model
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (REPO_ROOT, RESULTS_DIR, conditions, finish, load_part, quiet_transformers, seed_run,  # noqa: E402
                     write_json)
from report_quality import describe_interval, paired_report  # noqa: E402

sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))

from theseus_general import ConstantScheduler, LinearScheduler, Theseus  # noqa: E402
from theseus_general.baselines import DistillationStep, successor_shaped_copy  # noqa: E402
from theseus_general.errors import ExportError  # noqa: E402
from theseus_general.training import add_device_arguments, fit, resolve_device  # noqa: E402

METHODS = ("theseus", "theseus_kd", "theseus_paper", "theseus_linear", "theseus_constant", "finetune_trained", "finetune_initial", "kd")
DEFAULT_METHODS = ("theseus", "theseus_paper", "finetune_trained", "finetune_initial", "kd")
# the settings the dev grid (--lr-grid, --kd-grid) chooses per method
GRID_KEYS = ("lr", "temperature", "alpha")
KD_METHODS = ("kd", "theseus_kd")  # the methods with a distillation term: --kd-grid applies to them


# ---------------------------------------------------------------- tasks
class Task:
    """What a method needs: the trained predecessor, the pre-task model, batches, evaluation."""

    name: str
    target: Dict[str, Any]  # Theseus(...) depth arguments

    def predecessor(self) -> nn.Module:
        raise NotImplementedError

    def initial(self, seed: int) -> nn.Module:
        raise NotImplementedError

    def batches(self, seed: int) -> Iterator[Tuple[Any, torch.Tensor]]:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        raise NotImplementedError


class TextTask(Task):
    name = "text"

    def __init__(self, args: argparse.Namespace):
        import text_classification as tc
        from text_data import load_splits
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tc, self.auto, self.args = tc, AutoModelForSequenceClassification, args
        self.model_path = str(args.model or tc.default_model_path())
        splits = load_splits(None, "text", "label", args.test_size, args.dev_size, args.split_seed)
        tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.train, self.dev, self.test = (tc.Encoded(tokenizer, *s, args.max_length)
                                           for s in (splits.train, splits.dev, splits.test))
        self.num_labels = len(splits.label_names)
        self.source = splits.source
        self.target = budget_target(args) or {"successor_depth": args.depth}

    def predecessor(self) -> nn.Module:
        if self.args.predecessor:
            return self.auto.from_pretrained(self.args.predecessor)
        torch.manual_seed(self.args.split_seed)
        model = self.auto.from_pretrained(self.model_path, num_labels=self.num_labels)
        self.tc.train(model, self.train, self.args.pretrain_steps, self.args.pretrain_lr, self.args.split_seed,
                      "fine-tune predecessor", self.args, warmup=0.1)
        if self.args.save_predecessor:  # an HF directory, for --predecessor in the next runs
            model.save_pretrained(self.args.save_predecessor)
        return model

    def initial(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)  # the new classification head
        return self.auto.from_pretrained(self.model_path, num_labels=self.num_labels)

    def batches(self, seed: int):
        return self.train.training_batches(self.args.batch_size, seed)

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        return {"dev": self.tc.accuracy(model, self.dev), "test": self.tc.accuracy(model, self.test)}


def budget_target(args: argparse.Namespace) -> Dict[str, Any]:
    """The budget planner's arguments (--target-speedup, --successor-width), or {} for a plain depth."""
    target: Dict[str, Any] = {}
    if args.target_speedup is not None:
        target["target_speedup"] = args.target_speedup
    if args.successor_width is not None:
        target["successor_width"] = "auto" if args.successor_width == "auto" else float(args.successor_width)
    return target


class VisionTask(Task):
    def __init__(self, args: argparse.Namespace):
        import vision_classification as vc
        from image_data import load_fashion_mnist

        self.vc, self.args, self.name = vc, args, args.arch
        self.data = load_fashion_mnist(args.data_dir, args.dev_size, args.split_seed, args.train_limit)
        self.source = f"Fashion-MNIST from {self.data.source}"
        self.target = budget_target(args) or {"ratio": args.ratio}

    def _build(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        if self.args.arch == "resnet":
            return self.vc.build_resnet(self.args.width, [self.args.depth_pred] * 4)
        return self.vc.build_vit(self.args.width, self.args.depth_pred)

    def predecessor(self) -> nn.Module:
        model = self._build(self.args.split_seed)
        if self.args.predecessor:
            load_model(model, self.args.predecessor)  # safetensors (the vision example saves one): no unpickling
            return model
        self.vc.train(model, self.data.train, self.args.pretrain_steps, self.args.pretrain_lr, self.args.split_seed,
                      "train predecessor", self.args, warmup=0.05)
        if self.args.save_predecessor:  # so a second depth can reuse it with --predecessor
            save_model(model, self.args.save_predecessor)
        return model

    def initial(self, seed: int) -> nn.Module:
        return self._build(1000 + seed)  # a fresh random model: what the predecessor was before training

    def batches(self, seed: int):
        return self.vc.batches(*self.data.train, self.args.batch_size, seed)

    def evaluate(self, model: nn.Module) -> Dict[str, float]:
        n = self.args.eval_limit  # None: the whole split
        return {"dev": self.vc.accuracy(model, *(t[:n] for t in self.data.dev)),
                "test": self.vc.accuracy(model, *(t[:n] for t in self.data.test))}


# ---------------------------------------------------------------- methods
def run_method(method: str, task: Task, predecessor: nn.Module, seed: int, args: argparse.Namespace,
               notes: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Train `method`'s successor and return it; `notes` receives what the run chose (Theseus's recipe and
    start blocks)."""
    notes = {} if notes is None else notes
    seed_run(seed)
    common = dict(lr=args.lr, weight_decay=args.weight_decay, lr_schedule="linear", device=args.device,
                  max_grad_norm=args.max_grad_norm,
                  mixed_precision=args.mixed_precision, desc=method)  # the loss: cross-entropy unless KD
    if method in ("theseus", "theseus_kd"):  # the family's default recipe; the --match-* / --init flags override parts of it
        # the KD teacher: an unwrapped frozen copy (the engine trains copies of the rest, and the wrapped
        # model mixes successors in)
        teacher = copy.deepcopy(predecessor) if method == "theseus_kd" else None
        th = Theseus(predecessor, **task.target, init=args.init, train_rest=args.train_rest, seed=seed)
        extra = {} if args.match_fraction is None else {"match_steps": int(args.steps * args.match_fraction)}
        if teacher is not None:
            extra["loss"] = DistillationStep(th.model, teacher, args.temperature, args.alpha)
        try:
            fit(th, task.batches(seed), args.steps, match_lr=args.match_lr, choose_start=args.choose_start, **extra, **common)
            # {group: block} for the successors restarted from another block of their group
            notes["start_blocks"] = {str(g): b for g, b in sorted(th.successor_starts.items())}
            notes["recipe"] = th.recipe.name  # the family's: "resnet" for ResNets, else "default"
            return th.export(native=task.native)
        finally:
            th.unwrap()
    if method.startswith("theseus"):  # the paper's recipe, and the former recipe's two schedules
        full_at = max(1, int(args.steps * args.replace_by))
        scheduler = (ConstantScheduler(args.constant_rate, replace_all_at=full_at) if method == "theseus_constant"
                     else LinearScheduler.reaching_one_at(full_at, base=args.base_rate))
        th = Theseus(predecessor, **task.target, scheduler=scheduler, recipe="paper" if method == "theseus_paper" else "default",
                     seed=seed)
        try:
            fit(th, task.batches(seed), args.steps, match_steps=0, **common)
            return th.export(native=task.native)
        finally:
            th.unwrap()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    student = successor_shaped_copy(task.initial(seed) if method == "finetune_initial" else predecessor,
                                    native=task.native, **task.target)
    loss = DistillationStep(student, predecessor, args.temperature, args.alpha) if method == "kd" else None
    fit(student, task.batches(seed), args.steps, loss=loss, **common)
    return student


def grid_points(method: str, args: argparse.Namespace, lrs: Optional[List[float]] = None) -> List[Dict[str, float]]:
    """The dev grid of one method: every --lr-grid value, or `lrs` (KD: times every --kd-grid pair)."""
    lrs = lrs or args.lr_grid or [args.lr]
    if method not in KD_METHODS or not args.kd_grid:
        return [{"lr": lr} for lr in lrs]
    pairs = [tuple(float(v) for v in pair.split(":")) for pair in args.kd_grid]
    return [{"lr": lr, "temperature": t, "alpha": a} for lr in lrs for t, a in pairs]


def grid_extension(runs: List[Dict[str, float]]) -> Optional[float]:
    """The next learning rate to try when the best dev run sits on an edge of the lrs tried (one step
    of the grid's own ratio beyond it), else None. Needs at least two lrs."""
    lrs = sorted({r["lr"] for r in runs})
    if len(lrs) < 2:
        return None
    best = max(runs, key=lambda r: r["dev"])["lr"]  # first best on ties, as the choice itself
    if best == lrs[0]:
        return lrs[0] * lrs[0] / lrs[1]
    if best == lrs[-1]:
        return lrs[-1] * lrs[-1] / lrs[-2]
    return None


def native_export_possible(predecessor: nn.Module, target: Dict[str, Any]) -> bool:
    """Whether the family's own constructor can build this shape (a ResNet BasicBlock cannot be narrower
    than its stage). If not, every method trains and is evaluated as the non-native export: the
    same modules, the same outputs."""
    try:
        successor_shaped_copy(predecessor, **target)
        return True
    except ExportError as error:
        print(f"native export impossible for {target} ({error}); every method uses export(native=False)")
        return False


def plan_depths(predecessor: nn.Module, target: Dict[str, Any]) -> Dict[str, Dict[str, int]]:
    """Blocks per container before and after, from the engine's own plan (the model is unwrapped again)."""
    with Theseus(predecessor, **target) as th:
        return {"predecessor": dict(th.plan.containers), "successor": th.plan.successor_depth}


def summarise(runs: Dict[str, Dict[str, Dict[str, float]]]) -> Dict[str, Dict[str, float]]:
    out = {}
    for method, by_seed in runs.items():
        row = {"seeds": len(by_seed)}
        for split in ("dev", "test"):
            values = [r[split] for r in by_seed.values()]
            row[f"{split}_mean"] = statistics.mean(values)
            row[f"{split}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out[method] = row
    return out


class Reused:
    """Runs of earlier reports of the same benchmark, found by (method, seed, settings).

    A report's grid runs are its first seed's runs at each grid point; its other seeds ran the
    settings it chose. A run is taken over only where everything that shapes it is equal: the
    task, the predecessor, every setting but the bookkeeping and the grid (the Theseus overrides
    only for the methods they shape), and the run's own lr / temperature / alpha."""

    def __init__(self, paths: List[str], report: Dict[str, Any], args: argparse.Namespace):
        self.paths, self.runs = list(paths), []
        # what may differ: the bookkeeping of a part, and the grid (each run carries its own lr, temperature, alpha)
        ignore = (_PER_PART - set(THESEUS_OVERRIDES)) | {"lr_grid", "extend_grid", *GRID_KEYS}
        wanted = {k: v for k, v in vars(args).items() if k not in ignore}
        for path in paths:
            with open(path) as f:
                part = json.load(f)
            differs = {k for k, v in wanted.items() if part["settings"].get(k, v) != v}
            if differs - set(THESEUS_OVERRIDES) or part["task"] != report["task"] or part["predecessor"] != report["predecessor"]:
                raise SystemExit(f"error: --reuse {path} is not a run of the same benchmark "
                                 f"(settings {sorted(differs) or 'equal'}; predecessor {part['predecessor']} vs {report['predecessor']})")
            # runs of the methods those overrides shape are taken only where the overrides are equal too
            skip = set(OVERRIDDEN_METHODS) if differs else set()
            grid = part.get("grid", {})
            for method, points in grid.get("runs", {}).items():
                for point in points:
                    if method not in skip:
                        self._add(path, method, grid["seed"], point)
            for method, by_seed in part["runs"].items():
                if method in skip:
                    continue
                settings = grid.get("chosen", {}).get(method) if grid else self._fixed(part["settings"], method)
                for seed, result in by_seed.items():
                    if settings is not None:
                        self._add(path, method, int(seed), dict(settings, **result))

    @staticmethod
    def _fixed(settings: Dict[str, Any], method: str) -> Dict[str, float]:
        keys = GRID_KEYS if method in KD_METHODS else ("lr",)
        return {k: settings[k] for k in keys}

    def _add(self, path: str, method: str, seed: int, run: Dict[str, Any]) -> None:
        settings = {k: run[k] for k in GRID_KEYS if k in run}
        result = {k: v for k, v in run.items() if k not in GRID_KEYS}
        self.runs.append((method, seed, settings, dict(result, reused_from=result.get("reused_from", path))))

    def result(self, method: str, seed: int, settings: Dict[str, float]) -> Optional[Dict[str, Any]]:
        for m, s, known, result in self.runs:
            if (m, s, known) == (method, seed, settings):
                return dict(result)
        return None


def run(args: argparse.Namespace, path: str) -> Dict[str, Any]:
    started = time.time()
    task = TextTask(args) if args.task == "text" else VisionTask(args)
    predecessor = task.predecessor().eval()
    reference = copy.deepcopy(predecessor.state_dict())
    task.native = native_export_possible(predecessor, task.target)
    report: Dict[str, Any] = {
        "benchmark": "quality", "task": task.name, "data": task.source, "quick": args.quick,
        "settings": {k: v for k, v in vars(args).items()}, "conditions": conditions(resolve_device(args.device)),
        "target": task.target, "depth": plan_depths(predecessor, task.target), "native_export": task.native,
        "predecessor": task.evaluate(predecessor), "runs": {}, "complete": False,
    }
    methods = [m for m in METHODS if m in args.methods]

    def timed_run(method: str, seed: int, settings: Dict[str, float]) -> Dict[str, float]:
        t = time.time()
        notes: Dict[str, Any] = {}
        model = run_method(method, task, predecessor, seed, argparse.Namespace(**dict(vars(args), **settings)), notes)
        result = dict(task.evaluate(model), train_s=time.time() - t, **notes)
        print(f"  seed {seed} {method} {settings}: dev {result['dev']:.4f}, test {result['test']:.4f} "
              f"({result['train_s']:.0f} s)", flush=True)
        return result

    earlier = Reused(args.reuse or [], report, args)
    if args.reuse:
        report["reused"] = earlier.paths

    def timed_or_reused(method: str, seed: int, settings: Dict[str, float]) -> Dict[str, float]:
        found = earlier.result(method, seed, settings)
        if found is not None:
            print(f"  seed {seed} {method} {settings}: dev {found['dev']:.4f}, test {found['test']:.4f} "
                  f"(reused from {found['reused_from']})", flush=True)
            return found
        return timed_run(method, seed, settings)

    chosen: Dict[str, Dict[str, float]] = {m: {} for m in methods}
    if args.lr_grid or args.kd_grid:
        # Each method's settings come from the same grid on the dev split with the first seed;
        # test accuracies of the grid are recorded but play no part in the choice.
        report["grid"] = {"seed": args.seeds[0], "lr": args.lr_grid, "kd": args.kd_grid, "runs": {}, "chosen": chosen}
        for method in methods:
            points = grid_points(method, args)
            for extensions in range(args.extend_grid + 1):
                for settings in points:
                    result = timed_or_reused(method, args.seeds[0], settings)
                    report["grid"]["runs"].setdefault(method, []).append(dict(settings, **result))
                    report["total_s"] = time.time() - started
                    write_json(report, path)
                # --extend-grid: one more lr beyond an edge the choice sits on, until it sits inside
                beyond = grid_extension(report["grid"]["runs"][method]) if extensions < args.extend_grid else None
                if beyond is None:
                    break
                report["grid"].setdefault("extended", {}).setdefault(method, []).append(beyond)
                print(f"  {method}: the best dev lr sits on the grid's edge; extending to {beyond:g}", flush=True)
                points = grid_points(method, args, [beyond])
            best = max(report["grid"]["runs"][method], key=lambda r: r["dev"])  # first best on ties
            chosen[method] = {k: best[k] for k in GRID_KEYS if k in best}
            report["runs"].setdefault(method, {})[str(args.seeds[0])] = {k: best[k] for k in best if k not in GRID_KEYS}
    for seed in args.seeds:  # seed-major: an interrupted run still has whole seeds
        for method in methods:
            if str(seed) in report["runs"].get(method, {}):
                continue  # the grid's run with the chosen settings
            report["runs"].setdefault(method, {})[str(seed)] = timed_or_reused(method, seed, chosen[method])
            report["summary"] = summarise(report["runs"])
            report["total_s"] = time.time() - started
            write_json(report, path)
    report["summary"] = summarise(report["runs"])
    report["paired"] = paired_report(report)
    changed = [k for k, v in predecessor.state_dict().items() if not torch.equal(v, reference[k])]
    if changed:
        raise RuntimeError(f"the predecessor changed during the benchmark: {changed[:3]}")
    report["predecessor_unchanged"] = True
    report["complete"] = True
    return report  # main() records the end and writes it


def print_table(report: Dict[str, Any]) -> None:
    s = report["settings"]
    depth = {k: sum(v.values()) for k, v in report["depth"].items()}
    print(f"\nQuality, {report['task']} {depth['predecessor']} -> {depth['successor']} blocks ({report['data']}): {s['steps']} steps of batch {s['batch_size']} per method, "
          f"seeds {s['seeds']}; mean +- std over seeds")
    p = report["predecessor"]
    print(f"{'method':<18} {'dev acc':>16} {'test acc':>16}")
    print(f"{'predecessor':<18} {p['dev']:>16.4f} {p['test']:>16.4f}")
    for method, r in report["summary"].items():
        print(f"{method:<18} {r['dev_mean']:>8.4f} +- {r['dev_std']:.4f} {r['test_mean']:>8.4f} +- {r['test_std']:.4f}")
    test = (report.get("paired") or {}).get("test")
    if test and test["half_width"] is not None:
        print(f"theseus - {test['best_baseline']} (the best baseline), paired over {test['n']} seeds: "
              f"{describe_interval(test)}, {test['verdict']}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["text", "vision"], default="text")
    p.add_argument("--arch", choices=["vit", "resnet"], default="vit", help="vision: the model family")
    p.add_argument("--ratio", type=float, default=0.5, help="vision: successor depth / predecessor depth")
    p.add_argument("--target-speedup", type=float, default=None,
                   help="plan the successor shape with the budget planner (FLOPs-predicted speed-up) instead of --ratio / --depth")
    p.add_argument("--successor-width", default=None,
                   help="narrower successors: a fraction of the MLP neurons / channels, or 'auto' with --target-speedup")
    p.add_argument("--save-predecessor", default=None, help="write the trained predecessor here (vision: safetensors; text: an HF directory)")
    p.add_argument("--quick", action="store_true", help="tiny ViT, 2,000 images, 2 seeds, a few steps (smoke test)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    p.add_argument("--steps", type=int, default=None, help="step budget of every method (text 600, vision 400)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of every method (text 1e-4, vision 2e-3)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-grad-norm", type=float, default=None, help="clip every method's gradient norm (default: no clipping)")
    p.add_argument("--batch-size", type=int, default=None, help="text 32, vision 128")
    p.add_argument("--base-rate", type=float, default=None, help="linear curriculum start (resnet 0.6, else 0.3)")
    p.add_argument("--constant-rate", type=float, default=0.5, help="constant replacement rate")
    p.add_argument("--replace-by", type=float, default=None, help="fraction of --steps after which p = 1 (resnet 0.3, else 0.5)")
    p.add_argument("--lr-grid", type=float, nargs="+", default=None,
                   help="choose each method's lr from these on dev with the first seed, then run the other seeds")
    p.add_argument("--extend-grid", type=int, default=0, metavar="N",
                   help="while a method's best dev lr sits on an edge of the lrs it tried, try one more lr beyond "
                        "it (the grid's ratio), at most N times per method (default 0: the grid as given)")
    p.add_argument("--kd-grid", nargs="+", default=None, metavar="T:ALPHA",
                   help="KD's (temperature, alpha) pairs, searched with --lr-grid (e.g. 2:0.5 4:0.9)")
    p.add_argument("--match-fraction", type=float, default=None,
                   help="theseus: fraction of the steps spent on module matching first (default: the recipe's)")
    p.add_argument("--match-lr", type=float, default=None, help="theseus: module matching learning rate (default: the recipe's)")
    p.add_argument("--init", default=None, help="theseus: successor initialisation (first, group_first, group_last; "
                   "default: the library's, which lets the recipe choose each successor's start block)")
    p.add_argument("--choose-start", default=None, type=lambda v: {"on": True, "off": False}[v], metavar="{on,off}",
                   help="theseus: restart successors from their group's best-matching block before matching "
                        "(default: the recipe's)")
    p.add_argument("--train-rest", default=None, type=lambda v: {"on": True, "off": False}[v], metavar="{on,off}",
                   help="theseus: train copies of the non-replaced parts (default: the recipe's)")
    p.add_argument("--temperature", type=float, default=2.0, help="KD temperature")
    p.add_argument("--alpha", type=float, default=0.5, help="KD weight of the soft-target term")
    p.add_argument("--predecessor", default=None, help="a trained predecessor (text: HF directory; vision: predecessor.safetensors from the vision example)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="predecessor training steps when not given")
    p.add_argument("--pretrain-lr", type=float, default=None)
    p.add_argument("--split-seed", type=int, default=0, help="data split and predecessor seed (text example's --seed)")
    # text
    p.add_argument("--model", default=None, help="text: HF model (default all-MiniLM-L6-v2)")
    p.add_argument("--depth", type=int, default=3, help="text: successor layers")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--test-size", type=int, default=None, help="text 2000 / vision: ignored")
    p.add_argument("--dev-size", type=int, default=None, help="text 1000, vision 5000")
    # vision
    p.add_argument("--width", type=int, default=None, help="vision: ViT width (48) / ResNet first-stage channels (16)")
    p.add_argument("--depth-pred", type=int, default=None, help="vision: ViT blocks (8) / ResNet blocks per stage (2)")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--eval-limit", type=int, default=None, help="vision: evaluate on the first N dev/test images only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sharing", default="", help="what else ran on the machine's cores meanwhile (recorded)")
    add_device_arguments(p, device="cpu")  # where every method trains (the results were measured on the CPU)
    p.add_argument("--data-dir", default=None, help="vision: directory of the Fashion-MNIST idx files "
                   "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--reuse", nargs="+", default=None, metavar="JSON",
                   help="earlier reports of the same run (e.g. before --lr-grid gained a point): their grid runs and "
                        "their seeds' runs of the settings chosen now are taken over instead of re-run (recorded)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="merge parts of one run split by seed into --output, instead of running")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/quality_<text_d3|vit_r0.5|...>[_quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.task = "vision"
        quick = dict(seeds=[0, 1], steps=6, lr=2e-3, batch_size=32, pretrain_steps=20, pretrain_lr=2e-3, dev_size=200,
                     width=16, depth_pred=2, train_limit=1000, eval_limit=500)
        for key, value in quick.items():
            if getattr(args, key) is None or key in ("seeds", "width", "depth_pred"):
                setattr(args, key, value)
    defaults = {"text": dict(steps=600, lr=1e-4, batch_size=32, pretrain_steps=300, pretrain_lr=1e-4, test_size=2000,
                             dev_size=1000, base_rate=0.3, replace_by=0.5),
                "vit": dict(steps=400, lr=2e-3, batch_size=128, pretrain_steps=1000, pretrain_lr=2e-3, dev_size=5000,
                            width=48, depth_pred=8, base_rate=0.3, replace_by=0.5),
                "resnet": dict(steps=300, lr=1e-3, batch_size=128, pretrain_steps=800, pretrain_lr=2e-3, dev_size=5000,
                               width=16, depth_pred=2, base_rate=0.6, replace_by=0.3)}
    # The vision example's per-family settings (examples/vision_classification.py DEFAULTS), chosen on dev.
    for key, value in defaults["text" if args.task == "text" else args.arch].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# The flags that change the `theseus` and `theseus_kd` methods only.
THESEUS_OVERRIDES = ("match_fraction", "match_lr", "init", "choose_start", "train_rest")
OVERRIDDEN_METHODS = ("theseus", "theseus_kd")
# Settings that may differ between the parts of one run split by seed over several processes.
_PER_PART = {"seeds", "methods", "output", "threads", "merge", "reuse", "sharing", "kd_grid",  # KD's grid: only KD's part uses it
             *THESEUS_OVERRIDES}


def _same_run(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two parts' results of one seed are one run, one of them taken over from the other (--reuse)."""
    if "reused_from" not in a and "reused_from" not in b:
        return False
    strip = lambda r: {k: v for k, v in r.items() if k != "reused_from"}  # noqa: E731
    return strip(a) == strip(b)


def merge(specs: List[str], output: str) -> Dict[str, Any]:
    """One report from runs of the same benchmark split by seed (e.g. --seeds 0 1 and --seeds 2 in two
    processes) or by method. 'PATH:METHOD,...' takes only those methods of a part (e.g. the baselines
    of an earlier run, with Theseus re-run after a recipe change). Refuses parts whose task, settings
    or predecessor differ, or that share a method's seed."""
    parts, paths = [], []
    for spec in specs:
        part, methods = load_part(spec, METHODS)
        if methods is not None:
            if "grid" in part:
                part["grid"] = dict(part["grid"], runs={m: r for m, r in part["grid"]["runs"].items() if m in methods},
                                    chosen={m: c for m, c in part["grid"]["chosen"].items() if m in methods})
            part["settings"] = dict(part["settings"], methods=methods)
        parts.append(part)
        paths.append(spec)
    first = parts[0]
    same = {k: v for k, v in first["settings"].items() if k not in _PER_PART}
    merged = dict({k: v for k, v in first.items() if k != "grid"}, runs={},
                  complete=all(p.get("complete") for p in parts), parts=paths,
                  command="python benchmarks/quality.py --merge " + " ".join(paths))
    for path, part in zip(paths, parts):
        differs = sorted(k for k, v in part["settings"].items() if k not in _PER_PART and same.get(k) != v)
        if differs or part["predecessor"] != first["predecessor"] or part["task"] != first["task"]:
            raise SystemExit(f"error: {path} is not a part of the same run as {paths[0]} "
                             f"(settings {differs or 'equal'}; predecessor {part['predecessor']} vs {first['predecessor']})")
        for method, by_seed in part["runs"].items():
            earlier = merged["runs"].get(method, {})
            # a seed one part took over from another (--reuse) is the same run, not a clash
            by_seed = {s: r for s, r in by_seed.items() if not (s in earlier and _same_run(r, earlier[s]))}
            clash = set(by_seed) & set(earlier)
            if clash:
                raise SystemExit(f"error: seed(s) {sorted(clash)} of {method} appear in more than one part ({path})")
            merged["runs"].setdefault(method, {}).update(by_seed)
        if "grid" in part:  # parts may split the methods too: each brings its methods' grid
            grid = merged.setdefault("grid", dict(part["grid"], runs={}, chosen={}, extended={}))
            grid["runs"].update(part["grid"]["runs"])
            grid["chosen"].update(part["grid"]["chosen"])
            grid["extended"].update({m: lrs for m, lrs in part["grid"].get("extended", {}).items() if m in part["grid"]["runs"]})
    merged["settings"] = dict(first["settings"], seeds=sorted({int(s) for r in merged["runs"].values() for s in r}),
                              methods=[m for m in METHODS if m in merged["runs"]])
    merged["runs"] = {m: merged["runs"][m] for m in METHODS if m in merged["runs"]}  # the usual order
    merged["part_settings"] = {path: {k: part["settings"].get(k) for k in sorted(_PER_PART - {"merge"})}
                               for path, part in zip(paths, parts)}
    merged["summary"] = summarise(merged["runs"])
    merged["paired"] = paired_report(merged)
    merged["total_s"] = sum(p.get("total_s", 0) for p in parts)
    write_json(merged, output)
    print_table(merged)
    print(f"wrote {output} (merged {len(paths)} parts)")
    return merged


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.output or os.path.join(RESULTS_DIR, "quality_merged.json"))
    torch.set_num_threads(args.threads)
    quiet_transformers()
    shape = "".join(f"_{k[0]}{v}" for k, v in (("s", args.target_speedup), ("w", args.successor_width)) if v is not None)
    name = ("text_" + (shape[1:] if shape else f"d{args.depth}") if args.task == "text"
            else f"{args.arch}_" + (shape[1:] if shape else f"r{args.ratio:g}"))
    path = args.output or os.path.join(RESULTS_DIR, f"quality_{name}{'_quick' if args.quick else ''}.json")
    started = time.time()
    report = finish(run(args, path), path, "quality.py", argv, started)
    print_table(report)
    print(f"wrote {path} ({report['total_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
