"""The module that stands in for one group during compression, and the draws.

`TheseusGroup` holds a group's predecessor blocks and its successor. In training,
each forward pass of the model runs, for each group, the successor (with
probability p) or the predecessor blocks in order. In eval mode only the
successor runs.

Decisions are fixed outside traced code. A decision is a pure function of
(seed, step, group, micro-batch): every DDP rank draws the same modules without
communicating, a resumed run repeats the draws of an uninterrupted one, and
under gradient accumulation each micro-batch draws anew. The micro-batch index
of a group is the number of its training forwards since the last ``th.step()``;
a recomputation during backward (activation checkpointing) is not a new
forward and reuses the decision of the forward it recomputes.

The dispatch (`TheseusGroup.forward`) is excluded from ``torch.compile``
(``torch.compiler.disable(recursive=False)``): it runs eagerly and reads the
decision, while the blocks it calls are compiled as graphs of their own, so the
compiled graphs do not depend on, and do not grow with, the draw pattern.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Set, Tuple

import torch
from torch import nn

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


def _is_sharded(p: torch.Tensor) -> bool:
    return _DTensor is not None and isinstance(p, _DTensor)


def in_backward() -> bool:
    """True while the autograd engine runs a backward pass on this thread: a forward
    run now is a recomputation (activation checkpointing), not a new micro-batch."""
    return torch._C._current_graph_task_id() != -1


# How the replacement rate is spread over the groups (Theseus(replacement_order=...)).
REPLACEMENT_ORDERS = ("random", "bottom_up", "top_down")


class ReplacementState:
    """Shared by all groups of one engine: schedule position, rate and the decisions.

    Plain Python numbers, read and written only by the eager dispatch."""

    def __init__(self, seed: int = 0, order: str = "random", num_groups: int = 1):
        self.seed = int(seed)
        self.order = order
        self.num_groups = int(num_groups)
        self.step = 0
        self.rate = 0.0
        self.force: Optional[str] = None  # "predecessor": bypass the draw (validation runs the blocks)
        # force == "match": module matching (matching.py); each group's successor sees the group's
        # input, its error against the predecessor blocks' output is collected here as (group, error)
        self.match_errors: List[Tuple[int, torch.Tensor]] = []
        self.calls: Dict[int, int] = {}  # group -> training forwards since the last step (micro-batch index)
        self.last_draws: Dict[int, bool] = {}  # group -> decision of its latest forward (reused by recomputes)
        self.ran_successor: Set[int] = set()  # groups whose successor ran in some forward since the last step
        # group forwards in eval mode with gradients enabled since the last step: with no training forward
        # beside them, the step trained a model left in eval mode (Theseus.step() refuses)
        self.eval_grad_forwards = 0

    def group_rate(self, group: int) -> float:
        """The probability that `group` runs its successor now. "random" (the paper's): every group at the
        schedule's rate. "bottom_up" / "top_down": the same expected number of replaced groups, rate x
        groups, filled from the input / output side: the group at position g from that side runs its
        successor with probability clip(rate * groups - g, 0, 1)."""
        if self.order == "random":
            return self.rate
        position = group if self.order == "bottom_up" else self.num_groups - 1 - group
        return min(1.0, max(0.0, self.rate * self.num_groups - position))

    def decision(self, group: int, micro_batch: int) -> bool:
        """Whether `group` runs its successor in micro-batch `micro_batch` of the current step."""
        return uniform(self.seed, self.step, group, micro_batch) < self.group_rate(group)

    @torch.compiler.disable  # plain Python bookkeeping: never traced, never guarded on
    def draw(self, group: int) -> bool:
        if in_backward() and group in self.last_draws:
            return self.last_draws[group]
        count = self.calls.get(group, 0)
        self.calls[group] = count + 1
        use_successor = self.decision(group, count)
        self.last_draws[group] = use_successor
        if use_successor:
            self.ran_successor.add(group)
        return use_successor

    def idle_groups(self) -> Set[int]:
        """Groups that took part in training since the last step without running their successor."""
        return set(self.calls) - self.ran_successor

    @torch.compiler.disable
    def note_eval_forward(self) -> None:
        if torch.is_grad_enabled() and not in_backward():
            self.eval_grad_forwards += 1

    def advance(self, step: int, rate: float) -> None:
        self.step, self.rate = step, rate
        self.calls.clear()  # last_draws stays readable (what the step that just ended ran)
        self.ran_successor.clear()
        self.eval_grad_forwards = 0


def _carried(out: Any) -> Any:
    """What a block hands the next one: its output, or the first element of a tuple/list output."""
    return out[0] if isinstance(out, (tuple, list)) else out


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
        if state.draw(self.index):
            return self.successor(*args, **kwargs)
        out = self.run_predecessor(*args, **kwargs)
        if torch.is_grad_enabled():
            out = self._keep_successor_in_graph(out)
        return out

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

    def _keep_successor_in_graph(self, out: Any) -> Any:
        # When a group runs its predecessor, its successor takes no part in this
        # forward. Under DDP, parameters left out of a forward make the reducer
        # fail unless find_unused_parameters=True (an extra graph traversal every
        # step), and with the rest frozen a step where every group drew its
        # predecessor would have a loss with no trainable parameter. Adding
        # 0 * sum(successor params) keeps every successor parameter in the graph
        # with an exact zero gradient. Those zeros must not reach the optimiser
        # (AdamW's momentum and weight decay would still move an idle successor):
        # the engine's optimiser step pre-hook sets the gradients of successors
        # idle for the whole step to None, after DDP has reduced them, so the
        # optimiser skips them as in the reference code.
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
        carried = carried + anchor
        if isinstance(out, tuple):
            return (carried,) + tuple(out[1:])
        if isinstance(out, list):
            return [carried] + list(out[1:])
        return carried

    def extra_repr(self) -> str:
        return f"index={self.index}, predecessor_blocks={len(self.predecessor)}"
