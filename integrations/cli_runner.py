"""What every `theseus-compress` task shares: the engine from the config, training with the config's
settings (`theseus_general.training.fit`: device, mixed precision, checkpoints, progress, metrics)
and the closing report (accuracy, speed, FLOPs, plots). Tasks supply batches and a loss."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from ..config import TheseusConfig
from ..engine import Theseus
from ..graph import run_model
from ..measure import count_flops, count_parameters, measure_latency
from ..training import fit


def build_engine(model: nn.Module, config: Dict[str, Any]) -> Theseus:
    """The engine for a CLI config: its fields go into a `TheseusConfig`, which resolves the recipe (a
    field not given is the recipe's)."""
    th = Theseus(model, TheseusConfig(
        successor_depth=config["depth"], ratio=config["ratio"] if config["depth"] is None else None,
        recipe=config["recipe"], train_rest=config["train_rest"], seed=config["seed"],
        base_rate=config["base_rate"], replace_by=config["replace_by"], match_fraction=config["match_fraction"]))
    config["recipe"], config["train_rest"] = th.recipe.name, th.train_rest  # what ran, for results.json
    config["theseus_config"] = th.config.to_dict()
    return th


def train(th: Theseus, config: Dict[str, Any], batch_at: Callable[[int], Tuple[Any, torch.Tensor]],
          forward: Callable[[Any, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]) -> None:
    """`training.fit` with the config's settings: AdamW with linear decay for config['steps'] steps on
    config['device'] and config['mixed_precision']. `batch_at(position)` gives the batch at a data
    position (a function of the position alone, so a resumed run reads the same batches);
    `forward(inputs, labels)` gives (loss, logits), so the bar and the metrics show the batch accuracy."""
    checkpoints = os.path.join(config["output"], "checkpoints") if config["checkpoint_every"] else None
    fit(th, batch_at, config["steps"], loss=forward, lr=config["lr"], device=config["device"],
        mixed_precision=config["mixed_precision"], metrics=config["output"] if config["metrics"] else None,
        checkpoints=checkpoints, checkpoint_every=config["checkpoint_every"], desc="theseus")


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[Tuple[Any, torch.Tensor]], logits_of: Callable[[Any], torch.Tensor]) -> float:
    model.eval()
    correct = total = 0
    for inputs, labels in batches:
        correct += (logits_of(run_model(model, inputs)).argmax(-1) == labels).sum().item()
        total += len(labels)
    return correct / total


def report(predecessor: nn.Module, successor: nn.Module, config: Dict[str, Any], depths: Dict[str, Any],
           eval_batches: Optional[Callable[[], Iterable[Tuple[Any, torch.Tensor]]]],
           logits_of: Callable[[Any], torch.Tensor], sample: Any) -> Dict[str, Any]:
    """Parameters, FLOPs and measured speed of both models on `sample`; accuracy on the eval data when
    given. Printed as a table and written to OUTPUT/results.json, with plots when asked."""
    models = {"predecessor": predecessor, "successor": successor}
    latency = measure_latency(models, sample, warmup=2, repeats=10)
    flops = {name: count_flops(m, sample) for name, m in models.items()}
    rows = {}
    for name, model in models.items():
        rows[name] = {"blocks": depths[name], "parameters": count_parameters(model), "flops": flops[name],
                      "latency_ms": 1000 * latency[name], "speedup": latency["predecessor"] / latency[name],
                      "accuracy": accuracy(model, eval_batches(), logits_of) if eval_batches else None}
    result = {"config": config, "models": rows, "flops_ratio": flops["predecessor"] / flops["successor"]}
    print(f"\n{'model':<12} {'blocks':>12} {'params':>11} {'GFLOPs':>8} {'ms/batch':>9} {'speed-up':>9} {'accuracy':>9}")
    for name, r in rows.items():
        acc = f"{r['accuracy']:.4f}" if r["accuracy"] is not None else "n/a"
        blocks = "/".join(str(n) for n in r["blocks"].values())
        print(f"{name:<12} {blocks:>12} {r['parameters']:>11,} {r['flops'] / 1e9:>8.2f} "
              f"{r['latency_ms']:>9.1f} {r['speedup']:>8.2f}x {acc:>9}")
    print(f"FLOPs ratio {result['flops_ratio']:.2f}x (speed-up measured on one batch of {config['batch_size']}, "
          f"{torch.get_num_threads()} threads)")
    with open(os.path.join(config["output"], "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    if config["plots"]:
        result["plots"] = _plots(rows, config)
    return result


def _plots(rows: Dict[str, Dict[str, Any]], config: Dict[str, Any]) -> Dict[str, str]:
    from ..plots import plot_comparison, plot_curriculum

    out = {}
    if config["metrics"]:
        out["curriculum"] = plot_curriculum(config["output"], os.path.join(config["output"], "curriculum.png"))
    if all(r["accuracy"] is not None for r in rows.values()):
        out["comparison"] = plot_comparison([{"name": n, **r} for n, r in rows.items()],
                                            os.path.join(config["output"], "comparison.png"))
    for path in out.values():
        print(f"plot: {path}")
    return out
