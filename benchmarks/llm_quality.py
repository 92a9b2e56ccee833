"""Issue 23's decoder-LLM column: SmolLM2-135M depth compression under the quality protocol.

Five methods, every one from the same original model, on the same batches in the same order for a
given seed (Rotten Tomatoes snippets packed into rows of --seq-len tokens, batch --batch-size):

  theseus         the library's default recipe as a user gets it: ``Theseus(model, successor_depth=d)`` + `fit`
  theseus_bi      the default recipe with groups around the layers Block Influence keeps, each successor a
                  copy of its group's kept layer (ShortGPT's score, 1 - cos(input, output))
  layer_removal   the layers Block Influence keeps, in place, then fine-tuned (ShortGPT + fine-tuning)
  kd_bi           the same start, trained by distillation (task loss plus T^2 KL to the original's logits)
  streamline      LLM-Streamline's shape: the contiguous span of 30 - d + 1 layers whose input and output
                  hidden states are most alike (highest cosine) is replaced by one layer, a copy of the span's
                  first layer, trained alone on the span's output (`match_successors`: a relative MSE, its lr
                  chosen by the same probe as the default recipe's matching) for --match-fraction of the steps;
                  then the whole model is fine-tuned for the rest

The split is fixed (split seed 0, whatever --seeds): --test-snippets held out for test (at least 100k
predicted tokens, checked), --dev-snippets from the rest for choosing learning rates; the seeds change the
batch order and Theseus's gates only. Every student is exported natively, saved with ``save_pretrained`` and
reloaded before it is measured. Lower perplexity is better; the paired comparison is on the mean token
loss (log perplexity).

    python benchmarks/llm_quality.py --depth 20 --methods theseus kd_bi --seeds 0 --lr 1e-4 \\
        --output benchmarks/results/protocol/llm/d20_part.json
    python benchmarks/llm_quality.py --merge A.json B.json --output C.json     # parts of one column
    python benchmarks/llm_quality.py --merge A.json:theseus,kd_bi B.json --output C.json  # some methods of A
    python benchmarks/llm_quality.py --original --threads 2 --output X.json    # the original's perplexities
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import REPO_ROOT, conditions, finish, load_part, quiet_transformers, seed_run, write_json  # noqa: E402
from report_quality import paired_differences, paired_interval  # noqa: E402

sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))

import llm_compression as llm  # noqa: E402
from text_data import load_rotten_tomatoes, split  # noqa: E402

from theseus_general import Theseus  # noqa: E402
from theseus_general.baselines import distill, fine_tune_only  # noqa: E402
from theseus_general.training import fit, match_successors  # noqa: E402

METHODS = ("theseus", "theseus_bi", "layer_removal", "kd_bi", "streamline")
MIN_TEST_TOKENS = 100_000  # the protocol's held-out size: one number that does not move with the thread count
SPLIT_SEED = 0
SAME_IN_EVERY_PART = ("depth", "steps", "batch_size", "seq_len", "test_snippets", "dev_snippets", "calibration_rows",
                      "smoke")


def data(tokenizer, args: argparse.Namespace) -> Dict[str, torch.Tensor]:
    texts, labels, _ = load_rotten_tomatoes()
    parts = split(texts, labels, test_size=args.test_snippets, dev_size=args.dev_snippets, seed=SPLIT_SEED)
    rows = {name: llm.packed_sequences(tokenizer, parts[name][0], args.seq_len) for name in ("train", "dev", "test")}
    predicted = rows["test"][:, 1:].numel()
    if predicted < MIN_TEST_TOKENS:
        raise SystemExit(f"--test-snippets {args.test_snippets} gives {predicted} predicted test tokens; the protocol "
                         f"asks for at least {MIN_TEST_TOKENS}: raise --test-snippets.")
    return rows


def streamline_span(model, rows: torch.Tensor, length: int) -> Tuple[int, List[float]]:
    """LLM-Streamline's choice: the start of the `length` consecutive layers whose input and output hidden
    states have the highest mean cosine similarity over all tokens (the span that changes the state least)."""
    cosines = llm.span_cosines(llm.layer_states(model, rows), length)
    return max(range(len(cosines)), key=lambda i: cosines[i]), cosines


def streamline_groups(start: int, length: int, layers: int) -> List[Tuple[int, ...]]:
    span = tuple(range(start, start + length))
    return [(i,) for i in range(start)] + [span] + [(i,) for i in range(start + length, layers)]


def train_streamline(model, depth: int, batch_at, steps: int, args, calibration: torch.Tensor) -> Tuple[Any, Dict]:
    layers = model.config.num_hidden_layers
    length = layers - depth + 1
    start, cosines = streamline_span(model, calibration, length)
    groups = streamline_groups(start, length, layers)
    th = Theseus(model, groups=groups, init=lambda group, blocks: copy.deepcopy(blocks[0]), validate=False,
                 seed=args.seed)
    match_steps = int(steps * args.match_fraction)
    try:
        for group in th.groups:  # only the span's layer is trained on the hidden states; the rest are the originals
            if len(group.predecessor) == 1:
                group.successor.requires_grad_(False)
        matched = match_successors(th, batch_at, match_steps, lr="auto", choose_start=False, device="cpu",
                                   progress=args.progress, desc=f"streamline {layers}->{depth}: span")
        student = th.export()
    finally:
        th.unwrap()
    student.requires_grad_(True).train()

    def loss(inputs, labels):
        logits = student(**inputs).logits
        return llm.lm_loss(logits, labels), logits

    fit(student, lambda position: batch_at(match_steps + position), steps - match_steps, loss=loss, lr=args.lr,
        lr_schedule="linear", device="cpu", progress=args.progress, desc=f"streamline {layers}->{depth}: fine-tune")
    notes = {"span": [start, start + length - 1], "span_cosines": cosines, "match_steps": match_steps,
             "match_lr": matched.match_lr}
    return student.eval(), notes


def train(method: str, model, depth: int, batch_at, args, scores: Sequence[float],
          calibration: torch.Tensor) -> Tuple[Any, Dict[str, Any]]:
    """The student of `method` (exported, native) and what the run decided."""
    seed_run(args.seed)
    common = dict(lr=args.lr, device="cpu", lr_schedule="linear")
    if method == "streamline":
        return train_streamline(model, depth, batch_at, args.steps, args, calibration)
    if method == "theseus":
        kwargs, kept = {"successor_depth": depth, "validate": False}, None
    else:
        kwargs, kept = llm.layer_removal_student_kwargs(scores, depth)
    notes: Dict[str, Any] = {"kept_layers": kept} if kept else {}
    if method == "layer_removal":
        return fine_tune_only(model, batch_at, args.steps, task_loss=llm.lm_loss, **kwargs, **common), notes
    if method == "kd_bi":
        notes.update(kd_temperature=args.kd_temperature, kd_alpha=args.kd_alpha)  # per run: a column mixes parts
        return distill(model, batch_at, args.steps, task_loss=llm.lm_loss, temperature=args.kd_temperature,
                       alpha=args.kd_alpha, **kwargs, **common), notes
    th = Theseus(model, seed=args.seed, **kwargs)
    try:
        result = fit(th, batch_at, args.steps, loss=lambda inputs, labels: llm.lm_loss(th.model(**inputs).logits, labels),
                     desc=f"{method} 30->{depth}", progress=args.progress, **common)
        notes.update(recipe=th.recipe.name, start_agreement=result.start_agreement,
                     start_collapsed=result.start_collapsed,
                     match_steps=len(result.matching.history) if result.matching else 0,
                     start_blocks={str(g): b for g, b in sorted(th.successor_starts.items())})
        if result.matching is not None:
            notes["match_lr"] = result.matching.match_lr
        return th.export(), notes
    finally:
        th.unwrap()


def summarise(report: Dict[str, Any]) -> None:
    """`summary` per method (perplexity mean and std over seeds, as the other columns keep accuracy) and
    `paired`: the best baseline's test loss minus Theseus's, seed by seed, with its 95% t-interval once two
    seeds pair up (above 0: Theseus ahead; one seed gives no interval and no verdict)."""
    runs = report["runs"]
    summary = {}
    for method, by_seed in runs.items():
        ppl = [r["test_perplexity"] for r in by_seed.values()]
        mean = sum(ppl) / len(ppl)
        std = (sum((p - mean) ** 2 for p in ppl) / (len(ppl) - 1)) ** 0.5 if len(ppl) > 1 else 0.0
        summary[method] = {"test_mean": mean, "test_std": std, "seeds": sorted(by_seed, key=int),
                           "test_loss_mean": sum(r["test_loss"] for r in by_seed.values()) / len(ppl),
                           "dev_loss_mean": sum(r["dev_loss"] for r in by_seed.values()) / len(ppl)}
    report["summary"] = summary
    paired = {}
    baselines = [m for m in summary if not m.startswith("theseus")]
    for method in (m for m in summary if m.startswith("theseus")):
        against = {}
        for baseline in baselines:
            seeds, diffs = paired_differences(runs, baseline, method, "test_loss")  # lower loss is better
            if seeds:
                against[baseline] = dict(paired_interval(diffs), seeds=seeds, differences=diffs)
        if against:
            best = min(baselines, key=lambda m: summary[m]["test_loss_mean"])
            paired[method] = {"best_baseline": best, "verdict": against.get(best, {}).get("verdict"),
                              "against": against}
    report["paired"] = paired


def merge(paths: Sequence[str], output: str) -> Dict[str, Any]:
    parts = [load_part(item, METHODS)[0] for item in paths]
    settings = [s for p in parts for s in (p["parts"] if "parts" in p else [p["settings"]])]  # a merged part too
    for key in SAME_IN_EVERY_PART:  # a column is one depth, budget and split; lr may differ by method
        values = {json.dumps(s.get(key)) for s in settings}
        if len(values) > 1:
            raise SystemExit(f"--merge: {key} differs between the parts ({', '.join(sorted(values))}); merge the "
                             "parts of one column only.")
    report = {"benchmark": "llm_quality", "merged_from": list(paths), "parts": settings, "runs": {}}
    for part in parts:
        for method, by_seed in part["runs"].items():
            for seed, row in by_seed.items():
                if seed in report["runs"].get(method, {}):
                    raise SystemExit(f"{method} seed {seed} is in two parts; merge each run once.")
                report["runs"].setdefault(method, {})[seed] = row
    summarise(report)
    return write_json(report, output) and report


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=20, help="successor layers (SmolLM2 has 30)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (linear decay), every method")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--test-snippets", type=int, default=4200)
    p.add_argument("--dev-snippets", type=int, default=1000)
    p.add_argument("--calibration-rows", type=int, default=16, help="training rows for Block Influence and the span")
    p.add_argument("--match-fraction", type=float, default=0.2, help="streamline: share of the steps on the span alone")
    p.add_argument("--kd-temperature", type=float, default=2.0)
    p.add_argument("--kd-alpha", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--original", action="store_true", help="measure only the original model's dev and test perplexity")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--smoke", action="store_true", help="a check that the script runs: 5 steps, 8 rows per evaluation "
                   "(its numbers mean nothing)")
    p.add_argument("--sharing", default="", help="what else ran on the machine's cores meanwhile (recorded)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge result parts into --output and stop; "
                   "JSON:METHOD[,METHOD...] takes only those methods' runs from that part")
    p.add_argument("--output", required=True, help="JSON path")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.output)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    started = time.time()
    model, tokenizer = llm.load_smollm2()
    rows = data(tokenizer, args)
    if args.smoke:
        args.steps = 5
        rows.update(dev=rows["dev"][:8], test=rows["test"][:8])
    report: Dict[str, Any] = {
        "benchmark": "llm_quality", "settings": vars(args), "conditions": conditions(torch.device("cpu")),
        "tokens": {name: int(r[:, 1:].numel()) for name, r in rows.items()}, "runs": {},
    }
    print(f"predicted tokens: {report['tokens']}", flush=True)
    if args.original:
        t = time.time()
        report["original"] = {"dev_perplexity": llm.perplexity(model, rows["dev"]),
                              "test_perplexity": llm.perplexity(model, rows["test"]), "eval_s": time.time() - t}
        print(f"original: {report['original']}", flush=True)
        return finish(report, args.output, "llm_quality.py", argv, started)
    calibration = rows["train"][: args.calibration_rows]
    scores = llm.block_influence(model, calibration)
    report["block_influence"] = scores
    for seed in args.seeds:
        args.seed = seed
        batch_at = llm.batches_of(rows["train"], args.batch_size, seed)
        for method in args.methods:
            t = time.time()
            student, notes = train(method, model, args.depth, batch_at, args, scores, calibration)
            seconds = time.time() - t
            with tempfile.TemporaryDirectory() as tmp:  # measured as a user reloads it
                student = llm.reload(student, tmp)
            if student.config.num_hidden_layers != args.depth:
                raise SystemExit(f"{method}: the reloaded model has {student.config.num_hidden_layers} layers")
            t = time.time()
            dev, test = llm.mean_token_loss(student, rows["dev"]), llm.mean_token_loss(student, rows["test"])
            row = dict(dev_loss=dev, test_loss=test, dev_perplexity=math.exp(dev), test_perplexity=math.exp(test),
                       lr=args.lr, train_s=round(seconds, 1), eval_s=round(time.time() - t, 1), **notes)
            report["runs"].setdefault(method, {})[str(seed)] = row
            print(f"seed {seed} {method:<14} dev {row['dev_perplexity']:8.2f}  test {row['test_perplexity']:8.2f}  "
                  f"({seconds:.0f} s train, {row['eval_s']:.0f} s eval)", flush=True)
            summarise(report)
            write_json(report, args.output)
    return finish(report, args.output, "llm_quality.py", argv, started)


if __name__ == "__main__":
    main()
