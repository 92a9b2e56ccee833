"""What the first batches say about a truncated start (`theseus_general.matching.check_start`).

For each of the first --batches training batches of --seed, the successors alone (the default init)
against the predecessor: their agreement, and how many distinct classes each answers. Task, data and
predecessor flags are quality.py's. Prints one line per batch and writes nothing.

    python benchmarks/start_checks.py --task text --model MPNET_DIR --predecessor preds/mpnet_rt --depth 6 \\
        --max-length 32 --batch-size 16 --dev-size 500 --test-size 1500 --batches 8
    python benchmarks/start_checks.py --task vision --arch vit --ratio 0.25 --predecessor PRED --data-dir DATA
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality import TextTask, VisionTask, parse_args as quality_args  # noqa: E402

from theseus_general import Theseus  # noqa: E402
from theseus_general.matching import StartCheck, check_start  # noqa: E402
from theseus_general.recipes import get_recipe  # noqa: E402
from theseus_general.training import _read_start  # noqa: E402


def main(argv: Optional[List[str]] = None) -> List[StartCheck]:
    own = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                  add_help=False)
    own.add_argument("--batches", type=int, default=1, help="how many of the first training batches")
    own.add_argument("--seed", type=int, default=0, help="the batch order's seed")
    own.add_argument("--pooled", type=int, default=0, metavar="N",
                     help="also print the check pooled over the first batches until N predictions, as fit reads it "
                          "for a recipe with start_check_predictions=N")
    mine, rest = own.parse_known_args(argv)
    args = quality_args(rest)
    torch.set_num_threads(args.threads)
    task = TextTask(args) if args.task == "text" else VisionTask(args)
    predecessor = task.predecessor().eval()
    # the default recipe, reading --pooled predictions when asked (the recipe changes nothing but that read here)
    recipe = dataclasses.replace(get_recipe("default"), start_check_predictions=max(mine.pooled, 1))
    th = Theseus(predecessor, **task.target, validate=False, recipe=recipe)
    try:
        checks = [check_start(th, inputs) for inputs, _ in itertools.islice(task.batches(mine.seed), mine.batches)]
        if mine.pooled:
            _, pooled = _read_start(th, task.batches(mine.seed))
    finally:
        th.unwrap()
    for i, c in enumerate(checks):
        print(f"batch {i}: agreement {c.agreement:.3f}, classes start {c.start_classes} / predecessor "
              f"{c.predecessor_classes}, spread ratio {c.spread_ratio}, collapsed {c.collapsed} "
              f"(under the recipe: {c.collapsed_under(recipe.collapse_spread)})")
    if mine.pooled:
        print(f"pooled over {pooled.predictions} predictions: agreement {pooled.agreement:.3f}, classes start "
              f"{pooled.start_classes} / predecessor {pooled.predecessor_classes}, spread ratio {pooled.spread_ratio}, "
              f"collapsed {pooled.collapsed} (under the recipe: {pooled.collapsed_under(recipe.collapse_spread)})")
        checks.append(pooled)
    return checks


if __name__ == "__main__":
    main()
