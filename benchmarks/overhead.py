"""Training-step time and peak memory of a wrapped model, next to plain steps of the same model.

Model: a BERT of MiniLM-L6's shape (6 layers, hidden 384, 12 heads, intermediate 1536,
vocab 30522; random weights), sequence classification, batch 8, sequence 128,
compressed 6 -> 3. One step = forward, loss, backward, AdamW step, zero_grad (and
``th.step()`` for the engine). Variants:

  plain_full            the predecessor, every parameter trained (an ordinary fine-tuning step)
  plain_frozen          the predecessor with the engine's frozen parameters and its trainable set:
                        successor copies kept in the graph by the same ``+ 0 * sum(params)`` the
                        engine adds (hooks on each group's last block) - the reference for p = 0
  theseus_p0 / p0.5 / p1   the wrapped model at a constant replacement rate
  successor_frozen_rest the exported successor with embeddings and head frozen - the reference for p = 1
  successor_full        the exported successor, every parameter trained

Time: all variants in one process, alternating every repeat after a warm-up; median and
quartiles. Memory: on CPU each variant runs in a fresh process (full mode) and a thread samples
its resident set size; reported are the RSS after model, optimiser and one step, and the peak
rise above it during the timed steps. On CUDA: torch.cuda.max_memory_allocated.

    python benchmarks/overhead.py               # writes benchmarks/results/overhead.json
    python benchmarks/overhead.py --quick       # tiny model, seconds
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import statistics
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, conditions, finish, pick_device, quiet_transformers  # noqa: E402

from theseus_general import ConstantScheduler, Theseus  # noqa: E402

VARIANTS = ("plain_full", "plain_frozen", "theseus_p0", "theseus_p0.5", "theseus_p1",
            "successor_frozen_rest", "successor_full")


def config(quick: bool) -> Dict[str, Any]:
    if quick:
        return dict(layers=4, hidden=32, heads=2, intermediate=64, vocab=1000, batch=4, length=16, depth=2)
    return dict(layers=6, hidden=384, heads=12, intermediate=1536, vocab=30522, batch=8, length=128, depth=3)


def build_predecessor(cfg: Dict[str, Any]) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"], intermediate_size=cfg["intermediate"], num_labels=2))


def make_batch(cfg: Dict[str, Any], device: torch.device) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg["vocab"], (cfg["batch"], cfg["length"]), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 2, (cfg["batch"],), generator=g).to(device)}


class Variant:
    """A model, the parameters its optimiser updates, and what runs after each step."""

    def __init__(self, model: nn.Module, params: List[nn.Parameter], after: Optional[Callable] = None, keep=None):
        self.model, self.after, self.keep = model, after, keep
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)
        if isinstance(keep, Theseus):
            keep.attach(self.optimizer)  # the rest is frozen here: idle successors get the zero anchor

    def step(self, batch: Dict[str, torch.Tensor]) -> None:
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.after is not None:
            self.after()


def _anchor_hook(params: List[nn.Parameter]) -> Callable:
    # What the engine does for a group that ran its predecessor, done by hand on a plain model.
    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        anchor = torch.stack([p.sum() for p in params]).sum() * 0.0
        return (out[0] + anchor,) + tuple(out[1:]) if isinstance(out, tuple) else out + anchor
    return hook


def build_variant(name: str, cfg: Dict[str, Any], device: torch.device) -> Variant:
    base = build_predecessor(cfg).to(device)
    if name == "plain_full":
        return Variant(base, list(base.parameters()))
    if name.startswith("theseus_p"):
        th = Theseus(base, successor_depth=cfg["depth"], scheduler=ConstantScheduler(float(name[len("theseus_p"):])),
                     train_rest=False)  # the references below train the blocks only
        th.model.train()
        return Variant(th.model, th.trainable_parameters(), th.step, keep=th)
    th = Theseus(copy.deepcopy(base), successor_depth=cfg["depth"])
    successor = th.export().to(device)
    if name == "plain_frozen":
        copies = [copy.deepcopy(g.successor) for g in th.groups]
        th.unwrap()
        for p in base.parameters():
            p.requires_grad_(False)
        params = [p for c in copies for p in c.parameters()]
        layers = base.bert.encoder.layer
        for group, c in zip(th.plan.groups, copies):
            layers[group.blocks[-1]].register_forward_hook(_anchor_hook(list(c.parameters())))
        base.train()
        return Variant(base, params, keep=copies)
    successor.train()
    if name == "successor_frozen_rest":
        for p in successor.parameters():
            p.requires_grad_(False)
        for p in successor.bert.encoder.layer.parameters():
            p.requires_grad_(True)
        return Variant(successor, [p for p in successor.parameters() if p.requires_grad])
    if name == "successor_full":
        return Variant(successor, list(successor.parameters()))
    raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")


# ---------------------------------------------------------------- time
def time_steps(variants: Dict[str, Variant], batch: Dict[str, torch.Tensor], warmup: int, repeats: int,
               device: torch.device) -> Dict[str, Dict[str, float]]:
    """Median and quartiles of step seconds, variants alternating every repeat."""
    times: Dict[str, List[float]] = {n: [] for n in variants}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for v in variants.values():
            v.step(batch)
    for _ in tqdm(range(repeats), desc="timing steps", leave=False):
        for name, v in variants.items():
            sync()
            start = time.perf_counter()
            v.step(batch)
            sync()
            times[name].append(time.perf_counter() - start)
    out = {}
    for name, t in times.items():
        q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0]] * 3
        out[name] = {"median_s": statistics.median(t), "q1_s": q[0], "q3_s": q[2], "n": len(t)}
    return out


# ---------------------------------------------------------------- memory
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_memory(name: str, cfg: Dict[str, Any], device_name: str, steps: int, threads: int) -> Dict[str, float]:
    """RSS after setup and one step, and the peak rise during `steps` more (sampled every ms)."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    variant = build_variant(name, cfg, device)
    batch = make_batch(cfg, device)
    variant.step(batch)  # optimiser state and allocator pools exist from here on
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            variant.step(batch)
        torch.cuda.synchronize()
        return {"allocated_after_setup_mb": base / 2**20,
                "step_peak_rise_mb": (torch.cuda.max_memory_allocated(device) - base) / 2**20}
    base = _rss_bytes()
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(steps):
        variant.step(batch)
    done.set()
    sampler.join()
    return {"rss_after_setup_mb": base / 2**20, "step_peak_rise_mb": (max(peak[0], _rss_bytes()) - base) / 2**20}


def memory_all(cfg: Dict[str, Any], device: torch.device, steps: int, threads: int, isolate: bool) -> Dict[str, Any]:
    results = {}
    for name in tqdm(VARIANTS, desc="memory", leave=False):
        if isolate and device.type == "cpu":
            # A fresh process per variant: RSS is never given back reliably, so in one process
            # every later variant would look cheaper than it is.
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                results[name] = pool.apply(measure_memory, (name, cfg, str(device), steps, threads))
        else:
            results[name] = measure_memory(name, cfg, str(device), steps, threads)
    return results


# ---------------------------------------------------------------- report
def run(quick: bool, device: torch.device, repeats: int, warmup: int, threads: int) -> Dict[str, Any]:
    cfg = config(quick)
    batch = make_batch(cfg, device)
    variants = {name: build_variant(name, cfg, device) for name in VARIANTS}
    timing = time_steps(variants, batch, warmup, repeats, device)
    del variants
    memory = memory_all(cfg, device, 2 if quick else 5, threads, isolate=not quick)
    ref = timing["plain_frozen"]["median_s"]
    noise = max((t["q3_s"] - t["q1_s"]) / t["median_s"] for t in timing.values())
    return {
        "benchmark": "overhead", "quick": quick, "config": cfg,
        "timing": timing, "memory": memory,
        "memory_method": ("peak RSS rise in a fresh process per variant, sampled every 1 ms" if not quick and device.type == "cpu"
                          else "in-process" + (" torch.cuda.max_memory_allocated" if device.type == "cuda" else " RSS sampling")),
        "engine_overhead_p0": timing["theseus_p0"]["median_s"] / ref - 1,
        "engine_overhead_p1_vs_successor_frozen_rest":
            timing["theseus_p1"]["median_s"] / timing["successor_frozen_rest"]["median_s"] - 1,
        "largest_relative_iqr": noise,
    }


def print_report(report: Dict[str, Any]) -> None:
    c, cfg = report["conditions"], report["config"]
    print(f"\nTraining step, BERT {cfg['layers']} -> {cfg['depth']} layers, hidden {cfg['hidden']}, batch {cfg['batch']}, "
          f"sequence {cfg['length']}; {c['device']}, {c['torch_threads']} threads, load avg {c['loadavg_1_5_15'][0]:.2f}")
    mem_key = "rss_after_setup_mb" if "rss_after_setup_mb" in next(iter(report["memory"].values())) else "allocated_after_setup_mb"
    print(f"{'variant':<22} {'median ms':>9} {'q1-q3 ms':>15} {'vs plain_frozen':>15} {mem_key:>20} {'step peak rise MB':>17}")
    ref = report["timing"]["plain_frozen"]["median_s"]
    for name, t in report["timing"].items():
        m = report["memory"][name]
        print(f"{name:<22} {1e3 * t['median_s']:>9.1f} {1e3 * t['q1_s']:>7.1f}-{1e3 * t['q3_s']:<7.1f} "
              f"{t['median_s'] / ref:>14.3f}x {m[mem_key]:>20.1f} {m['step_peak_rise_mb']:>17.1f}")
    print(f"engine overhead at p = 0 (theseus_p0 vs plain_frozen): {100 * report['engine_overhead_p0']:+.1f}%; "
          f"at p = 1 vs successor_frozen_rest: {100 * report['engine_overhead_p1_vs_successor_frozen_rest']:+.1f}%; "
          f"largest relative IQR {100 * report['largest_relative_iqr']:.1f}%")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, seconds (smoke test)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 40; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default 3; 1 with --quick)")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/overhead[_quick].json)")
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    device = pick_device(args.device)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    started = time.time()
    before = conditions(device)
    repeats = args.repeats or (5 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    report = run(args.quick, device, repeats, warmup, args.threads)
    report["conditions"] = before
    path = args.output or os.path.join(RESULTS_DIR, "overhead_quick.json" if args.quick else "overhead.json")
    finish(report, path, "overhead.py", argv, started)
    print_report(report)
    print(f"wrote {path} ({report['total_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
