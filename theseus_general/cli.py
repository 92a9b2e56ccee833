"""`theseus-compress CONFIG.yaml`: run a compression from a YAML config.

This module imports no model library: it reads and checks the config, then hands
it to the task's runner on the adapter side (``theseus_general.adapters.cli_text``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional

from .errors import TheseusError


class ConfigError(TheseusError):
    """A config field is missing, unknown, or of the wrong type or range."""


# name: (type, default (... = required), help)
FIELDS: Dict[str, tuple] = {
    "task": (str, ..., "what to compress; one of: text-classification"),
    "model": (str, ..., "Hugging Face model directory or name of the fine-tuned predecessor (with its tokenizer)"),
    "data": (str, ..., "CSV or JSONL file with a text and an integer label column (labels 0..K-1)"),
    "output": (str, ..., "directory for checkpoints/ and successor/ (save_pretrained output)"),
    "depth": (int, ..., "successor depth (number of layers), at least 1 and below the model's"),
    "text_column": (str, "text", "name of the text column"),
    "label_column": (str, "label", "name of the label column"),
    "steps": (int, 600, "optimiser steps"),
    "lr": (float, 1e-4, "AdamW learning rate (linear decay to 0)"),
    "batch_size": (int, 32, "batch size"),
    "max_length": (int, 64, "tokens per text"),
    "base_rate": (float, 0.3, "replacement rate at step 0 (linear curriculum)"),
    "replace_by": (float, 0.5, "fraction of the steps after which the rate is 1 (only successors run)"),
    "unfreeze_rest": (bool, True, "train embeddings and head once the rate is 1"),
    "seed": (int, 0, "seed of the data order and of the replacement draws"),
    "checkpoint_every": (int, 0, "save a checkpoint every N steps into OUTPUT/checkpoints and resume from it (0: off)"),
}
TASKS = {"text-classification": "theseus_general.adapters.cli_text"}
_POSITIVE = {"depth", "steps", "lr", "batch_size", "max_length"}


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
        raise ConfigError(f"{where}: unknown field(s) {unknown}; the fields are {sorted(FIELDS)} (theseus-compress --help).")
    config = {}
    for name, (kind, default, _) in FIELDS.items():
        if name not in raw:
            if default is ...:
                raise ConfigError(f"{where}: field {name!r} is required ({FIELDS[name][2]}).")
            config[name] = default
            continue
        value = raw[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{where}: field {name!r} must be a {kind.__name__}, got {value!r}.")
        config[name] = value
    for name in _POSITIVE:
        if config[name] <= 0:
            raise ConfigError(f"{where}: field {name!r} must be > 0, got {config[name]!r}.")
    for name in ("base_rate", "replace_by"):
        if not 0.0 <= config[name] <= 1.0:
            raise ConfigError(f"{where}: field {name!r} must be within [0, 1], got {config[name]!r}.")
    if config["checkpoint_every"] < 0:
        raise ConfigError(f"{where}: field 'checkpoint_every' must be >= 0, got {config['checkpoint_every']!r}.")
    if config["task"] not in TASKS:
        raise ConfigError(f"{where}: field 'task' must be one of {sorted(TASKS)}, got {config['task']!r}.")
    return config


def _help() -> str:
    lines = ["config fields (YAML mapping; * = required):"]
    for name, (kind, default, text) in FIELDS.items():
        mark = "*" if default is ... else " "
        shown = "" if default is ... else f" (default: {default})"
        lines.append(f"  {mark} {name}: {kind.__name__}{shown}\n      {text}")
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
