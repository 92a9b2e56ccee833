"""The Theseus recipe flags the text and vision examples share: --recipe, the schedule flags,
--match-fraction, --train-rest. They become a `TheseusConfig` (`config_from_flags`), which resolves
the recipe: unset flags leave the model family's recipe as it is."""

from __future__ import annotations

import argparse
from typing import Optional

from torch import nn

from theseus_general import RECIPES, ConstantScheduler, Theseus
from theseus_general.config import TheseusConfig


def add_recipe_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="Theseus recipe (default: the model family's: 'resnet' for ResNets, else 'default'); "
                        "'paper': the paper's (rest frozen, no module matching); the flags below override parts of it")
    p.add_argument("--schedule", choices=["linear", "constant"], default="linear",
                   help="replacement-rate schedule: linear curriculum, or constant --base-rate then 1")
    p.add_argument("--base-rate", type=float, default=None,
                   help="curriculum start b (linear) / constant rate p (default: the recipe's, 0.3; resnet 0.6)")
    p.add_argument("--replace-by", type=float, default=None,
                   help="fraction of the mixed phase after which p = 1 and only the successors run (default: the "
                        "recipe's, 0.5; resnet 0.3)")
    p.add_argument("--match-fraction", type=float, default=None,
                   help="fraction of --steps spent first on module matching (default: the recipe's)")
    p.add_argument("--train-rest", action=argparse.BooleanOptionalAction, default=None,
                   help="train (copies of) the embeddings/stem and head from step 0 (default: the recipe's, on for "
                        "'default'); --no-train-rest keeps them frozen, as in the paper")


def config_from_flags(args: argparse.Namespace, **target) -> TheseusConfig:
    """The engine's config from the flags and a depth target (``successor_depth=``/``ratio=``): a flag not
    given is left to the recipe."""
    linear = args.schedule == "linear"
    return TheseusConfig(**target, recipe=args.recipe, train_rest=args.train_rest, seed=args.seed,
                         base_rate=args.base_rate if linear else None, replace_by=args.replace_by if linear else None,
                         match_fraction=args.match_fraction)


def constant_schedule(args: argparse.Namespace, model: nn.Module, config: TheseusConfig):
    """With --schedule constant: --base-rate (default 0.5) until --replace-by of the mixed phase (default
    0.5), then 1; None with the linear curriculum (the config's)."""
    if args.schedule == "linear":
        return None
    base = 0.5 if args.base_rate is None else args.base_rate
    replace_by = 0.5 if args.replace_by is None else args.replace_by
    mixed = args.steps - int(args.steps * (args.match_fraction or 0.0))
    return ConstantScheduler(base, replace_all_at=max(1, int(mixed * replace_by)))
