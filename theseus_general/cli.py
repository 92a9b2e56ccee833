"""`theseus-compress CONFIG.yaml`: run a compression from a YAML config.

This module imports no model library: it reads and checks the config, then hands
it to the task's runner on the adapter side (``theseus_general.integrations.cli_text``).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Any, Dict, List, Optional

from .errors import TheseusError, UnknownOptionError
from .suggest import unknown_names_message


class ConfigError(TheseusError):
    """A config field is missing, unknown, or of the wrong type or range."""


class UnknownFieldError(ConfigError, UnknownOptionError):
    """A config field that does not exist (usually a typo); the message suggests the closest field."""


TEXT, IMAGE = "text-classification", "image-classification"
ANY = (TEXT, IMAGE)
REQUIRED = ...

# name: (type, default (REQUIRED = required; None = optional), tasks it applies to, help)
FIELDS: Dict[str, tuple] = {
    "task": (str, REQUIRED, ANY, f"what to compress; one of: {TEXT}, {IMAGE}"),
    "model": (str, REQUIRED, ANY, f"{TEXT}: Hugging Face model directory or name of the fine-tuned predecessor "
              f"(with its tokenizer); {IMAGE}: a .safetensors state dict of the predecessor"),
    "architecture": (str, REQUIRED, (IMAGE,), "how to build the model the weights belong to: 'timm:NAME' "
                     "(timm.create_model), 'torchvision:NAME' (torchvision.models.get_model) or 'module:function' "
                     "(a function of yours, importable from the working directory)"),
    "model_args": (dict, {}, (IMAGE,), "keyword arguments for the architecture (e.g. num_classes, in_chans, depth)"),
    "data": (str, REQUIRED, ANY, f"training data. {TEXT}: CSV or JSONL with a text and an integer label column "
             f"(labels 0..K-1); {IMAGE}: a directory of MNIST-style idx files (train-images-idx3-ubyte[.gz], "
             "train-labels-idx1-ubyte[.gz]) or an .npz with arrays 'images' (N,H,W or N,C,H,W) and 'labels'"),
    "eval_data": (str, None, ANY, f"optional held-out data, same format ({IMAGE} idx directory: the t10k files); "
                  "when given, the accuracy of predecessor and successor is reported"),
    "output": (str, REQUIRED, ANY, "directory for the successor, checkpoints/, metrics.csv, tensorboard/, "
               "results.json and plots"),
    "depth": (int, None, ANY, "successor depth in blocks (e.g. 3 of 6 BERT layers); give depth or ratio"),
    "ratio": (float, None, ANY, "successor depth as a fraction of the predecessor's, per container (0.5: half), "
              "rounded to the nearest block, halves down (9 blocks x 0.5 -> 4); give depth or ratio"),
    "text_column": (str, "text", (TEXT,), "name of the text column"),
    "label_column": (str, "label", (TEXT,), "name of the label column"),
    "max_length": (int, 64, (TEXT,), "tokens per text"),
    "steps": (int, 600, ANY, "optimiser steps"),
    "lr": (float, 1e-4, ANY, "AdamW learning rate (linear decay to 0)"),
    "batch_size": (int, 32, ANY, "batch size"),
    "base_rate": (float, None, ANY, "replacement rate at the start of the mixed phase (linear curriculum); "
                  "default: the recipe's (0.3; resnet 0.6)"),
    "replace_by": (float, None, ANY, "fraction of the mixed phase after which the rate is 1 (only successors run); "
                   "default: the recipe's (0.5; resnet 0.3)"),
    "recipe": (str, None, ANY, "'default' (the library's recipe), 'matching' (the default after module matching, for "
               "runs whose truncated start predicts one class), 'resnet' (stem and head frozen, no module matching, "
               "a faster curriculum) or 'paper' (BERT-of-Theseus as published: embeddings and head frozen, no module "
               "matching); default: the model family's ('resnet' for ResNets, else 'default'); the fields below "
               "override it"),
    "train_rest": (bool, None, ANY, "train embeddings/stem and head from step 0, on copies (false: keep them frozen, "
                   "the paper's replacement phase); default: the recipe's (true for 'default')"),
    "match_fraction": (float, None, ANY, "share of the steps spent first on module matching (each successor learns "
                       "its group's output); default: the recipe's"),
    "seed": (int, 0, ANY, "seed of the data order and of the replacement draws"),
    "device": (str, "auto", ANY, "where to train: 'auto' (CUDA when available, else the CPU), 'cpu', 'cuda' or "
               "'cuda:N'"),
    "mixed_precision": (str, "no", ANY, "autocast while training: 'no', 'bf16' (also on the CPU) or 'fp16' (with loss "
                        "scaling; for GPUs without bfloat16)"),
    "checkpoint_every": (int, 0, ANY, "save a checkpoint every N steps into OUTPUT/checkpoints and resume from it "
                         "(0: off)"),
    "metrics": (bool, True, ANY, "write OUTPUT/metrics.csv (loss, replacement rate, lr per step) and TensorBoard "
                "events in OUTPUT/tensorboard when tensorboard is installed"),
    "plots": (bool, True, ANY, "write OUTPUT/curriculum.png and, with eval_data, OUTPUT/comparison.png "
              "(needs matplotlib)"),
}
TASKS = {TEXT: "theseus_general.integrations.cli_text", IMAGE: "theseus_general.integrations.cli_image"}
_POSITIVE = {"depth", "ratio", "steps", "lr", "batch_size", "max_length"}


def load_config(path: str) -> Dict[str, Any]:
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path!r} does not exist.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return check_config(raw, path)


def check_config(raw: Any, where: str = "config") -> Dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(raw).__name__}. See theseus-compress --help.")
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise UnknownFieldError(f"{where}: {unknown_names_message('field', unknown, FIELDS)}; the fields are "
                                f"{sorted(FIELDS)} (theseus-compress --help).")
    task = raw.get("task")
    if task not in TASKS:
        raise ConfigError(f"{where}: field 'task' must be one of {sorted(TASKS)}, got {task!r}.")
    config = {}
    for name, (kind, default, tasks, text) in FIELDS.items():
        if task not in tasks:
            if name in raw:
                raise ConfigError(f"{where}: field {name!r} applies to {', '.join(tasks)} only, not to {task}.")
            continue
        if name not in raw:
            if default is REQUIRED:
                raise ConfigError(f"{where}: field {name!r} is required for {task} ({text}).")
            config[name] = default
            continue
        value = raw[name]
        if value is None and default is None:  # an optional field written as `null`
            config[name] = None
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            kind_name = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
                         "dict": "a mapping"}[kind.__name__]
            raise ConfigError(f"{where}: field {name!r} must be {kind_name}, got {value!r}.")
        config[name] = value
    if (config["depth"] is None) == (config["ratio"] is None):
        raise ConfigError(f"{where}: give exactly one of the fields 'depth' (blocks) and 'ratio' (fraction of the "
                          f"predecessor's depth); got depth={config['depth']!r}, ratio={config['ratio']!r}.")
    for name in _POSITIVE:
        if config.get(name) is not None and config[name] <= 0:
            raise ConfigError(f"{where}: field {name!r} must be > 0, got {config[name]!r}.")
    from .recipes import RECIPES
    if config["recipe"] is not None and config["recipe"] not in RECIPES:
        raise ConfigError(f"{where}: field 'recipe' must be one of {sorted(RECIPES)}, got {config['recipe']!r}.")
    for name in ("base_rate", "replace_by", "match_fraction"):
        if config[name] is not None and not 0.0 <= config[name] <= 1.0:
            raise ConfigError(f"{where}: field {name!r} must be within [0, 1], got {config[name]!r}.")
    if config["checkpoint_every"] < 0:
        raise ConfigError(f"{where}: field 'checkpoint_every' must be >= 0, got {config['checkpoint_every']!r}.")
    if config["ratio"] is not None and config["ratio"] >= 1:
        raise ConfigError(f"{where}: field 'ratio' must be below 1 (a smaller successor), got {config['ratio']!r}.")
    return config


def check_target(config: Dict[str, Any], model: Any, where: str = "config") -> None:
    """Check the fields 'depth' / 'ratio' against the model's blocks before the engine is built, so
    that an impossible target names the config's field (not the API's argument successor_depth)."""
    from .errors import PlanError
    from .plan import resolve_depths
    from .registry import detect_adapter

    try:
        adapter = detect_adapter(model)
        adapter.check(model)
        sizes = {path: len(model.get_submodule(path)) for path in adapter.containers(model)}
    except TheseusError:
        return  # the engine says what is wrong with the model itself
    counts = ", ".join(f"{path}: {n}" for path, n in sizes.items())
    total, depth = sum(sizes.values()), config.get("depth")
    if depth is not None:
        if depth >= total or depth < len(sizes):
            low = len(sizes)
            keeps = f" (each of its {low} containers keeps at least one)" if low > 1 else ""
            raise ConfigError(f"{where}: field 'depth' is {depth}, but the model has {total} blocks ({counts}); "
                              f"the successor must be shallower: choose a depth between {low} and {total - 1}{keeps}.")
        return
    try:
        resolve_depths(sizes, ratio=config["ratio"], depth_advice=("set the field 'depth' to 1", "set the field 'depth'"))
    except PlanError as e:
        raise ConfigError(f"{where}: field 'ratio': {e}") from None


def _help() -> str:
    lines = ["config fields (YAML mapping; * = required for the tasks it applies to):"]
    for name, (kind, default, tasks, text) in FIELDS.items():
        mark = "*" if default is REQUIRED else " "
        shown = "" if default is REQUIRED or default is None else f" (default: {default})"
        scope = "" if tasks == ANY else f" [{', '.join(tasks)} only]"
        lines.append(f"  {mark} {name}: {kind.__name__}{shown}{scope}")
        lines.append(textwrap.fill(text, width=96, initial_indent=" " * 6, subsequent_indent=" " * 6))
    lines.append("\nexamples: examples/configs/text.yaml, vit.yaml, resnet.yaml")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="theseus-compress", description="Compress a trained model by progressive module replacement.",
        epilog=_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file (fields below)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import importlib

    runner = importlib.import_module(TASKS[config["task"]])
    try:
        runner.run(config)
    except TheseusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
