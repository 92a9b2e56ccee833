"""The default recipe's parts on SmolLM2-135M's decoder, one change at a time, against fine-tune-only
(issue 26's ablation on the decoder LLM).

The README's path on a causal LM: ``Theseus(model, successor_depth=d)`` (the library's default init,
successor i a copy of layer i) and `fit` with a causal-LM loss, at --lr. Every variant and the
fine-tune-only baseline (the first d layers, fine-tuned) read the same batches in the same order
(examples/llm_compression.py's data: Rotten Tomatoes snippets packed into rows of --seq-len tokens);
each student is exported natively and its held-out perplexity measured on --test-rows rows.

  default            Theseus(model, successor_depth=d) + fit, as a user gets it (module matching only
                     when the start collapsed; before round 7: agreement below 2/3)
  matching           recipe="matching": always match (20% of the steps, lr 1e-3, start-block choice)
  no_matching        fit(..., match_steps=0)
  matching_no_choose recipe="matching" without the start-block choice
  rest_frozen        the default with train_rest=False
  former             rest frozen, p from 0.3 to 1 at half the run, no matching (the recipe before matching)
  paper              recipe="paper": rest frozen, p = min(1, 0.3 + 6e-4 t), no matching
  candidate          issue 26's candidate default (round 6): p = 1 at 10% of the run, matching only a
                     collapsed start (benchmarks/_common.candidate_recipe)
  match_auto         the default with match_lr="auto": matching's lr chosen per model by a probe (round 13)
  fine_tune_only     the first d layers, fine-tuned (truncation)

    python benchmarks/llm_recipe_ablation.py --depth 20 --steps 100 --lr 1e-4 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (REPO_ROOT, RESULTS_DIR, candidate_recipe, conditions, finish, quiet_transformers,  # noqa: E402
                     seed_run, write_json)

sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))

import llm_compression as llm  # noqa: E402

from theseus_general import Theseus  # noqa: E402
from theseus_general.baselines import fine_tune_only  # noqa: E402
from theseus_general.training import fit  # noqa: E402

# name -> (Theseus keyword arguments, fit keyword arguments)
VARIANTS: Dict[str, tuple] = {
    "default": ({}, {}),
    "matching": ({"recipe": "matching"}, {}),
    "no_matching": ({}, {"match_steps": 0}),
    "matching_no_choose": ({"recipe": "matching", "choose_start": False}, {}),
    "rest_frozen": ({"train_rest": False}, {}),
    "former": ({"recipe": "default", "train_rest": False}, {"match_steps": 0}),
    "paper": ({"recipe": "paper"}, {}),
    "candidate": ({"recipe": candidate_recipe()}, {}),
    "match_auto": ({"match_lr": "auto"}, {}),
}
METHODS = tuple(VARIANTS) + ("fine_tune_only",)


def train(name: str, model, depth: int, batch_at, args: argparse.Namespace) -> tuple:
    """The student of `name` (exported, native) and what the run decided."""
    seed_run(args.seed)
    common = dict(lr=args.lr, device="cpu", lr_schedule="linear")
    if name == "fine_tune_only":
        return fine_tune_only(model, batch_at, args.steps, task_loss=llm.lm_loss, successor_depth=depth,
                              validate=False, **common), {}
    engine_kwargs, fit_kwargs = VARIANTS[name]
    th = Theseus(model, successor_depth=depth, validate=False, seed=args.seed, **engine_kwargs)
    try:
        result = fit(th, batch_at, args.steps, loss=lambda inputs, labels: llm.lm_loss(th.model(**inputs).logits, labels),
                     desc=name, progress=False, **fit_kwargs, **common)
        notes = {"recipe": th.recipe.name, "train_rest": th.train_rest, "start_agreement": result.start_agreement,
                 "match_steps": len(result.matching.history) if result.matching else 0,
                 "start_blocks": {str(g): b for g, b in sorted(th.successor_starts.items())}}
        if result.matching is not None:
            notes["match_lr"] = result.matching.match_lr
            if result.matching.match_lr_probe is not None:
                notes["match_lr_probe"] = {f"{lr:g}": e for lr, e in result.matching.match_lr_probe.errors.items()}
        return th.export(), notes
    finally:
        th.unwrap()


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20, help="successor layers (SmolLM2 has 30)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--test-rows", type=int, default=256, help="held-out rows of --seq-len tokens")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sharing", default="", help="what else ran on the machine's cores meanwhile (recorded)")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/recipe_lr/smollm2_d<depth>.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    started = time.time()
    path = args.output or os.path.join(RESULTS_DIR, "recipe_lr", f"smollm2_d{args.depth}.json")
    model, tokenizer = llm.load_smollm2()
    train_texts, test_texts = llm.review_texts(args.seed)
    train_rows = llm.packed_sequences(tokenizer, train_texts, args.seq_len)
    test_rows = llm.packed_sequences(tokenizer, test_texts, args.seq_len)[: args.test_rows]
    batch_at = llm.batches_of(train_rows, args.batch_size, args.seed)
    report: Dict[str, Any] = {
        "benchmark": "llm_recipe_ablation", "settings": vars(args), "conditions": conditions(torch.device("cpu")),
        "test_tokens": int(test_rows[:, 1:].numel()), "predecessor": {"perplexity": llm.perplexity(model, test_rows)},
        "runs": {},
    }
    print(f"original: test perplexity {report['predecessor']['perplexity']:.2f} on {report['test_tokens']} tokens", flush=True)
    for name in args.methods:
        t = time.time()
        student, notes = train(name, model, args.depth, batch_at, args)
        seconds = time.time() - t
        with tempfile.TemporaryDirectory() as tmp:  # measured as a user reloads it
            student = llm.reload(student, tmp)
        row = dict(perplexity=llm.perplexity(student, test_rows), train_s=round(seconds, 1), **notes)
        report["runs"][name] = row
        print(f"  {name:<20} perplexity {row['perplexity']:10.2f}  ({seconds:.0f} s) {notes}", flush=True)
        write_json(report, path)
    return finish(report, path, "llm_recipe_ablation.py", argv, started)


if __name__ == "__main__":
    main()
