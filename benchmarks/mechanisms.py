"""Issue 23's mechanisms, each as one change to the model family's recipe, measured on the dev split only.

Every variant trains the same successor shape from the same predecessor, with the same batches per
seed, the same steps and the same lr (the default recipe's lr chosen on dev for that budget), in
`theseus_general.fit`. Only dev accuracy is computed: the test split stays for the protocol's runs.

  default             Theseus(model, ...) + fit as a user gets it, with the model family's recipe ("bert"
                      on BERT encoders, "default" on the ViT); the variants below change that recipe
                      (module matching runs when the start collapsed, from the chosen start blocks;
                      before round 7: agreement below 2/3)
  agreement_trigger   the default before round 7: module matching when the start's agreement with the
                      predecessor is below 2/3 (instead of when it collapsed)
  candidate           issue 26's candidate default (round 6): p = 1 at 10% of the run, matching only a
                      collapsed start (benchmarks/_common.candidate_recipe)
  no_matching         fit(..., match_steps=0)
  lr_compensation     the successors' lr times min(--compensation-cap, 1/p) while p < 1
  mixed_matching      + --matching-weight x the successors' local relative squared error against their
                      groups through the mixed phase
  blend               (1 - p) * group + p * successor instead of random draws (DCR-style)
  importance_groups   groups and starts from Block Influence (the budget planner: the most important
                      blocks are kept, each dropped block joins the kept block before it, each successor
                      starts as its group's kept block), at the same depth; models of one block
                      container only (a ResNet's four stages are refused before any run)
  group_first         each successor starts as its group's first block (LLM-Streamline's start)

Task, data and predecessor flags are quality.py's (--task, --arch, --ratio, --depth, --predecessor, ...).
With --baseline (a quality.py JSON of the same column, steps and seeds), each variant is also paired
with that JSON's fine-tune-only and KD dev accuracies, seed by seed.

    python benchmarks/mechanisms.py --task vision --arch vit --ratio 0.25 --steps 400 --lr 4e-3 \\
        --predecessor PRED.safetensors --seeds 0 1 2 --baseline benchmarks/results/budget_curve/vit_r0.25_s400.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RECIPE_FACTORIES, RESULTS_DIR, conditions, finish, seed_run, write_json  # noqa: E402
from quality import TextTask, VisionTask, native_export_possible, parse_args as quality_args, plan_depths  # noqa: E402
from report_quality import paired_interval  # noqa: E402

from theseus_general import AdapterError, Theseus, detect_adapter  # noqa: E402
from theseus_general.budget import profile_blocks  # noqa: E402
from theseus_general.planning import container_at  # noqa: E402
from theseus_general.recipes import Recipe, get_recipe  # noqa: E402
from theseus_general.training import fit, resolve_device  # noqa: E402

VARIANTS = ("default", "agreement_trigger", "candidate", "no_matching", "lr_compensation", "mixed_matching", "blend", "importance_groups", "group_first")
BASELINES = ("finetune_trained", "kd")


def dev_accuracy(task: Any, model: torch.nn.Module) -> float:
    if isinstance(task, VisionTask):
        n = task.args.eval_limit
        return task.vc.accuracy(model, *(t[:n] for t in task.data.dev))
    return task.tc.accuracy(model, task.dev)


def first_inputs(task: Any, seed: int) -> Any:
    inputs, _ = next(iter(task.batches(seed)))
    return inputs


def importance_target(predecessor: torch.nn.Module, container: str, depth: int, sample: Any) -> Dict[str, Any]:
    """Budget-planner arguments that keep exactly `depth` blocks of `container`: a FLOPs target half a
    block above the rest plus `depth` blocks (the planner keeps the most important ones)."""
    profile = profile_blocks(predecessor, {container: container_at(predecessor, container)}, sample)
    costs = profile.costs[container]
    kept = sorted(costs)[:depth]  # equal blocks in the models measured here; the cheapest bound otherwise
    fraction = (profile.rest + sum(kept) + 0.5 * min(costs)) / profile.total
    return {"target_flops": fraction, "sample": sample,
            "importance": [round(v, 4) for v in profile.importance[container]]}


def variant_recipe(name: str, predecessor: torch.nn.Module, args: argparse.Namespace) -> Optional[Recipe]:
    """The recipe a variant runs: None (the family's, as a user gets it) or one change to the family's
    recipe ("bert" on BERT encoders, so a text variant does not also lose the bert recipe's settings).
    `agreement_trigger` and `candidate` are whole recipes built on "default", for the ViT's history; on a
    BERT encoder they also drop the bert recipe's settings."""
    if name in RECIPE_FACTORIES:  # a named recipe of benchmarks/_common (candidate, agreement_trigger)
        return RECIPE_FACTORIES[name]()
    try:
        family = get_recipe(detect_adapter(predecessor).default_recipe)
    except AdapterError:  # a model only the generic route takes: its recipe is "default"
        family = get_recipe("default")
    return {"lr_compensation": dataclasses.replace(family, lr_compensation=args.compensation_cap),
            "mixed_matching": dataclasses.replace(family, mixed_matching=args.matching_weight),
            "blend": dataclasses.replace(family, mixing="blend")}.get(name)


def run_variant(name: str, task: Any, predecessor: torch.nn.Module, seed: int, args: argparse.Namespace,
                depths: Dict[str, int]) -> Dict[str, Any]:
    started = time.time()
    seed_run(seed)
    recipe = variant_recipe(name, predecessor, args)
    target: Dict[str, Any] = dict(task.target)
    notes: Dict[str, Any] = {}
    if name == "importance_groups":
        (container, depth), = depths.items()  # one container: main() refuses importance_groups otherwise
        planned = importance_target(predecessor, container, depth, first_inputs(task, 0))
        notes["block_influence"] = planned.pop("importance")
        target = planned
    th = Theseus(predecessor, **target, recipe=recipe, seed=seed,
                 init="group_first" if name == "group_first" else None)
    try:
        if th.plan.successor_depth != depths:
            raise RuntimeError(f"{name}: the plan has depths {th.plan.successor_depth}, not {depths}")
        result = fit(th, task.batches(seed), args.steps, lr=args.lr, weight_decay=args.weight_decay,
                     device=args.device, progress=False, desc=name,
                     **({"match_steps": 0} if name == "no_matching" else {}))
        notes.update(groups=[list(g.blocks) for g in th.plan.groups],
                     start_blocks={str(g): b for g, b in sorted(th.successor_starts.items())},
                     start_agreement=result.start_agreement,
                     match_steps=len(result.matching.history) if result.matching is not None else 0)
        model = th.export(native=task.native)
    finally:
        th.unwrap()
    return dict(dev=dev_accuracy(task, model), train_s=time.time() - started, **notes)


def compare(runs: Dict[str, Dict[str, Dict[str, Any]]], against: Dict[str, Dict[str, float]]) -> Dict[str, Any]:
    """Each variant minus each reference (dev, in points), paired by seed, with the 95% t-interval."""
    out: Dict[str, Any] = {}
    for variant, by_seed in runs.items():
        for reference, dev in against.items():
            if reference == variant:
                continue
            seeds = sorted(set(by_seed) & set(dev), key=int)
            if seeds:
                out.setdefault(variant, {})[reference] = paired_interval(
                    [100 * (by_seed[s]["dev"] - dev[s]) for s in seeds])
    return out


def baseline_dev(path: Optional[str]) -> Dict[str, Dict[str, float]]:
    if not path:
        return {}
    with open(path) as f:
        report = json.load(f)
    return {m: {s: r["dev"] for s, r in report["runs"][m].items()} for m in BASELINES if m in report["runs"]}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    own = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                  add_help=False)
    own.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    own.add_argument("--compensation-cap", type=float, default=3.0, help="lr_compensation's cap on 1/p")
    own.add_argument("--matching-weight", type=float, default=1.0, help="mixed_matching's loss weight")
    own.add_argument("--baseline", default=None, help="a quality.py JSON of the same column (its dev runs)")
    own.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge parts into --output")
    mine, rest = own.parse_known_args(argv)
    if mine.merge:
        output = quality_args(rest).output
        if not output:
            raise SystemExit("--merge needs --output")
        return merge(mine.merge, output)
    args = argparse.Namespace(**{**vars(quality_args(rest)), **vars(mine)})
    started = time.time()
    torch.set_num_threads(args.threads)
    task = TextTask(args) if args.task == "text" else VisionTask(args)
    predecessor = task.predecessor().eval()
    task.native = native_export_possible(predecessor, task.target)
    depths = plan_depths(predecessor, task.target)["successor"]
    if "importance_groups" in mine.variants and len(depths) != 1:  # before any run, not at its turn
        raise SystemExit(f"importance_groups plans the groups of one block container, and this model has "
                         f"{len(depths)} ({', '.join(depths)}); leave it out of --variants for this model.")
    name = f"{task.name}_{'r' + str(args.ratio) if args.task == 'vision' else 'd' + str(args.depth)}_s{args.steps}"
    path = args.output or os.path.join(RESULTS_DIR, "mechanisms", f"{name}.json")
    report: Dict[str, Any] = {
        "benchmark": "mechanisms", "task": task.name, "data": task.source, "steps": args.steps, "lr": args.lr,
        "depth": next(iter(depths.values())), "settings": vars(args), "conditions": conditions(resolve_device(args.device)),
        "predecessor_dev": dev_accuracy(task, predecessor), "runs": {}, "complete": False,
    }
    for seed in args.seeds:
        for variant in mine.variants:
            result = run_variant(variant, task, predecessor, seed, args, depths)
            report["runs"].setdefault(variant, {})[str(seed)] = result
            print(f"  seed {seed} {variant}: dev {result['dev']:.4f} ({result['train_s']:.0f} s, "
                  f"matching {result['match_steps']} steps, groups {result['groups']})", flush=True)
            report["total_s"] = time.time() - started
            write_json(report, path)
    report["baseline"] = mine.baseline
    report["complete"] = True
    return finish(summarise(report), path, "mechanisms.py", argv, started)


def summarise(report: Dict[str, Any]) -> Dict[str, Any]:
    """Means, and each variant paired with the default and the --baseline JSON's methods; prints them."""
    references = dict(baseline_dev(report.get("baseline")))
    references["default"] = {s: r["dev"] for s, r in report["runs"].get("default", {}).items()}
    report["paired_dev_points"] = compare(report["runs"], references)
    report["summary"] = {v: {"dev_mean": sum(r["dev"] for r in runs.values()) / len(runs),
                             "train_s_mean": sum(r["train_s"] for r in runs.values()) / len(runs)}
                         for v, runs in report["runs"].items()}
    for variant, row in report["summary"].items():
        pairs = "; ".join(f"vs {ref} {p['mean']:+.2f} [{p['low'] if p['low'] is None else round(p['low'], 2)}, "
                          f"{p['high'] if p['high'] is None else round(p['high'], 2)}] {p['verdict']}"
                          for ref, p in report["paired_dev_points"].get(variant, {}).items())
        print(f"{variant:18s} dev {row['dev_mean']:.4f}  {row['train_s_mean']:.0f} s  {pairs}")
    return report


def merge(paths: List[str], output: str) -> Dict[str, Any]:
    """One report from parts run side by side (the same column, steps and lr; disjoint variant x seed runs)."""
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    first = parts[0]
    for part in parts[1:]:
        for key in ("task", "steps", "lr", "depth", "predecessor_dev"):
            if part[key] != first[key]:
                raise SystemExit(f"--merge: {key} differs between the parts ({part[key]!r} vs {first[key]!r})")
    report = dict(first, runs={}, parts=paths, complete=all(p["complete"] for p in parts),
                  total_s=sum(p["total_s"] for p in parts))
    for part in parts:
        for variant, runs in part["runs"].items():
            for seed, run in runs.items():
                if seed in report["runs"].get(variant, {}):
                    raise SystemExit(f"--merge: {variant} seed {seed} is in two parts")
                report["runs"].setdefault(variant, {})[seed] = run
    report = summarise(report)
    report["command"] = "python benchmarks/mechanisms.py --merge " + " ".join(paths) + f" --output {output}"
    write_json(report, output)
    return report


if __name__ == "__main__":
    main()
