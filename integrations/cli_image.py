"""The image-classification task of `theseus-compress` (imports timm or torchvision on demand).

Builds the predecessor from ``architecture`` + ``model_args`` and loads its safetensors
weights, trains its successor on MNIST-style idx files or an .npz with the shared loop
(theseus_general.integrations.cli_runner), writes ``OUTPUT/successor.safetensors`` with a
``successor.json`` that says how to rebuild it, and reports accuracy, FLOPs and speed.
"""

from __future__ import annotations

import gzip
import importlib
import json
import os
import sys
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch import nn

from theseus_general.integrations.cli_runner import build_engine, report, train
from theseus_general.cli import check_target
from theseus_general.errors import TheseusError

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class ImageDataError(TheseusError, ValueError):
    """An image data file is missing, unreadable or malformed; the message names it."""


def read_idx(path: str, fix: str = "") -> np.ndarray:
    """An idx file of bytes (the MNIST format: magic, dimensions, then the raw data), gzipped or not."""
    hint = f" {fix}" if fix else ""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:  # gzip raises these on truncated or non-gzip data
        raise ImageDataError(f"Cannot read {path} ({error}); the file looks corrupt.{hint}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ImageDataError(f"{path} is {'empty' if not raw else 'not an idx file of bytes'}.{hint}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ImageDataError(f"{path} holds {len(raw)} bytes but its header announces shape {shape} ({expected} "
                             f"bytes); the file is truncated or corrupt.{hint}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_path(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise ImageDataError(f"{directory} has no {stem}[.gz]; an idx data directory holds "
                         f"{', '.join(s for pair in IDX_FILES.values() for s in pair)} (gzipped or not).")


def load_images(path: str, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images as float N x C x H x W in [0, 1] for uint8 data, labels as int64) from an idx directory
    (`split` picks train or t10k files) or an .npz with arrays 'images' and 'labels' (never unpickled)."""
    if os.path.isdir(path):
        images, labels = (read_idx(_idx_path(path, stem)) for stem in IDX_FILES[split])
    elif path.endswith(".npz") and os.path.isfile(path):
        with np.load(path, allow_pickle=False) as arrays:
            if not {"images", "labels"} <= set(arrays.files):
                raise ImageDataError(f"{path} needs arrays 'images' and 'labels'; it has {sorted(arrays.files)}.")
            images, labels = arrays["images"], arrays["labels"]
    else:
        raise ImageDataError(f"Image data {path!r} is neither a directory of idx files nor an existing .npz file.")
    if images.ndim not in (3, 4) or labels.ndim != 1 or len(images) != len(labels):
        raise ImageDataError(f"{path}: images {images.shape} and labels {labels.shape} do not pair up as "
                             "(N, H, W) or (N, C, H, W) images and (N,) labels.")
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / (255.0 if images.dtype == np.uint8 else 1.0))
    return (x.unsqueeze(1) if x.ndim == 3 else x), torch.from_numpy(labels.astype(np.int64))


def build_model(architecture: str, model_args: Dict[str, Any]) -> nn.Module:
    """'timm:NAME', 'torchvision:NAME' or 'module:function' called with model_args."""
    source, sep, name = architecture.partition(":")
    if not sep or not name:
        raise TheseusError(f"architecture {architecture!r}: expected 'timm:NAME', 'torchvision:NAME' or 'module:function'.")
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False, **model_args)
    if source == "torchvision":
        from torchvision.models import get_model

        return get_model(name, weights=None, **model_args)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a builder next to the config, as with `python -m`
    try:
        builder = getattr(importlib.import_module(source), name)
    except (ImportError, AttributeError) as e:
        raise TheseusError(f"architecture {architecture!r}: cannot import {name} from {source} ({e}).") from None
    return builder(**model_args)


# Argument names under which builders take a depth: one int (a single chain of blocks) or one
# int per stage. Tried only when model_args does not already hold the depth.
_DEPTH_ARGUMENTS = ("depth", "num_layers")
_STAGE_DEPTH_ARGUMENTS = ("layers", "depths")


def successor_model_args(architecture: str, model_args: Dict[str, Any], predecessor: nn.Module,
                         depths: Dict[str, Dict[str, int]], successor: nn.Module) -> Optional[Dict[str, Any]]:
    """The model_args with which `build_model(architecture, ...)` builds the successor exactly, or None.

    Candidates change the depth argument: one in model_args whose value is the predecessor's depth
    (an int, or a list with one entry per stage: ViT ``depth``, ResNet ``layers`` or a builder's
    ``blocks_per_stage``), else a common depth argument the builder may take (``depth``,
    ``num_layers``, ``layers``, ``depths``). A candidate counts only when its model is of the
    successor's class and loads the successor's state dict strictly: nothing is guessed."""
    before, after = depths["predecessor"], depths["successor"]
    paths = list(before)
    candidates = []
    for key, value in model_args.items():
        if len(paths) == 1 and isinstance(value, int) and not isinstance(value, bool) and value == before[paths[0]]:
            candidates.append({**model_args, key: after[paths[0]]})
        elif isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
            changed = _replace_stage_depths(list(value), [before[p] for p in paths], [after[p] for p in paths])
            if changed is not None:
                candidates.append({**model_args, key: type(value)(changed) if isinstance(value, tuple) else changed})
    if len(paths) == 1:
        candidates += [{**model_args, key: after[paths[0]]} for key in _DEPTH_ARGUMENTS if key not in model_args]
    stages = _sibling_stage_depths(predecessor, paths, after)
    if stages is not None:
        candidates += [{**model_args, key: stages} for key in _STAGE_DEPTH_ARGUMENTS if key not in model_args]
    reference = successor.state_dict()
    for args in candidates:
        try:
            rebuilt = build_model(architecture, args)
            if type(rebuilt) is type(successor):
                rebuilt.load_state_dict(reference, strict=True)
                return args
        except Exception:  # a builder that does not take the argument, or weights that do not fit
            continue
    return None


def _replace_stage_depths(values: list, before: list, after: list) -> Optional[list]:
    """`values` with the entries that are the compressed stages' depths replaced. Stages of a single
    block are not compressed, so the compressed stages are the entries above 1, in order."""
    if values == before:
        return list(after)
    positions = [i for i, v in enumerate(values) if v > 1]
    if [values[i] for i in positions] != before:
        return None
    changed = list(values)
    for i, depth in zip(positions, after):
        changed[i] = depth
    return changed


def _sibling_stage_depths(model: nn.Module, paths: list, after: Dict[str, int]) -> Optional[list]:
    """One depth per stage when the compressed containers are stages under one parent (ResNet's
    layer1..layer4): every container child of that parent, at its successor depth."""
    parents = {path.rpartition(".")[0] for path in paths}
    if len(parents) != 1:
        return None
    (parent,) = parents
    owner = model.get_submodule(parent) if parent else model
    prefix = f"{parent}." if parent else ""
    return [after.get(prefix + name, len(child)) for name, child in owner.named_children()
            if isinstance(child, (nn.Sequential, nn.ModuleList))]


def check_weights_file(path: str) -> None:
    """The predecessor's weights: an existing .safetensors file."""
    if not os.path.exists(path):
        raise TheseusError(f"model: {path!r} does not exist (resolved to {os.path.abspath(path)}); give the path of "
                           "the predecessor's weights, saved with safetensors.torch.save_model(model, "
                           "'predecessor.safetensors').")
    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        raise TheseusError(f"model: {path!r} is not a .safetensors file; save the predecessor with "
                           "safetensors.torch.save_model(model, 'predecessor.safetensors').")


def run(config: Dict[str, Any]) -> Dict[str, Any]:
    check_weights_file(config["model"])
    x, y = load_images(config["data"], "train")
    evaluation = load_images(config["eval_data"], "test") if config["eval_data"] else None
    model = build_model(config["architecture"], config["model_args"])
    try:
        load_model(model, config["model"])  # safetensors: no unpickling
    except RuntimeError as e:
        raise TheseusError(f"model: the weights in {config['model']} do not fit {config['architecture']} with "
                           f"model_args {config['model_args']} ({str(e).splitlines()[0]}).") from None
    check_target(config, model)
    th = build_engine(model, config)
    print(th.plan)
    batch_size = min(config["batch_size"], len(x))
    per_epoch = len(x) // batch_size

    def batch_at(position: int):
        epoch, offset = divmod(position, per_epoch)  # a function of the position: resumable
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(config["seed"] * 100003 + epoch))
        index = order[offset * batch_size:(offset + 1) * batch_size]
        return x[index], y[index]

    def forward(images, labels):
        logits = th.model(images)
        return F.cross_entropy(logits, labels), logits

    train(th, config, batch_at, forward)
    depths = {"predecessor": dict(th.plan.containers), "successor": th.plan.successor_depth}
    successor = th.export()
    th.unwrap()
    os.makedirs(config["output"], exist_ok=True)
    out = os.path.join(config["output"], "successor.safetensors")
    save_model(successor, out)
    rebuild = successor_model_args(config["architecture"], config["model_args"], model, depths, successor)
    if rebuild is None:
        how = ("no depth argument of the architecture was found that rebuilds it: build the architecture with "
               "predecessor_model_args, cut its block containers to successor_depth, then "
               "safetensors.torch.load_model")
        print(f"warning: successor.json cannot give model_args that rebuild the successor ({how}).", file=sys.stderr)
    else:
        how = ("theseus_general.integrations.cli_image.build_model(architecture, model_args) (timm.create_model, "
               "torchvision.models.get_model or your function), then safetensors.torch.load_model(model, weights); "
               "checked when written")
    with open(os.path.join(config["output"], "successor.json"), "w") as f:
        json.dump({"architecture": config["architecture"], "model_args": rebuild,
                   "predecessor_model_args": config["model_args"], "successor_depth": depths["successor"],
                   "weights": "successor.safetensors", "how_to_load": how,
                   "theseus_config": config.get("theseus_config")}, f, indent=2)
    print(f"successor: {depths['successor']} blocks -> {out} (safetensors)")
    eval_batches = None
    if evaluation:
        ex, ey = evaluation
        eval_batches = lambda: ((ex[i:i + 1000], ey[i:i + 1000]) for i in range(0, len(ex), 1000))  # noqa: E731
    result = report(model, successor, config, depths, eval_batches, lambda out: out, batch_at(0)[0])
    return {"successor": out, "steps": config["steps"], **result}
