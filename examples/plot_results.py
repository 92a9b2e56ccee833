"""Plots of an example run, from its results.json: the replacement curriculum with the training
loss (curriculum.png), and accuracy and speed of predecessor, Theseus successor and baselines
side by side (comparison.png). The text and vision examples call this at the end of a run;
to redraw from a saved run:

    python examples/plot_results.py examples/output/text/results.json
"""

from __future__ import annotations

import json
import os
import sys
from typing import Dict

from theseus_general.plots import plot_comparison, plot_curriculum


def plot_example_results(report: dict, directory: str) -> Dict[str, str]:
    curve = report["replacement_curve"]  # (step, rate, loss) per Theseus step
    series = {"loss": [(s, loss) for s, _, loss in curve], "replacement_rate": [(s, rate) for s, rate, _ in curve]}
    speedup = report["speed"]["speedup"]  # every compressed model has the successor's shape
    rows = [{"name": name, "accuracy": r["test_accuracy"], "speedup": 1.0 if name == "predecessor" else speedup}
            for name, r in report["results"].items()]
    what = report.get("family", "text")
    return {
        "curriculum": plot_curriculum(series, os.path.join(directory, "curriculum.png"),
                                      title=f"{what}: replacement rate and Theseus training loss"),
        "comparison": plot_comparison(rows, os.path.join(directory, "comparison.png"),
                                      title=f"{what}: test accuracy and measured speed-up (seed {report['seed']})"),
    }


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    with open(sys.argv[1]) as f:
        written = plot_example_results(json.load(f), os.path.dirname(os.path.abspath(sys.argv[1])))
    for path in written.values():
        print(path)
