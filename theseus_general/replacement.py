"""The module that stands in for one group during compression, and the draws.

`TheseusGroup` holds a group's predecessor blocks and its successor. In training,
each forward pass of the model runs, for each group, the successor (with
probability p) or the predecessor blocks in order. In eval mode only the
successor runs.

Decisions are fixed outside traced code. A decision is a pure function of
(seed, step, group, micro-batch): every DDP rank draws the same modules without
communicating, a resumed run repeats the draws of an uninterrupted one, and
under gradient accumulation each micro-batch draws anew. The micro-batch index
of a group is the number of its training forwards since the last ``th.step()``.

A recomputation during backward (activation checkpointing, reentrant or not) is
not a new forward: it gets the decision of the forward it recomputes, found by
the group's input, which the recomputation receives again (the same tensor, or
a detached view of the same memory). So any number of forwards may come before
one backward (R-Drop, two augmented views, summed micro-batches). When the input
cannot tell the forwards apart (two forwards of one step gave the group the same
tensor and drew differently), the recomputation raises instead of guessing.

The dispatch (`TheseusGroup.forward`) is excluded from ``torch.compile``
(``torch.compiler.disable(recursive=False)``): it runs eagerly and reads the
decision, while the blocks it calls are compiled as graphs of their own, so the
compiled graphs do not depend on, and do not grow with, the draw pattern.

Idle successors and DDP: a group that runs its predecessor leaves its successor
out of the graph. Under DDP without ``find_unused_parameters`` the reducer would
wait for those parameters, and with nothing else trainable (``train_rest=False``)
a step where every group ran its predecessor would have a loss without gradient.
Only in those two cases the group adds an exact zero, ``0 * sum(successor
params)``, to its output (the anchor); the engine's hook on the run's own
optimiser (``th.attach(optimizer)``) then sets those zero gradients back to None
so that AdamW's momentum and weight decay leave an idle successor unchanged. A
gradient that reached a successor some other way (an auxiliary loss) is kept.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

from .errors import TrainingError

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(*keys: int) -> float:
    """A deterministic uniform number in [0, 1) from integer keys."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (k & _MASK64))
    return (h >> 11) / float(1 << 53)


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch build without distributed support
    _DTensor = None

try:
    from torch.nn.parallel import DistributedDataParallel as _DDP
except ImportError:  # a torch build without distributed support
    _DDP = None


def _is_sharded(p: torch.Tensor) -> bool:
    return _DTensor is not None and isinstance(p, _DTensor)


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread: a forward
    run now is a recomputation (activation checkpointing), not a new micro-batch."""
    return torch._C._current_graph_task_id() != -1


def ddp_waits_for_every_parameter() -> bool:
    """True inside the forward of a DistributedDataParallel whose reducer expects a gradient for
    every parameter (find_unused_parameters=False)."""
    active = _DDP._get_active_ddp_module() if _DDP is not None else None
    return active is not None and not active.find_unused_parameters


def input_key(x: Any) -> Optional[tuple]:
    """What identifies a group's input between a forward and its recomputation: the memory it views
    (a reentrant checkpoint recomputes on a detached view of the same memory). None: not a tensor."""
    if not isinstance(x, torch.Tensor):
        return None
    try:
        return (x.device, x.dtype, x.data_ptr(), tuple(x.shape), tuple(x.stride()))
    except RuntimeError:  # a tensor without storage (e.g. some subclasses)
        return None


class _Forward:
    """One training forward of one group: its input's key, a weak reference to the input (a dead
    input cannot be recomputed, and its memory may be reused), and the decision."""

    __slots__ = ("key", "ref", "use_successor")

    def __init__(self, x: Any, use_successor: bool):
        self.key = input_key(x)
        self.ref = weakref.ref(x) if self.key is not None else None
        self.use_successor = use_successor

    def may_be(self, key: Optional[tuple]) -> bool:
        if key is None or self.key is None:
            return key is None and self.key is None
        return self.key == key and self.ref() is not None


class ReplacementState:
    """Shared by all groups of one engine: schedule position, rate and the decisions.

    Plain Python numbers, read and written only by the eager dispatch."""

    def __init__(self, seed: int = 0, anchor_always: bool = False):
        self.seed = int(seed)
        self.step = 0
        self.rate = 0.0
        # the zero anchor in every single-process run too: with nothing else trainable (train_rest=False)
        # a step where every group ran its predecessor would have a loss without gradient
        self.anchor_always = anchor_always
        self.force: Optional[str] = None  # "predecessor": bypass the draw (validation runs the blocks)
        # force == "match": module matching (matching.py); each group's successor sees the group's
        # input, its error against the predecessor blocks' output is collected here as (group, error)
        self.match_errors: List[Tuple[int, torch.Tensor]] = []
        # issue 23's options (theseus_general.recipes): "blend" mixes both paths by p instead of drawing;
        # mixed_matching (its loss weight; 0: off): each training forward while p < 1 also records (group,
        # error) of its successor against the group on the same detached input (`Theseus.auxiliary_loss`)
        self.mixing = "random"
        self.group_count = 0  # the engine's groups, in plan order ("prefix" mixing counts the draws of all of them)
        self.mixed_matching = 0.0
        # the recipe's rest_after_mixing (with train_rest): the rest's copies take no step while rate < 1
        self.rest_waits = False
        self.mixed_errors: List[Tuple[int, torch.Tensor]] = []
        self.forwards: Dict[int, List[_Forward]] = {}  # group -> its training forwards since the last step
        self.last: Dict[int, bool] = {}  # group -> decision of its latest training forward (kept across steps)
        self.anchored: Set[int] = set()  # groups whose successor got the zero anchor since the last step
        # group forwards in eval mode with gradients enabled since the last step: with no training forward
        # beside them, the step trained a model left in eval mode (Theseus.step() refuses)
        self.eval_grad_forwards = 0

    def decision(self, group: int, micro_batch: int) -> bool:
        """Whether `group` runs its successor in micro-batch `micro_batch` of the current step. "prefix"
        mixing: the successors replace the first k groups, k the number of the paper's draws (one per
        group) that picked a successor, so every successor reads a successor's output, as in the
        compressed model, and the predecessor's blocks above the cut read the last successor's."""
        if self.mixing == "prefix":
            picked = sum(uniform(self.seed, self.step, g, micro_batch) < self.rate for g in range(self.group_count))
            return group < picked
        return uniform(self.seed, self.step, group, micro_batch) < self.rate

    @torch.compiler.disable  # plain Python bookkeeping: never traced, never guarded on
    def draw(self, group: int, carried: Any) -> bool:
        """The decision for a training forward of `group` whose input is `carried`."""
        forwards = self.forwards.setdefault(group, [])
        if in_backward():
            return self._recomputed(group, forwards, input_key(carried))
        use_successor = self.decision(group, len(forwards))
        forwards.append(_Forward(carried, use_successor))
        self.last[group] = use_successor
        return use_successor

    def _recomputed(self, group: int, forwards: List[_Forward], key: Optional[tuple]) -> bool:
        decisions = {f.use_successor for f in forwards if f.may_be(key)}
        if len(decisions) == 1:
            return decisions.pop()
        if not decisions:
            raise TrainingError(
                f"A recomputation during backward (activation checkpointing) ran Theseus group {group} on an input "
                "that no forward of this step gave it, so the engine cannot tell which modules that forward ran. "
                "Checkpoint functions that receive the group's input as they got it in the forward, and call "
                "th.step() only after the backward."
            )
        raise TrainingError(
            f"Two forwards of this step gave Theseus group {group} the same input tensor and drew different "
            "modules, so a recomputation during backward (activation checkpointing) cannot tell which one it "
            "recomputes. Pass each forward its own tensor (e.g. x.clone() for the second view), or do not "
            "checkpoint this group."
        )

    def successor_ran(self) -> Set[int]:
        return {g for g, forwards in self.forwards.items() if any(f.use_successor for f in forwards)}

    def idle_groups(self) -> Set[int]:
        """Groups whose successor got only the zero anchor since the last step: it never ran."""
        return self.anchored - self.successor_ran()

    def decisions(self) -> Dict[int, List[bool]]:
        return {g: [f.use_successor for f in forwards] for g, forwards in sorted(self.forwards.items())}

    @torch.compiler.disable
    def note_eval_forward(self) -> None:
        if torch.is_grad_enabled() and not in_backward():
            self.eval_grad_forwards += 1

    @property
    def rest_idle(self) -> bool:
        """Whether the rest's copies sit this step out (`rest_waits` and p < 1)."""
        return self.rest_waits and self.rate < 1.0

    def advance(self, step: int, rate: float) -> None:
        self.step, self.rate = step, rate
        self.forwards.clear()  # `last` stays readable (what the step that just ended ran)
        self.mixed_errors.clear()  # a loss that did not take them (`Theseus.auxiliary_loss`) drops them here
        self.anchored.clear()
        self.eval_grad_forwards = 0


def _carried(out: Any) -> Any:
    """What a block hands the next one: its output, or the first element of a tuple/list output."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_carried(out: Any, carried: Any) -> Any:
    """`out` with its carried part (itself, or the first element of a tuple/list) replaced."""
    if isinstance(out, tuple):
        return (carried,) + tuple(out[1:])
    if isinstance(out, list):
        return [carried] + list(out[1:])
    return carried


class TheseusGroup(nn.Module):
    """A group of predecessor blocks and the successor that learns to replace them."""

    def __init__(self, index: int, predecessor: list, successor: nn.Module, state: ReplacementState,
                 state_kwarg: str = "hidden_states"):
        super().__init__()
        self.index = index
        self.predecessor = nn.ModuleList(predecessor)
        self.successor = successor
        self._state = state  # plain attribute: shared, not a submodule
        self._state_kwarg = state_kwarg

    @torch.compiler.disable(recursive=False)
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self._state
        if state.force is not None:  # validation or module matching; one test on the training path
            return self.run_predecessor(*args, **kwargs) if state.force == "predecessor" else self._match(*args, **kwargs)
        if not self.training:
            state.note_eval_forward()
            return self.successor(*args, **kwargs)
        if state.mixing == "blend" and state.rate < 1.0:
            return self._blend(*args, **kwargs)
        use_successor = state.draw(self.index, self._carried_input(args, kwargs))
        if state.mixed_matching and state.rate < 1.0 and torch.is_grad_enabled() and not in_backward():
            return self._run_and_match(use_successor, *args, **kwargs)
        if use_successor:
            return self.successor(*args, **kwargs)
        out = self.run_predecessor(*args, **kwargs)
        if torch.is_grad_enabled() and (state.anchor_always or ddp_waits_for_every_parameter()):
            out = self._keep_successor_in_graph(out)
        return out

    def _carried_input(self, args: tuple, kwargs: dict) -> Any:
        return args[0] if args else kwargs.get(self._state_kwarg)

    def run_predecessor(self, *args: Any, **kwargs: Any) -> Any:
        """Run the predecessor blocks in order; each receives the previous block's carried
        output (the output itself, or its first element when it is a tuple/list) and the
        same remaining arguments."""
        if args:
            carried, rest, key = args[0], args[1:], None
        elif self._state_kwarg in kwargs:
            kwargs = dict(kwargs)
            carried, rest, key = kwargs.pop(self._state_kwarg), (), self._state_kwarg
        else:
            raise TypeError(
                f"Theseus group {self.index} was called without positional arguments and without "
                f"{self._state_kwarg!r}; set the adapter's state_kwarg to the keyword that carries the state."
            )
        out = None
        for block in self.predecessor:
            out = block(carried, *rest, **kwargs) if key is None else block(*rest, **{key: carried}, **kwargs)
            carried = _carried(out)
        return out

    def _match(self, *args: Any, **kwargs: Any) -> Any:
        # The predecessor's hidden states flow on unchanged (no gradient); the successor gets
        # the same input and learns to reproduce the group's output (relative squared error).
        with torch.no_grad():
            target = self.run_predecessor(*args, **kwargs)
        wanted = _carried(target).float()
        with torch.enable_grad():
            got = _carried(self.successor(*args, **kwargs)).float()
            error = (got - wanted).pow(2).mean() / wanted.pow(2).mean().clamp_min(1e-12)
        self._state.match_errors.append((self.index, error))
        return target

    def _blend(self, *args: Any, **kwargs: Any) -> Any:
        # the deterministic annealed blend: both paths run, their carried outputs mix by p
        rate = self._state.rate
        before = self.run_predecessor(*args, **kwargs)
        after = self.successor(*args, **kwargs)
        return _with_carried(after, (1.0 - rate) * _carried(before) + rate * _carried(after))

    def _run_and_match(self, use_successor: bool, *args: Any, **kwargs: Any) -> Any:
        # the drawn path as usual, plus the successor's error against the group on the same input,
        # detached so that the matching term trains this successor only (module matching's error)
        out = self.successor(*args, **kwargs) if use_successor else self.run_predecessor(*args, **kwargs)
        args, kwargs = self._detached_input(args, kwargs)
        if use_successor:
            with torch.no_grad():
                wanted = _carried(self.run_predecessor(*args, **kwargs)).float()
        else:
            wanted = _carried(out).detach().float()
        got = _carried(self.successor(*args, **kwargs)).float()
        error = (got - wanted).pow(2).mean() / wanted.pow(2).mean().clamp_min(1e-12)
        self._state.mixed_errors.append((self.index, error))
        return out

    def _detached_input(self, args: tuple, kwargs: dict) -> Tuple[tuple, dict]:
        if args and isinstance(args[0], torch.Tensor):
            return (args[0].detach(),) + tuple(args[1:]), kwargs
        if isinstance(kwargs.get(self._state_kwarg), torch.Tensor):
            return args, dict(kwargs, **{self._state_kwarg: kwargs[self._state_kwarg].detach()})
        return args, kwargs

    def _keep_successor_in_graph(self, out: Any) -> Any:
        # The zero anchor (see the module docstring): only when DDP's reducer or a loss with
        # nothing else trainable needs it; the run's optimiser hook drops its zero gradients.
        params = [p for p in self.successor.parameters() if p.requires_grad]
        carried = _carried(out)
        if not params or not isinstance(carried, torch.Tensor) or not carried.is_floating_point():
            return out
        if any(_is_sharded(p) for p in params):
            # FSDP2 with the successor as its own unit: an idle successor stays sharded (its
            # unit's forward did not run). FSDP2 needs no anchor (it has no reducer waiting for
            # every parameter), and without one the idle successor gets no gradient at all.
            return out
        anchor = torch.stack([p.sum() for p in params]).sum().to(carried.dtype) * 0.0
        self._state.anchored.add(self.index)
        return _with_carried(out, carried + anchor)

    def extra_repr(self) -> str:
        return f"index={self.index}, predecessor_blocks={len(self.predecessor)}"


def _skip_dispatch_frames() -> None:
    # compiler.disable(recursive=False) makes dynamo break the graph at a group's call, but dynamo still
    # looks at the dispatch's own frame on every call and declines it anew (a frame per group per
    # forward). Marking its code as skipped once lets the frames pass at C level; the blocks the
    # dispatch calls are still compiled as graphs of their own.
    inner = getattr(TheseusGroup.forward, "__wrapped__", None)
    skip_code = getattr(getattr(getattr(torch, "_dynamo", None), "eval_frame", None), "skip_code", None)
    if inner is not None and skip_code is not None:
        skip_code(inner.__code__)


_skip_dispatch_frames()
