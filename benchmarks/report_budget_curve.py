"""The budget curve (issue 23): accuracy against training steps for each method, with the protocol's
paired verdict at each budget, equal-compute figures read off the curves, and the plot.

Each input is one quality.py report at one step budget (the same task, predecessor and seeds; parts
merged with quality.py --merge first). Per budget: each method's test mean and 95% t-interval over the
seeds, Theseus minus the best baseline paired by seed (report_quality.paired_verdict), and the mean
training time per run. Equal compute: each baseline's test accuracy at Theseus's mean training time
of that budget, interpolated along the baseline's own curve (linear in log time; only inside the
times it was measured at, and only between budgets trained on the same device, else blank; --machine
gives the budgets timed on another machine of that device type an axis of their own).

    python benchmarks/report_budget_curve.py benchmarks/results/budget_curve/vit_r0.25_s*.json \\
        --output benchmarks/results/budget_curve/vit_r0.25.json --plot docs/images/budget_curve_vit.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import write_json  # noqa: E402
from report_quality import describe_interval, paired_interval, paired_verdict  # noqa: E402

LABELS = {"theseus": "Theseus (default)", "finetune_trained": "fine-tune-only (trained blocks)",
          "finetune_initial": "fine-tune-only (pre-task model)", "kd": "knowledge distillation"}


def interval(values: List[float]) -> Dict[str, float]:
    """Mean and 95% t half-width over seeds: the protocol's own interval, on the values themselves."""
    p = paired_interval(values)
    return {"mean": p["mean"], "half_width": p["half_width"] or 0.0, "n": p["n"]}


def at_time(curve: List[Dict[str, float]], seconds: float) -> Optional[float]:
    """Test accuracy at `seconds` of training, linear in log time between measured budgets."""
    points = sorted((p["train_s"], p["test"]) for p in curve)
    for (t0, a0), (t1, a1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            w = (math.log(seconds) - math.log(t0)) / (math.log(t1) - math.log(t0)) if t1 > t0 else 0.0
            return a0 + w * (a1 - a0)
    return None


def build(reports: List[Dict[str, Any]]) -> Dict[str, Any]:
    reports = sorted(reports, key=lambda r: r["settings"]["steps"])
    budgets = []
    for report in reports:
        methods = {}
        for method, by_seed in report["runs"].items():
            tests = [r["test"] for _, r in sorted(by_seed.items(), key=lambda kv: int(kv[0]))]
            methods[method] = {"test": interval(tests), "train_s": statistics.mean(r["train_s"] for r in by_seed.values()),
                               "lr": report.get("grid", {}).get("chosen", {}).get(method, {}).get("lr"),
                               "settings": report.get("grid", {}).get("chosen", {}).get(method)}
        budgets.append({"steps": report["settings"]["steps"], "seeds": report["settings"]["seeds"],
                        "batch_size": report["settings"].get("batch_size"),
                        "device": report["settings"].get("device", "cpu"),
                        "predecessor": report["predecessor"], "methods": methods,
                        "verdict": paired_verdict(report), "complete": report.get("complete", False)})
    for b in budgets:
        if "theseus" in b["methods"]:
            # seconds on a GPU and on a CPU are not one time axis: read each baseline's curve only
            # along the budgets measured on the same device as this one
            same = [o for o in budgets if o["device"] == b["device"]]
            curves = {m: [{"train_s": o["methods"][m]["train_s"], "test": o["methods"][m]["test"]["mean"]}
                          for o in same if m in o["methods"]] for m in sorted({m for o in same for m in o["methods"]})}
            t = b["methods"]["theseus"]["train_s"]
            b["equal_compute"] = {"theseus_train_s": t, **{m: at_time(c, t) for m, c in curves.items() if m != "theseus"}}
    return {"task": reports[0]["task"], "target": reports[0]["target"], "depth": reports[0]["depth"],
            "budgets": budgets, "inputs": [r.get("command") for r in reports]}


def advice(curve: Dict[str, Any]) -> List[str]:
    """One line per budget: which method to use there, by the paired verdict."""
    lines = []
    for b in curve["budgets"]:
        v = b["verdict"]
        if not v:
            continue
        other = LABELS.get(v["best_baseline"], v["best_baseline"])
        pick = ("Theseus" if v["verdict"] == "ahead" else other if v["verdict"] == "behind"
                else f"either (Theseus and {other} are level)")
        lines.append(f"{b['steps']} steps: {pick}; Theseus - {other} = {describe_interval(v)} ({v['verdict']})")
    return lines


def table(curve: Dict[str, Any]) -> str:
    budgets = curve["budgets"]
    head = "| method | " + " | ".join(f"{b['steps']} steps" for b in budgets) + " |"
    rows = [head, "|---" * (len(budgets) + 1) + "|"]
    methods = [m for m in LABELS if any(m in b["methods"] for b in budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            r = b["methods"].get(m)
            on = "" if b["device"] == "cpu" else f" on {b['device']}"
            cells.append("" if r is None else f"{r['test']['mean']:.4f} ± {r['test']['half_width']:.4f} "
                         f"(lr {r['lr']:g}, {r['train_s']:.0f} s{on})")
        rows.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    cells = []
    for b in budgets:
        v = b["verdict"]
        cells.append(f"{v['mean'] * 100:+.2f} [{v['low'] * 100:+.2f}, {v['high'] * 100:+.2f}] **{v['verdict']}**" if v else "")
    rows.append("| Theseus − best baseline, points (95% t) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def steps_label(curve: Dict[str, Any]) -> str:
    """The x axis: steps, with the batch size when every budget used the same one (the curves differ: ViT 128, text 32)."""
    sizes = {b.get("batch_size") for b in curve["budgets"]}
    return f"training steps (batch {sizes.pop()})" if len(sizes) == 1 and None not in sizes else "training steps"


def plot(curve: Dict[str, Any], path: str, methods: Optional[List[str]] = None) -> None:
    """methods: those to draw (default all); e.g. leave out a method run at one budget only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = [(m, label) for m, label in LABELS.items() if methods is None or m in methods]
    for i, (m, label) in enumerate(drawn):
        points = [(b["steps"], b["methods"][m]["test"]) for b in curve["budgets"] if m in b["methods"]]
        if points:  # each method a little to the side, so that the intervals do not hide each other
            ax.errorbar([s * 1.04 ** (i - (len(drawn) - 1) / 2) for s, _ in points], [r["mean"] for _, r in points], yerr=[r["half_width"] for _, r in points],
                        marker="o", capsize=3, label=label)
    ax.axhline(curve["budgets"][0]["predecessor"]["test"], color="grey", linestyle="--", label="predecessor")
    ax.set_xscale("log")
    ax.set_xlabel(steps_label(curve))
    ax.set_ylabel("test accuracy (mean, 95% t-interval)")
    depth = {k: sum(v.values()) for k, v in curve["depth"].items()}
    ax.set_title(f"{curve['task']} {depth['predecessor']} -> {depth['successor']} blocks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="quality.py JSONs, one per step budget")
    p.add_argument("--output", default=None, help="the curve as JSON")
    p.add_argument("--plot", default=None, help="a PNG of the curve (needs matplotlib)")
    p.add_argument("--plot-methods", nargs="+", default=None, choices=sorted(LABELS),
                   help="methods to draw (default: all); the table and verdicts keep every method")
    p.add_argument("--machine", nargs="+", default=[], metavar="JSON=LABEL",
                   help="inputs timed on another machine of the same device type (e.g. a slower CPU): their "
                        "seconds get a time axis of their own, so equal compute is never read across machines")
    args = p.parse_args(argv)
    pairs = [spec.partition("=") for spec in args.machine]
    unknown = [path + sep + label for path, sep, label in pairs if not sep or path not in args.reports]
    if unknown:
        p.error(f"--machine {unknown}: each must be JSON=LABEL with JSON one of the reports given")
    machines = {path: label for path, _, label in pairs}
    reports = []
    for path in args.reports:
        with open(path) as f:
            report = json.load(f)
        if path in machines:  # the label joins the device, the key build() keeps time axes apart by
            report["settings"] = dict(report["settings"], device=f"{report['settings'].get('device', 'cpu')}, {machines[path]}")
        reports.append(report)
    curve = build(reports)
    curve["advice"] = advice(curve)
    print(table(curve))
    print("\n".join(curve["advice"]))
    if args.output:
        write_json(curve, args.output)
    if args.plot:
        plot(curve, args.plot, args.plot_methods)
    return curve


if __name__ == "__main__":
    main()
