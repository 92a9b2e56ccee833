"""Plans: which predecessor blocks form each group, and what replaces each group.

A target is one of
  * ``successor_depth``: an int (spread over all containers), or a list with one
    depth per container;
  * ``ratio``: a float in (0, 1), applied to every container: a container of n
    blocks gets ``n * ratio`` blocks rounded to the nearest whole block, exact halves
    rounded down (9 x 0.5 = 4.5 -> 4, 6 x 0.5 -> 3, 7 x 0.3 = 2.1 -> 2). A ratio that
    rounds some container to 0 blocks is refused (6 x 0.05 = 0.3): every container
    keeps at least one block, and a silent clamp to 1 would not be the ratio asked for;
  * ``groups``: explicit groups of block indices (a list of lists for one container,
    or a dict container path -> list of lists).

Uneven splits follow one rule: group sizes differ by at most one and the larger
groups come first (12 blocks -> 5 groups gives sizes 3, 3, 2, 2, 2), the same rule
as ``numpy.array_split``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .errors import PlanError

# explicit groups (per container in a dict), or "importance": groups around the blocks kept by importance
GroupsSpec = Union[Sequence[Sequence[int]], Dict[str, Sequence[Sequence[int]]], str]


@dataclass(frozen=True)
class Group:
    """One group of consecutive predecessor blocks and the successor that replaces them."""

    index: int  # position among all groups of the plan
    container: str  # dotted path of the container holding the blocks
    blocks: Tuple[int, ...]  # indices of the predecessor blocks inside the container
    successor: str = ""  # how the successor was made, for people
    predecessor_params: int = 0
    successor_params: int = 0


@dataclass
class Plan:
    """What an engine does to a model: readable with print(), comparable with ==."""

    adapter: str
    containers: Dict[str, int]  # path -> number of predecessor blocks
    groups: List[Group]
    frozen_params: int = 0  # parameters outside the groups (the name predates train_rest; kept for checkpoints)
    notes: List[str] = field(default_factory=list)
    rest_trains: bool = False  # whether copies of the parameters outside the groups train (train_rest)
    # A budget target's choice and predictions (theseus_general.budget.BudgetPlan); timings vary
    # between runs, so it takes no part in == and to_dict() (checkpoints compare those).
    budget: Optional[object] = field(default=None, compare=False, repr=False)
    # group -> block (index in its container) its successor was restarted from by the start-block choice
    # (theseus_general.matching.choose_starts). The table shows it; like `budget` it takes no part in == and
    # to_dict(): a checkpoint compares the plan as made, and a resumed run's successors come from the checkpoint.
    starts: Dict[int, int] = field(default_factory=dict, compare=False, repr=False)

    @property
    def successor_depth(self) -> Dict[str, int]:
        depth = {path: 0 for path in self.containers}
        for group in self.groups:
            depth[group.container] += 1
        return depth

    def groups_in(self, container: str) -> List[Group]:
        return [g for g in self.groups if g.container == container]

    def to_dict(self) -> dict:
        return {
            "adapter": self.adapter,
            "containers": dict(self.containers),
            "groups": [
                {
                    "index": g.index,
                    "container": g.container,
                    "blocks": list(g.blocks),
                    "successor": g.successor,
                    "predecessor_params": g.predecessor_params,
                    "successor_params": g.successor_params,
                }
                for g in self.groups
            ],
            "frozen_params": self.frozen_params,
        }

    def __str__(self) -> str:
        header = ("group", "container", "predecessor blocks", "successor", "params (pred -> succ)")
        rows = [
            (
                str(g.index),
                g.container,
                _format_blocks(g.blocks),
                f"copy of block {self.starts[g.index]} (chosen)" if g.index in self.starts else g.successor,
                f"{g.predecessor_params:,} -> {g.successor_params:,}",
            )
            for g in self.groups
        ]
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        pred = sum(g.predecessor_params for g in self.groups)
        succ = sum(g.successor_params for g in self.groups)
        depth = ", ".join(f"{p}: {n} -> {self.successor_depth[p]}" for p, n in self.containers.items())
        out = [f"Theseus plan (adapter: {self.adapter}; depth {depth})", line(header), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        out.append(
            f"replaced blocks: {pred:,} params -> successors: {succ:,} params"
            f" ({succ / max(pred, 1):.1%}); outside the groups: {self.frozen_params:,} params, "
            + ("trained as copies (train_rest=True)" if self.rest_trains else "frozen (train_rest=False)")
        )
        if self.budget is not None:
            out += self.budget.lines()
        out += self.notes
        return "\n".join(out)


def _format_blocks(blocks: Sequence[int]) -> str:
    if len(blocks) == 1:
        return str(blocks[0])
    return f"{blocks[0]}-{blocks[-1]}" if list(blocks) == list(range(blocks[0], blocks[-1] + 1)) else str(list(blocks))


def split_evenly(num_blocks: int, depth: int) -> List[Tuple[int, ...]]:
    """Cut blocks 0..num_blocks-1 into `depth` consecutive groups, larger groups first."""
    if depth < 1 or depth > num_blocks:
        raise PlanError(f"Cannot cut {num_blocks} blocks into {depth} groups.")
    size, extra = divmod(num_blocks, depth)
    groups, start = [], 0
    for i in range(depth):
        end = start + size + (1 if i < extra else 0)
        groups.append(tuple(range(start, end)))
        start = end
    return groups


def _check_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(f"{what} must be an int, got {value!r}.")
    return value


def resolve_depths(
    sizes: Dict[str, int],
    successor_depth: Union[int, Sequence[int], None] = None,
    ratio: Optional[float] = None,
    depth_advice: Optional[Tuple[str, str]] = None,
) -> Dict[str, int]:
    """Turn a depth or ratio target into one successor depth per container. `depth_advice`:
    how to tell the caller to give a depth instead of a ratio, for one container and for
    several (the CLI names its own field); by default the successor_depth argument."""
    advice = depth_advice or ("give successor_depth=1", "give successor_depth with one depth per container")
    paths = list(sizes)
    total = sum(sizes.values())
    if (successor_depth is None) == (ratio is None):
        raise PlanError(
            "Give exactly one target: successor_depth=N (e.g. successor_depth=6 for 12 -> 6), "
            "ratio=R (e.g. ratio=0.5) or groups=[[0, 1], [2, 3], ...]."
        )
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
            raise PlanError(f"ratio must be a number strictly between 0 and 1 (successor depth / predecessor depth), got {ratio!r}.")
        depths = {p: round_half_down(sizes[p] * ratio) for p in paths}
        empty = {p: sizes[p] for p in paths if depths[p] == 0}
        if empty:
            n = min(empty.values())
            products = ", ".join(f"{p}: {k} x {ratio} = {k * ratio:.3g}" for p, k in empty.items())
            raise PlanError(
                f"ratio={ratio} leaves no block in {sorted(empty)} ({products} blocks, which rounds to 0; ratio x "
                "blocks is rounded to the nearest whole block, halves down). Every container keeps at least one "
                f"block: use a ratio above {0.5 / n:.3g} or {advice[0] if len(paths) == 1 else advice[1]}."
            )
        if sum(depths.values()) >= total:
            raise PlanError(
                f"ratio={ratio} keeps every block of {sizes} (rounding gives depths {depths}); "
                "use a smaller ratio or an explicit successor_depth."
            )
        return depths
    if isinstance(successor_depth, (list, tuple)):
        if len(successor_depth) != len(paths):
            raise PlanError(
                f"successor_depth has {len(successor_depth)} entries but the model has {len(paths)} "
                f"containers {paths}; give one depth per container."
            )
        depths = {}
        for p, d in zip(paths, successor_depth):
            d = _check_int(d, f"successor_depth for {p}")
            if not 1 <= d <= sizes[p]:
                raise PlanError(f"successor_depth for {p} must be between 1 and {sizes[p]} (its block count), got {d}.")
            depths[p] = d
        if sum(depths.values()) >= total:
            raise PlanError(f"successor_depth {list(successor_depth)} does not make {sizes} any shallower.")
        return depths
    depth = _check_int(successor_depth, "successor_depth")
    if depth < 1:
        raise PlanError(f"successor_depth must be at least 1, got {depth}.")
    if depth >= total:
        raise PlanError(
            f"successor_depth={depth} is not smaller than the predecessor's depth ({total} blocks); "
            f"choose a depth between 1 and {total - 1}."
        )
    if len(paths) == 1:
        return {paths[0]: depth}
    if depth < len(paths):
        raise PlanError(
            f"successor_depth={depth} is less than the number of containers ({len(paths)}: {paths}); "
            "every container keeps at least one block. Give a per-container list instead."
        )
    return _spread(sizes, depth)


def round_half_down(x: float) -> int:
    """`x` rounded to the nearest int, exact halves down (4.5 -> 4, 4.6 -> 5). The tolerance keeps
    float noise from moving a half: 0.35 * 10 is 3.4999999999999996 and counts as 3.5."""
    return max(0, math.ceil(x - 0.5 - 1e-9))


def _spread(sizes: Dict[str, int], depth: int) -> Dict[str, int]:
    """Share `depth` among containers in proportion to their size (largest remainder), each >= 1."""
    total = sum(sizes.values())
    exact = {p: depth * n / total for p, n in sizes.items()}
    depths = {p: max(1, min(sizes[p], int(e))) for p, e in exact.items()}
    order = sorted(sizes, key=lambda p: exact[p] - int(exact[p]), reverse=True)
    while sum(depths.values()) < depth:
        for p in order:
            if sum(depths.values()) < depth and depths[p] < sizes[p]:
                depths[p] += 1
    while sum(depths.values()) > depth:
        for p in reversed(order):
            if sum(depths.values()) > depth and depths[p] > 1:
                depths[p] -= 1
    return depths


def check_groups(container: str, num_blocks: int, groups: Sequence[Sequence[int]]) -> List[Tuple[int, ...]]:
    """Validate explicit groups: consecutive, in order, each block in exactly one group."""
    if not groups:
        raise PlanError(f"groups for {container} is empty; give at least one group of block indices.")
    checked, expected = [], 0
    for i, group in enumerate(groups):
        group = tuple(group)
        if not group:
            raise PlanError(f"group {i} for {container} is empty; every group needs at least one block.")
        for b in group:
            _check_int(b, f"block index in group {i}")
        if group[0] != expected or group != tuple(range(group[0], group[0] + len(group))):
            if group[0] < expected:
                problem = f"overlaps an earlier group or is out of order (block {group[0]} was already used)"
            elif group[0] > expected:
                problem = f"skips block {expected}"
            else:
                problem = "is not a run of consecutive blocks"
            raise PlanError(
                f"group {i} {list(group)} for {container} {problem}. Groups must cut blocks "
                f"0..{num_blocks - 1} into consecutive runs, in order, e.g. [[0, 1], [2, 3]]."
            )
        expected = group[-1] + 1
        checked.append(group)
    if expected != num_blocks:
        raise PlanError(
            f"groups for {container} cover blocks 0..{expected - 1} but the container has {num_blocks} blocks; "
            f"blocks {expected}..{num_blocks - 1} are in no group."
        )
    return checked
