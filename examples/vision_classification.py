"""Compress a ViT or a ResNet trained on Fashion-MNIST with Theseus, against a fine-tune-only baseline.

Offline: the data comes from the idx files of the Debian package
dataset-fashion-mnist (see image_data.py); no pretrained weights are needed.

  (a) train the predecessor from scratch on train (minus a dev split of 5,000);
  (b) Theseus: successor blocks (copies of predecessor blocks) replace groups of
      blocks, then train alone; half the blocks (per stage for the ResNet);
  (c) baseline with the same step budget as (b): the successor-shaped model
      initialised the same way (the first blocks of the predecessor, with its
      stem and head), trained directly.
Prints a table and writes JSON with accuracy (dev and test), parameters, FLOPs and
measured speed-up. Settings are compared on the dev split; the test split is only reported.

    python examples/vision_classification.py --family vit       # timm ViT, 8 -> 4 blocks
    python examples/vision_classification.py --family resnet    # timm ResNet, [2, 2, 2, 2] -> [1, 1, 1, 1]
    python examples/vision_classification.py --family vit --quick   # the same job on a small subset, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from image_data import DataError, load_fashion_mnist  # noqa: E402

from recipe_flags import add_recipe_arguments, config_from_flags, constant_schedule  # noqa: E402
from theseus_general import Theseus  # noqa: E402
from theseus_general.graph import get_submodule  # noqa: E402
from theseus_general.measure import count_flops, count_parameters, measure_latency, state_checksum  # noqa: E402
from theseus_general.training import FitResult, add_device_arguments, fit  # noqa: E402

# Per-family defaults, sized to finish in under 15 minutes on 2 CPU cores (1 thread); every one
# has a flag. Learning rates were compared on the dev split only, from the saved predecessor
# (seed 0): ViT lr 2e-3 dev 0.752 vs 1e-3 0.743; ResNet lr 1e-3 (2e-3: 0.890). Theseus runs the
# family's recipe (ViT: the library's default, module matching then the curriculum; ResNet:
# 'resnet', stem and head frozen, no matching); --recipe and the schedule flags override it.
DEFAULTS = {
    "vit": dict(width=48, depth_pred=8, pretrain_steps=1000, pretrain_lr=2e-3, steps=400, lr=2e-3, baseline_lr=2e-3),
    "resnet": dict(width=16, depth_pred=2, pretrain_steps=800, pretrain_lr=2e-3, steps=300, lr=1e-3, baseline_lr=1e-3),
}

# --quick: every stage of the job (predecessor, Theseus, baseline, table, speed) on a small subset.
QUICK = dict(train_limit=2000, dev_size=500, width=16, pretrain_steps=30, steps=20, batch_size=64, no_save_models=True)


# ---------------------------------------------------------------- models
def build_vit(width: int, depth: int) -> nn.Module:
    """timm ViT for 1 x 28 x 28 images: 7 x 7 patches of 4 pixels, `depth` blocks."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=width, depth=depth,
                             num_heads=4, mlp_ratio=2.0)


def build_resnet(width: int, blocks_per_stage: List[int]) -> nn.Module:
    """timm ResNet (BasicBlock, widths w, 2w, 4w, 8w) with a stem for 28 x 28 images:
    a stride-1 3x3 convolution instead of the 7x7 stride-2 one (max-pool kept: 14 x 14 into layer1)."""
    from timm.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, blocks_per_stage, in_chans=1, num_classes=10,
                   channels=(width, 2 * width, 4 * width, 8 * width))
    # timm's plain stem has 64 channels whatever the stage widths; keep that width.
    model.conv1 = nn.Conv2d(1, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    return model


def truncated_copy(model: nn.Module, containers: Dict[str, int]) -> nn.Module:
    """The successor-shaped model initialised like Theseus's init='first': the first
    n blocks of each container (a ResNet stage keeps its downsampling head), stem and head."""
    short = copy.deepcopy(model)
    for path, depth in containers.items():
        container = get_submodule(short, path)
        parent, _, name = path.rpartition(".")
        setattr(get_submodule(short, parent) if parent else short, name, container[:depth])
    if hasattr(short, "feature_info") and isinstance(short.feature_info, list) and "blocks" in containers:
        short.feature_info = short.feature_info[:containers["blocks"]]
    return short


# ---------------------------------------------------------------- training
def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
    """Endless shuffled batches, with a random shift of up to 2 pixels (cheap augmentation)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            images = F.pad(x[index], (2, 2, 2, 2))
            dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
            yield images[:, :, dy:dy + 28, dx:dx + 28], y[index]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


def train(target, data, steps: int, lr: float, seed: int, desc: str, args: argparse.Namespace,
          warmup: float = 0.0, metrics: Optional[str] = None) -> FitResult:
    """The example's recipe on the shared loop (`theseus_general.training.fit`): AdamW (weight decay
    0.05) with linear warm-up and cosine decay, shifted batches of --batch-size on --device with
    --mixed-precision. `target` is a model or a Theseus engine (one th.step() per optimiser step)."""
    return fit(target, batches(*data, args.batch_size, seed), steps, lr=lr, weight_decay=0.05, lr_schedule="cosine",
               warmup=warmup, device=args.device, mixed_precision=args.mixed_precision, metrics=metrics, desc=desc)


def share(value: float, reference: float) -> float:
    """value / reference; NaN when the reference is 0 (an untrained predecessor)."""
    return value / reference if reference else float("nan")


# ---------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(DEFAULTS), required=True)
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST idx files "
                   "(default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--dev-size", type=int, default=5000, help="images held out from train for choosing settings")
    p.add_argument("--train-limit", type=int, default=None, help="use only this many training images")
    p.add_argument("--width", type=int, default=None, help="ViT embedding width / ResNet first-stage channels")
    p.add_argument("--depth-pred", type=int, default=None, help="ViT blocks / ResNet blocks per stage of the predecessor")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--pretrain-steps", type=int, default=None, help="predecessor training steps")
    p.add_argument("--pretrain-lr", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="step budget of Theseus and of the baseline")
    p.add_argument("--lr", type=float, default=None, help="Theseus learning rate")
    p.add_argument("--baseline-lr", type=float, default=None)
    add_recipe_arguments(p)
    p.add_argument("--only", choices=["all", "theseus"], default="all", help="'theseus' skips the baseline (for sweeps)")
    p.add_argument("--predecessor", default=None, help="predecessor.safetensors of an already trained predecessor (same flags)")
    p.add_argument("--seed", type=int, default=0)
    add_device_arguments(p)  # --device, --mixed-precision: training only; evaluation and speed run on the CPU
    p.add_argument("--quick", action="store_true", help="a smoke run of the whole job in seconds: 2,000 training "
                   "images, dev 500, a narrow model, 30/20 steps, models not saved, output "
                   "examples/output/<family>_quick (flags given explicitly win)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: tiny models gain little "
                   "from more, and threads slow down badly when other jobs share the cores)")
    p.add_argument("--output", default=None, help="directory for results.json and models (default examples/output/<family>)")
    p.add_argument("--no-save-models", action="store_true")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write curriculum.png and comparison.png to --output (needs matplotlib)")
    args = p.parse_args(argv)
    if args.quick:  # parse again with the quick defaults, so that explicit flags still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    for key, value in DEFAULTS[args.family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.output = args.output or os.path.join("examples", "output", args.family + ("_quick" if args.quick else ""))
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    try:
        data = load_fashion_mnist(args.data_dir, args.dev_size, args.seed, args.train_limit)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"data: Fashion-MNIST from {data.source}: train {len(data.train[0])}, dev {len(data.dev[0])}, "
          f"test {len(data.test[0])}")
    os.makedirs(args.output, exist_ok=True)
    results: Dict[str, dict] = {}
    timings: Dict[str, float] = {}

    def blocks_of(model: nn.Module) -> List[int]:
        if args.family == "vit":
            return [len(model.blocks)]
        return [len(getattr(model, f"layer{i}")) for i in range(1, 5)]

    def record(name: str, model: nn.Module, **extra) -> None:
        results[name] = {"dev_accuracy": accuracy(model, *data.dev), "test_accuracy": accuracy(model, *data.test),
                         "parameters": count_parameters(model), "blocks": blocks_of(model), **extra}
        print(f"  {name}: dev {results[name]['dev_accuracy']:.4f}, test {results[name]['test_accuracy']:.4f}")

    # (a) predecessor, from scratch
    t = time.time()
    if args.family == "vit":
        predecessor = build_vit(args.width, args.depth_pred)
    else:
        predecessor = build_resnet(args.width, [args.depth_pred] * 4)
    if args.predecessor:
        load_model(predecessor, args.predecessor)  # safetensors: no unpickling
        print(f"predecessor: loaded from {args.predecessor}")
    else:
        train(predecessor, data.train, args.pretrain_steps, args.pretrain_lr, args.seed, "train predecessor", args,
              warmup=0.05)
        if not args.no_save_models:
            save_model(predecessor, os.path.join(args.output, "predecessor.safetensors"))
    timings["predecessor"] = time.time() - t
    record("predecessor", predecessor)

    # (b) Theseus on the predecessor object itself (restored afterwards): half the blocks
    t = time.time()
    before = state_checksum(predecessor)
    config = config_from_flags(args, ratio=0.5)
    th = Theseus(predecessor, config, scheduler=constant_schedule(args, predecessor, config))
    print(th.plan)
    fitted = train(th, data.train, args.steps, args.lr, args.seed + 1, "theseus", args,
                   metrics=os.path.join(args.output, "theseus"))  # metrics.csv (+ tensorboard/)
    depths = dict(th.plan.successor_depth)
    successor = th.export()
    th.unwrap()
    unchanged = state_checksum(predecessor) == before
    timings["theseus"] = time.time() - t
    record("theseus", successor, predecessor_unchanged=unchanged)
    if not args.no_save_models:
        save_model(successor, os.path.join(args.output, "theseus_successor.safetensors"))

    # (c) baseline: same shape, same initialisation, same step budget, trained directly
    if args.only == "all":
        t = time.time()
        baseline = truncated_copy(predecessor, depths)
        train(baseline, data.train, args.steps, args.baseline_lr, args.seed + 1, "baseline: first blocks, fine-tuned",
              args)
        timings["baseline"] = time.time() - t
        record("baseline", baseline)

    # speed: exported successor against its predecessor, same process, alternating
    sample = data.test[0][:args.batch_size]
    latency = measure_latency({"predecessor": predecessor, "theseus": successor}, sample, warmup=3, repeats=20)
    flops = {name: count_flops(m, sample) // len(sample) for name, m in (("predecessor", predecessor), ("theseus", successor))}
    for name in results:
        results[name]["flops_per_image"] = flops["predecessor" if name == "predecessor" else "theseus"]
    speed = {
        "batch": len(sample), "latency_s": latency, "flops_per_image": flops,
        "speedup": latency["predecessor"] / latency["theseus"],
        "flops_ratio": flops["predecessor"] / flops["theseus"],
        "threads": torch.get_num_threads(),
    }
    report = {
        "family": args.family, "data": data.source, "seed": args.seed, "successor_depth": depths,
        "settings": dict(vars(args)), "results": results, "speed": speed,
        "retention_test": share(results["theseus"]["test_accuracy"], results["predecessor"]["test_accuracy"]),
        "retention_dev": share(results["theseus"]["dev_accuracy"], results["predecessor"]["dev_accuracy"]),
        # what fit's first batches said about the truncated start, which decides whether the recipe matched
        "start_check": {"agreement": fitted.start_agreement, "collapsed": fitted.start_collapsed,
                        "predictions": fitted.start_predictions, "spread": fitted.start_spread},
        "matching_curve": [h.loss for h in fitted.matching.history] if fitted.matching else [],
        "replacement_curve": [(h.step, h.replacement_rate, h.loss) for h in fitted.history],
        "timings_s": timings, "total_s": time.time() - started, "torch": torch.__version__,
    }
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    if args.plots:
        from plot_results import plot_example_results

        for path in plot_example_results(report, args.output).values():
            print(f"plot: {path}")
    return report


def print_table(report: dict) -> None:
    pred = report["results"]["predecessor"]
    s = report["settings"]
    print(f"\nTheseus on Fashion-MNIST, {report['family']}: blocks {pred['blocks']} -> "
          f"{report['results']['theseus']['blocks']}, seed {report['seed']}, predecessor {s['pretrain_steps']} steps, "
          f"Theseus and baseline {s['steps']} steps each, batch {s['batch_size']}")
    print(f"{'model':<12} {'blocks':>14} {'params':>10} {'MFLOPs/img':>10} {'dev acc':>8} {'test acc':>8} {'% of pred':>9}")
    for name, r in report["results"].items():
        print(f"{name:<12} {str(r['blocks']):>14} {r['parameters']:>10,} {r['flops_per_image'] / 1e6:>10.2f} "
              f"{r['dev_accuracy']:>8.4f} {r['test_accuracy']:>8.4f} {100 * share(r['test_accuracy'], pred['test_accuracy']):>8.1f}%")
    sp = report["speed"]
    print(f"speed-up (batch {sp['batch']}, CPU, {sp['threads']} threads, median): {sp['speedup']:.2f}x; "
          f"FLOPs ratio {sp['flops_ratio']:.2f}x")
    t = report["timings_s"]
    print(f"time: predecessor {t['predecessor']:.0f} s, theseus {t['theseus']:.0f} s"
          + (f", baseline {t['baseline']:.0f} s" if "baseline" in t else "")
          + f"; total {report['total_s']:.0f} s; predecessor unchanged after compression: "
          f"{report['results']['theseus'].get('predecessor_unchanged')}")


if __name__ == "__main__":
    main()
