"""`TheseusConfig`: every setting of a Theseus run in one JSON-safe dataclass.

    config = TheseusConfig(successor_depth=3, total_steps=600)
    th = Theseus(model, config)                      # the same as Theseus(model, successor_depth=3, total_steps=600)
    th.config                                        # resolved: the recipe's parts filled in, what this run uses
    Theseus.from_checkpoint(model, "runs/ck/step-000100")   # rebuilt from the checkpoint's config

The recipe is resolved here, once (`resolve`): a recipe name (or the model family's, when none is
given) fills in ``train_rest``, ``schedule`` and the training parts (`recipe_parts`: module
matching's share and learning rate, the start-block choice); each part given explicitly
(``train_rest``, ``base_rate``, ``replace_by``, ``match_fraction``, ``match_lr``, ``choose_start``)
wins over the recipe's, and a schedule given as ``scheduler=`` wins over the curriculum. `fit`,
module matching, checkpoints, the CLI and the examples read the resolved config, nowhere else.

What cannot be written as JSON stays an argument of `Theseus(...)` alone and is not part of the
config: modules (``successors=``), an `Adapter` instance, a sample, a callable ``init=`` or
schedule (a config of such a run has ``schedule=None``; pass ``scheduler=`` again when rebuilding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .errors import ScheduleError
from .recipes import Recipe, get_recipe
from .schedulers import Scheduler


@dataclass
class TheseusConfig:
    """Every JSON-safe setting of `Theseus` (see its docstring for each); `None`: the recipe's or the default."""

    successor_depth: Union[int, List[int], None] = None
    ratio: Optional[float] = None
    groups: Optional[Any] = None
    adapter: Optional[str] = None
    adapter_options: Dict[str, Any] = field(default_factory=dict)
    recipe: Optional[str] = None
    train_rest: Optional[bool] = None
    schedule: Optional[Dict[str, Any]] = None  # a schedule's to_dict(); None: the recipe's
    init: Optional[str] = None
    total_steps: Optional[int] = None
    seed: int = 0
    validate: bool = True
    target_flops: Optional[float] = None
    target_speedup: Optional[float] = None
    measure: str = "flops"
    successor_width: Union[float, str, Dict[str, float], None] = None
    # parts of the recipe, each None for the recipe's own: the curriculum's start rate and the fraction of
    # the run at which p reaches 1, module matching's share of fit's steps and its learning rate, and the
    # start-block choice
    base_rate: Optional[float] = None
    replace_by: Optional[float] = None
    match_fraction: Optional[float] = None
    match_lr: Union[float, str, None] = None
    choose_start: Optional[bool] = None
    # the resolved recipe (a Recipe's fields) that the schedule, `fit` and module matching use; filled in by resolve()
    recipe_parts: Optional[Dict[str, Any]] = None

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TheseusConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ScheduleError(f"Unknown TheseusConfig fields {unknown}; it has {sorted(names)}. Was it written by "
                                "a newer theseus-general?")
        return cls(**data)

    def replace(self, **changes: Any) -> "TheseusConfig":
        return dataclasses.replace(self, **changes)

    @property
    def resolved(self) -> bool:
        return self.recipe_parts is not None

    def resolve(self, family_recipe: str, recipe: Optional[Recipe] = None,
                scheduler: Optional[Scheduler] = None) -> "TheseusConfig":
        """This config with the recipe applied: `recipe` (a `Recipe` given to Theseus), else the one named,
        else `family_recipe` (the adapter's default); explicit ``train_rest`` / ``schedule`` (or a
        `scheduler` object given to Theseus) win. A resolved config (a saved run's) keeps its parts."""
        if self.resolved and recipe is None:
            parts = dict(self.recipe_parts, train_rest=bool(self.train_rest))  # an override of train_rest holds
            schedule = self.schedule if scheduler is None else (
                scheduler.to_dict() if hasattr(scheduler, "to_dict") else None)
            return self.replace(recipe_parts=parts, schedule=schedule)
        recipe = recipe if recipe is not None else get_recipe(self.recipe or family_recipe)
        overrides = {name: value for name, value in (
            ("train_rest", self.train_rest), ("base", self.base_rate), ("full_at", self.replace_by),
            ("match_fraction", self.match_fraction), ("match_lr", self.match_lr), ("choose_start", self.choose_start))
            if value is not None}
        recipe = dataclasses.replace(recipe, **overrides)
        if scheduler is not None:
            schedule = scheduler.to_dict() if hasattr(scheduler, "to_dict") else None
        else:
            schedule = self.schedule if self.schedule is not None else recipe.scheduler().to_dict()
        return self.replace(recipe=recipe.name, train_rest=recipe.train_rest, schedule=schedule,
                            recipe_parts=dataclasses.asdict(recipe))

    def recipe_object(self) -> Recipe:
        """The resolved recipe, as a `Recipe` (with this run's train_rest)."""
        if not self.resolved:
            raise ScheduleError("This TheseusConfig is not resolved yet; Theseus(model, config) resolves it.")
        return Recipe(**self.recipe_parts)


__all__ = ["TheseusConfig"]
