"""Named training recipes: what `Theseus(...)` and `fit` do when a setting is not given.

``recipe="default"`` is the library's recipe: copies of the non-replaced parts (embeddings, stem,
head) train from step 0 while the replacement rate rises linearly from `base` 0.3 to 1 at
`full_at` 50% of the run (`RunLinearScheduler`); the successors then train alone. Successor i
starts as a copy of block i. Module matching runs only when the truncated start has collapsed
(`match_if_collapsed`): when the successors alone answer at most half as many distinct classes (tokens)
as the predecessor on `fit`'s first batches, pooled until 128 predictions (`start_check_predictions`; a
binary classifier: one class on all of them, and logits that no longer vary with the input, their spread
below 1/1,000 of the predecessor's: `collapse_spread`), `fit` first spends 20% of the steps on module matching
(each successor learns its group's output from the group's input), after restarting each successor from the block
of its group that reproduces the group best (`choose_start`). Matching's lr is chosen for the model by a short
probe (``match_lr="auto"``, `training.probe_match_lr`: 1e-4 to 3e-3, 8 steps each, judged on held-out batches;
round 13: it chose the former fixed 1e-3 on MiniLM-L6 and all-mpnet-base-v2, 3e-3 on SmolLM2's decoder, perplexity
222 against 392 at 1e-3). Measured (docs/results.md#the-default-recipe-at-usual-learning-rates
and the sections after it): MiniLM-L6's bottom 3 layers answer one class (matching: 0.74-0.76 test
where fine-tune-only and no matching stay at the majority class), SmolLM2's first 20 layers 16 of 121
tokens (matching: perplexity 303 against 44,386 without); a 12-layer encoder's bottom 6 answer both
classes and skip it (matching there cost 3.3-3.5 test points at lr 3e-5). Until round 7 the trigger was
agreement below 2/3 (`match_below_agreement`, an option since). It matched all-mpnet-base-v2 12 -> 6 and
the ViT 8 -> 2, where matching cost: on MPNet at lr 3e-5 and 300 steps the collapse trigger is 3.1-3.3
test points above it on the two seeds where the triggers differ, and on the ViT's dev +0.71 / +0.76 at
400 / 1,600 steps (docs/results.md#round-7-the-start-check-alone-what-came-out). It costs on the ViT 8 -> 4
from an under-trained predecessor: -0.55 [-1.23, +0.12] dev points (3 seeds). Until round 8 the check read
the first batch only: on one seed of three, MPNet's start answered one class on its first 16 examples and so
matched (3.1 points lower at lr 3e-5); over 128 predictions it answers both on every seed
(docs/results.md#round-8-the-start-check-over-more-examples-what-came-out). From a converged predecessor MPNet's
start answers one class on all 128 (its margin's offset exceeds its spread; spread 0.087 of the predecessor's, where
MiniLM 6 -> 3's is 7e-5), so until round 9 the default matched it and was about 4 points behind truncation
(docs/results.md#round-9-mpnet-from-a-converged-predecessor-what-came-out); `collapse_spread` skips it. With this default's
phase, MPNet is still below truncation on every seed, behind it at lr 3e-5 and 5e-5 by 0.7-0.8 points
(docs/results.md#round-9-a-collapse-that-is-only-an-offset-what-came-out): `recipe="bert"` below. A short mixed phase (p = 1 at 10%, no matching) was level with truncation on MPNet, but behind it on the
README-path test's task at lr 1e-4 and 0.59 points below the usual phase on the ViT at 1,600 steps
(docs/results.md#a-candidate-default-round-6-what-came-out).

``recipe="bert"`` is the default for BERT-family encoders (the bert adapter names it; issue 26, round 10): the
default, except that a start whose pooled agreement with the predecessor is below 2/3 gets a short mixed phase,
p = 1 at 10% of the run (`short_phase_below_agreement`, `short_full_at`; `fit` applies it before the first step).
On all-mpnet-base-v2 12 -> 6 (agreement 0.57-0.63) at lr 2e-5 / 3e-5 / 5e-5 it is level with truncation (+0.02,
-0.07, +0.07 points, 3 seeds), where the default's phase was 0.7-0.9 below; the README-path task (0.875) and the
stacked MiniLM encoder (0.81) keep the default's phase. The threshold was chosen on those runs
(docs/results.md#round-10-the-short-phase-for-a-start-that-disagrees-what-came-out). Out of sample it failed:
MPNet 12 -> 4 was 10.9 points behind truncation, and 12 -> 3 ended at the majority class; that start is nearly collapsed (spread 5-6e-3, above
`collapse_spread`). Round 11's candidate matched it (`collapse_spread=1e-2`, a matched start on the default's phase:
`short_phase_if_collapsed=False`): ahead of truncation at lr 2e-5 and 3e-5, 1.1 points behind at 5e-5, so
not adopted (docs/results.md#round-11-what-came-out). Round 12 adopted the limit alone: `"bert"` judges a binary
start collapsed below 1/100 of the predecessor's spread (`collapse_spread=1e-2`), matches it, then runs the short
phase. On MPNet 12 -> 4 it is not behind truncation at lr 2e-5, 3e-5 or 5e-5, and on 12 -> 3 at 5e-5 (held out)
it is ahead, 3 seeds (docs/results.md#round-12-what-came-out); the limit was set with 12 -> 4 seen.

``recipe="matching"`` always matches (the default until issue 26).
``fit(..., match_steps=n)`` asks for n matching steps with any recipe, ``match_steps=0`` for none.

``recipe="resnet"`` is the default for ResNets (the resnet adapter names it; chosen on the ResNet
dev split, docs/results.md#ablation-of-the-default-recipe): the paper's frozen stem and head, no
module matching, p from 0.6 to 1 at 30% of the run. Training the stem and head, matching and the
slower curriculum each measured at or below it there.

``recipe="paper"`` is BERT-of-Theseus as published (Xu et al., 2020): embeddings and head
frozen, task loss only, the linear curriculum p = min(1, 0.3 + 6e-4 t) whatever the run's length.

Settings given explicitly (``scheduler=``, ``train_rest=``) win over the recipe's.

Three mechanisms of issue 23 are options of a `Recipe`, off in every named recipe; they stay options
until they win on dev (measured in docs/results.md#mechanisms-on-dev-issue-23). Give them as
``Theseus(model, ..., recipe=dataclasses.replace(RECIPES["default"], mixing="blend"))``:

* ``lr_compensation=c``: while p < 1 a successor runs in about p of the steps, so `fit` scales the
  successors' learning rate by min(c, 1/p) (the paper's effective-lr argument); the rest keeps `lr`.
* ``mixed_matching=w``: through the mixed phase, each group also measures its successor's relative
  squared error against the group's output on the same (detached) input, and `fit` adds w times
  their mean to the task loss (module matching that goes on while the task trains).
* ``mixing="blend"``: instead of a random draw per group, each group outputs
  (1 - p) * predecessor blocks + p * successor while p < 1 (a deterministic annealed blend, as DCR).

Two more of issue 26 (round 10, docs/results.md#round-10-stage-1-what-came-out-and-a-second-candidate-written-2026-12-05-0728-utc),
off in every named recipe as well:

* ``mixing="prefix"``: the paper's draws count how many groups, from the first, run their successors, so
  a successor always reads a successor's output, as in the compressed model.
* ``rest_after_mixing=True``: with train_rest, the rest's copies take no optimiser step while p < 1 (the
  engine's optimiser hook drops their gradients), then train with the successors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import math
from typing import Dict, Optional, Union

from .errors import ScheduleError, TrainingError
from .schedulers import LinearScheduler, RunLinearScheduler, Scheduler

MIXINGS = ("random", "blend", "prefix")
START_CHECK_MAX_BATCHES = 16  # the start check reads no more batches than this, however small they are


@dataclass(frozen=True)
class Recipe:
    name: str
    train_rest: bool
    full_at: Optional[float]  # fraction of the run at which p reaches 1; None: the paper's fixed slope
    base: float  # the replacement rate at step 0
    match_fraction: float = 0.0  # share of fit()'s steps spent on module matching first
    # its learning rate (None: fit()'s lr; "auto": chosen per model by a short probe, `training.probe_match_lr`)
    match_lr: Union[float, str, None] = None
    # before matching, restart each default-copied successor from the block of its group that
    # reproduces the group best on the first batch (theseus_general.matching.choose_starts)
    choose_start: bool = False
    # match only a start that lost the task: skip matching when the successors alone agree with the
    # predecessor on at least this share of the start check's predictions (None: always match)
    match_below_agreement: Optional[float] = None
    # match only a start that has collapsed: skip matching unless the successors alone answer at most half
    # as many distinct classes in the start check as the predecessor (`theseus_general.matching.StartCheck`)
    match_if_collapsed: bool = False
    # how many predictions the start check pools: it reads the run's first batches until it has at least
    # this many (examples of a classifier, tokens of a language model; at most START_CHECK_MAX_BATCHES
    # batches). 1: the first batch alone
    start_check_predictions: int = 1
    # for a binary classifier, a start answering one class counts as collapsed only if its logits' spread over the
    # check's predictions is also below this share of the predecessor's (`StartCheck.collapsed_under`; None: the
    # class count alone)
    collapse_spread: Optional[float] = None
    # issue 23's mechanisms (see the module docstring); off here and in every named recipe
    lr_compensation: Optional[float] = None  # cap c of the successors' lr factor min(c, 1/p) while p < 1
    mixed_matching: float = 0.0  # weight of the mixed phase's local matching loss
    # "random": the paper's draws; "blend": (1 - p) * group + p * successor; "prefix": the paper's draws count how
    # many groups, from the first, run their successors (`ReplacementState.decision`; issue 26, round 10)
    mixing: str = "random"
    # with train_rest, the rest's copies take no optimiser step while p < 1 (the engine's optimiser hook drops
    # their gradients, so AdamW starts their state at p = 1): the successors learn their place under the
    # predecessor's own embeddings and head, which then adapt to the all-successor model (issue 26, round 10)
    rest_after_mixing: bool = False
    # a start that disagrees with its predecessor (the start check's pooled agreement below this) gets a short mixed
    # phase: p reaches 1 at `short_full_at` of the run instead of `full_at` (`fit` decides it before the first step)
    short_phase_below_agreement: Optional[float] = None
    short_full_at: float = 0.1
    # whether a start the recipe judges collapsed (and so matches) gets that short phase too; False: it keeps
    # `full_at`, the phase module matching was measured with (issue 26, round 11)
    short_phase_if_collapsed: bool = True

    def __post_init__(self) -> None:
        lr = self.match_lr
        if not (lr is None or lr == "auto" or (not isinstance(lr, bool) and isinstance(lr, (int, float))
                                               and math.isfinite(lr) and lr > 0)):
            raise ScheduleError(f"Recipe match_lr is module matching's learning rate: a number > 0, \"auto\" (chosen "
                                f"per model by a short probe) or None (fit's lr), got {lr!r}.")
        if self.mixing not in MIXINGS:
            raise ScheduleError(f"Recipe mixing must be one of {MIXINGS}, got {self.mixing!r}.")
        if self.lr_compensation is not None and not (isinstance(self.lr_compensation, (int, float))
                                                     and self.lr_compensation >= 1):
            raise ScheduleError(f"Recipe lr_compensation caps the successors' lr factor 1/p: a number >= 1 "
                                f"(or None for none), got {self.lr_compensation!r}.")
        if isinstance(self.start_check_predictions, bool) or not isinstance(self.start_check_predictions, int) \
                or self.start_check_predictions < 1:
            raise ScheduleError(f"Recipe start_check_predictions is how many predictions the start check reads: "
                                f"an int >= 1, got {self.start_check_predictions!r}.")
        if self.collapse_spread is not None and (isinstance(self.collapse_spread, bool) or not isinstance(
                self.collapse_spread, (int, float)) or not 0 < self.collapse_spread <= 1):
            raise ScheduleError(f"Recipe collapse_spread is a share of the predecessor's logit spread, in (0, 1] "
                                f"(or None for the class count alone), got {self.collapse_spread!r}.")
        for name in ("short_phase_below_agreement", "short_full_at"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
                raise ScheduleError(f"Recipe {name} is a share in (0, 1], got {value!r}.")
        for name in ("rest_after_mixing", "short_phase_if_collapsed"):
            if not isinstance(getattr(self, name), bool):
                raise ScheduleError(f"Recipe {name} is True or False, got {getattr(self, name)!r}.")
        if not isinstance(self.mixed_matching, (int, float)) or not self.mixed_matching >= 0:
            raise ScheduleError(f"Recipe mixed_matching is a loss weight >= 0 (0: off), got {self.mixed_matching!r}.")

    def require_fit_loop(self, where: str) -> None:
        """Raise when this recipe has an option that only `theseus_general.fit` applies (the successors'
        lr factor, the matching term added to the loss): `where` (an integration) would drop it silently."""
        options = [name for name, on in (("lr_compensation", self.lr_compensation is not None),
                                         ("mixed_matching", self.mixed_matching > 0)) if on]
        if options:
            raise TrainingError(f"The recipe's {' and '.join(options)} take effect in theseus_general.fit only; "
                                f"{where} would train without them. Train with fit(th, ...), or use a recipe "
                                "without them (they are off in every named recipe).")

    def successor_lr_factor(self, rate: float) -> float:
        """The successors' lr factor at replacement rate `rate` (`lr_compensation`; 1 when off)."""
        if self.lr_compensation is None:
            return 1.0
        return min(float(self.lr_compensation), 1.0 / max(rate, 1e-12))

    @property
    def asks_start(self) -> bool:
        """Whether this recipe's matching depends on what the run's first batches say about the start
        (`theseus_general.matching.check_start`: its agreement with the predecessor, whether it collapsed)."""
        return (bool(self.match_fraction) and (self.match_below_agreement is not None or self.match_if_collapsed)
                or self.short_phase_below_agreement is not None)

    def full_at_for(self, agreement: Optional[float], collapsed: Optional[bool] = None) -> Optional[float]:
        """Where p reaches 1 for a start whose check read `agreement` (and judged it `collapsed`, as this
        recipe's `collapse_spread` reads it): `short_full_at` below `short_phase_below_agreement`, unless the
        start collapsed and `short_phase_if_collapsed` is off; else `full_at` (a check not measured, None,
        changes nothing)."""
        disagrees = (self.short_phase_below_agreement is not None and agreement is not None
                     and agreement < self.short_phase_below_agreement)
        return self.short_full_at if disagrees and (self.short_phase_if_collapsed or not collapsed) else self.full_at

    def match_steps(self, steps: int, agreement: Optional[float] = None, collapsed: Optional[bool] = None) -> int:
        """The module-matching steps this recipe takes out of a run of `steps` optimiser steps. With
        `match_below_agreement`, none when the successors' `agreement` with the predecessor on the first
        batch reaches it; with `match_if_collapsed`, none unless the start `collapsed` on it. A check not
        measured (None) does not veto."""
        if self.match_below_agreement is not None and agreement is not None and agreement >= self.match_below_agreement:
            return 0
        if self.match_if_collapsed and collapsed is not None and not collapsed:
            return 0
        return int(steps * self.match_fraction)

    def scheduler(self) -> Scheduler:
        if self.full_at is None:
            return LinearScheduler(base=self.base)
        return RunLinearScheduler(full_at=self.full_at, base=self.base)


# the default (issue 26): matching cost 3.3-3.5 test points on a 12-layer encoder whose start keeps both classes, and
# rescues one that answers a single class (MiniLM 6 -> 3: +18 points): it runs for the latter only
# (round 8: the check pools 128 predictions; one batch of 16 had matched a start that keeps both classes)
# (round 9: a binary start that answers one class is collapsed only if its logits no longer vary with the input:
# all-mpnet-base-v2's start from a converged predecessor answers one class through an offset, and matching it cost
# about 4 points)
# (round 13: matching's lr is chosen per model by a probe, `training.probe_match_lr`; it chose the former fixed 1e-3 on
# both BERT-family models and 3e-3 on SmolLM2's decoder, where the perplexity fell from 392 to 222)
_DEFAULT = Recipe("default", train_rest=True, full_at=0.5, base=0.3, match_fraction=0.2, match_lr="auto",
                   choose_start=True, match_if_collapsed=True, start_check_predictions=128, collapse_spread=1e-3)

RECIPES: Dict[str, Recipe] = {
    "default": _DEFAULT,
    # the bert adapter's family recipe (issue 26, round 10): the default, with a short mixed phase for a start that
    # disagrees with its predecessor. all-mpnet-base-v2 12 -> 6 (agreement 0.57-0.63) was below truncation on every
    # seed with the default's phase and level with it with the short one; the README-path task (0.875) and the
    # stacked MiniLM encoder (0.81) keep the default's phase, where the short one cost or was level. Round 12: a
    # binary start answering one class is collapsed (matched) below 1/100 of the predecessor's spread: MPNet 12 -> 3
    # and 12 -> 4 (3-6e-3) ended at or near the majority class without matching; 12 -> 5 and 12 -> 6 (0.05-0.09) skip it
    "bert": replace(_DEFAULT, name="bert", collapse_spread=1e-2, short_phase_below_agreement=2 / 3, short_full_at=0.1),
    "matching": Recipe("matching", train_rest=True, full_at=0.5, base=0.3, match_fraction=0.2, match_lr="auto",
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
