"""The default recipe's parts at the learning rates users run, against fine-tune-only (issue 26).

One text task (benchmarks/quality.py's: data, predecessor, batches, evaluation and `run_method`),
the predecessor evaluated once, then every --variants entry at every --lrs value and seed, each
in the same `fit` with the same batches. A variant is a quality.py method plus overrides of the
Theseus flags; ``match_lr_x`` sets matching's lr to that multiple of the run's lr.

    python benchmarks/recipe_lr.py --predecessor DIR --model DIR --depth 6 --lrs 3e-5 \
        --variants finetune default no_matching no_choose_start paper \
        --output benchmarks/results/recipe_lr/s12_lr3e-5.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RECIPE_FACTORIES, conditions, finish, quiet_transformers, seed_run, write_json  # noqa: E402
import quality  # noqa: E402

# name -> the quality.py method and the flags it overrides
VARIANTS: Dict[str, Dict[str, Any]] = {
    "finetune": dict(method="finetune_trained"),
    "default": dict(method="theseus"),  # the library's default recipe, as Theseus(...) + fit give it
    # the default until issue 26, now recipe="matching": matching 20% at lr 1e-3 after the start-block choice
    "matching": dict(method="theseus", match_fraction=0.2, match_lr=1e-3, choose_start=True),
    "no_matching": dict(method="theseus", match_fraction=0.0),  # no matching, hence no start-block choice
    "no_choose_start": dict(method="theseus", choose_start=False),
    "match_lr_1x_no_choose": dict(method="theseus", choose_start=False, match_lr_x=1.0),
    "match_lr_10x_no_choose": dict(method="theseus", choose_start=False, match_lr_x=10.0),
    "match_lr_10x": dict(method="theseus", match_lr_x=10.0),
    "match_lr_30x": dict(method="theseus", match_lr_x=30.0),
    "no_matching_rest_frozen": dict(method="theseus", match_fraction=0.0, train_rest=False),
    "rest_frozen": dict(method="theseus", train_rest=False),  # the default with embeddings and head frozen
    "former": dict(method="theseus_paper"),  # rest frozen, linear p 0.3 -> 1 at --replace-by, no matching
    "paper": dict(method="theseus", paper=True),  # recipe="paper": the published fixed slope, rest frozen
    # the default with p reaching 1 at 10% of the run instead of 50% (a short mixed phase), with or without matching
    "early_full": dict(method="theseus", full_at=0.1),
    "early_full_no_matching": dict(method="theseus", full_at=0.1, match_steps=0),
    # round 10's third candidate: p reaching 1 at a quarter of the run (the recipe's matching decision kept)
    "quarter_full": dict(method="theseus", full_at=0.25),
    # each successor from its group's last block (a coherent mix: the all-successor model drops blocks), no matching
    "group_last_no_matching": dict(method="theseus", init="group_last", match_fraction=0.0),
    # issue 26's candidate default of round 6 (benchmarks/_common.candidate_recipe): both changes together
    "candidate": dict(method="theseus", recipe_factory="candidate"),
    # round 7's candidate (benchmarks/_common.collapsed_trigger_recipe): only the matching trigger changed
    "collapsed_trigger": dict(method="theseus", recipe_factory="collapsed_trigger"),
    # round 8's candidate (benchmarks/_common.pooled_check_recipe): the start check pooled over 128 predictions
    "pooled_check": dict(method="theseus", recipe_factory="pooled_check"),
    # round 9's candidate (benchmarks/_common.offset_aware_recipe): a one-class binary start collapsed only if its
    # logits no longer vary (spread below 1e-3 of the predecessor's)
    "offset_aware": dict(method="theseus", recipe_factory="offset_aware"),
    # round 10's candidates: `rest_frozen` above, and the rest's copies training only once p reaches 1
    "rest_after_mixing": dict(method="theseus", recipe_factory="rest_after_mixing"),
    # round 10's second candidate: the successors replace a prefix of the groups (mixing="prefix")
    "prefix_mixing": dict(method="theseus", recipe_factory="prefix_mixing"),
    # the bert recipe as round 10 adopted it, and round 11's candidate: collapsed below 1e-2 of the predecessor's
    # spread (not 1e-3), and a matched start keeps the default's phase
    "bert_r10": dict(method="theseus", recipe_factory="bert_r10"),
    "bert_r11": dict(method="theseus", recipe_factory="bert_r11"),
    # round 12's candidate: round 11's limit alone, so a matched start gets the short phase too
    "bert_r12": dict(method="theseus", recipe_factory="bert_r12"),
    # round 13's candidate: round 12's (the shipped bert recipe) with matching's lr probed per model
    "bert_r13": dict(method="theseus", recipe_factory="bert_r13"),
}


def variant_args(args: argparse.Namespace, name: str, lr: float, seed: int) -> argparse.Namespace:
    spec = dict(VARIANTS[name])
    spec.pop("method")
    spec.pop("recipe_factory", None)
    settings = dict(vars(args), lr=lr, seeds=[seed])
    ratio = spec.pop("match_lr_x", None)
    if ratio is not None:
        settings["match_lr"] = ratio * lr
    settings.update(spec)
    return argparse.Namespace(**settings)


def main(argv=None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["finetune", "default", "no_matching"])
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-5])
    p.add_argument("--output", required=True)
    own, rest = p.parse_known_args(argv)
    args = quality.parse_args(["--task", "text"] + rest)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    started = time.time()
    task = quality.TextTask(args)
    predecessor = task.predecessor().eval()
    task.native = quality.native_export_possible(predecessor, task.target)
    report: Dict[str, Any] = {
        "benchmark": "recipe_lr", "data": task.source, "settings": dict(vars(args), variants=own.variants, lrs=own.lrs),
        "variants": {n: VARIANTS[n] for n in own.variants}, "conditions": conditions(torch.device("cpu")),
        "target": task.target, "depth": quality.plan_depths(predecessor, task.target),
        "predecessor": task.evaluate(predecessor), "runs": [],
    }
    print(f"predecessor: {report['predecessor']}", flush=True)
    for seed in args.seeds:
        for lr in own.lrs:
            for name in own.variants:
                t = time.time()
                run_args = variant_args(args, name, lr, seed)
                notes: Dict[str, Any] = {}
                if VARIANTS[name].get("paper"):
                    model = paper_run(task, predecessor, seed, run_args)
                elif "recipe_factory" in VARIANTS[name]:  # a named recipe of benchmarks/_common
                    recipe = RECIPE_FACTORIES[VARIANTS[name]["recipe_factory"]]()
                    model = theseus_run(task, predecessor, seed, run_args, name, {}, notes, recipe=recipe)
                elif "full_at" in VARIANTS[name]:
                    model = full_at_run(task, predecessor, seed, run_args, VARIANTS[name], notes)
                else:
                    model = quality.run_method(VARIANTS[name]["method"], task, predecessor, seed, run_args, notes)
                row = dict(variant=name, lr=lr, seed=seed, **task.evaluate(model), train_s=round(time.time() - t, 1), **notes)
                report["runs"].append(row)
                print(f"  seed {seed} lr {lr:g} {name:<24} dev {row['dev']:.4f} test {row['test']:.4f} "
                      f"({row['train_s']:.0f} s) {notes or ''}", flush=True)
                write_json(report, own.output)
    return finish(report, own.output, "recipe_lr.py", argv, started)


def theseus_run(task, predecessor, seed: int, args: argparse.Namespace, desc: str, fit_options: Dict[str, Any],
                notes: Optional[Dict[str, Any]] = None, **theseus_options):
    """One Theseus run as a user writes it, `Theseus(...)` + `fit(...)`, for the variants quality.py's
    methods do not express; `notes` (if given) receives the start blocks and the curriculum's end."""
    from theseus_general import Theseus
    from theseus_general.training import fit

    seed_run(seed)
    th = Theseus(predecessor, **task.target, seed=seed, **theseus_options)
    try:
        result = fit(th, task.batches(seed), args.steps, lr=args.lr, weight_decay=args.weight_decay,
                     lr_schedule="linear", device=args.device, desc=desc, **fit_options)
        if notes is not None:
            notes["match_steps"] = len(result.matching.history) if result.matching is not None else 0
            if result.matching is not None:
                notes["match_lr"] = result.matching.match_lr
                probe = result.matching.match_lr_probe
                if probe is not None:
                    notes["match_lr_probe"] = {f"{lr:g}": round(e, 5) for lr, e in probe.errors.items()}
            notes["start_blocks"] = {str(g): b for g, b in sorted(th.successor_starts.items())}
            notes["full_at"] = th.recipe.full_at
            notes["start_agreement"], notes["start_collapsed"] = result.start_agreement, result.start_collapsed
            notes["start_predictions"], notes["start_spread"] = result.start_predictions, result.start_spread
        return th.export(native=task.native)
    finally:
        th.unwrap()


def paper_run(task, predecessor, seed: int, args: argparse.Namespace):
    """recipe="paper" as a user gets it: rest frozen, p = min(1, 0.3 + 6e-4 t), no matching."""
    return theseus_run(task, predecessor, seed, args, "paper", {}, recipe="paper")


def full_at_run(task, predecessor, seed: int, args: argparse.Namespace, spec: Dict[str, Any], notes: Dict[str, Any]):
    """The family's default recipe with its curriculum reaching p = 1 at `full_at` of the run (the config's
    `replace_by`), and with `match_steps` if the variant sets it (else the recipe decides)."""
    from theseus_general.config import TheseusConfig

    fit_options = {"match_steps": spec["match_steps"]} if "match_steps" in spec else {}
    return theseus_run(task, predecessor, seed, args, "theseus", fit_options, notes,
                       config=TheseusConfig(replace_by=spec["full_at"]))


if __name__ == "__main__":
    main()
