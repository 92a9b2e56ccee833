"""Planning: model + target -> plan and successors. Pure: reads the model, changes nothing.

`Theseus` calls these before it touches anything, so that bad input fails with a
`PlanError` / `AdapterError` while the caller's model is still as it was.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional

from torch import nn

from .adapter import Adapter
from .budget import groups_around, importance_note, kept_by_importance, plan_budget, resolve_widths
from .errors import AdapterError, CheckpointError, PlanError, warn_user
from .graph import CONTAINER_TYPES, count_parameters, get_submodule
from .plan import Group, Plan, check_groups, resolve_depths, split_evenly
from .validation import check_successors

INIT_CHOICES = ("first", "group_first", "group_last")


def container_at(model: nn.Module, path: str) -> nn.Module:
    module = get_submodule(model, path)
    if not isinstance(module, CONTAINER_TYPES):
        raise AdapterError(
            f"{path!r} is a {type(module).__qualname__}, not a container of blocks (nn.ModuleList or nn.Sequential)."
        )
    if len(module) < 2:
        raise AdapterError(f"{path!r} holds {len(module)} block(s); Theseus needs at least 2 blocks to group.")
    return module


def resolve_groups(sizes: Dict[str, int], depth, ratio, groups, width_only: bool = False) -> Dict[str, list]:
    if width_only and depth is None and ratio is None and groups is None:
        return {p: [(i,) for i in range(n)] for p, n in sizes.items()}  # same depth, narrower blocks
    if groups is not None:
        if depth is not None or ratio is not None:
            raise PlanError("Give either groups= or a depth/ratio target, not both.")
        if isinstance(groups, dict):
            unknown = set(groups) - set(sizes)
            if unknown or set(groups) != set(sizes):
                raise PlanError(f"groups= must name every container exactly: expected {sorted(sizes)}, got {sorted(groups)}.")
            result = {p: check_groups(p, sizes[p], groups[p]) for p in sizes}
        else:
            if len(sizes) != 1:
                raise PlanError(f"The model has {len(sizes)} containers {list(sizes)}; give groups as a dict path -> groups.")
            (path,) = sizes
            result = {path: check_groups(path, sizes[path], groups)}
        if sum(len(g) for g in result.values()) >= sum(sizes.values()) and not width_only:
            raise PlanError("groups= has one group per block, so nothing would be compressed; merge some blocks.")
        return result
    depths = resolve_depths(sizes, depth, ratio)
    return {p: split_evenly(sizes[p], depths[p]) for p in sizes}


def build_successors(containers: Dict[str, nn.Module], group_blocks: Dict[str, list], init, successors,
                     sources: Optional[Dict[str, List[int]]] = None) -> list:
    """One (module, description) per group, in plan order. Copies share nothing with the predecessor.
    `sources` (a budget plan's kept blocks): container -> the block each group's successor copies."""
    total = sum(len(g) for g in group_blocks.values())
    if successors is not None:
        successors = list(successors)
        if len(successors) != total:
            raise PlanError(f"successors= has {len(successors)} modules but the plan has {total} groups; give one per group.")
        for i, s in enumerate(successors):
            if not isinstance(s, nn.Module):
                raise PlanError(f"successors[{i}] is a {type(s).__qualname__}, not a torch.nn.Module.")
        return [(s, f"custom {type(s).__name__}") for s in successors]
    if not callable(init) and init not in INIT_CHOICES:
        raise PlanError(f"init must be one of {INIT_CHOICES} or a callable (group, blocks) -> module, got {init!r}.")
    built, index = [], 0
    for path, container in containers.items():
        for position, blocks in enumerate(group_blocks[path]):
            if callable(init):
                group = Group(index, path, tuple(blocks))
                module = init(group, [container[i] for i in blocks])
                if not isinstance(module, nn.Module):
                    raise PlanError(f"init returned a {type(module).__qualname__} for group {index}, not a torch.nn.Module.")
                built.append((module, f"init() {type(module).__name__}"))
            else:
                source = sources[path][position] if sources is not None else \
                    {"first": position, "group_first": blocks[0], "group_last": blocks[-1]}[init]
                built.append((copy.deepcopy(container[source]), f"copy of block {source}"))
            index += 1
    return built


def narrow_successors(adapter: Adapter, group_blocks: Dict[str, list], built: list, widths: Dict[str, float]) -> list:
    """Width successors: each built copy narrowed to its container's width fraction (see
    `theseus_general.width`); a width of 1 keeps the copy."""
    from .width import kept_count

    out, index = [], 0
    for path, blocks in group_blocks.items():
        for _ in blocks:
            module, description = built[index]
            fraction = widths.get(path, 1.0)
            if fraction < 1.0:
                hidden = adapter.width_of(module)
                if hidden is None:
                    adapter.narrow(module, 1)  # raises PlanError naming the adapter and the block
                    raise PlanError(f"The {adapter.name} adapter cannot narrow a {type(module).__name__}.")
                keep = kept_count(hidden, fraction)
                module, description = adapter.narrow(module, keep), f"{description}, width {keep}/{hidden}"
            out.append((module, description))
            index += 1
    return out


def export_refusal(adapter: Adapter, containers: dict, plan: Plan, successors: List[nn.Module]):
    """The first group whose successor the adapter could not export natively, with the adapter's
    reason, as (group, reason); None when every successor can be."""
    for group, successor in zip(plan.groups, successors):
        reason = adapter.check_successor([containers[group.container][i] for i in group.blocks], successor)
        if reason:
            return group, reason
    return None


def check_built_export(adapter: Adapter, containers: dict, plan: Plan, built: list) -> None:
    """Budget and width successors must export natively as planned: say so now if they cannot."""
    refusal = export_refusal(adapter, containers, plan, [module for module, _ in built])
    if refusal:
        group, reason = refusal
        description = built[group.index][1]
        raise PlanError(
            f"The successor of group {group.index} ({group.container} blocks {list(group.blocks)}) is a "
            f"{description}, which the {adapter.name} adapter cannot export natively: {reason}."
        )


def check_copies_export(adapter: Adapter, containers: dict, plan: Plan, built: list, init: str) -> None:
    """A built-in init copies predecessor blocks. When the adapter would refuse such a
    copy at native export (a family that needs a particular block at a particular
    place, like a ResNet stage's downsampling head), the init is wrong for this
    model: say so now rather than after training."""
    refusal = export_refusal(adapter, containers, plan, [module for module, _ in built])
    if refusal:
        group, reason = refusal
        description = built[group.index][1]
        others = ", ".join(repr(c) for c in INIT_CHOICES if c != init)
        raise PlanError(
            f"init={init!r} makes the successor of group {group.index} ({group.container} blocks "
            f"{list(group.blocks)}) a {description}, which the {adapter.name} adapter cannot export natively: "
            f"{reason}. Use another init ({others}) or pass successors=."
        )


def make_plan(adapter: Adapter, model: nn.Module, containers: dict, group_blocks: dict, built: list) -> Plan:
    groups, index = [], 0
    for path, container in containers.items():
        for blocks in group_blocks[path]:
            module, description = built[index]
            groups.append(Group(
                index, path, tuple(blocks), description,
                sum(count_parameters(container[i]) for i in blocks), count_parameters(module),
            ))
            index += 1
    replaced = {id(p) for c in containers.values() for p in c.parameters()}
    frozen = sum(p.numel() for p in model.parameters() if id(p) not in replaced)
    return Plan(adapter.name, {p: len(c) for p, c in containers.items()}, groups, frozen)


def check_plan_matches(ours: dict, saved: dict, chosen_on_sample: bool = False) -> None:
    """Raise CheckpointError naming the first differences between two plan dicts. `chosen_on_sample`: the
    engine's groups were chosen on its sample= (groups="importance" or a budget target)."""
    if ours == saved:
        return
    diffs = []
    for key in ("adapter", "containers", "frozen_params"):
        if ours.get(key) != saved.get(key):
            diffs.append(f"{key}: checkpoint {saved.get(key)!r}, this model {ours.get(key)!r}")
    a, b = saved.get("groups", []), ours.get("groups", [])
    if len(a) != len(b):
        diffs.append(f"number of groups: checkpoint {len(a)}, this model {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        for field in ("container", "blocks", "successor", "predecessor_params", "successor_params"):
            if x.get(field) != y.get(field):
                diffs.append(f"group {i} {field}: checkpoint {x.get(field)!r}, this model {y.get(field)!r}")
    raise CheckpointError(
        "The checkpoint was saved from a different plan or model:\n  " + "\n  ".join(diffs[:10])
        + "\nCreate the engine with the same model, depth/groups and init as the saved run."
        + (" Its groups were chosen on sample= (groups=\"importance\" or a budget target): give the run's own "
           "sample= again; another batch can rank the blocks differently." if chosen_on_sample else "")
    )


@dataclass
class PlannedRun:
    """What `plan_run` decided: the containers (path -> module), the plan, and one successor per
    group in plan order (built, not yet attached to anything)."""

    containers: Dict[str, nn.Module]
    plan: Plan
    successors: List[nn.Module]
    starts_fixed: bool = False  # the successors start as the blocks chosen for them: fit must not restart them


def plan_run(model: nn.Module, adapter: Adapter, *, successor_depth, ratio, groups, init, successors, sample,
             validate: bool, target_flops, target_speedup, measure: str, successor_width) -> PlannedRun:
    """Everything `Theseus()` decides before it changes anything: the containers, the groups (from
    a depth, ratio, explicit groups or a budget target), the successors (copies, narrowed copies or
    the caller's) and the plan; checks that native export will be possible and, on a sample, that
    every successor fits its group. Reads the model only: bad input fails here."""
    paths = adapter.containers(model, sample)
    containers = {p: container_at(model, p) for p in paths}
    sizes = {p: len(c) for p, c in containers.items()}
    budgeted = target_flops is not None or target_speedup is not None
    widths = resolve_widths(successor_width, paths, allow_auto=budgeted)
    if widths is not None and (successors is not None or callable(init)):
        raise PlanError("successor_width= narrows copies of predecessor blocks; it cannot be combined with "
                        "successors= or a callable init (narrow those modules yourself).")
    budget, by_importance = None, isinstance(groups, str)
    if not budgeted and measure != "flops":
        raise PlanError("measure= says how a budget target is predicted; give target_speedup= with it.")
    if by_importance:
        check_importance_arguments(adapter, groups, successor_depth, ratio, budgeted, successors, init, sample)
    if budgeted:
        check_budget_arguments(successor_depth, ratio, groups, successors, init)
        if sample is None:
            sample = adapter.sample_input(model)
        if sample is None:
            raise PlanError(
                f"A budget target (target_flops= / target_speedup=) is planned by measuring each block on an "
                f"input, and the {adapter.name} adapter cannot make one for this "
                f"{type(model).__name__}: pass sample= with a typical batch.")
        budget = plan_budget(adapter, model, containers, sample, target_flops, target_speedup, measure, widths)
        kept = {p: c.kept for p, c in budget.choices.items()}
        widths = budget.widths()
    elif by_importance:  # the depths given, the blocks a budget plan would keep at them
        depths = {p: len(g) for p, g in resolve_groups(sizes, successor_depth, ratio, None).items()}
        kept = kept_by_importance(model, containers, sample, depths)
    if budgeted or by_importance:  # groups around the kept blocks, each successor a copy of its kept block
        group_blocks = {p: groups_around(k, sizes[p]) for p, k in kept.items()}
        built = build_successors(containers, group_blocks, "first", None,
                                 sources=kept if adapter.budget_init == "kept" else None)
    else:
        narrower = widths is not None and any(w < 1.0 for w in widths.values())
        group_blocks = resolve_groups(sizes, successor_depth, ratio, groups, width_only=narrower)
        built = build_successors(containers, group_blocks, init, successors)
    if widths is not None:
        built = narrow_successors(adapter, group_blocks, built, widths)
    plan = make_plan(adapter, model, containers, group_blocks, built)
    discovery = getattr(adapter, "discovery", None)  # the generic adapter's choice, when it made one
    if discovery is not None:
        plan.notes.append(str(discovery).splitlines()[0])
    plan.budget = budget
    if by_importance:
        plan.notes.append(importance_note(kept))
    if budgeted or by_importance or widths is not None:
        check_built_export(adapter, containers, plan, built)
        problem = adapter.width_export_problem(model, widths or {})
        if problem:
            warn_user(f"These width successors cannot be exported natively: {problem}. Training works; "
                      "export(native=False) will give the model with its successor modules as they are.")
    elif successors is None and isinstance(init, str):
        check_copies_export(adapter, containers, plan, built, init)
    if sample is None and validate:
        sample = adapter.sample_input(model)
    if validate and sample is not None:
        check_successors(model, containers, plan, [s for s, _ in built], sample)

    return PlannedRun(containers, plan, [module for module, _ in built], starts_fixed=by_importance)


def check_importance_arguments(adapter: Adapter, groups: str, successor_depth, ratio, budgeted: bool, successors,
                               init, sample) -> None:
    if groups != "importance":
        raise PlanError(f"groups= takes groups of block indices or \"importance\", got {groups!r}.")
    if adapter.budget_init != "kept":
        raise PlanError(f"groups=\"importance\" starts each group's successor as its kept block, but the "
                        f"{adapter.name} adapter's blocks behave by position (e.g. Swin's shifted windows), so a block "
                        "cannot stand in for another position: give successor_depth= alone, or a budget target.")
    if not budgeted and (successor_depth is None) == (ratio is None):
        raise PlanError("groups=\"importance\" chooses which blocks to keep at the depth you give: add "
                        "successor_depth=N or ratio=R (one of them).")
    if budgeted:
        raise PlanError("groups=\"importance\" groups around the most important blocks at the depth you give; a "
                        "budget target (target_flops= / target_speedup=) already does that at the depth it "
                        "chooses: give one or the other.")
    if successors is not None or init != "first":
        raise PlanError("groups=\"importance\" starts each successor as a copy of its group's kept block; drop "
                        "successors= and init= (or give explicit groups= with them).")
    if sample is None:
        raise PlanError("groups=\"importance\" ranks the blocks by how much each changes its input on your data: "
                        "pass sample= with a typical batch (an adapter's made-up input would rank them on noise).")


def check_budget_arguments(successor_depth, ratio, groups, successors, init) -> None:
    given = [name for name, value in (("successor_depth", successor_depth), ("ratio", ratio), ("groups", groups),
                                      ("successors", successors)) if value is not None]
    if init != "first":
        given.append("init")
    if given:
        raise PlanError(
            f"A budget target (target_flops= / target_speedup=) chooses the depths, groups and successors itself; "
            f"it cannot be combined with {', '.join(given)}=. Give either the target or {' / '.join(given)}.")
