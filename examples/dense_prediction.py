"""Compress the ResNet backbone of a torchvision segmenter (FCN) with Theseus, trained with the model's own loss.

Offline data with targets derived from real images: Fashion-MNIST garments of four classes
(T-shirt/top, Trouser, Sneaker, Bag; image_data.py) pasted at random places on a 64 x 64
canvas, two per canvas; every garment pixel (brightness > 0.1) is labelled with its class,
the rest is background. Train canvases come from the training images, dev canvases from the
held-out dev images (5,000), test canvases from the test split.

The model: torchvision's FCN (``torchvision.models.segmentation.FCN``) on a ResNet-18 body
cut after layer3 (``IntermediateLayerGetter(resnet18-shaped ResNet, {"layer3": "out"})``,
output stride 16) with an FCNHead; loss: cross-entropy on ``model(x)["out"]``. Metric: mIoU
over the five classes (background included), from the confusion matrix of the whole split.

  (a) predecessor, from scratch: rounds of --round-steps until dev mIoU has not improved for
      --patience rounds (at most --max-rounds); the best round's weights are kept;
  (b) Theseus(model, ratio=0.5): the backbone adapter finds ``backbone`` and compresses its
      stages [2, 2, 2] -> [1, 1, 1] with the resnet rules and the resnet recipe; exported as an FCN;
  (c) fine-tune-only (theseus_general.baselines.fine_tune_only): the same successor-shaped FCN,
      trained directly. (b) and (c) get the same steps, the same batches and the same optimiser.

    python examples/dense_prediction.py                   # the recorded run (docs/results.md)
    python examples/dense_prediction.py --quick           # the whole job on a few canvases, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from image_data import DataError, load_fashion_mnist  # noqa: E402

from theseus_general import Theseus  # noqa: E402
from theseus_general.baselines import fine_tune_only  # noqa: E402
from theseus_general.measure import count_flops, count_parameters, state_checksum  # noqa: E402
from theseus_general.training import fit  # noqa: E402

GARMENTS = {0: "T-shirt/top", 1: "Trouser", 7: "Sneaker", 8: "Bag"}  # Fashion-MNIST label -> name
CLASSES = ["background", *GARMENTS.values()]
CANVAS, PER_CANVAS, INK = 64, 2, 0.1

QUICK = dict(train_limit=400, dev_size=200, dev_canvases=16, test_canvases=16, round_steps=3, max_rounds=2,
             steps=4, batch_size=4)


# ---------------------------------------------------------------- data: garments on a canvas
def garments(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The images of the four garment classes, and their class index in CLASSES (1..4)."""
    keep = torch.isin(y, torch.tensor(list(GARMENTS)))
    index = {label: i + 1 for i, label in enumerate(GARMENTS)}
    return x[keep], torch.tensor([index[int(v)] for v in y[keep]], dtype=torch.long)


def canvases(x: torch.Tensor, y: torch.Tensor, n: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """n canvases (n, 3, 64, 64) with PER_CANVAS garments each, and their masks (n, 64, 64):
    the class of the garment drawn last at each inked pixel, 0 elsewhere."""
    images, masks = torch.zeros(n, 1, CANVAS, CANVAS), torch.zeros(n, CANVAS, CANVAS, dtype=torch.long)
    picks = torch.randint(0, len(x), (n, PER_CANVAS), generator=generator)
    corners = torch.randint(0, CANVAS - 28 + 1, (n, PER_CANVAS, 2), generator=generator)
    for i in range(n):
        for k in range(PER_CANVAS):
            garment, (top, left) = x[picks[i, k], 0], corners[i, k].tolist()
            ink = garment > INK
            window = images[i, 0, top:top + 28, left:left + 28]
            window[ink] = garment[ink]
            masks[i, top:top + 28, left:left + 28][ink] = y[picks[i, k]]
    return images.expand(-1, 3, -1, -1).contiguous(), masks  # grey -> the 3 channels a ResNet stem takes


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Endless fresh canvases from the training garments; the same seed gives the same batches."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        yield canvases(x, y, batch_size, generator)


# ---------------------------------------------------------------- model and metric
def build_fcn(blocks: int = 2) -> nn.Module:
    """torchvision FCN on a ResNet-18-shaped body cut after layer3 (output stride 16)."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.resnet import BasicBlock, ResNet
    from torchvision.models.segmentation import FCN
    from torchvision.models.segmentation.fcn import FCNHead

    body = IntermediateLayerGetter(ResNet(BasicBlock, [blocks] * 4), return_layers={"layer3": "out"})
    return FCN(body, FCNHead(256, len(CLASSES)))


def seg_loss(model: nn.Module):
    """The segmenter's loss: cross-entropy on its 'out' map (fit's loss(inputs, labels))."""
    return lambda x, y: F.cross_entropy(model(x)["out"], y)


@torch.no_grad()
def miou(model: nn.Module, split: Tuple[torch.Tensor, torch.Tensor], batch_size: int = 50) -> Dict[str, object]:
    model.eval()
    k = len(CLASSES)
    confusion = torch.zeros(k, k, dtype=torch.long)
    x, y = split
    for i in range(0, len(x), batch_size):
        predicted = model(x[i:i + batch_size])["out"].argmax(1)
        confusion += torch.bincount(y[i:i + batch_size].flatten() * k + predicted.flatten(), minlength=k * k).view(k, k)
    iou = confusion.diag().float() / (confusion.sum(0) + confusion.sum(1) - confusion.diag()).clamp(min=1).float()
    return {"miou": iou.mean().item(), "iou": dict(zip(CLASSES, iou.tolist())),
            "pixel_accuracy": (confusion.diag().sum() / confusion.sum()).item()}


# ---------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default /usr/share/datasets/fashion-mnist)")
    p.add_argument("--dev-size", type=int, default=5000, help="training images held out for the dev canvases")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--dev-canvases", type=int, default=500)
    p.add_argument("--test-canvases", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--round-steps", type=int, default=100, help="predecessor steps between dev evaluations")
    p.add_argument("--patience", type=int, default=2, help="rounds without a better dev mIoU before stopping")
    p.add_argument("--max-rounds", type=int, default=12)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=300, help="steps of Theseus and of fine-tune-only each")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of Theseus and of fine-tune-only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="the whole job on a few canvases and steps (seconds)")
    p.add_argument("--output", default=None, help="results.json goes here (default examples/output/dense[_quick])")
    args = p.parse_args(argv)
    if args.quick:  # parse again with the quick defaults, so that explicit flags still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    args.output = args.output or os.path.join("examples", "output", "dense" + ("_quick" if args.quick else ""))
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
    train = garments(*data.train)
    dev = canvases(*garments(*data.dev), args.dev_canvases, torch.Generator().manual_seed(args.seed + 100))
    test = canvases(*garments(*data.test), args.test_canvases, torch.Generator().manual_seed(args.seed + 200))
    print(f"data: {len(train[0])} training garments ({', '.join(GARMENTS.values())}) from {data.source}; "
          f"dev {len(dev[0])} canvases, test {len(test[0])} canvases of {CANVAS} x {CANVAS}")
    os.makedirs(args.output, exist_ok=True)
    results: Dict[str, dict] = {}
    timings: Dict[str, float] = {}
    optimiser = dict(weight_decay=0.05, progress=not args.quick)

    def record(name: str, model: nn.Module, **extra) -> None:
        body = model.backbone
        results[name] = {"dev": miou(model, dev), "test": miou(model, test), "parameters": count_parameters(model),
                         "blocks": [len(getattr(body, f"layer{i}")) for i in range(1, 4)], **extra}
        print(f"  {name}: dev mIoU {results[name]['dev']['miou']:.4f}, test mIoU {results[name]['test']['miou']:.4f}")

    # (a) predecessor: rounds until dev mIoU stops improving; the best round is kept
    t = time.time()
    predecessor, stream = build_fcn(), batches(*train, args.batch_size, args.seed)
    best, best_state, stale, rounds = -1.0, None, 0, []
    for round_ in range(args.max_rounds):
        fit(predecessor, stream, args.round_steps, loss=seg_loss(predecessor), lr=args.pretrain_lr,
            lr_schedule="constant", desc=f"predecessor round {round_ + 1}", **optimiser)
        score = miou(predecessor, dev)["miou"]
        rounds.append(score)
        print(f"  round {round_ + 1}: dev mIoU {score:.4f}")
        if score > best:
            best, best_state, stale = score, {k: v.clone() for k, v in predecessor.state_dict().items()}, 0
        else:
            stale += 1
            if stale >= args.patience:
                break
    predecessor.load_state_dict(best_state)
    timings["predecessor"] = time.time() - t
    record("predecessor", predecessor, rounds_dev_miou=rounds, steps=args.round_steps * len(rounds))

    # (b) Theseus with the library's default for this model (the backbone adapter, the resnet recipe)
    t = time.time()
    before = state_checksum(predecessor)
    th = Theseus(predecessor, ratio=0.5)
    print(th.plan)
    fitted = fit(th, batches(*train, args.batch_size, args.seed + 1), args.steps, loss=seg_loss(th.model), lr=args.lr,
                 lr_schedule="cosine", desc="theseus", **optimiser)
    successor = th.export()
    th.unwrap()
    timings["theseus"] = time.time() - t
    record("theseus", successor, predecessor_unchanged=state_checksum(predecessor) == before,
           adapter=th.adapter.name, recipe=th.recipe.name, exported_class=type(successor).__name__)

    # (c) fine-tune-only: the same successor-shaped FCN, the same batches, steps and optimiser
    t = time.time()
    baseline = fine_tune_only(predecessor, batches(*train, args.batch_size, args.seed + 1), args.steps,
                              logits=lambda out: out["out"], task_loss=F.cross_entropy, lr=args.lr,
                              weight_decay=optimiser["weight_decay"], lr_schedule="cosine", ratio=0.5)
    timings["fine_tune_only"] = time.time() - t
    record("fine_tune_only", baseline)

    sample = test[0][:args.batch_size]
    flops = {name: count_flops(m, sample) // len(sample) for name, m in (("predecessor", predecessor), ("successor", successor))}
    report = {
        "example": "dense_prediction", "task": f"Fashion-MNIST garments on a {CANVAS}x{CANVAS} canvas, semantic "
        f"segmentation, {len(CLASSES)} classes", "model": "torchvision FCN, ResNet-18-shaped body cut after layer3",
        "seed": args.seed, "successor_depth": dict(th.plan.successor_depth), "settings": dict(vars(args)),
        "results": results, "flops_per_image": flops, "flops_ratio": flops["predecessor"] / flops["successor"],
        "theseus_losses_first_last": [fitted.losses[0], fitted.losses[-1]] if fitted.losses else [],
        "timings_s": timings, "total_s": time.time() - started, "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    return report


def print_table(report: dict) -> None:
    s = report["settings"]
    print(f"\nTheseus on a segmenter ({report['model']}), {report['task']}; predecessor "
          f"{report['results']['predecessor']['steps']} steps, Theseus and fine-tune-only {s['steps']} steps each, "
          f"batch {s['batch_size']}")
    print(f"{'model':<15} {'blocks':>10} {'params':>10} {'dev mIoU':>9} {'test mIoU':>9} {'test pix acc':>12}")
    for name, r in report["results"].items():
        print(f"{name:<15} {str(r['blocks']):>10} {r['parameters']:>10,} {r['dev']['miou']:>9.4f} "
              f"{r['test']['miou']:>9.4f} {r['test']['pixel_accuracy']:>12.4f}")
    t = report["timings_s"]
    print(f"FLOPs ratio {report['flops_ratio']:.2f}x; time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items())
          + f"; total {report['total_s']:.0f} s")


if __name__ == "__main__":
    main()
