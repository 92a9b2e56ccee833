"""Collect the quality runs into one table and one plot: accuracy against speed-up, per method and task.

Reads benchmarks/results/quality_*.json (written by quality.py; `_quick` files are skipped),
measures the speed-up of each task's successor shape over its predecessor shape (every
compressed method has the same shape, so one measurement per task and shape; the run's trained
predecessor is loaded when its file exists, since a budget plan depends on the weights, and the
measured shape's depths must equal the run's), and writes

  benchmarks/results/quality_summary.json    the numbers below, with the measurement conditions
  docs/images/accuracy_vs_speedup.png        test accuracy (mean +- std over seeds) against speed-up

and prints a Markdown table for the README.

    OMP_NUM_THREADS=1 python benchmarks/report_quality.py
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any, Dict, List

import torch
from safetensors.torch import load_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import REPO_ROOT, RESULTS_DIR, conditions, quiet_transformers, write_json  # noqa: E402

sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))

from theseus_general import Theseus  # noqa: E402
from theseus_general.measure import count_flops, measure_latency  # noqa: E402
from theseus_general.plots import plot_accuracy_vs_speedup  # noqa: E402

LABELS = {"theseus": "Theseus (default recipe)", "theseus_paper": "Theseus (paper recipe)",
          "theseus_linear": "Theseus (linear curriculum)", "theseus_constant": "Theseus (constant p)",
          "finetune_trained": "fine-tune-only (trained blocks)", "finetune_initial": "fine-tune-only (pre-task model)",
          "kd": "knowledge distillation"}


def predecessor_shape(report: Dict[str, Any]) -> tuple:
    """A model of the run's predecessor shape, and an input batch like the run's. The run's trained
    predecessor is loaded when its file is still there: a budget plan (which blocks, which widths)
    depends on the weights; the timing does not."""
    s = report["settings"]
    trained = s.get("predecessor") and os.path.exists(s["predecessor"])
    torch.manual_seed(0)
    if report["task"] == "text":
        import text_classification as tc
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if trained:
            model = AutoModelForSequenceClassification.from_pretrained(s["predecessor"])
        else:
            config = AutoConfig.from_pretrained(s["model"] or str(tc.default_model_path()), num_labels=2)
            model = AutoModelForSequenceClassification.from_config(config)
        ids = torch.randint(1000, 5000, (s["batch_size"], s["max_length"]))
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    import vision_classification as vc

    model = (vc.build_resnet(s["width"], [s["depth_pred"]] * 4) if report["task"] == "resnet"
             else vc.build_vit(s["width"], s["depth_pred"]))
    if trained:
        load_model(model, s["predecessor"])  # safetensors: no unpickling
    return model, torch.rand(s["batch_size"], 1, 28, 28)


def speed(report: Dict[str, Any], repeats: int) -> Dict[str, float]:
    model, sample = predecessor_shape(report)
    with Theseus(model, **report["target"]) as th:  # unwrapped again on leaving
        if th.plan.successor_depth != report["depth"]["successor"]:
            raise RuntimeError(f"{report['task']} {report['target']}: the shape timed here ({th.plan.successor_depth}) is not "
                               f"the run's ({report['depth']['successor']}); is the run's predecessor file "
                               f"({report['settings'].get('predecessor')}) missing? Its plan depends on its weights.")
        successor = th.export(native=report.get("native_export", True))  # the shape every compressed method has
    latency = measure_latency({"predecessor": model, "successor": successor}, sample, warmup=3, repeats=repeats)
    return {"speedup": latency["predecessor"] / latency["successor"],
            "flops_ratio": count_flops(model, sample) / count_flops(successor, sample),
            "batch": len(sample["input_ids"]) if isinstance(sample, dict) else len(sample)}


FAMILY = {"text": "MiniLM / Rotten Tomatoes", "vit": "ViT / Fashion-MNIST", "resnet": "ResNet / Fashion-MNIST"}


def task_label(report: Dict[str, Any]) -> str:
    depth = {k: sum(v.values()) for k, v in report["depth"].items()}
    planned = ", ".join(f"{k}={v}" for k, v in report["target"].items() if k in ("target_speedup", "successor_width"))
    return f"{FAMILY[report['task']]}, {depth['predecessor']} -> {depth['successor']}" + (f" ({planned})" if planned else "")


def shape_kind(target: Dict[str, Any]) -> str:
    width = target.get("successor_width")
    if width is None:
        return "depth only"
    if "target_speedup" in target or "ratio" in target:
        return "depth and width"
    return "width only"


# Two-sided 95% quantiles of Student's t, by degrees of freedom (seeds - 1): the paired interval of the
# quality protocol (docs/results.md#the-quality-protocol). Beyond 30 the normal quantile.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


NO_VERDICT = "none (fewer than 2 seeds)"


def paired_interval(differences: List[float]) -> Dict[str, Any]:
    """The mean of per-seed differences with its 95% t-interval, and the protocol's verdict: "ahead" when
    the interval lies above 0, "behind" below 0, "level" otherwise. With fewer than 2 seeds there is no
    interval, so there is no verdict either: "none (fewer than 2 seeds)"."""
    n = len(differences)
    mean = sum(differences) / n
    if n < 2:
        return {"n": n, "mean": mean, "half_width": None, "low": None, "high": None, "verdict": NO_VERDICT}
    sd = (sum((d - mean) ** 2 for d in differences) / (n - 1)) ** 0.5
    half = T_975.get(n - 1, 1.960) * sd / n ** 0.5
    low, high = mean - half, mean + half
    return {"n": n, "mean": mean, "half_width": half, "low": low, "high": high,
            "verdict": "ahead" if low > 0 else "behind" if high < 0 else "level"}


def paired_verdict(report: Dict[str, Any], method: str = "theseus", split: str = "test") -> Dict[str, Any]:
    """The protocol's verdict for one column: `method` minus the best baseline (the other method with the
    highest test mean: the strongest competitor; Theseus variants are not baselines), paired by seed.
    `split="dev"` pairs the dev scores against the same baseline (it is chosen by test mean either way)."""
    runs = report.get("runs") or {}
    summary = report["summary"]
    baselines = {m: r for m, r in summary.items() if not m.startswith("theseus") and m in runs}
    if method not in runs or not baselines:
        return {}
    best = max(baselines, key=lambda m: baselines[m]["test_mean"])
    seeds, differences = paired_differences(runs, method, best, split)
    if not differences:
        return {}
    return {"method": method, "best_baseline": best, "split": split, "seeds": seeds, "differences": differences,
            **paired_interval(differences)}


def paired_differences(runs: Dict[str, Any], method: str, other: str, split: str) -> tuple:
    """The seeds both methods ran, and `method` minus `other` on `split` for each."""
    seeds = sorted(set(runs[method]) & set(runs[other]), key=int)
    return seeds, [runs[method][s][split] - runs[other][s][split] for s in seeds]


def describe_interval(paired: Dict[str, Any]) -> str:
    """'+1.09 [+0.49, +1.70] points': a paired interval in points, as the docs quote it."""
    return f"{100 * paired['mean']:+.2f} [{100 * paired['low']:+.2f}, {100 * paired['high']:+.2f}] points"


def paired_report(report: Dict[str, Any], method: str = "theseus") -> Dict[str, Any]:
    """What a result JSON keeps under "paired": the protocol's verdict on test, the same pairs on dev, and
    `method` against every baseline on test; {} when the run has no `method` or no baseline."""
    test = paired_verdict(report, method)
    if not test:
        return {}
    runs = report["runs"]
    against = {baseline: paired_interval(paired_differences(runs, method, baseline, "test")[1])
               for baseline in runs if baseline != method and not baseline.startswith("theseus")}
    return {"test": test, "dev": paired_verdict(report, method, split="dev"), "against_each_baseline": against}


def annotate(paths: List[str]) -> None:
    """Add (or refresh) the "paired" intervals of result JSONs written before quality.py kept them."""
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        report["paired"] = paired_report(report)
        write_json(report, path)
        test = report["paired"].get("test")
        print(f"{path}: " + (f"{describe_interval(test)} against {test['best_baseline']}, {test['verdict']}"
                             if test and test["half_width"] is not None else "no paired interval (one seed, or no baseline)"))


def verdict(report: Dict[str, Any], method: str = "theseus") -> Dict[str, Any]:
    """Is `method` the best compressed model of this run? Its test mean against every other method's,
    and the margin over the best of them in pooled standard deviations (sqrt of the mean variance)."""
    summary = report["summary"]
    if method not in summary or len(summary) < 2:
        return {}
    ours = summary[method]
    others = {m: r for m, r in summary.items() if m != method}
    best_name, best = max(others.items(), key=lambda kv: kv[1]["test_mean"])
    pooled = ((ours["test_std"] ** 2 + best["test_std"] ** 2) / 2) ** 0.5
    margin = ours["test_mean"] - best["test_mean"]
    return {"method": method, "best_other": best_name, "margin": margin, "pooled_std": pooled,
            "margin_in_pooled_std": margin / pooled if pooled > 0 else None,
            "at_least_as_high_as_every_other": margin >= 0,
            "above_by_more_than_one_pooled_std": pooled > 0 and margin > pooled,
            "paired": paired_verdict(report, method)}


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15, help="latency repeats per model (median)")
    p.add_argument("--plot", default=os.path.join(REPO_ROOT, "docs", "images", "accuracy_vs_speedup.png"))
    p.add_argument("--output", default=os.path.join(RESULTS_DIR, "quality_summary.json"))
    p.add_argument("--results", default=RESULTS_DIR, help="directory of the quality_*.json files")
    p.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all)")
    p.add_argument("--by-shape", action="store_true",
                   help="one plot series per method and kind of shape (depth only, width only, depth and width): "
                        "the Pareto view of the budget planner's runs")
    p.add_argument("--annotate", nargs="+", metavar="JSON", default=None,
                   help="only add the paired intervals (rule 3) to these result JSONs, under \"paired\", and exit")
    args = p.parse_args(argv)
    if args.annotate:
        annotate(args.annotate)
        return {}
    quiet_transformers()
    rows: List[Dict[str, Any]] = []
    verdicts: Dict[str, Dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(args.results, "quality_*.json"))):
        if path.endswith(("_quick.json", "quality_summary.json")) or os.path.abspath(path) == os.path.abspath(args.output):
            continue
        with open(path) as f:
            report = json.load(f)
        if "depth" not in report or not report.get("summary"):
            continue  # an older format, or a run that has not finished a seed
        measured = speed(report, args.repeats)
        pred = report["predecessor"]["test"]
        if verdict(report):
            verdicts[f"{task_label(report)}, {report['settings']['steps']} steps"] = verdict(report)
        for method, r in report["summary"].items():
            if args.methods and method not in args.methods:
                continue
            wall = [run["train_s"] for run in report["runs"][method].values() if "train_s" in run]
            rows.append({"task": task_label(report), "family": FAMILY[report["task"]], "file": os.path.basename(path), "method": method,
                         "label": LABELS.get(method, method), "seeds": r["seeds"], "steps": report["settings"]["steps"],
                         "complete": report.get("complete", False), "predecessor_test": pred,
                         "accuracy": r["test_mean"], "accuracy_std": r["test_std"], "retention": r["test_mean"] / pred,
                         "dev": r["dev_mean"], "train_s_mean": sum(wall) / len(wall) if wall else None,
                         "lr": (report.get("grid", {}).get("chosen", {}).get(method) or {}).get("lr", report["settings"]["lr"]),
                         "shape": shape_kind(report["target"]),
                         **measured})
    if not rows:
        raise SystemExit(f"no quality results in {args.results}; run benchmarks/quality.py first")
    write_json({"rows": rows, "verdicts": verdicts, "conditions": conditions(torch.device("cpu"))}, args.output)
    predecessors = {(r["family"], r["predecessor_test"]) for r in rows}  # at 1.0x
    points = ([{"task": family, "method": "predecessor", "speedup": 1.0, "accuracy": acc} for family, acc in predecessors]
              + [{**r, "task": r["family"], "method": f"{r['label']}, {r['shape']}" if args.by_shape else r["label"]}
                 for r in rows])
    plot_accuracy_vs_speedup(sorted(points, key=lambda q: q["method"] != "predecessor"), args.plot,
                             title="Test accuracy (mean +- std over seeds) against measured speed-up")
    print("| task | steps | method | lr | seeds | test accuracy | % of predecessor | train s / run | speed-up (FLOPs ratio) |")
    print("|---|---:|---|---:|---:|---|---:|---:|---|")
    for r in rows:
        wall = f"{r['train_s_mean']:.0f}" if r["train_s_mean"] is not None else "-"
        print(f"| {r['task']} (predecessor {r['predecessor_test']:.4f}) | {r['steps']} | {r['label']} | {r['lr']:g} | "
              f"{r['seeds']} | {r['accuracy']:.4f} ± {r['accuracy_std']:.4f} | {100 * r['retention']:.1f}% | {wall} | "
              f"{r['speedup']:.2f}x ({r['flops_ratio']:.2f}x) |")
    for column, v in verdicts.items():
        print(f"{column}: Theseus {'is' if v['at_least_as_high_as_every_other'] else 'is not'} the best; "
              f"{v['margin']:+.4f} against {LABELS.get(v['best_other'], v['best_other'])} "
              f"({v['margin_in_pooled_std']:+.1f} pooled std)" if v["margin_in_pooled_std"] is not None else "")
        paired = v.get("paired")
        if paired and paired["half_width"] is not None:
            print(f"  paired over {paired['n']} seeds against {LABELS.get(paired['best_baseline'], paired['best_baseline'])}: "
                  f"{100 * paired['mean']:+.2f} ± {100 * paired['half_width']:.2f} points (95% t-interval): "
                  f"{paired['verdict']}")
    print()
    print(wide_table(rows))
    print(f"wrote {args.output} and {args.plot}")
    return {"rows": rows, "verdicts": verdicts}


def wide_table(rows: List[Dict[str, Any]]) -> str:
    """The README's table: one column per task and budget, one row per method; test accuracy mean +- std
    (share of the predecessor), the best per column in bold, then the chosen lr and the mean wall time."""
    columns = list(dict.fromkeys(f"{r['task']}, {r['steps']} steps" for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(f"{r['task']}, {r['steps']} steps", r["method"]): r for r in rows}
    best = {c: max((r for (col, _), r in cell.items() if col == c), key=lambda r: r["accuracy"]) for c in columns}
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    first = {c: next(r for (col, _), r in cell.items() if col == c) for c in columns}
    lines.append("| predecessor | " + " | ".join(f"{first[c]['predecessor_test']:.4f}" for c in columns) + " |")
    for m in methods:
        out = []
        for c in columns:
            r = cell.get((c, m))
            if r is None:
                out.append("-")
                continue
            text = f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f} ({100 * r['retention']:.1f}%)"
            out.append(f"**{text}**" if r is best[c] else text)
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(out) + " |")
    for m in methods:
        lines.append(f"| lr, train s/run: {LABELS.get(m, m)} | " + " | ".join(
            f"{cell[(c, m)]['lr']:g}, {cell[(c, m)]['train_s_mean']:.0f} s" if (c, m) in cell and cell[(c, m)]["train_s_mean"]
            else "-" for c in columns) + " |")
    lines.append("| speed-up (FLOPs ratio) | " + " | ".join(
        f"{first[c]['speedup']:.2f}x ({first[c]['flops_ratio']:.2f}x)" for c in columns) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
