"""One table from quality.py runs of single variants: the dev effect of each mechanism of the recipe.

Each variant is a `quality.py --methods theseus ...` (or theseus_paper) run over seeds 0-2 at the
family's fixed learning rate, saved to its own JSON; this script reads them, computes each
variant's dev mean and std and its difference from the column's reference variant, and writes
results/quality_ablation.json (with every run's command). Dev only: the choice of the default was
made on these numbers; test accuracies stay in the source JSONs.

    python benchmarks/report_ablation.py --column "text 6 -> 3, 100 steps" --reference base \\
        base=results/ablation/t100_base.json match20=results/ablation/t100_m20x10.json ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, write_json  # noqa: E402


def variant_row(label: str, path: str) -> Dict[str, Any]:
    with open(path) as f:
        report = json.load(f)
    (method, by_seed), = report["runs"].items()  # one method per variant run
    dev = [r["dev"] for r in by_seed.values()]
    return {"variant": label, "method": method, "seeds": sorted(by_seed), "dev": dev,
            "dev_mean": statistics.mean(dev), "dev_std": statistics.stdev(dev) if len(dev) > 1 else 0.0,
            "train_s": [round(r["train_s"], 1) for r in by_seed.values()],
            "source": os.path.relpath(path, RESULTS_DIR), "command": report.get("command")}


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--column", required=True, help="the column's name in the table")
    p.add_argument("--reference", required=True, help="the variant the others are compared with")
    p.add_argument("variants", nargs="+", metavar="LABEL=JSON")
    p.add_argument("--output", default=os.path.join(RESULTS_DIR, "quality_ablation.json"))
    args = p.parse_args(argv)
    rows: List[Dict[str, Any]] = [variant_row(*item.rsplit("=", 1)) for item in args.variants]
    reference = next((r for r in rows if r["variant"] == args.reference), None)
    if reference is None:
        raise SystemExit(f"error: the reference {args.reference!r} is not among the variants")
    for r in rows:
        r["dev_delta"] = r["dev_mean"] - reference["dev_mean"]
    table = {}
    if os.path.exists(args.output):
        with open(args.output) as f:
            table = json.load(f)
    table.setdefault("columns", {})[args.column] = {"reference": args.reference, "rows": rows}
    write_json(table, args.output)
    print(f"| {args.column}: variant | dev (mean ± std, seeds 0-2) | vs {args.reference} |")
    print("|---|---|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['dev_mean']:.4f} ± {r['dev_std']:.4f} | {100 * r['dev_delta']:+.1f} pt |")
    return table


if __name__ == "__main__":
    main()
