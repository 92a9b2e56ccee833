"""Inference speed-up of exported successors over their predecessors, next to the FLOPs ratio.

Successors are built with the engine (``Theseus(model, ...).export()`` right after
construction: speed does not depend on trained values), so random weights suffice:

  * BERT-base (transformers ``BertConfig()`` defaults), 12 -> 6, 4, 3 layers;
    batch 1, 8, 32; sequence 128 (paper: 1.94x, 2.82x, 3.66x for 6, 4, 3 layers);
  * ViT-S/16 (timm ``vit_small_patch16_224``), 12 -> 6 blocks; 224 x 224 images;
  * ResNet-50 (torchvision ``resnet50``), stages [3, 4, 6, 3] -> ceil(n / 2) per stage = [2, 2, 3, 2].

Latency: `theseus_general.measure.measure_latency` (all models of a row group in one
process, alternating every repeat, after a warm-up; median). FLOPs:
`count_flops` (torch's FlopCounterMode).

    python benchmarks/speed.py                  # full run, 2 threads; writes benchmarks/results/speed.json
    python benchmarks/speed.py --quick          # tiny models, a few seconds (CI smoke test)
    python benchmarks/speed.py --device cuda
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, conditions, finish, pick_device, quiet_transformers  # noqa: E402

from theseus_general import Theseus  # noqa: E402
from theseus_general.measure import count_flops, count_parameters, measure_latency  # noqa: E402


# ---------------------------------------------------------------- models
def bert(quick: bool) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig() if not quick else BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128)
    return BertForSequenceClassification(config)


def vit(quick: bool) -> nn.Module:
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if quick:
        return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    return timm.create_model("vit_small_patch16_224", pretrained=False)


def resnet(quick: bool) -> nn.Module:
    from torchvision.models import resnet50
    from torchvision.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, [2, 2, 2, 2], num_classes=10) if quick else resnet50(weights=None)


def halve_per_stage(model: nn.Module) -> List[int]:
    """The ResNet rule: ceil(n / 2) blocks per stage ([3, 4, 6, 3] -> [2, 2, 3, 2])."""
    return [math.ceil(len(getattr(model, f"layer{i}")) / 2) for i in range(1, 5)]


def text_sample(batch: int, length: int, vocab: int) -> Callable[[torch.device], Dict[str, torch.Tensor]]:
    def make(device: torch.device) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, vocab, (batch, length), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    return make


def image_sample(batch: int, size: int) -> Callable[[torch.device], torch.Tensor]:
    def make(device: torch.device) -> torch.Tensor:
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    return make


def cases(quick: bool) -> List[Dict[str, Any]]:
    """One entry per predecessor: its targets and the batches to time."""
    length = 16 if quick else 128
    batches = [1, 4] if quick else [1, 8, 32]
    return [
        {"name": "BERT-base" if not quick else "BERT-tiny", "build": bert,
         "targets": [{"successor_depth": d} for d in ((2,) if quick else (6, 4, 3))],
         "samples": {b: text_sample(b, length, 1000) for b in batches}, "input": f"sequence {length}"},
        {"name": "ViT-S/16" if not quick else "ViT-tiny", "build": vit,
         "targets": [{"successor_depth": 2 if quick else 6}],
         "samples": {b: image_sample(b, 32 if quick else 224) for b in ([4] if quick else [1, 8])},
         "input": "32 x 32" if quick else "224 x 224"},
        {"name": "ResNet-50" if not quick else "ResNet-tiny", "build": resnet,
         "targets": [{"successor_depth": "halve_per_stage"}],
         "samples": {b: image_sample(b, 32 if quick else 224) for b in ([4] if quick else [1, 8])},
         "input": "32 x 32" if quick else "224 x 224"},
    ]


def depth_of(model: nn.Module) -> Any:
    if hasattr(model, "config"):
        return model.config.num_hidden_layers
    if hasattr(model, "blocks"):
        return len(model.blocks)
    return [len(getattr(model, f"layer{i}")) for i in range(1, 5)]


def repeats_for(batch: int, quick: bool, override: int = 0) -> int:
    # Enough repeats for a stable median at small batches; fewer where one forward takes seconds.
    if override:
        return override
    return 5 if quick else max(5, min(30, 120 // batch))


# ---------------------------------------------------------------- run
def run(quick: bool, device: torch.device, repeats: int = 0, warmup: int = 0) -> Dict[str, Any]:
    rows = []
    for case in cases(quick):
        torch.manual_seed(0)
        predecessor = case["build"](quick).to(device).eval()
        successors = {}
        for target in case["targets"]:
            if target.get("successor_depth") == "halve_per_stage":
                target = {"successor_depth": halve_per_stage(predecessor)}
            engine = Theseus(predecessor, **target)
            try:
                successor = engine.export().to(device).eval()
            finally:
                engine.unwrap()
            successors[str(depth_of(successor))] = successor
        models = {"predecessor": predecessor, **successors}
        for batch, make in case["samples"].items():
            sample = make(device)
            n = repeats_for(batch, quick, repeats)
            started = time.time()
            latency = measure_latency(models, sample, warmup=warmup or (1 if quick else 2), repeats=n)
            seconds = time.time() - started
            flops = {name: count_flops(m, sample) for name, m in models.items()}
            for name, successor in successors.items():
                rows.append({
                    "model": case["name"], "input": case["input"], "batch": batch,
                    "predecessor_depth": depth_of(predecessor), "successor_depth": depth_of(successor),
                    "predecessor_params": count_parameters(predecessor), "successor_params": count_parameters(successor),
                    "predecessor_latency_s": latency["predecessor"], "successor_latency_s": latency[name],
                    "speedup": latency["predecessor"] / latency[name],
                    "flops_ratio": flops["predecessor"] / flops[name],
                    "predecessor_gflops": flops["predecessor"] / 1e9, "successor_gflops": flops[name] / 1e9,
                    "repeats": n, "loadavg_1min_after": os.getloadavg()[0], "timing_wall_s": seconds,
                })
            print(f"  {case['name']} batch {batch}: {n} repeats in {seconds:.0f} s", flush=True)
    return {"benchmark": "speed", "quick": quick, "method": "measure_latency: alternating, warm-up, median",
            "resnet_rule": "ceil(n / 2) blocks per stage", "paper_bert_speedups": {"6": 1.94, "4": 2.82, "3": 3.66},
            "rows": rows}


def print_table(report: Dict[str, Any]) -> None:
    c = report["conditions"]
    print(f"\nInference speed-up, {c['device']} ({c['device_name']}), {c['torch_threads']} threads, "
          f"load avg {c['loadavg_1_5_15'][0]:.2f} at start; median of alternating repeats")
    print(f"{'model':<12} {'depth':>18} {'batch':>5} {'pred ms':>9} {'succ ms':>9} {'speed-up':>8} {'FLOPs ratio':>11} {'reps':>4}")
    for r in report["rows"]:
        depth = f"{r['predecessor_depth']} -> {r['successor_depth']}"
        print(f"{r['model']:<12} {depth:>18} {r['batch']:>5} {1e3 * r['predecessor_latency_s']:>9.1f} "
              f"{1e3 * r['successor_latency_s']:>9.1f} {r['speedup']:>7.2f}x {r['flops_ratio']:>10.2f}x {r['repeats']:>4}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, a few seconds (smoke test)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats per batch (default: by batch size)")
    p.add_argument("--warmup", type=int, default=0, help="untimed repeats first (default 2; 1 with --quick)")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/speed[_quick].json)")
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    started = time.time()
    before = conditions(device)
    report = run(args.quick, device, args.repeats, args.warmup)
    report["conditions"] = before
    path = args.output or os.path.join(RESULTS_DIR, "speed_quick.json" if args.quick else "speed.json")
    finish(report, path, "speed.py", argv, started)
    print_table(report)
    print(f"wrote {path} ({report['total_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
