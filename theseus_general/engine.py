"""The Theseus engine: wrap a model in place, replace modules progressively, export.

    th = Theseus(model, successor_depth=3)          # adapter auto-detected
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-4)
    for batch in data:
        loss = th.model(**batch).loss               # the model's own forward and outputs
        loss.backward(); opt.step(); opt.zero_grad(); th.step()
    successor = th.export()                          # a native model of the same type, shallower

What wrapping does, and `unwrap()` undoes exactly:
  * every replaced container (e.g. ``bert.encoder.layer``) is swapped for a
    container of `TheseusGroup` modules, one per group, of the same type;
  * every parameter of the model is frozen (``requires_grad=False``); only the
    successors (new modules, copies or caller-supplied) train;
  * frozen modules with running statistics (batch norm) are kept in eval mode
    while they are frozen, so that training never writes the caller's buffers;
  * with ``unfreeze_rest=True`` the non-replaced parts (embeddings, head) are
    swapped for copies that start training when the rate reaches 1; the
    caller's own tensors are never written.
"""

from __future__ import annotations

import copy
import math
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .adapter import Adapter
from .errors import AdapterError, CheckpointError, EngineStateError, ExportError, NonFiniteLossError, PlanError, ScheduleError
from .graph import CONTAINER_TYPES, count_params, get_submodule, set_submodule
from .plan import Group, GroupsSpec, Plan, check_groups, resolve_depths, split_evenly
from .registry import detect_adapter, get_adapter
from .replacement import ReplacementState, TheseusGroup
from .schedulers import SchedulerLike, as_scheduler, callable_schedule
from .validation import check_successors

InitLike = Union[str, Callable[[Group, List[nn.Module]], nn.Module]]
INIT_CHOICES = ("first", "group_first", "group_last")


class Theseus:
    """Progressive module replacement on a model, in place and reversible.

    Args:
        model: the trained predecessor (any ``nn.Module`` an adapter accepts).
        successor_depth: number of successor blocks; an int, or one int per container.
        ratio: successor depth as a fraction of the predecessor's, instead of successor_depth.
        groups: explicit groups of block indices, instead of a depth or ratio.
        adapter: adapter name, an `Adapter` instance, or None to auto-detect.
        scheduler: a `Scheduler`, a constant rate, a callable ``step -> p``, or None
            for the paper's reference curriculum ``LinearScheduler(base=0.3, k=6e-4)``.
        init: how successors start: ``"first"`` (successor i is a copy of predecessor
            block i, as in the paper), ``"group_first"`` / ``"group_last"`` (a copy of
            the first / last block of its group), or a callable ``(group, blocks) -> module``.
        successors: modules to use as successors, one per group (overrides ``init``).
        unfreeze_rest: also train the non-replaced parts (embeddings, head) once the
            rate reaches 1, on copies of them.
        seed: seed of the replacement draws (identical on every process).
        sample: an input to check every successor against its group before any change;
            by default the adapter makes one when it can.
        validate: set False to skip that check.
        **adapter_options: passed to the adapter (e.g. ``container=`` for the generic one).
    """

    def __init__(
        self,
        model: nn.Module,
        successor_depth: Union[int, Sequence[int], None] = None,
        *,
        ratio: Optional[float] = None,
        groups: Optional[GroupsSpec] = None,
        adapter: Union[str, Adapter, None] = None,
        scheduler: SchedulerLike = None,
        init: InitLike = "first",
        successors: Optional[Sequence[nn.Module]] = None,
        unfreeze_rest: bool = False,
        seed: int = 0,
        sample: Any = None,
        validate: bool = True,
        **adapter_options: Any,
    ):
        # Everything below up to _wrap() only reads the model: bad input fails here,
        # before any parameter, flag or module of the caller's changes.
        if not isinstance(model, nn.Module):
            raise AdapterError(f"Theseus needs a torch.nn.Module, got {type(model).__qualname__}.")
        if any(isinstance(m, TheseusGroup) for m in model.modules()):
            raise EngineStateError(
                "This model is already wrapped by a Theseus engine. Use that engine, or call its unwrap() "
                "(or export()) first; wrapping twice would replace groups of groups."
            )
        self.scheduler = as_scheduler(scheduler)
        first_rate = self.scheduler(0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ScheduleError(f"seed must be an int, got {seed!r}.")
        self.adapter = _resolve_adapter(model, adapter, adapter_options)
        self._model = model
        self.unfreeze_rest = bool(unfreeze_rest)
        if self.unfreeze_rest and self.scheduler.full_replacement_step is None and not callable_schedule(self.scheduler):
            raise ScheduleError(
                f"unfreeze_rest=True trains the rest of the model once the rate reaches 1, but {self.scheduler!r} "
                "never reaches 1. Use ConstantScheduler(p, replace_all_at=STEP) or a LinearScheduler with k > 0."
            )

        paths = self.adapter.containers(model, sample)
        containers = {p: _container(model, p) for p in paths}
        sizes = {p: len(c) for p, c in containers.items()}
        group_blocks = _resolve_groups(sizes, successor_depth, ratio, groups)
        built = _build_successors(containers, group_blocks, init, successors)
        self.plan = _make_plan(self.adapter, model, containers, group_blocks, built)
        if successors is None and isinstance(init, str):
            _check_copies_export(self.adapter, containers, self.plan, built, init)
        if sample is None and validate:
            sample = self.adapter.sample_input(model)
        if validate and sample is not None:
            check_successors(model, containers, self.plan, [s for s, _ in built], sample)

        self._state = ReplacementState(seed)
        self._state.advance(0, first_rate)
        self._step = 0
        self._closed = False
        self._failed: Optional[str] = None
        self._wrap(containers, built)

    # ------------------------------------------------------------------ public API
    @property
    def model(self) -> nn.Module:
        """The caller's model, wrapped: same object, same forward signature and outputs."""
        return self._model

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def replacement_rate(self) -> float:
        """p at the current step."""
        return self._state.rate

    @property
    def phase(self) -> str:
        """"replacing" while p < 1, "successor" once only successors run."""
        return "successor" if self._state.rate >= 1.0 else "replacing"

    @property
    def groups(self) -> List[TheseusGroup]:
        return list(self._groups)

    def successors(self) -> List[nn.Module]:
        return [g.successor for g in self._groups]

    def trainable_parameters(self) -> List[nn.Parameter]:
        """Parameters to give the optimiser: the successors', plus the copies of the
        non-replaced parts when unfreeze_rest=True (they get gradients from the step
        at which the rate reaches 1; until then they have none and optimisers skip them)."""
        self._check_open("trainable_parameters()")
        params = [p for g in self._groups for p in g.successor.parameters()]
        seen = {id(p) for p in params}
        for p in self._rest_copies:
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def step(self, loss: Optional[torch.Tensor] = None) -> float:
        """Advance the schedule by one optimiser step; returns the new replacement rate.

        With `loss`, a NaN or infinite value stops the run: the engine is marked
        failed (step(), export() and checkpointing then refuse, so no bad state is
        saved) and NonFiniteLossError names the step. Passing it costs one
        device-to-host copy of the loss per step."""
        self._check_open("step()")
        if loss is not None:
            value = float(loss.detach().float().item()) if isinstance(loss, torch.Tensor) else float(loss)
            if math.isnan(value) or math.isinf(value):
                self._failed = f"the loss was {value} at step {self._step}"
                raise NonFiniteLossError(
                    f"The loss became {value} at step {self._step} (replacement rate {self.replacement_rate:.3f}); "
                    "the run is stopped and nothing more can be saved from it. Resume from the last good "
                    "checkpoint, e.g. with a lower learning rate."
                )
        self._step += 1
        rate = self.scheduler(self._step)
        self._state.advance(self._step, rate)
        if self.unfreeze_rest and rate >= 1.0 and not self._rest_trains:
            for p in self._rest_copies:
                p.requires_grad_(True)
            self._rest_trains = True
        return rate

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs from the engine: ``{"tensors": {name: tensor}, "meta": {...}}``.

        tensors: every successor's state (``successors.<group>.<key>``) and, with
        unfreeze_rest, the copies of the rest (``rest.<n>``, in wrapping order). The
        tensors are the live ones (no copy); `theseus_general.checkpoint` writes them.
        meta (JSON-safe): step, seed, rate at that step and the plan. The replacement
        draws are a pure function of (seed, step, group, call), so step and seed restore them."""
        self._check_open("state_dict()")
        tensors: Dict[str, torch.Tensor] = {}
        for g in self._groups:
            for key, value in g.successor.state_dict().items():
                tensors[f"successors.{g.index}.{key}"] = value
        for i, tensor in enumerate(self._rest_tensors()):
            tensors[f"rest.{i}"] = tensor
        meta = {"step": self._step, "seed": self._state.seed, "rate": self._state.rate,
                "unfreeze_rest": self.unfreeze_rest, "plan": self.plan.to_dict()}
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore `state_dict()` output. Everything is checked before anything changes:
        a different plan, schedule, or tensor names/shapes raise
        CheckpointError naming the difference, and the engine and model stay as they were."""
        self._check_open("load_state_dict()")
        rate = self.check_state_dict(state)
        live, tensors, step = self.state_dict()["tensors"], state["tensors"], int(state["meta"]["step"])
        with torch.no_grad():
            for name, value in live.items():
                value.copy_(tensors[name])
        self._state.seed = int(state["meta"]["seed"])
        self._step = step
        self._state.advance(step, rate)
        if self.unfreeze_rest:
            trains = rate >= 1.0
            for p in self._rest_copies:
                p.requires_grad_(trains)
            self._rest_trains = trains

    def check_state_dict(self, state: Dict[str, Any]) -> float:
        """The checks of load_state_dict() alone: raises CheckpointError, changes nothing.
        Returns the rate at the saved step."""
        self._check_open("check_state_dict()")
        tensors, meta = state["tensors"], state["meta"]
        _check_plan_matches(self.plan.to_dict(), meta["plan"])
        if bool(meta.get("unfreeze_rest")) != self.unfreeze_rest:
            raise CheckpointError(
                f"The checkpoint was saved with unfreeze_rest={meta.get('unfreeze_rest')}, this engine has "
                f"unfreeze_rest={self.unfreeze_rest}; create the engine with the same setting."
            )
        step = int(meta["step"])
        rate = self.scheduler(step)
        if not math.isclose(rate, float(meta["rate"]), rel_tol=0, abs_tol=1e-12):
            raise CheckpointError(
                f"At the checkpoint's step {step} this engine's schedule {self.scheduler!r} gives p={rate}, "
                f"but the checkpoint was at p={meta['rate']}; create the engine with the schedule of the saved run."
            )
        live = self.state_dict()["tensors"]
        missing, unexpected = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
        if missing or unexpected:
            raise CheckpointError(
                f"The checkpoint's tensors do not match this engine's: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}. Was it saved from the same model and successors?"
            )
        for name, value in live.items():
            saved = tensors[name]
            if saved.shape != value.shape or saved.dtype != value.dtype:
                raise CheckpointError(
                    f"Tensor {name!r}: the checkpoint has {tuple(saved.shape)} {saved.dtype}, this engine "
                    f"{tuple(value.shape)} {value.dtype}. Was it saved from the same model and successors?"
                )
        return rate

    def export(self, native: bool = True) -> nn.Module:
        """A standalone successor model of the model's own type (in eval mode).

        The successors replace the groups; the rest is copied (with its trained
        copies when unfreeze_rest=True). The wrapped model is left as it was.
        With native=True the adapter checks that the result is a proper model of
        its family (e.g. a BERT whose save_pretrained output loads with transformers).
        """
        self._check_open("export()")
        if native:
            for group, succ in zip(self.plan.groups, self.successors()):
                blocks = [self._originals[group.container][i] for i in group.blocks]
                reason = self.adapter.check_successor(blocks, succ)
                if reason:
                    raise ExportError(
                        f"Group {group.index} ({group.container} blocks {list(group.blocks)}): {reason}. "
                        "Use export(native=False) to get the model with the successor modules as they are."
                    )
        swapped = {}
        try:
            for path, wrapped in self._wrapped.items():
                succ = [g.successor for g in wrapped]
                swapped[path] = wrapped
                set_submodule(self._model, path, _same_container(self._originals[path], succ))
            exported = copy.deepcopy(self._model)
        finally:
            for path, wrapped in swapped.items():
                set_submodule(self._model, path, wrapped)
        hooks = [h.id for h in self._hooks]
        for module in exported.modules():
            for hid in hooks:
                module._forward_pre_hooks.pop(hid, None)
        for p in exported.parameters():
            p.requires_grad_(True)
        exported.eval()
        return self.adapter.finalize_export(exported, self.plan.successor_depth)

    def validate(self, sample: Any) -> None:
        """Check every successor against its group on `sample` (shape, dtype, device and
        output structure); raises SuccessorMismatchError naming the group. Changes nothing."""
        self._check_open("validate()")
        previous = self._state.force
        self._state.force = "predecessor"  # run the predecessor blocks so that hooks see each group's input
        try:
            check_successors(self._model, self._originals, self.plan, self.successors(), sample)
        finally:
            self._state.force = previous

    def unwrap(self) -> nn.Module:
        """Restore the model exactly as it was before wrapping and close the engine."""
        if self._closed:
            return self._model
        for path, original in self._originals.items():
            set_submodule(self._model, path, original)
        for module, name, original in reversed(self._swapped_tensors):
            (module._parameters if isinstance(original, nn.Parameter) else module._buffers)[name] = original
        for handle in self._hooks:
            handle.remove()
        for p, flag in self._requires_grad.items():
            p.requires_grad_(flag)
        for m, flag in self._training.items():
            m.training = flag
        self._closed = True
        return self._model

    close = unwrap

    def __enter__(self) -> "Theseus":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unwrap()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._step}, p={self.replacement_rate:.3f}, phase {self.phase}"
        return f"Theseus({type(self._model).__name__}, adapter={self.adapter.name!r}, {state})"

    # ------------------------------------------------------------------ internals
    def _check_open(self, what: str) -> None:
        if self._failed and not self._closed:
            raise EngineStateError(
                f"Cannot call {what}: this Theseus run failed ({self._failed}). unwrap() restores the model; "
                "start a new run, e.g. from the last good checkpoint."
            )
        if self._closed:
            raise EngineStateError(
                f"Cannot call {what} on a closed Theseus engine (unwrap() was called). "
                "Create a new Theseus(model, ...) to compress again."
            )

    def _wrap(self, containers: Dict[str, nn.Module], built: list) -> None:
        model = self._model
        self._originals = dict(containers)
        self._requires_grad = {p: p.requires_grad for p in model.parameters()}
        self._training = {m: m.training for m in model.modules()}
        self._swapped_tensors: list = []
        self._hooks: list = []
        self._rest_copies: List[nn.Parameter] = []
        self._rest_trains = False
        self._wrapped: Dict[str, nn.Module] = {}
        self._groups: List[TheseusGroup] = []
        try:
            predecessor_modules = {id(m) for c in containers.values() for m in c.modules()}
            rest_modules = [m for m in model.modules() if id(m) not in predecessor_modules]
            for p in model.parameters():
                p.requires_grad_(False)
            if self.unfreeze_rest:
                self._copy_rest(rest_modules)
            for path, container in containers.items():
                groups = []
                for group in self.plan.groups_in(path):
                    successor = built[group.index][0]
                    blocks = [container[i] for i in group.blocks]
                    groups.append(TheseusGroup(group.index, blocks, successor, self._state, self.adapter.state_kwarg))
                wrapped = _same_container(container, groups)
                wrapped.train(container.training)
                set_submodule(model, path, wrapped)
                self._wrapped[path] = wrapped
                self._groups.extend(groups)
            for g in self._groups:
                for p in g.successor.parameters():
                    p.requires_grad_(True)
            for m in (m for c in containers.values() for m in c.modules()):
                self._keep_eval_while(m, lambda: True)
            for m in rest_modules:
                self._keep_eval_while(m, lambda: not self._rest_trains)
        except BaseException:
            self.unwrap()
            raise

    def _copy_rest(self, rest_modules: List[nn.Module]) -> None:
        """Swap the non-replaced parameters and buffers for copies the engine may train.
        Tied tensors stay tied (one copy per original)."""
        copies: Dict[int, torch.Tensor] = {}
        for module in rest_modules:
            for store in (module._parameters, module._buffers):
                for name, tensor in list(store.items()):
                    if tensor is None:
                        continue
                    if id(tensor) not in copies:
                        if isinstance(tensor, nn.Parameter):
                            copies[id(tensor)] = nn.Parameter(tensor.detach().clone(), requires_grad=False)
                            self._rest_copies.append(copies[id(tensor)])
                        else:
                            copies[id(tensor)] = tensor.clone()
                    self._swapped_tensors.append((module, name, tensor))
                    store[name] = copies[id(tensor)]

    def _rest_tensors(self) -> List[torch.Tensor]:
        """The copies made by _copy_rest (parameters and buffers), each once, in wrapping order."""
        seen, out = set(), []
        for module, name, _ in self._swapped_tensors:
            tensor = module._parameters.get(name) if name in module._parameters else module._buffers.get(name)
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                out.append(tensor)
        return out

    def _keep_eval_while(self, module: nn.Module, frozen: Callable[[], bool]) -> None:
        # Frozen batch norm must not update its running statistics (they are the
        # caller's buffers): force eval mode just before each of its forwards.
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            def hook(m: nn.Module, args: Any) -> None:
                if frozen():
                    m.training = False

            self._hooks.append(module.register_forward_pre_hook(hook))


def _check_plan_matches(ours: dict, saved: dict) -> None:
    """Raise CheckpointError naming the first differences between two plan dicts."""
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
    )


def _resolve_adapter(model: nn.Module, adapter: Union[str, Adapter, None], options: dict) -> Adapter:
    """The adapter for `model`. Keywords Theseus() did not recognise arrive here as `options`: a name
    neither Theseus() nor the adapter takes raises UnknownOptionError with the closest valid name."""
    from .registry import adapter_class, list_adapters
    from .suggest import check_names, keyword_names

    theseus_keywords = keyword_names(Theseus.__init__, exclude=("model",))

    def check(adapter_options: List[str], whose: str) -> None:
        takes = f"{whose} {', '.join(adapter_options) or 'no options'}"
        check_names(options, theseus_keywords + adapter_options, "keyword argument",
                    f"Theseus() takes {', '.join(theseus_keywords)}; {takes}.")

    if isinstance(adapter, Adapter):
        if options:
            check(type(adapter).option_names(), f"the {adapter.name or type(adapter).__name__} adapter takes")
            raise AdapterError(f"Adapter options {sorted(options)} were given with an adapter instance; pass them to its constructor.")
        adapter.check(model)
        return adapter
    if adapter is None:
        if options:
            by_adapter = {name: adapter_class(name).option_names() for name in list_adapters()}
            check(sorted({o for names in by_adapter.values() for o in names}), "adapter options:")
            if "container" in options:
                adapter = "generic"
            else:
                owners = sorted(n for n, names in by_adapter.items() if set(options) & set(names))
                raise AdapterError(
                    f"The options {sorted(options)} belong to the adapter(s) {owners}; pass adapter= with one of them."
                )
        else:
            detected = detect_adapter(model)
            detected.check(model)  # matching is cheap; check() is where an adapter refuses a variant
            return detected
    if not isinstance(adapter, str):
        raise AdapterError(f"adapter must be a registered name, an Adapter instance or None, got {adapter!r}.")
    check(adapter_class(adapter).option_names(), f"the {adapter} adapter takes")
    instance = get_adapter(adapter, **options)
    instance.check(model)
    return instance


def _container(model: nn.Module, path: str) -> nn.Module:
    module = get_submodule(model, path)
    if not isinstance(module, CONTAINER_TYPES):
        raise AdapterError(
            f"{path!r} is a {type(module).__qualname__}, not a container of blocks (nn.ModuleList or nn.Sequential)."
        )
    if len(module) < 2:
        raise AdapterError(f"{path!r} holds {len(module)} block(s); Theseus needs at least 2 blocks to group.")
    return module


def _same_container(like: nn.Module, modules: List[nn.Module]) -> nn.Module:
    """A container of the same type as `like` holding `modules`. A Sequential whose
    children are named ``<prefix><i>`` (torchvision's ``encoder_layer_0``, ...) keeps
    that naming, so state-dict keys match a natively built model of the new depth."""
    if not isinstance(like, nn.Sequential):
        return nn.ModuleList(modules)
    names = [name for name, _ in like.named_children()]
    match = re.fullmatch(r"(.*?)(\d+)", names[0]) if names else None
    prefix = match.group(1) if match else None
    if prefix and names == [f"{prefix}{i}" for i in range(len(names))]:
        return nn.Sequential(OrderedDict((f"{prefix}{i}", m) for i, m in enumerate(modules)))
    return nn.Sequential(*modules)


def _resolve_groups(sizes: Dict[str, int], depth, ratio, groups) -> Dict[str, list]:
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
        if sum(len(g) for g in result.values()) >= sum(sizes.values()):
            raise PlanError("groups= has one group per block, so nothing would be compressed; merge some blocks.")
        return result
    depths = resolve_depths(sizes, depth, ratio)
    return {p: split_evenly(sizes[p], depths[p]) for p in sizes}


def _build_successors(containers: Dict[str, nn.Module], group_blocks: Dict[str, list], init, successors) -> list:
    """One (module, description) per group, in plan order. Copies share nothing with the predecessor."""
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
                source = {"first": position, "group_first": blocks[0], "group_last": blocks[-1]}[init]
                built.append((copy.deepcopy(container[source]), f"copy of block {source}"))
            index += 1
    return built


def _check_copies_export(adapter: Adapter, containers: dict, plan: Plan, built: list, init: str) -> None:
    """A built-in init copies predecessor blocks. When the adapter would refuse such a
    copy at native export (a family that needs a particular block at a particular
    place, like a ResNet stage's downsampling head), the init is wrong for this
    model: say so now rather than after training."""
    for group, (successor, description) in zip(plan.groups, built):
        blocks = [containers[group.container][i] for i in group.blocks]
        reason = adapter.check_successor(blocks, successor)
        if reason:
            others = ", ".join(repr(c) for c in INIT_CHOICES if c != init)
            raise PlanError(
                f"init={init!r} makes the successor of group {group.index} ({group.container} blocks "
                f"{list(group.blocks)}) a {description}, which the {adapter.name} adapter cannot export natively: "
                f"{reason}. Use another init ({others}) or pass successors=."
            )


def _make_plan(adapter: Adapter, model: nn.Module, containers: dict, group_blocks: dict, built: list) -> Plan:
    groups, index = [], 0
    for path, container in containers.items():
        for blocks in group_blocks[path]:
            module, description = built[index]
            groups.append(Group(
                index, path, tuple(blocks), description,
                sum(count_params(container[i]) for i in blocks), count_params(module),
            ))
            index += 1
    replaced = {id(p) for c in containers.values() for p in c.parameters()}
    frozen = sum(p.numel() for p in model.parameters() if id(p) not in replaced)
    return Plan(adapter.name, {p: len(c) for p, c in containers.items()}, groups, frozen)
