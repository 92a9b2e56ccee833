"""The text-classification task of `theseus-compress` (imports transformers).

Loads a fine-tuned sequence classifier and its tokenizer, trains its successor on
a CSV/JSONL file with the shared loop (theseus_general.integrations.cli_runner: checkpoints,
metrics, progress), writes ``OUTPUT/successor`` with save_pretrained, and reports
accuracy (with eval_data), FLOPs and speed of both models.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Tuple

import torch

from theseus_general.integrations.cli_runner import build_engine, report, train
from theseus_general.cli import check_target
from theseus_general.errors import TheseusError


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


def _batch(ids: List[List[int]], labels: List[int], chosen: List[int], pad: int) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    length = max(len(ids[i]) for i in chosen)
    input_ids = torch.full((len(chosen), length), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, i in enumerate(chosen):
        input_ids[row, :len(ids[i])], mask[row, :len(ids[i])] = torch.tensor(ids[i]), 1
    return {"input_ids": input_ids, "attention_mask": mask}, torch.tensor([labels[i] for i in chosen])


def run(config: Dict[str, Any]) -> Dict[str, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts, labels = read_rows(config["data"], config["text_column"], config["label_column"])
    evaluation = read_rows(config["eval_data"], config["text_column"], config["label_column"]) if config["eval_data"] else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(config["model"])
        model = AutoModelForSequenceClassification.from_pretrained(config["model"])
    except OSError as e:  # what transformers raises for a missing directory or an unknown Hub name
        what = ("is neither an existing directory nor a model name on the Hub" if not os.path.exists(config["model"])
                else "cannot be loaded")
        raise TheseusError(f"model: {config['model']!r} {what} ({str(e).splitlines()[0]}); give a "
                           "directory written by save_pretrained (model and tokenizer) or a model name on the Hub.") from None
    for name, y in (("data", labels), ("eval_data", evaluation[1] if evaluation else [])):
        if y and (max(y) >= model.config.num_labels or min(y) < 0):
            raise TheseusError(f"{name}: labels span {min(y)}..{max(y)} but the model has {model.config.num_labels} labels.")
    check_target(config, model)
    th = build_engine(model, config)
    print(th.plan)

    ids = tokenizer(texts, truncation=True, max_length=config["max_length"])["input_ids"]
    pad = tokenizer.pad_token_id or 0
    batch_size = min(config["batch_size"], len(ids))
    per_epoch = len(ids) // batch_size

    def batch_at(position: int):
        # The order of each epoch is a function of (seed, epoch), so a resume needs only the position.
        epoch, offset = divmod(position, per_epoch)
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(config["seed"] * 100003 + epoch))
        return _batch(ids, labels, order[offset * batch_size:(offset + 1) * batch_size].tolist(), pad)

    def forward(inputs, y):
        out = th.model(**inputs, labels=y)
        return out.loss, out.logits

    train(th, config, batch_at, forward)
    depths = {"predecessor": dict(th.plan.containers), "successor": th.plan.successor_depth}
    successor = th.export()
    th.unwrap()
    out = os.path.join(config["output"], "successor")
    successor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"successor: {successor.config.num_hidden_layers} layers -> {out} (save_pretrained)")

    eval_batches = None
    if evaluation:
        eval_ids = tokenizer(evaluation[0], truncation=True, max_length=config["max_length"])["input_ids"]
        order = sorted(range(len(eval_ids)), key=lambda i: len(eval_ids[i]))  # less padding
        chunks = [order[i:i + 128] for i in range(0, len(order), 128)]
        eval_batches = lambda: (_batch(eval_ids, evaluation[1], c, pad) for c in chunks)  # noqa: E731
    sample = batch_at(0)[0]
    result = report(model, successor, config, depths, eval_batches, lambda out: out.logits, sample)
    return {"successor": out, "steps": config["steps"], **result}
