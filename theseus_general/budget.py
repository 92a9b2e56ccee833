"""Budget planning: choose depths (and widths) per container to meet a FLOPs or speed target.

    Theseus(model, target_flops=0.5, sample=x)        # at most half the predecessor's FLOPs
    Theseus(model, target_speedup=2.0, sample=x)      # 2x, predicted from FLOPs
    Theseus(model, target_speedup=2.0, sample=x, measure="latency")  # from timing each block
    Theseus(model, target_flops=0.5, sample=x, successor_width="auto")  # depth and width

Pure: reads the model, changes nothing. One pass of the model on the sample (eval mode, no
gradients) records what each block receives; then

* **cost** of each block: its FLOPs on that input (`torch.utils.flop_counter`), or with
  ``measure="latency"`` its median time on the model's device, timed in place (hooks around
  each block while the whole model runs; a narrowed block is timed alone and scaled by how
  its original's time alone compares with in place). The *rest* (embeddings,
  stem, head, ...) costs the whole model's FLOPs (time) minus the blocks', and counts in
  every prediction: a target below what the rest alone costs is impossible.
* **importance** of each block: ``1 - cos(input, output)`` on the sample, averaged over
  tokens (over positions for a feature map): how much the block changes its input, as
  ShortGPT's Block Influence. A block that changes the shape of its input (a ResNet stage's
  first, downsampling block) is always kept.

**Depth.** For a container of n blocks and a depth d, the kept blocks are the d most important
(always-kept blocks first), the others are dropped. Each dropped block joins the group of the
kept block before it (blocks before the first kept block join the first group), so groups are
consecutive, and each group's successor starts as a copy of its kept block, the most important
of its group (or, for an adapter whose blocks behave by position, ``Adapter.budget_init =
"first"``, successor k starts as block k). The predicted cost of the successor model is the rest plus the kept blocks'
costs; the *removed importance* is the sum of the dropped blocks' importances. The depths per
container are chosen to meet the target with the least removed importance, exactly: each
container's options (one per depth) are merged container by container, keeping only the
Pareto front of (cost, removed importance).

**Width.** ``successor_width=w`` narrows every successor to a fraction w of its hidden units
(`theseus_general.width`); a narrowed block's cost is measured on its captured input like the
others. With ``successor_width="auto"`` the planner tries each width in `AUTO_WIDTHS`, one width
for every successor (so that the export stays native), finds the best depths at each, and keeps
the option with the least *removed importance*, where narrowing a kept block to width w is
scored as removing the share of its importance that its cost shrinks by:
``importance * (1 - cost(w) / cost(1))``. This assumes a block's importance is spread over
its compute like its cost; it is a heuristic that the Pareto runs of issue 12 are to test.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PlanError
from .graph import first_tensor, flops_of, run_model

MEASURES = ("flops", "latency")
AUTO_WIDTHS = (1.0, 0.75, 0.5)
WidthSpec = Union[None, float, str, Dict[str, float]]


# ---------------------------------------------------------------- measuring
@dataclass
class BlockInput:
    args: tuple
    kwargs: dict


@dataclass
class Profile:
    """Costs and importances of every block of the containers, on one sample."""

    total: float  # the whole model's cost (FLOPs or seconds)
    costs: Dict[str, List[float]]  # container -> cost of each block
    importance: Dict[str, List[float]]
    always_kept: Dict[str, List[bool]]  # blocks that change their input's shape
    unit: str  # "FLOPs" or "s"
    inputs: Dict[str, List[BlockInput]] = field(default_factory=dict, repr=False)
    measure_block: Optional[Callable[[nn.Module, BlockInput], float]] = field(default=None, repr=False)

    @property
    def rest(self) -> float:
        return self.total - sum(sum(c) for c in self.costs.values())


def _prepared_sample(model: nn.Module, sample: Any) -> Any:
    # One pass without a KV cache: a cache would let a block's captured input grow when run again.
    if isinstance(sample, Mapping) and "use_cache" in inspect.signature(model.forward).parameters:
        return {**sample, "use_cache": False}
    return sample


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flops(fn: Callable[[], Any]) -> float:
    return float(flops_of(fn))


def _seconds(fn: Callable[[], Any], device: torch.device, warmup: int = 2, repeats: int = 7) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _timed_in_place(model: nn.Module, containers: Dict[str, nn.Module], sample: Any, device: torch.device,
                    warmup: int = 2, repeats: int = 7) -> Tuple[float, Dict[str, List[float]]]:
    """Median time of the whole model and of each block *inside* it (hooks around every block):
    a block timed alone runs with other caches and call overheads than inside the model, and its
    time does not add up with the rest's."""
    spans: Dict[Tuple[str, int], List[float]] = {(p, i): [] for p, c in containers.items() for i in range(len(c))}
    started: Dict[Tuple[str, int], float] = {}
    hooks = []

    def pre(key):
        def hook(module, args):
            _sync(device)
            started[key] = time.perf_counter()
        return hook

    def post(key):
        def hook(module, args, output):
            _sync(device)
            spans[key].append(time.perf_counter() - started[key])
        return hook

    for p, c in containers.items():
        for i, block in enumerate(c):
            hooks += [block.register_forward_pre_hook(pre((p, i))), block.register_forward_hook(post((p, i)))]
    try:
        with torch.inference_mode():
            total = _seconds(lambda: run_model(model, sample), device, warmup, repeats)
    finally:
        for h in hooks:
            h.remove()
    costs = {p: [statistics.median(spans[(p, i)][-repeats:]) for i in range(len(c))] for p, c in containers.items()}
    return total, costs


def _change(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - cosine similarity of a block's input and output, averaged over tokens / positions."""
    dim = 1 if x.dim() == 4 else -1  # (B, C, H, W): the channel vector at each position
    cos = F.cosine_similarity(x.detach().float(), y.detach().float(), dim=dim, eps=1e-8)
    return max(0.0, 1.0 - float(cos.mean()))


def profile_blocks(model: nn.Module, containers: Dict[str, nn.Module], sample: Any, measure: str = "flops") -> Profile:
    """Run `model` once on `sample` and measure every block of `containers` (see the module docstring)."""
    if measure not in MEASURES:
        raise PlanError(f"measure must be one of {MEASURES}, got {measure!r}.")
    sample = _prepared_sample(model, sample)
    inputs: Dict[str, List[Optional[BlockInput]]] = {p: [None] * len(c) for p, c in containers.items()}
    changes: Dict[str, List[Optional[float]]] = {p: [None] * len(c) for p, c in containers.items()}
    hooks = []

    def pre(path: str, i: int):
        def hook(module, args, kwargs):
            if inputs[path][i] is None:
                inputs[path][i] = BlockInput(args, dict(kwargs))
        return hook

    def post(path: str, i: int):
        def hook(module, args, kwargs, output):
            if changes[path][i] is None:
                x = first_tensor(args) if args else first_tensor(kwargs)
                y = first_tensor(output)
                same = x is not None and y is not None and x.shape == y.shape and x.is_floating_point()
                changes[path][i] = _change(x, y) if same else math.inf
        return hook

    for path, container in containers.items():
        for i, block in enumerate(container):
            hooks.append(block.register_forward_pre_hook(pre(path, i), with_kwargs=True))
            hooks.append(block.register_forward_hook(post(path, i), with_kwargs=True))
    training = {m: m.training for m in model.modules()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    try:
        with torch.no_grad():
            total_flops = _flops(lambda: run_model(model, sample))
        for h in hooks:
            h.remove()
        hooks = []
        missing = [f"{p}[{i}]" for p, ins in inputs.items() for i, x in enumerate(ins) if x is None]
        if missing:
            raise PlanError(f"The sample did not run blocks {missing[:5]}; give a sample= that runs the whole model.")

        if measure == "flops":
            def measure_block(block: nn.Module, given: BlockInput) -> float:
                with torch.no_grad():
                    return _flops(lambda: block(*given.args, **given.kwargs))
            total = total_flops
            costs = {p: [measure_block(b, inputs[p][i]) for i, b in enumerate(c)] for p, c in containers.items()}
        else:
            def measure_block(block: nn.Module, given: BlockInput) -> float:
                was = block.training
                block.eval()
                try:
                    with torch.inference_mode():
                        return _seconds(lambda: block(*given.args, **given.kwargs), device)
                finally:
                    block.train(was)
            total, costs = _timed_in_place(model, containers, sample, device)
    finally:
        for h in hooks:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    importance, always = {}, {}
    for path, values in changes.items():
        finite = [v for v in values if math.isfinite(v)]
        top = max(finite, default=1.0)
        always[path] = [not math.isfinite(v) for v in values]
        importance[path] = [v if math.isfinite(v) else top for v in values]  # for width scoring only
    return Profile(total, costs, importance, always, "FLOPs" if measure == "flops" else "s",
                   inputs, measure_block)


# ---------------------------------------------------------------- choosing
@dataclass
class ContainerChoice:
    path: str
    depth: int
    width: float
    kept: Tuple[int, ...]
    cost: float
    removed: float


def groups_around(kept: Sequence[int], num_blocks: int) -> List[Tuple[int, ...]]:
    """Consecutive groups, one per kept block: each dropped block joins the group of the kept block
    before it; blocks before the first kept block join the first group."""
    n = num_blocks
    starts = [0] + list(kept[1:])
    ends = list(kept[1:]) + [n]
    return [tuple(range(s, e)) for s, e in zip(starts, ends)]


def most_important(importance: Sequence[float], always: Sequence[bool], depth: int) -> Tuple[int, ...]:
    """The `depth` blocks to keep, in block order: the always-kept ones, then the most important
    others (on a tie, the earlier block)."""
    n = len(importance)
    forced = [i for i in range(n) if always[i]]
    others = sorted((i for i in range(n) if not always[i]), key=lambda i: (-importance[i], i))
    return tuple(sorted(forced + others[:depth - len(forced)]))


def _container_options(path: str, costs: List[float], importance: List[float], always: List[bool],
                       width: float, narrowed: List[float]) -> List[ContainerChoice]:
    """One option per depth: keep the always-kept blocks, then the most important ones."""
    n = len(costs)
    options = []
    for depth in range(max(1, sum(always)), n + 1):
        kept = most_important(importance, always, depth)
        cost = sum(narrowed[i] for i in kept)
        removed = sum(importance[i] for i in range(n) if i not in kept)
        removed += sum(importance[i] * max(0.0, 1.0 - narrowed[i] / costs[i]) for i in kept if costs[i] > 0)
        options.append(ContainerChoice(path, depth, width, kept, cost, removed))
    return options


def _key(removed: float, cost: float) -> Tuple[float, float]:
    # Least removed importance first; on a tie (blocks that do not change their input, e.g. a
    # random ResNet's zero-initialised residual branches) the plan that keeps more compute.
    return round(removed, 12), -cost


def _pareto(options: List[Tuple[float, float, tuple]]) -> List[Tuple[float, float, tuple]]:
    """(cost, removed, choices) points not beaten on both (cost, then `_key`); cheapest first."""
    front, best = [], None
    for cost, removed, choices in sorted(options, key=lambda o: (o[0], -o[1])):
        if best is None or round(removed, 12) <= best:
            if front and front[-1][0] == cost:
                front.pop()
            front.append((cost, removed, choices))
            best = round(removed, 12)
    return front


def _best(per_container: List[List[ContainerChoice]], budget: float, sizes: Dict[str, int]):
    """(the cheapest combination, the least-removed combination within `budget` or None)."""
    front: List[Tuple[float, float, tuple]] = [(0.0, 0.0, ())]
    for options in per_container:
        front = _pareto([(c + o.cost, r + o.removed, ch + (o,)) for (c, r, ch) in front for o in options])
    cheapest = front[0]
    feasible = [f for f in front if f[0] <= budget * (1 + 1e-9)
                and any(o.depth < sizes[o.path] or o.width < 1.0 for o in f[2])]
    return cheapest, (min(feasible, key=lambda f: _key(f[1], f[0])) if feasible else None)


@dataclass
class BudgetPlan:
    """What the planner chose, and what it predicts."""

    target: str  # e.g. "target_flops=0.5"
    measure: str
    total: float  # predecessor cost (unit)
    predicted: float  # successor cost (unit)
    total_flops: float
    predicted_flops: float
    choices: Dict[str, ContainerChoice]
    sizes: Dict[str, int]
    alternatives: List[str] = field(default_factory=list)

    @property
    def predicted_speedup(self) -> float:
        return self.total / self.predicted if self.predicted else math.inf

    @property
    def predicted_flops_fraction(self) -> float:
        return self.predicted_flops / self.total_flops if self.total_flops else math.nan

    def widths(self) -> Dict[str, float]:
        return {p: c.width for p, c in self.choices.items()}

    def lines(self) -> List[str]:
        by = "FLOPs" if self.measure == "flops" else "latency per block on the sample"
        depth = ", ".join(f"{p}: {self.sizes[p]} -> {c.depth}" + (f" at width {c.width:g}" if c.width < 1 else "")
                          for p, c in self.choices.items())
        kept = "; ".join(f"{p} keeps {list(c.kept)}" for p, c in self.choices.items())
        out = [
            f"budget {self.target}: chosen depths {depth}",
            f"  predicted FLOPs {_short(self.predicted_flops)} of {_short(self.total_flops)} "
            f"({self.predicted_flops_fraction:.1%}); predicted speed-up {self.predicted_speedup:.2f}x (from {by})",
            f"  {kept} (least removed importance {sum(c.removed for c in self.choices.values()):.4g}, "
            "importance = 1 - cos(block input, block output) on the sample)",
        ]
        return out + [f"  {a}" for a in self.alternatives]


def _short(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def resolve_widths(spec: WidthSpec, paths: Sequence[str], allow_auto: bool) -> Union[str, Dict[str, float], None]:
    """successor_width= as None, "auto", or container -> fraction in (0, 1]."""
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec != "auto":
            raise PlanError(f"successor_width must be a fraction in (0, 1], a dict container -> fraction, or 'auto'; got {spec!r}.")
        if not allow_auto:
            raise PlanError("successor_width='auto' lets the planner choose widths, so it needs a budget: "
                            "give target_flops= or target_speedup= with it, or a fraction such as successor_width=0.5.")
        return "auto"
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(paths))
        if unknown:
            raise PlanError(f"successor_width names containers {unknown} that are not compressed; they are {list(paths)}.")
        widths = {p: spec.get(p, 1.0) for p in paths}
    else:
        widths = {p: spec for p in paths}
    for p, w in widths.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 < float(w) <= 1.0:
            raise PlanError(f"successor_width for {p} must be a fraction in (0, 1] of the hidden units kept, got {w!r}.")
    return {p: float(w) for p, w in widths.items()}


def _narrowed_costs(adapter, containers: Dict[str, nn.Module], per_path: Dict[str, float], flops: Profile,
                    timed: Profile) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """FLOPs and cost of every block narrowed to its container's width, each on the block's own input."""
    from .width import kept_count

    narrowed_flops, narrowed_cost = {}, {}
    for p, c in containers.items():
        if per_path[p] >= 1.0:
            narrowed_flops[p], narrowed_cost[p] = flops.costs[p], timed.costs[p]
            continue
        nf, nc = [], []
        for i, block in enumerate(c):
            hidden = adapter.width_of(block)
            if hidden is None:
                adapter.narrow(block, 1)  # raises PlanError naming the adapter and block
                raise PlanError(f"The {adapter.name} adapter cannot narrow a {type(block).__name__}.")
            small = adapter.narrow(block, kept_count(hidden, per_path[p]))
            nf.append(flops.measure_block(small, flops.inputs[p][i]))
            if timed is flops:
                nc.append(nf[-1])
            else:  # timed alone, scaled by how the original block's time alone compares with in place
                alone = timed.measure_block(block, timed.inputs[p][i])
                nc.append(timed.measure_block(small, timed.inputs[p][i]) * timed.costs[p][i] / alone)
        narrowed_flops[p], narrowed_cost[p] = nf, nc
    return narrowed_flops, narrowed_cost


def plan_budget(adapter, model: nn.Module, containers: Dict[str, nn.Module], sample: Any,
                target_flops: Optional[float], target_speedup: Optional[float], measure: str,
                widths: Union[str, Dict[str, float], None]) -> BudgetPlan:
    """Choose depths (and widths) per container meeting the target with the least removed importance."""
    target, fraction = _target(target_flops, target_speedup)
    if target_flops is not None and measure != "flops":
        raise PlanError("target_flops counts FLOPs; measure='latency' goes with target_speedup=.")
    flops = profile_blocks(model, containers, sample, "flops")
    timed = profile_blocks(model, containers, sample, "latency") if measure == "latency" else flops
    sizes = {p: len(c) for p, c in containers.items()}
    budget = timed.total * fraction

    candidates = [1.0, *[w for w in AUTO_WIDTHS if w < 1.0]] if widths == "auto" else [None]
    results, unavailable = [], []
    for w in candidates:
        per_path = {p: 1.0 for p in containers} if w is None and widths is None else (
            dict(widths) if w is None else {p: w for p in containers})
        try:
            narrowed_flops, narrowed_cost = _narrowed_costs(adapter, containers, per_path, flops, timed)
        except PlanError as error:
            if widths != "auto":
                raise
            unavailable.append(f"width {w:g}: not available ({error})")  # auto: depth and the other widths
            continue
        options = [_container_options(p, timed.costs[p], timed.importance[p], timed.always_kept[p], per_path[p],
                                      narrowed_cost[p]) for p in containers]
        cheapest, best = _best(options, budget - timed.rest, sizes)
        results.append((w, per_path, cheapest, best, narrowed_flops))

    feasible = [r for r in results if r[3] is not None]
    if not feasible:
        _impossible(target, timed, results, fraction, measure, target_flops is not None, widths is None)
    w, per_path, _, (cost, removed, choices), narrowed_flops = min(feasible, key=lambda r: _key(r[3][1], r[3][0]))
    chosen = {c.path: c for c in choices}
    predicted_flops = flops.rest + sum(narrowed_flops[p][i] for p, c in chosen.items() for i in c.kept)
    alternatives = []
    if widths == "auto":
        for rw, _, _, rbest, _ in results:
            if rbest is None:
                alternatives.append(f"width {rw:g}: cannot meet the target")
            else:
                ds = ", ".join(str(o.depth) for o in rbest[2])
                alternatives.append(f"width {rw:g}: depths [{ds}], removed importance {rbest[1]:.4g}"
                                    + ("  <- chosen" if rw == w else ""))
        alternatives += unavailable
    return BudgetPlan(target, measure, timed.total, timed.rest + cost, flops.total, predicted_flops, chosen, sizes,
                      alternatives)


def kept_by_importance(model: nn.Module, containers: Dict[str, nn.Module], sample: Any,
                       depths: Dict[str, int]) -> Dict[str, Tuple[int, ...]]:
    """``groups="importance"`` at given depths: per container, the blocks to keep (the most important
    on the sample, as a budget plan keeps them), for `groups_around`."""
    profile = profile_blocks(model, containers, sample, "flops")
    kept = {}
    for path, depth in depths.items():
        always = profile.always_kept[path]
        if sum(always) > depth:
            raise PlanError(
                f"{path} has {sum(always)} blocks that change their input's shape (always kept: "
                f"{[i for i, a in enumerate(always) if a]}), more than successor depth {depth}; give a depth of at "
                f"least {sum(always)} for it.")
        kept[path] = most_important(profile.importance[path], always, depth)
    return kept


def importance_note(kept: Dict[str, Tuple[int, ...]]) -> str:
    return ("groups by importance (1 - cos(block input, block output) on the sample), each successor a copy of its "
            "group's kept block: " + "; ".join(f"{p} keeps {list(k)}" for p, k in kept.items()))


def _target(target_flops, target_speedup) -> Tuple[str, float]:
    if target_flops is not None and target_speedup is not None:
        raise PlanError("Give one budget: target_flops= (a fraction of the predecessor's FLOPs) or target_speedup=, not both.")
    if target_flops is not None:
        if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not 0.0 < target_flops < 1.0:
            raise PlanError(f"target_flops must be a fraction strictly between 0 and 1 of the predecessor's FLOPs, got {target_flops!r}.")
        return f"target_flops={target_flops:g}", float(target_flops)
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)) or not target_speedup > 1.0:
        raise PlanError(f"target_speedup must be a number above 1 (e.g. 2.0 for twice as fast), got {target_speedup!r}.")
    return f"target_speedup={target_speedup:g}", 1.0 / float(target_speedup)


def _impossible(target: str, timed: Profile, results, fraction: float, measure: str, is_flops: bool, no_width: bool):
    cheapest = min((r[2] for r in results), key=lambda f: f[0])
    best_cost = timed.rest + cheapest[0]
    depths = ", ".join(f"{o.path}: {o.depth}" + (f" at width {o.width:g}" if o.width < 1 else "") for o in cheapest[2])
    unit = "FLOPs" if measure == "flops" else "s"
    closest = (f"target_flops={math.ceil(best_cost / timed.total * 1000) / 1000:g}" if is_flops
               else f"target_speedup={math.floor(timed.total / best_cost * 100) / 100:g}")
    raise PlanError(
        f"{target} cannot be met: it allows {_short(timed.total * fraction)} {unit} of the predecessor's "
        f"{_short(timed.total)}, but the parts that are not replaced alone cost {_short(timed.rest)} "
        f"({timed.rest / timed.total:.1%}) and the cheapest plan ({depths}; every container keeps at least one "
        f"block{' and its always-kept downsampling blocks' if any(any(v) for v in timed.always_kept.values()) else ''}) "
        f"costs {_short(best_cost)} ({best_cost / timed.total:.1%}, a {timed.total / best_cost:.2f}x speed-up). "
        f"The closest achievable target is {closest}"
        + ("; narrower successors (successor_width='auto') may go further." if no_width else ".")
    )
