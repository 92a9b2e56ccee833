"""Fashion-MNIST for the vision examples, read offline from its idx files.

Default location: /usr/share/datasets/fashion-mnist (Debian package
``dataset-fashion-mnist``); any directory holding the four files works via
``--data-dir``. Files may be gzipped (``.gz``) or plain. Images come back as
float tensors in [0, 1] of shape (N, 1, 28, 28), labels as int64.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_IDX_DTYPE = {0x08: np.uint8}  # the only element type Fashion-MNIST uses
_FIX = "Install the data with `apt-get install -y dataset-fashion-mnist`, or pass --data-dir with a copy of the idx files."


class DataError(ValueError):
    """A data file is missing or unreadable; the message names it and the fix."""


@dataclass
class ImageSplits:
    train: Tuple[torch.Tensor, torch.Tensor]
    dev: Tuple[torch.Tensor, torch.Tensor]  # held out from train, for choosing hyper-parameters
    test: Tuple[torch.Tensor, torch.Tensor]
    classes: list
    source: str


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise DataError(f"Missing {os.path.join(directory, stem + '.gz')} (or {stem} uncompressed). {_FIX}")


def read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format: magic, dimensions, then raw big-endian data)."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:  # gzip raises these on truncated or non-gzip data
        raise DataError(f"Cannot read {path} ({error}); the file looks corrupt. {_FIX}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPE:
        raise DataError(f"{path} is {'empty' if not raw else 'not an idx file of bytes'}. {_FIX}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataError(f"{path} holds {len(raw)} bytes but its header announces shape {shape} ({expected} bytes); "
                        f"the file is truncated or corrupt. {_FIX}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_split(directory: str, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    images_stem, labels_stem = FILES[split]
    images_path, labels_path = _find(directory, images_stem), _find(directory, labels_stem)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{images_path} ({images.shape}) and {labels_path} ({labels.shape}) do not pair up as "
                        f"images (N, H, W) and labels (N,). {_FIX}")
    if labels.max(initial=0) >= len(CLASSES):
        raise DataError(f"{labels_path} has label {labels.max()}, but Fashion-MNIST has {len(CLASSES)} classes. {_FIX}")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def load_fashion_mnist(data_dir: Optional[str] = None, dev_size: int = 5000, seed: int = 0,
                       train_limit: Optional[int] = None) -> ImageSplits:
    """Train / dev / test splits. The dev split is a seeded random hold-out from
    train (never the test split); `train_limit` keeps only that many training images."""
    directory = data_dir or DEFAULT_DIR
    if not os.path.isdir(directory):
        raise DataError(f"Data directory {directory} does not exist. {_FIX}")
    x, y = load_split(directory, "train")
    if not 0 < dev_size < len(x):
        raise DataError(f"--dev-size must be between 1 and {len(x) - 1}, got {dev_size}.")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    dev, train = order[:dev_size], order[dev_size:]
    if train_limit is not None:
        train = train[:train_limit]
    return ImageSplits(train=(x[train], y[train]), dev=(x[dev], y[dev]), test=load_split(directory, "test"),
                       classes=list(CLASSES), source=directory)
