"""PNG plots of a compression run (matplotlib, imported only when a plot is drawn).

* ``plot_curriculum``: the replacement rate and the training loss over steps;
* ``plot_comparison``: accuracy and speed-up of predecessor, successor and baselines side by side;
* ``plot_accuracy_vs_speedup``: one point per method (mean +- std over seeds), a panel per task.

Figures are built with ``matplotlib.figure.Figure`` rather than pyplot, so drawing one never
changes the user's pyplot state or backend.
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .errors import TheseusError
from .metrics import read_metrics

Series = Dict[str, List[Tuple[int, float]]]


def _figure(width: float, height: float, ncols: int = 1):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise TheseusError("Plots need matplotlib: `pip install matplotlib` "
                           "(or `pip install theseus-general[examples]`).") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _moving_average(values: Sequence[float], window: int) -> List[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curriculum(metrics: Union[str, Series], path: str, title: Optional[str] = None,
                    loss: str = "loss", rate: str = "replacement_rate", smooth: int = 20) -> str:
    """Training loss (raw and a `smooth`-step moving average) and the replacement rate over steps.
    `metrics` is a metrics.csv, its directory, or ``read_metrics`` output."""
    series = read_metrics(metrics) if isinstance(metrics, str) else metrics
    missing = [name for name in (loss, rate) if name not in series]
    if missing:
        raise TheseusError(f"plot_curriculum needs the metrics {missing}; the run logged {sorted(series)}.")
    fig, (ax,) = _figure(7, 3.6)
    steps, values = zip(*series[loss])
    ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.plot(steps, _moving_average(values, smooth), color="tab:blue", label=f"{loss} ({smooth}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    right = ax.twinx()
    rate_steps, rates = zip(*series[rate])
    right.plot(rate_steps, rates, color="tab:red", label="replacement rate p")
    right.set_ylim(-0.02, 1.05)
    right.set_ylabel("replacement rate p", color="tab:red")
    full = next((s for s, r in series[rate] if r >= 1.0), None)
    if full is not None:
        ax.axvline(full, color="gray", linestyle=":", linewidth=1)
        ax.annotate("p = 1: successors only", (full, 1), xycoords=("data", "axes fraction"), xytext=(4, -24),
                    textcoords="offset points", fontsize=8, color="gray")
    ax.set_title(title or "Replacement curriculum and training loss")
    return _save(fig, path)


def plot_comparison(rows: Sequence[Mapping], path: str, title: Optional[str] = None) -> str:
    """Two bar charts side by side: accuracy and speed-up over the predecessor.
    rows: ``{"name", "accuracy", "speedup"}`` each (speed-up 1.0 for the predecessor; None if unmeasured)."""
    if not rows:
        raise TheseusError("plot_comparison needs at least one row.")
    fig, (acc_ax, speed_ax) = _figure(8, 3.4, ncols=2)
    names = [r["name"] for r in rows]
    colors = ["tab:gray" if i == 0 else "tab:green" if ("theseus" in n.lower() or n == "successor") else "tab:orange"
              for i, n in enumerate(names)]  # predecessor, Theseus successor, baselines
    for ax, key, label, fmt in ((acc_ax, "accuracy", "accuracy", "{:.3f}"), (speed_ax, "speedup", "speed-up (x)", "{:.2f}x")):
        values = [float(r[key]) if r.get(key) is not None else 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colors)
        for bar, row, value in zip(bars, rows, values):
            text = fmt.format(value) if row.get(key) is not None else "n/a"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(0, max(values) * 1.15 if max(values) > 0 else 1)
    accuracies = [float(r["accuracy"]) for r in rows]
    low = min(accuracies)
    acc_ax.set_ylim(max(0.0, low - 0.1), min(1.0, max(accuracies) + 0.03) if max(accuracies) <= 1 else None)
    fig.suptitle(title or "Accuracy and speed")
    return _save(fig, path)


def plot_accuracy_vs_speedup(points: Sequence[Mapping], path: str, title: Optional[str] = None,
                             dodge: float = 0.02) -> str:
    """points: ``{"task", "method", "speedup", "accuracy", "accuracy_std" (optional)}``; one panel per task,
    one marker per method, error bars = std over seeds. Methods that share a speed-up (the same
    successor shape) are spread sideways by `dodge` (a fraction of the speed-up) so none hides another."""
    if not points:
        raise TheseusError("plot_accuracy_vs_speedup needs at least one point.")
    tasks = list(dict.fromkeys(p["task"] for p in points))
    methods = list(dict.fromkeys(p["method"] for p in points))
    markers = "o s D ^ v P X * h".split()
    # at least 9 inches wide: the title and a legend of three columns need it with one panel
    fig, axes = _figure(max(3.8 * len(tasks), 9.0), 3.8 + 0.2 * ((len(methods) + 2) // 3), ncols=len(tasks))
    for ax, task in zip(axes, tasks):
        for i, method in enumerate(methods):
            mine = [p for p in points if p["task"] == task and p["method"] == method]
            if not mine:
                continue
            shift = 1 + dodge * (i - (len(methods) - 1) / 2)
            xs = [p["speedup"] * (shift if p["speedup"] != 1.0 else 1.0) for p in mine]  # 1.0x: the reference
            ax.errorbar(xs, [p["accuracy"] for p in mine],
                        yerr=[p.get("accuracy_std") or 0.0 for p in mine], fmt=markers[i % len(markers)],
                        color=f"C{i}", label=method, capsize=3, markersize=6, alpha=0.85)
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("measured speed-up over predecessor (x)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:  # every method once, whichever panel has it
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8)
    fig.suptitle(title or "Accuracy against speed-up")
    return _save(fig, path)
