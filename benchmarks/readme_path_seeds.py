"""The README-path test's task over seeds: the default recipe and issue 26's round-6 candidates against
fine-tune-only (the trained model's bottom layers), at several learning rates.

  default                 Theseus(model, successor_depth=2) + fit, as a user gets it
  candidate               benchmarks/_common.candidate_recipe: p = 1 at 10%, matching a collapsed start only
  group_last_no_matching  each successor starts as its group's last block, no matching (a screen)
  finetune_group_last     fine-tune-only from that same start (the predecessor with blocks dropped)
  rest_frozen             the default with train_rest=False (round 10)
  rest_after_mixing       benchmarks/_common.rest_after_mixing_recipe: the rest trains once p = 1 (round 10)
  prefix_mixing           benchmarks/_common.prefix_mixing_recipe: successors replace a prefix of the groups (round 10)
  quarter_full            the default with p reaching 1 at 25% of the run (`replace_by=0.25`, round 10)

`tests/test_recipes.py::test_readme_path_at_default_settings_is_not_worse_than_fine_tune_only` runs one
seed; this runs --seeds of the Theseus draws (and of dropout's generator) on the same task, so that one
seed's reading can be told from the recipe's. A tiny random BERT, CPU, seconds per run.

    python benchmarks/readme_path_seeds.py --lrs 3e-5 1e-4 3e-4 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (REPO_ROOT, RESULTS_DIR, candidate_recipe, conditions, finish, prefix_mixing_recipe,  # noqa: E402
                     rest_after_mixing_recipe, seed_run, write_json)

sys.path.insert(0, os.path.join(REPO_ROOT, "tests"))

from test_recipes import held_out_accuracy, teacher_task  # noqa: E402  (the test's own task)

from theseus_general import Theseus, fit  # noqa: E402
from theseus_general.baselines import successor_shaped_copy  # noqa: E402


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=40, help="the test's steps")
    p.add_argument("--variants", nargs="+", default=["default", "candidate"],
                   choices=["default", "candidate", "group_last_no_matching", "finetune_group_last", "rest_frozen",
                            "rest_after_mixing", "prefix_mixing", "quarter_full"])
    p.add_argument("--output", default=os.path.join(RESULTS_DIR, "recipe_lr", "readme_path_seeds.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    teacher, train, test = teacher_task(args.steps)
    # name -> (Theseus keyword arguments, fit keyword arguments)
    variants = {"default": ({}, {}), "candidate": ({"recipe": candidate_recipe()}, {}),
                "group_last_no_matching": ({"init": "group_last"}, {"match_steps": 0}),
                "rest_frozen": ({"train_rest": False}, {}), "rest_after_mixing": ({"recipe": rest_after_mixing_recipe()}, {}),
                "prefix_mixing": ({"recipe": prefix_mixing_recipe()}, {}),
                "quarter_full": ({"replace_by": 0.25}, {})}
    # fine-tune-only: name -> the start (`init`; None: the bottom blocks, truncation), always "finetune" first
    baselines = {"finetune": None}
    if "finetune_group_last" in args.variants:
        baselines["finetune_group_last"] = "group_last"
    report: Dict[str, Any] = {"benchmark": "readme_path_seeds", "settings": vars(args),
                              "conditions": conditions(torch.device("cpu")), "runs": {}}
    for lr in args.lrs:
        runs = report["runs"].setdefault(f"{lr:g}", {})
        for seed in args.seeds:
            for name, init in baselines.items():
                seed_run(seed)
                student = successor_shaped_copy(teacher, successor_depth=2, init=init)
                fit(student, train, args.steps, lr=lr, progress=False)
                runs.setdefault(name, []).append(held_out_accuracy(student, test))
            for name in [v for v in args.variants if v in variants]:
                engine_options, fit_options = variants[name]
                seed_run(seed)
                th = Theseus(teacher, successor_depth=2, seed=seed, **engine_options)
                fit(th, train, args.steps, lr=lr, progress=False, **fit_options)
                successor = th.export()
                th.unwrap()
                runs.setdefault(name, []).append(held_out_accuracy(successor, test))
        print(f"lr {lr:g}: " + " | ".join(f"{n} {statistics.mean(a):.4f} {[round(x, 3) for x in a]}"
                                          for n, a in runs.items()), flush=True)
        write_json(report, args.output)
    return finish(report, args.output, "readme_path_seeds.py", argv, started)


if __name__ == "__main__":
    main()
