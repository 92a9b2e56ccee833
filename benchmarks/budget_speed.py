"""How well the budget planner predicts speed: predicted vs measured speed-up of its exports.

For each family the planner (`Theseus(model, target_speedup=s, sample=x, ...)`) chooses the
depths (and widths) for a few targets; the export is then timed against the predecessor with
`theseus_general.measure.measure_latency` (both in one process, alternating every repeat, after
a warm-up; median), and the report gives predicted speed-up, measured speed-up and the error
``predicted / measured - 1``. Three planners per target:

  * ``flops``: depths from FLOPs (``torch.utils.flop_counter``), the default;
  * ``latency``: depths from each block's time on the sample (``measure="latency"``);
  * ``flops+width``: FLOPs with ``successor_width="auto"`` (depth and width).

Models have random weights (speed does not depend on trained values; the importances that pick
*which* blocks stay are then meaningless, but the cost model is what is measured here):

  * BERT (transformers, hidden 256, 8 layers, MLP 1024), batch 4 x 128 tokens;
  * ViT (timm VisionTransformer, DeiT-Tiny shape: 192 wide, 12 blocks), batch 2 x 224 x 224;
  * ResNet-50 (torchvision), batch 1 x 160 x 160.

    python benchmarks/budget_speed.py                 # writes benchmarks/results/budget_speed.json
    python benchmarks/budget_speed.py --quick         # tiny models, seconds (CI smoke test)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, conditions, finish, pick_device, quiet_transformers  # noqa: E402

from theseus_general import PlanError, Theseus  # noqa: E402
from theseus_general.measure import count_flops, measure_latency  # noqa: E402

PLANNERS = {"flops": {}, "latency": {"measure": "latency"}, "flops+width": {"successor_width": "auto"}}


def bert(quick: bool) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    if quick:
        config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=128)
    else:
        config = BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=8, num_attention_heads=4,
                            intermediate_size=1024)
    return BertForSequenceClassification(config)


def vit(quick: bool) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if quick:
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3, num_classes=1000)


def resnet(quick: bool) -> nn.Module:
    from torchvision.models import resnet50
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [2, 2, 2, 2], num_classes=10) if quick else resnet50(weights=None)


def text(batch: int, length: int) -> Callable[[torch.device], Dict[str, torch.Tensor]]:
    def make(device):
        ids = torch.randint(1, 1000, (batch, length), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    return make


def images(batch: int, size: int) -> Callable[[torch.device], torch.Tensor]:
    def make(device):
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return make


def cases(quick: bool) -> List[Dict[str, Any]]:
    speedups = [1.5] if quick else [1.33, 1.6, 2.0]
    return [
        {"name": "BERT-tiny" if quick else "BERT-8L-256", "build": bert, "sample": text(2, 16) if quick else text(4, 128),
         "targets": speedups},
        {"name": "ViT-tiny" if quick else "ViT-Ti/16", "build": vit, "sample": images(2, 32) if quick else images(2, 224),
         "targets": speedups},
        {"name": "ResNet-tiny" if quick else "ResNet-50", "build": resnet,
         "sample": images(2, 32) if quick else images(1, 160), "targets": [1.2] if quick else [1.2, 1.33, 1.6]},
    ]


def run(quick: bool, device: torch.device, repeats: int, warmup: int, planners: List[str]) -> List[Dict[str, Any]]:
    rows = []
    for case in cases(quick):
        torch.manual_seed(0)
        model = case["build"](quick).to(device).eval()
        sample = case["sample"](device)
        flops = count_flops(model, sample)
        for target in case["targets"]:
            for planner in planners:
                row = {"model": case["name"], "target_speedup": target, "planner": planner}
                started = time.time()
                try:
                    engine = Theseus(model, target_speedup=target, sample=sample, **PLANNERS[planner])
                except PlanError as error:
                    row["error"] = str(error)
                    rows.append(row)
                    print(f"{case['name']:12s} {target:5.2f}x {planner:12s} impossible: {str(error)[:120]}")
                    continue
                plan_s = time.time() - started
                budget = engine.plan.budget
                try:
                    successor = engine.export().to(device).eval()
                finally:
                    engine.unwrap()
                latency = measure_latency({"predecessor": model, "successor": successor}, sample,
                                          warmup=warmup, repeats=repeats)
                measured = latency["predecessor"] / latency["successor"]
                row.update(
                    depths={p: c.depth for p, c in budget.choices.items()},
                    widths={p: c.width for p, c in budget.choices.items()},
                    predicted_speedup=budget.predicted_speedup,
                    predicted_flops_fraction=budget.predicted_flops_fraction,
                    measured_flops_fraction=count_flops(successor, sample) / flops,
                    predecessor_latency_s=latency["predecessor"], successor_latency_s=latency["successor"],
                    measured_speedup=measured, error=budget.predicted_speedup / measured - 1.0, plan_s=plan_s,
                )
                rows.append(row)
                print(f"{case['name']:12s} {target:5.2f}x {planner:12s} depths {list(row['depths'].values())} "
                      f"width {sorted(set(row['widths'].values()))} predicted {row['predicted_speedup']:.2f}x "
                      f"measured {measured:.2f}x error {row['error']:+.1%}")
    return rows


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Mean absolute error of the predicted speed-up per model and planner."""
    out: Dict[str, Any] = {}
    for row in rows:
        if isinstance(row.get("error"), float):
            out.setdefault(row["model"], {}).setdefault(row["planner"], []).append(abs(row["error"]))
    return {m: {p: sum(v) / len(v) for p, v in by.items()} for m, by in out.items()}


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one target: a smoke test")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats per model (default 20, quick 3)")
    parser.add_argument("--planners", default=",".join(PLANNERS), help=f"comma-separated, from {list(PLANNERS)}")
    parser.add_argument("--output", default=os.path.join(RESULTS_DIR, "budget_speed.json"))
    args = parser.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    quiet_transformers()
    device = pick_device(args.device)
    planners = [p for p in args.planners.split(",") if p]
    unknown = sorted(set(planners) - set(PLANNERS))
    if unknown:
        parser.error(f"unknown planners {unknown}; choose from {list(PLANNERS)}")
    report: Dict[str, Any] = {"conditions": conditions(device), "quick": args.quick}
    rows = run(args.quick, device, args.repeats or (3 if args.quick else 20), 1 if args.quick else 3, planners)
    report["rows"] = rows
    report["mean_abs_error"] = summary(rows)
    for model, by in report["mean_abs_error"].items():
        print(f"{model:12s} mean |error|: " + ", ".join(f"{p} {e:.1%}" for p, e in by.items()))
    return finish(report, args.output, "budget_speed.py", argv, started)


if __name__ == "__main__":
    main()
