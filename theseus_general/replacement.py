"""The module that stands in for one group during compression.

`TheseusGroup` holds a group's predecessor blocks and its successor. In training,
each call draws r ~ Bernoulli(p) for this group alone and runs the successor
(r = 1) or the predecessor blocks in order (r = 0). In eval mode only the
successor runs.

Draws are a pure function of (seed, step, group, call number within the step),
not of any process's global RNG, so every DDP rank draws the same modules at the
same step and a resumed run repeats the draws of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

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


class ReplacementState:
    """Shared by all groups of one engine: schedule position, rate and draw bookkeeping."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.step = 0
        self.rate = 0.0
        self.force: Optional[str] = None  # "successor" / "predecessor": bypass the draw (validation)
        self.calls: Dict[int, int] = {}  # group -> calls since the last step
        self.last_draws: Dict[int, bool] = {}  # group -> did its latest call run the successor

    def draw(self, group: int) -> bool:
        count = self.calls.get(group, 0)
        self.calls[group] = count + 1
        use_successor = uniform(self.seed, self.step, group, count) < self.rate
        self.last_draws[group] = use_successor
        return use_successor

    def advance(self, step: int, rate: float) -> None:
        self.step, self.rate = step, rate
        self.calls.clear()


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

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        state = self._state
        if state.force == "predecessor":
            return self.run_predecessor(*args, **kwargs)
        if not self.training or state.force == "successor" or state.draw(self.index):
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
            carried = out[0] if isinstance(out, (tuple, list)) else out
        return out

    def _keep_successor_in_graph(self, out: Any) -> Any:
        # When a group runs its predecessor, its successor takes no part in this
        # forward. If every group drew its predecessor (p = 0.5, 2 groups: 1 step in
        # 4), the loss would depend on no trainable parameter and a plain
        # loss.backward() would raise; under DDP, parameters left out of a forward
        # make the reducer wait or fail unless find_unused_parameters=True (which
        # costs an extra graph traversal every step). Adding 0 * sum(successor
        # params) to the carried output keeps every successor parameter in the
        # graph with an exact zero gradient, the same zeros the reference code's
        # zero_grad() left. Cost: one reduction over the unused successor's
        # parameters and one elementwise add per unused group per forward.
        params = [p for p in self.successor.parameters() if p.requires_grad]
        carried = out[0] if isinstance(out, (tuple, list)) else out
        if not params or not isinstance(carried, torch.Tensor) or not carried.is_floating_point():
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
