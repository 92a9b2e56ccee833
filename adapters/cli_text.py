"""The text-classification task of `theseus-compress` (imports transformers).

Loads a fine-tuned sequence classifier and its tokenizer, trains its successor on
a CSV/JSONL file with a plain loop (checkpointing and resuming when asked), and
writes ``OUTPUT/successor`` with save_pretrained.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Tuple

import torch
from tqdm.auto import tqdm

from theseus_general.checkpoint import CheckpointManager
from theseus_general.engine import Theseus
from theseus_general.errors import TheseusError
from theseus_general.schedulers import LinearScheduler


def read_rows(path: str, text_column: str, label_column: str) -> Tuple[List[str], List[int]]:
    if not os.path.isfile(path):
        raise TheseusError(f"data: file {path!r} does not exist.")
    with open(path, newline="") as f:
        rows = [json.loads(line) for line in f if line.strip()] if path.endswith((".jsonl", ".json")) else list(csv.DictReader(f))
    if not rows or text_column not in rows[0] or label_column not in rows[0]:
        raise TheseusError(f"data: {path} needs columns {text_column!r} and {label_column!r} (text_column / label_column); "
                           f"found {sorted(rows[0]) if rows else 'no rows'}.")
    try:
        labels = [int(r[label_column]) for r in rows]
    except ValueError as e:
        raise TheseusError(f"data: {path}: labels must be integers 0..K-1 ({e}).") from None
    return [str(r[text_column]) for r in rows], labels


def run(config: Dict[str, Any]) -> Dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts, labels = read_rows(config["data"], config["text_column"], config["label_column"])
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    model = AutoModelForSequenceClassification.from_pretrained(config["model"])
    if max(labels) >= model.config.num_labels or min(labels) < 0:
        raise TheseusError(f"data: labels span {min(labels)}..{max(labels)} but the model has {model.config.num_labels} labels.")
    steps = config["steps"]
    th = Theseus(model, successor_depth=config["depth"], unfreeze_rest=config["unfreeze_rest"], seed=config["seed"],
                 scheduler=LinearScheduler.reaching_one_at(max(1, int(steps * config["replace_by"])), base=config["base_rate"]))
    print(th.plan)
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=config["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / steps))
    manager = CheckpointManager(os.path.join(config["output"], "checkpoints")) if config["checkpoint_every"] else None
    resumed = manager.resume(th, opt, sched) if manager else None
    position = resumed.data_position if resumed else 0
    if resumed:
        print(f"resumed from {resumed.path} (step {resumed.step})")

    ids = tokenizer(texts, truncation=True, max_length=config["max_length"])["input_ids"]
    pad = tokenizer.pad_token_id or 0
    batch_size = min(config["batch_size"], len(ids))
    per_epoch = len(ids) // batch_size
    th.model.train()
    bar = tqdm(total=steps, initial=th.step_count, desc="theseus", dynamic_ncols=True)
    while th.step_count < steps:
        # The order of each epoch is a function of (seed, epoch), so a resume needs only the position.
        epoch, offset = divmod(position, per_epoch)
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(config["seed"] * 100003 + epoch))
        chosen = order[offset * batch_size:(offset + 1) * batch_size].tolist()
        length = max(len(ids[i]) for i in chosen)
        input_ids = torch.full((len(chosen), length), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(chosen):
            input_ids[row, :len(ids[i])], mask[row, :len(ids[i])] = torch.tensor(ids[i]), 1
        loss = th.model(input_ids=input_ids, attention_mask=mask, labels=torch.tensor([labels[i] for i in chosen])).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        th.step(loss)
        position += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", p=f"{th.replacement_rate:.2f}")
        if manager and (th.step_count % config["checkpoint_every"] == 0 or th.step_count == steps):
            manager.save(th, opt, sched, data_position=position)
    bar.close()
    successor = th.export()
    th.unwrap()
    out = os.path.join(config["output"], "successor")
    successor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"successor: {successor.config.num_hidden_layers} layers -> {out}")
    return {"successor": out, "steps": th.step_count}
