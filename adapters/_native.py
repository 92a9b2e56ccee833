"""Native export: build the family's model at the new depth, then load the export strictly.

An adapter gives a *recipe*: a function depths -> a freshly constructed model of
the family (``type(model)(config)``, ``timm.create_model(name, depth=n, ...)``,
``ResNet(block, layers)``), recovered from the predecessor. Everything that
depends on depth (drop-path schedules, layer indices, ``feature_info``,
per-layer config lists) then comes out as the constructor makes it, not as it was
at the old depth.

A recipe is trusted only when it provably rebuilds the predecessor: built at the
predecessor's depths, it must have the same module tree, the same constructor
settings (every plain attribute of every module: rates, flags, eps, head counts)
and the same state-dict shapes. Whatever differs is named in an `ExportError`;
we never export something other than what was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from theseus_general.errors import ExportError

from ._structure import structure_difference

# Flags that say how a model is *run*, not how it was built.
_RUNTIME_FLAGS = {"training", "grad_checkpointing", "gradient_checkpointing"}
NATIVE_FALSE = "Use export(native=False) to get the trained model with its successor modules as they are."

Build = Callable[..., nn.Module]  # build(depths, **overrides) -> a new model


def is_identity(module: Optional[nn.Module]) -> bool:
    """No module, or an nn.Identity: a constructor option that is off."""
    return module is None or isinstance(module, nn.Identity)


def _plain(value) -> bool:
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    return isinstance(value, (tuple, list)) and all(_plain(v) for v in value)


def settings(module: nn.Module) -> Tuple:
    """A module's class and plain attributes (rates, sizes, flags): what its constructor set."""
    attrs = tuple(sorted(
        (k, tuple(v) if isinstance(v, list) else v) for k, v in vars(module).items()
        if not k.startswith("_") and k not in _RUNTIME_FLAGS and _plain(v)
    ))
    return type(module), attrs


def _under(path: str, prefixes: Iterable[str]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class Blueprint:
    """What a constructor decided about a model: every module's class and plain settings,
    and every state-dict tensor's shape. Cheap to keep (no tensors)."""

    modules: Dict[str, Tuple]
    shapes: Dict[str, Tuple[int, ...]]

    @classmethod
    def of(cls, model: nn.Module) -> "Blueprint":
        return cls({p: settings(m) for p, m in model.named_modules()},
                   {k: tuple(v.shape) for k, v in model.state_dict().items()})


def state_difference(rebuilt: Blueprint, model: Blueprint, skip: Iterable[str] = ()) -> Optional[str]:
    """Why the model's state dict (outside `skip`) would not load strictly into the rebuild, or None."""
    skip = tuple(skip)
    ours = {k: v for k, v in rebuilt.shapes.items() if not _under(k, skip)}
    theirs = {k: v for k, v in model.shapes.items() if not _under(k, skip)}
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    if missing or extra:
        return f"the state dicts differ in keys (only in the rebuild: {missing[:3]}, only in the model: {extra[:3]})"
    shape = next((k for k in ours if ours[k] != theirs[k]), None)
    if shape is not None:
        return f"{shape!r} has shape {theirs[shape]} in the model but {ours[shape]} in the rebuild"
    return None


def settings_difference(rebuilt: Blueprint, model: Blueprint, skip: Iterable[str] = ()) -> Optional[str]:
    """The first module (outside `skip`) whose class or settings differ, described; None when all agree."""
    skip = tuple(skip)
    ours = {p: v for p, v in rebuilt.modules.items() if not _under(p, skip)}
    theirs = {p: v for p, v in model.modules.items() if not _under(p, skip)}
    if set(ours) != set(theirs):
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        return f"the module trees differ (only in the rebuild: {missing[:3]}, only in the model: {extra[:3]})"
    for path in ours:
        (rtype, rattrs), (otype, oattrs) = ours[path], theirs[path]
        if rtype is not otype:
            return f"{path or 'the model'!r} is a {otype.__name__} in the model but a {rtype.__name__} in the rebuild"
        if rattrs != oattrs:
            r, o = dict(rattrs), dict(oattrs)
            key = next(k for k in sorted(set(r) | set(o)) if r.get(k, "<unset>") != o.get(k, "<unset>"))
            return (f"{'.'.join(filter(None, (path, key)))!r} is {o.get(key, '<unset>')!r} in the model but "
                    f"{r.get(key, '<unset>')!r} in the rebuild")
    return None


def difference(rebuilt: Blueprint, model: Blueprint, skip: Iterable[str] = ()) -> Optional[str]:
    return state_difference(rebuilt, model, skip) or settings_difference(rebuilt, model, skip)


def _inside(blueprint: Blueprint, name: str) -> Tuple[Dict, Dict]:
    return ({k: v for k, v in blueprint.modules.items() if _under(k, (name,))},
            {k: v for k, v in blueprint.shapes.items() if _under(k, (name,))})


def _own_children(rebuilt: nn.Module, model: Blueprint, containers: Iterable[str]) -> Tuple[str, ...]:
    """Top-level children the user replaced after construction (a small-image stem, a new
    head): those that differ from the rebuild and hold no container. Export keeps the model's own."""
    ours = Blueprint.of(rebuilt)
    return tuple(
        name for name, _ in rebuilt.named_children()
        if not any(_under(c, (name,)) for c in containers) and _inside(ours, name) != _inside(model, name)
    )


# (description, build) pairs; build(depths) -> a new model. Kept with the predecessor's
# blueprint and verified on first use, so planning stays cheap.
Candidate = Tuple[str, Build]


class Recipe:
    """How to build a model of the family at given container depths, or why it cannot be done.

    The candidates are constructor calls whose arguments were read off the
    predecessor. The first one that rebuilds the predecessor exactly (built at its
    own depths, compared with its blueprint) is the recipe; it is found on first use.
    """

    def __init__(self, candidates: Iterable[Candidate], predecessor: Optional[Blueprint] = None,
                 depths: Optional[Dict[str, int]] = None, error: Optional[str] = None):
        self._candidates, self._predecessor, self._depths = list(candidates), predecessor, depths
        self._resolved: Optional[Tuple[Optional[Candidate], Tuple[str, ...], Optional[str]]] = (
            None if error is None else (None, (), error))

    @classmethod
    def trusted(cls, description: str, build: Build) -> "Recipe":
        """A constructor call that rebuilds the model by construction (e.g. type(model)(config))."""
        recipe = cls([])
        recipe._resolved = ((description, build), (), None)
        return recipe

    def resolve(self) -> Tuple[Optional[Candidate], Tuple[str, ...], Optional[str]]:
        """(candidate, own children to keep from the model, error): the candidate that rebuilds
        the predecessor with the fewest kept children, or None and the first candidate's difference."""
        if self._resolved is None:
            best, first_error = None, None
            for description, build in self._candidates:
                try:
                    rebuilt = build(self._depths)
                    own = _own_children(rebuilt, self._predecessor, self._depths)
                    reason = difference(Blueprint.of(rebuilt), self._predecessor, skip=own)
                except Exception as error:  # the constructor refused these arguments
                    reason, own = f"it raised {type(error).__name__}: {error}", ()
                if reason is None and (best is None or len(own) < len(best[1])):
                    best = ((description, build), own)
                    if not own:
                        break
                if reason is not None:
                    first_error = first_error or f"{description} does not rebuild the model: {reason}"
            self._resolved = (*best, None) if best else (None, (), first_error or "no constructor call was found")
        return self._resolved


def read_recipe(model: nn.Module, depths: Dict[str, int], candidates: Callable[[], Iterable[Candidate]]) -> Recipe:
    """A Recipe from constructor calls whose arguments `candidates()` reads off `model` now
    (while its blocks are the predecessor's). Arguments that cannot be read become the error."""
    try:
        found = list(candidates())
    except (AttributeError, TypeError, IndexError, ExportError) as error:
        return Recipe([], error=f"its constructor arguments could not be read back ({type(error).__name__}: {error})")
    return Recipe(found, Blueprint.of(model), dict(depths))


def _match_tensors(native: nn.Module, exported: nn.Module) -> None:
    """Give every tensor of `native` the dtype and device of its namesake in `exported`
    (in place, so tied weights stay tied)."""
    reference = dict(exported.named_parameters(remove_duplicate=False))
    reference.update(exported.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name, tensor in [*native.named_parameters(remove_duplicate=False), *native.named_buffers(remove_duplicate=False)]:
            like = reference.get(name)
            if like is not None and (tensor.dtype, tensor.device) != (like.dtype, like.device):
                tensor.data = tensor.data.to(device=like.device, dtype=like.dtype)


def export_native(exported: nn.Module, depths: Dict[str, int], recipe: Optional[Recipe], family: str,
                  native: Optional[bool], copy_route: Callable[[nn.Module], nn.Module],
                  overrides: Optional[Dict[str, object]] = None) -> nn.Module:
    """Build the family's model at `depths` and load `exported`'s state into it strictly.

    `overrides`: constructor arguments that differ from the predecessor's besides the depth
    (width successors: ``mlp_ratio=``, ``mlp_dim=``, ``width_per_group=``); the rebuild is then
    checked against the export block by block as usual.

    native=False: the copy route. native=None (a direct call that does not say): native
    when the exported blocks fit the rebuild, else the copy route.
    """
    if native is False:
        return copy_route(exported)
    if recipe is None:
        raise ExportError(f"The {family} adapter has not seen the predecessor (containers() was not called), so it "
                          f"cannot rebuild it natively. {NATIVE_FALSE}")
    found, own, error = recipe.resolve()
    if found is None:
        raise ExportError(f"Cannot rebuild this {type(exported).__name__} natively: {error}. {NATIVE_FALSE}")
    description, build = found
    if overrides:
        description += " with " + ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    try:
        rebuilt = build(depths, **(overrides or {}))
    except Exception as error:  # the constructor refuses the new width
        if native is None:
            return copy_route(exported)
        raise ExportError(f"{description} fails ({type(error).__name__}: {error}). {NATIVE_FALSE}") from error
    for name in own:  # replaced by the user after construction: the model's own (trained) module stays
        setattr(rebuilt, name, getattr(exported, name))
    reason = difference(Blueprint.of(rebuilt), Blueprint.of(exported), skip=depths)
    for path in depths if reason is None else ():
        for i, (fresh, trained) in enumerate(zip(rebuilt.get_submodule(path), exported.get_submodule(path))):
            why = structure_difference(fresh, trained)
            if why:
                reason = f"block {i} of {path!r}: {why}"
                break
        if reason:
            break
    if reason is not None:
        if native is None:
            return copy_route(exported)
        raise ExportError(f"The successor model does not fit {description} at depths {depths}: {reason}. "
                          f"{NATIVE_FALSE}")
    _match_tensors(rebuilt, exported)
    rebuilt.load_state_dict(exported.state_dict(), strict=True)  # keys and shapes were checked above
    for p in rebuilt.parameters():
        p.requires_grad_(True)
    _keep_checkpointing(rebuilt, exported)
    return rebuilt.eval()


def _keep_checkpointing(rebuilt: nn.Module, exported: nn.Module) -> None:
    """Activation checkpointing is a run-time switch, not a constructor setting: carry it over."""
    if getattr(exported, "grad_checkpointing", False) and hasattr(rebuilt, "set_grad_checkpointing"):
        rebuilt.set_grad_checkpointing(True)  # timm
    hf_flag = "is_activation_checkpointing" if hasattr(type(exported), "is_activation_checkpointing") else "is_gradient_checkpointing"
    if getattr(exported, hf_flag, False) and hasattr(rebuilt, "gradient_checkpointing_enable"):
        rebuilt.gradient_checkpointing_enable()  # transformers
