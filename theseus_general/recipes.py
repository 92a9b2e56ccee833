"""Named training recipes: what `Theseus(...)` and `fit` do when a setting is not given.

``recipe="default"`` is the library's recipe, chosen on dev splits (benchmarks/quality.py,
docs/results.md#ablation): `fit` first spends `match_fraction` of the steps on module matching
(each successor learns its group's output from the group's input, at `match_lr`; this is what
stops short runs from collapsing to one class), starting each successor from the block of its
group that reproduces the group best on the first batch (`choose_start`); then copies of the
non-replaced parts train from step 0 of the mixed phase while the replacement rate rises
linearly from `base` to 1 at `full_at` of it (`RunLinearScheduler`); the successors then train
alone.

``recipe="resnet"`` is the default for ResNets (the resnet adapter names it; chosen on the ResNet
dev split, docs/results.md#ablation-of-the-default-recipe): the paper's frozen stem and head, no
module matching, p from 0.6 to 1 at 30% of the run. Training the stem and head, matching and the
slower curriculum each measured at or below it there.

``recipe="paper"`` is BERT-of-Theseus as published (Xu et al., 2020): embeddings and head
frozen, task loss only, the linear curriculum p = min(1, 0.3 + 6e-4 t) whatever the run's length.

Settings given explicitly (``scheduler=``, ``train_rest=``) win over the recipe's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from .errors import ScheduleError
from .schedulers import LinearScheduler, RunLinearScheduler, Scheduler


@dataclass(frozen=True)
class Recipe:
    name: str
    train_rest: bool
    full_at: Optional[float]  # fraction of the run at which p reaches 1; None: the paper's fixed slope
    base: float  # the replacement rate at step 0
    match_fraction: float = 0.0  # share of fit()'s steps spent on module matching first
    match_lr: Optional[float] = None  # its learning rate (None: fit()'s lr)
    # before matching, restart each default-copied successor from the block of its group that
    # reproduces the group best on the first batch (theseus_general.matching.choose_starts)
    choose_start: bool = False

    def match_steps(self, steps: int) -> int:
        """The module-matching steps this recipe takes out of a run of `steps` optimiser steps."""
        return int(steps * self.match_fraction)

    def scheduler(self) -> Scheduler:
        if self.full_at is None:
            return LinearScheduler(base=self.base)
        return RunLinearScheduler(full_at=self.full_at, base=self.base)


RECIPES: Dict[str, Recipe] = {
    "default": Recipe("default", train_rest=True, full_at=0.5, base=0.3, match_fraction=0.2, match_lr=1e-3,
                      choose_start=True),
    "resnet": Recipe("resnet", train_rest=False, full_at=0.3, base=0.6),
    "paper": Recipe("paper", train_rest=False, full_at=None, base=0.3),
}


def get_recipe(name: str) -> Recipe:
    if isinstance(name, Recipe):
        return name
    if name not in RECIPES:
        raise ScheduleError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)} "
                            "(or give scheduler= and train_rest= yourself).")
    return RECIPES[name]
