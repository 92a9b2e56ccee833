"""Whether ``Theseus(model, successor_depth=d, groups="importance", sample=...)`` is the measured `theseus_bi`.

`benchmarks/llm_quality.py`'s `theseus_bi` built its groups by hand (ShortGPT's Block Influence on the first
--calibration-rows training rows, `examples/llm_compression.layer_removal_student_kwargs`). This check builds
both on SmolLM2-135M from the same rows, at each depth, and compares: the kept layers, the groups, every
successor's weights, and the losses of a few `fit` steps at the same seed (the default recipe, as in
`llm_quality.py`). Equal everywhere means the quality protocol's `theseus_bi` figures are this option's.

    python benchmarks/importance_groups_check.py --depths 20 15 --steps 5 \\
        --output benchmarks/results/protocol/llm/importance_groups_check.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO_ROOT, conditions, finish, quiet_transformers, seed_run  # noqa: E402

sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))
import llm_compression as llm  # noqa: E402
from llm_quality import data  # noqa: E402

from theseus_general import Theseus  # noqa: E402
from theseus_general.training import fit  # noqa: E402


def losses_of_fit(th: Theseus, batch_at, steps: int, lr: float) -> List[float]:
    result = fit(th, batch_at, steps, loss=lambda inputs, labels: llm.lm_loss(th.model(**inputs).logits, labels),
                 lr=lr, device="cpu", lr_schedule="linear", progress=False)
    return [float(v) for v in result.losses]


def check_depth(model, depth: int, calibration: torch.Tensor, batch_at, args) -> Dict[str, Any]:
    scores = llm.block_influence(model, calibration)
    by_hand, kept_by_hand = llm.layer_removal_student_kwargs(scores, depth)
    row: Dict[str, Any] = {"kept_by_hand": kept_by_hand}
    engines = {}
    importance = {"successor_depth": depth, "groups": "importance", "sample": {"input_ids": calibration}}
    for name, kwargs in (("by_hand", by_hand), ("importance", importance)):
        seed_run(args.seed)  # as llm_quality.py's train() before each method
        th = Theseus(model, seed=args.seed, **kwargs)
        try:
            row[f"groups_{name}"] = [list(g.blocks) for g in th.plan.groups]
            row[f"may_choose_starts_{name}"] = th.may_choose_starts
            weights = [{k: v.clone() for k, v in s.state_dict().items()} for s in th.successors()]
            row[f"losses_{name}"] = losses_of_fit(th, batch_at, args.steps, args.lr) if args.steps else []
            engines[name] = weights
        finally:
            th.unwrap()
    row["same_groups"] = row["groups_by_hand"] == row["groups_importance"]
    row["same_start_weights"] = len(engines["by_hand"]) == len(engines["importance"]) and all(
        a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for a, b in zip(engines["by_hand"], engines["importance"]))
    row["same_losses"] = row["losses_by_hand"] == row["losses_importance"]
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[20, 15])
    p.add_argument("--steps", type=int, default=5, help="fit steps compared per depth (0: none)")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", required=True)
    args = p.parse_args(argv)
    # the data exactly as llm_quality.py makes it (its defaults: split seed 0, 4,200 test and 1,000 dev snippets)
    rows_args = argparse.Namespace(test_snippets=4200, dev_snippets=1000, seq_len=64)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    started = time.time()
    model, tokenizer = llm.load_smollm2()
    rows = data(tokenizer, rows_args)
    calibration = rows["train"][:16]  # llm_quality.py's --calibration-rows default
    report: Dict[str, Any] = {"benchmark": "importance_groups_check", "settings": vars(args),
                              "conditions": conditions(torch.device("cpu")), "depths": {}}
    for depth in args.depths:
        row = check_depth(model, depth, calibration, llm.batches_of(rows["train"], 4, args.seed), args)
        report["depths"][str(depth)] = row
        print(f"30 -> {depth}: kept {row['kept_by_hand']}; same groups {row['same_groups']}, same start weights "
              f"{row['same_start_weights']}, same {args.steps}-step losses {row['same_losses']}", flush=True)
    finish(report, args.output, "importance_groups_check.py", argv, started)
    if not all(r[k] for r in report["depths"].values() for k in ("same_groups", "same_start_weights", "same_losses")):
        raise SystemExit("groups=\"importance\" is not the measured theseus_bi: see " + args.output)


if __name__ == "__main__":
    main()
