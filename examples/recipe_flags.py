"""The Theseus recipe flags the text and vision examples share: --recipe, the schedule flags,
--match-fraction, --train-rest. Unset flags leave the model family's recipe as it is."""

from __future__ import annotations

import argparse
from typing import Optional

from torch import nn

from theseus_general import RECIPES, ConstantScheduler, RunLinearScheduler, Theseus
from theseus_general.recipes import family_recipe


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


def schedule_from_flags(args: argparse.Namespace, model: nn.Module):
    """None (the recipe's curriculum) unless a schedule flag was given; then that schedule over the mixed
    phase, a flag not given taking the value of the recipe `model` gets."""
    if args.schedule == "linear" and args.base_rate is None and args.replace_by is None:
        return None
    recipe = family_recipe(model, args.recipe)
    base = recipe.base if args.base_rate is None else args.base_rate
    replace_by = (recipe.full_at or 0.5) if args.replace_by is None else args.replace_by
    if args.schedule == "linear":
        return RunLinearScheduler(full_at=replace_by, base=base)  # fit() tells it the run's length
    mixed = args.steps - int(args.steps * (args.match_fraction or 0.0))
    return ConstantScheduler(base, replace_all_at=max(1, int(mixed * replace_by)))


def match_steps(target, steps: int, args: argparse.Namespace) -> Optional[int]:
    """--match-fraction as steps for a Theseus run (None: the recipe's; plain models never match)."""
    if not isinstance(target, Theseus) or args.match_fraction is None:
        return None
    return int(steps * args.match_fraction)
