"""Does DeepSpeed ZeRO change what a Theseus run learns? The text job through TheseusTrainer, with a
ZeRO stage or without DeepSpeed, one process; dev accuracy of the exported successor.

all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (a --predecessor directory, e.g. the one
examples/text_classification.py writes to OUTPUT/predecessor), compressed 6 -> 3 with the default
recipe (module matching when the first batch says so, as examples/trainer_example.py does), then
TheseusTrainer for the remaining steps and ``trainer.export()``. Under ZeRO a successor idle for a
whole step still moves with AdamW's momentum (docs/training.md, DeepSpeed); this measures what that
costs. One run per call (DeepSpeed's process group and Accelerate's state stay in their own process):

    python benchmarks/deepspeed_quality.py --predecessor DIR --stage 0   # without DeepSpeed
    python benchmarks/deepspeed_quality.py --predecessor DIR --stage 3   # ZeRO-3 (DeepSpeed's CPU accelerator without CUDA)
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Any, Dict

if "--stage" in sys.argv and sys.argv[sys.argv.index("--stage") + 1] != "0":
    for _name, _value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT="29511").items():
        os.environ.setdefault(_name, _value)  # one process; deepspeed.init_distributed reads these

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

from _common import RESULTS_DIR, conditions, finish, quiet_transformers  # noqa: E402
from text_data import load_splits, tokenized_rows  # noqa: E402

from theseus_general import Theseus, match_successors  # noqa: E402
from theseus_general.training import planned_match_steps  # noqa: E402


@torch.no_grad()
def accuracy(model, rows, collate, batch: int = 128) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch):
        inputs = collate(rows[start:start + batch])
        labels = inputs.pop("labels")
        correct += (model(**inputs).logits.argmax(-1) == labels).sum().item()
    return correct / len(rows)


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predecessor", required=True, help="a fine-tuned MiniLM directory (save_pretrained)")
    parser.add_argument("--model", default=None, help="the tokenizer's directory (default: all-MiniLM-L6-v2's)")
    parser.add_argument("--stage", type=int, choices=(0, 2, 3), required=True, help="ZeRO stage; 0: no DeepSpeed")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="default benchmarks/results/deepspeed_quality_zero<STAGE>.json")
    args = parser.parse_args(argv)
    started = time.time()
    torch.set_num_threads(1)
    quiet_transformers()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    from theseus_general.integrations.hf_trainer import TheseusTrainer

    if args.stage:
        import deepspeed.ops

        if not torch.cuda.is_available():  # the CPU backend's shm op would be JIT-compiled; gloo does the work
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    from text_classification import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(args.model or default_model_path())  # a predecessor dir may hold none
    splits = load_splits(None, "text", "label", 2000, 1000, args.seed)  # the text example's splits
    train = tokenized_rows(tokenizer, *splits.train, args.max_length, None)
    dev = tokenized_rows(tokenizer, *splits.dev, args.max_length, None)
    collate = DataCollatorWithPadding(tokenizer)
    model = AutoModelForSequenceClassification.from_pretrained(args.predecessor)  # before any ZeRO-3 TrainingArguments
    before = accuracy(model, dev, collate)

    th = Theseus(model, successor_depth=args.depth, seed=args.seed)
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    match_steps = planned_match_steps(th, args.steps, batches=loader)
    if match_steps:
        match_successors(th, itertools.cycle(loader), match_steps, lr=th.recipe.match_lr, progress=False)
    deepspeed_config = None
    if args.stage:
        deepspeed_config = {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
                            "zero_optimization": {"stage": args.stage}}
    training_args = TrainingArguments(output_dir=os.path.join("/tmp", f"deepspeed_quality_{args.stage}"),
                                      max_steps=args.steps - match_steps, per_device_train_batch_size=args.batch_size,
                                      learning_rate=args.lr, seed=args.seed, report_to="none", save_strategy="no",
                                      logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                                      use_cpu=not args.stage and not torch.cuda.is_available(),
                                      deepspeed=deepspeed_config)
    trainer = TheseusTrainer(theseus=th, model=th.model, args=training_args, train_dataset=train, data_collator=collate)
    train_started = time.time()
    trainer.train()
    train_seconds = time.time() - train_started
    successor = trainer.export().to("cpu")
    after = accuracy(successor, dev, collate)
    report = {
        "conditions": conditions(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "setup": {"predecessor": args.predecessor, "zero_stage": args.stage, "steps": args.steps,
                  "match_steps": match_steps, "lr": args.lr, "batch_size": args.batch_size, "depth": args.depth,
                  "seed": args.seed, "dev_examples": len(dev)},
        "deepspeed_engine": type(trainer.model_wrapped).__name__,
        "dev_accuracy_predecessor": before, "dev_accuracy_successor": after, "theseus_steps": th.step_count,
        "train_seconds": train_seconds,
    }
    output = args.output or os.path.join(RESULTS_DIR, f"deepspeed_quality_zero{args.stage}.json")
    finish(report, output, "deepspeed_quality.py", argv, started)
    print(f"ZeRO stage {args.stage}: dev accuracy {before:.4f} -> {after:.4f} ({th.step_count} Theseus steps after "
          f"{match_steps} matching steps, {train_seconds:.0f} s of training); wrote {output}")
    return report


if __name__ == "__main__":
    main()
