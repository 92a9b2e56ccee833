"""Fashion-MNIST for the vision examples, read offline from its idx files.

Default location: /usr/share/datasets/fashion-mnist (Debian package
``dataset-fashion-mnist``); any directory holding the four files works via
``--data-dir``. Files may be gzipped (``.gz``) or plain. Images come back as
float tensors in [0, 1] of shape (N, 1, 28, 28), labels as int64.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from theseus_general.integrations.cli_image import ImageDataError
from theseus_general.integrations.cli_image import read_idx as _read_idx

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FIX = "Install the data with `apt-get install -y dataset-fashion-mnist`, or pass --data-dir with a copy of the idx files."


DataError = ImageDataError  # a data file is missing or unreadable; the message names it and the fix


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
    """An idx file (the MNIST format); the reader is the CLI's, with this dataset's install hint."""
    return _read_idx(path, fix=_FIX)


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
