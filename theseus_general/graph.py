"""The module graph: a model seen as ordered, named blocks inside their containers.

A *container* is an ``nn.ModuleList`` or ``nn.Sequential`` with at least two
children; its children are the *blocks* that Theseus can group and replace.
With a sample input, each block's input and output shapes are recorded by
running the model once with forward hooks. Hooks see what actually runs, so
models with control flow or dict inputs work (torch.fx tracing would not).
The same pass counts each container's FLOPs with `torch.utils.flop_counter`.

A *chain* (a candidate for compression) is a container of at least two blocks of
one type, each mapping its input to an output of the same shape, holding
parameters, and not nested inside another chain. Chains are ranked by *size*:
FLOPs on the sample (the compute a shallower successor saves), then parameters;
parameters alone when no FLOPs were counted. ``describe()`` leads with them.

Adapters and the generic block finder read this graph; nothing here knows a
model family.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import AdapterError, InputError

CONTAINER_TYPES = (nn.ModuleList, nn.Sequential)


@dataclass
class Block:
    index: int
    path: str
    type_name: str
    num_params: int
    input_shape: Optional[Tuple[int, ...]] = None  # shape of the carried (first tensor) input
    output_shape: Optional[Tuple[int, ...]] = None  # shape of the carried (first tensor) output


@dataclass
class Container:
    path: str
    kind: str
    blocks: List[Block] = field(default_factory=list)
    flops: Optional[int] = None  # FLOPs of one forward pass on the sample; None without one

    @property
    def num_params(self) -> int:
        return sum(b.num_params for b in self.blocks)

    @property
    def block_type(self) -> str:
        """The blocks' class name, or "mixed"."""
        return self.blocks[0].type_name if self.uniform and self.blocks else "mixed"

    @property
    def shape_preserving(self) -> bool:
        """True when every block maps its carried input to an output of the same shape,
        known only after tracing with a sample."""
        return all(b.input_shape is not None and b.input_shape == b.output_shape for b in self.blocks)

    @property
    def uniform(self) -> bool:
        return len({b.type_name for b in self.blocks}) == 1


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """`model.get_submodule` with an error that says what exists."""
    if path == "":
        return model
    try:
        return model.get_submodule(path)
    except AttributeError:
        parts, current, walked = path.split("."), model, []
        for part in parts:
            if not hasattr(current, part) or not isinstance(getattr(current, part), nn.Module):
                children = [n for n, _ in current.named_children()]
                where = ".".join(walked) or "the model"
                raise AdapterError(
                    f"Container path {path!r} does not exist: {where} has no submodule {part!r}. "
                    f"Its children are {children}."
                ) from None
            current = getattr(current, part)
            walked.append(part)
        raise


def set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(model, parent_path)
    setattr(parent, name, module)


def first_tensor(value: Any) -> Optional[torch.Tensor]:
    """The tensor a block chain carries: the value itself, or the first tensor in a tuple/list/mapping."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, Mapping):
        for v in value.values():
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def model_arguments(model: nn.Module, inputs: Any) -> Tuple[tuple, Dict[str, Any]]:
    """How `inputs` (``sample=``, a `fit` batch's inputs) are passed to the model's forward, as
    ``(args, kwargs)``: any Mapping (a dict, a transformers BatchEncoding) as keyword arguments, a
    tuple as positional arguments, anything else (a tensor, a list such as the images a torchvision
    detection model takes, a named tuple such as a PackedSequence) as one positional argument.

    A list the forward cannot take as one argument but could as several is ambiguous: InputError
    shows both spellings."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple) and not hasattr(inputs, "_fields"):
        return tuple(inputs), {}
    if isinstance(inputs, list) and len(inputs) > 1 and _binds(model, inputs) and not _binds(model, [inputs]):
        raise InputError(
            f"The inputs are a list of {len(inputs)} items, and {type(model).__name__}.forward takes them only as "
            f"{len(inputs)} arguments. A list is one positional argument, [a, b, ...] or ([a, b, ...],) (the list of "
            "images a torchvision detection model takes); several positional arguments are a tuple: pass "
            "(a, b, ...) instead of [a, b, ...]."
        )
    return (inputs,), {}


def _binds(model: nn.Module, args: list) -> bool:
    """Whether the model's forward accepts `args` as positional arguments (True when it cannot be told)."""
    try:
        inspect.signature(model.forward).bind(*args)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): do not guess
        return True
    return True


def run_model(model: nn.Module, sample: Any) -> Any:
    """Call a model on a sample, passed as `model_arguments` says."""
    args, kwargs = model_arguments(model, sample)
    return model(*args, **kwargs)


def default_logits(output: Any) -> torch.Tensor:
    """Logits of a model output: ``output.logits`` (Hugging Face), the tensor itself,
    or the first element of a tuple/list."""
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"Cannot find logits in a {type(output).__qualname__} model output; pass logits=<callable output -> tensor>."
    )


class ModuleGraph:
    """All containers of a model, in the order `named_modules` visits them."""

    def __init__(self, containers: List[Container], total_params: int = 0, total_flops: Optional[int] = None):
        self.containers = containers
        self.total_params = total_params
        self.total_flops = total_flops  # FLOPs of the whole model on the sample; None without one
        self.traced = False

    @classmethod
    def from_model(cls, model: nn.Module, sample: Any = None) -> "ModuleGraph":
        containers = []
        for path, module in model.named_modules():
            if isinstance(module, CONTAINER_TYPES) and len(module) >= 2:
                blocks = [
                    Block(i, f"{path}.{name}" if path else name, type(child).__name__, count_parameters(child))
                    for i, (name, child) in enumerate(module.named_children())
                ]
                containers.append(Container(path, type(module).__name__, blocks))
        graph = cls(containers, total_params=count_parameters(model))
        if sample is not None:
            graph._trace(model, sample)
        return graph

    def _trace(self, model: nn.Module, sample: Any) -> None:
        """Record each block's carried input/output shape (first call only) and each container's
        FLOPs, from one forward pass."""
        handles, by_path = [], {}
        for container in self.containers:
            for block in container.blocks:
                by_path[block.path] = block

        def hook(block: Block):
            def record(module, args, kwargs, output):
                if block.input_shape is None:
                    t_in = first_tensor(args) if args else first_tensor(kwargs)
                    t_out = first_tensor(output)
                    block.input_shape = tuple(t_in.shape) if t_in is not None else None
                    block.output_shape = tuple(t_out.shape) if t_out is not None else None

            return record

        modules = dict(model.named_modules())
        for path, block in by_path.items():
            handles.append(modules[path].register_forward_hook(hook(block), with_kwargs=True))
        was_training = model.training
        counter = flop_counter()
        try:
            model.eval()
            try:
                with torch.no_grad(), (counter or contextlib.nullcontext()):
                    run_model(model, sample)
            except Exception:
                if counter is None:
                    raise
                counter = None  # shapes matter more than FLOPs: run again without the counter
                with torch.no_grad():
                    run_model(model, sample)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        self.traced = True
        if counter is not None:
            # The counter names modules "<RootClass>.<path>"; "Global" is the whole pass.
            counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
            root = type(model).__name__
            self.total_flops = counts.get("Global", 0)
            for c in self.containers:
                # the sum over its blocks: a ModuleList is iterated by its owner, never called,
                # so the counter has no entry of its own for it
                c.flops = sum(counts.get(f"{root}.{b.path}", 0) for b in c.blocks)
            if not any(c.flops for c in self.containers):  # names not matched (e.g. a wrapped model): unknown
                self.total_flops = None
                for c in self.containers:
                    c.flops = None

    def size(self, container: Container) -> Tuple[int, int]:
        """The ranking key of a container: (FLOPs on the sample, parameters); FLOPs count as 0
        when none were counted, so parameters decide."""
        return (container.flops or 0) if self.total_flops else 0, container.num_params

    def ranking(self) -> str:
        """How `chains()` ranks, in words."""
        return "FLOPs on the sample, then parameters" if self.total_flops else "parameters (no FLOPs counted)"

    def container(self, path: str) -> Container:
        for c in self.containers:
            if c.path == path:
                return c
        known = [c.path for c in self.containers]
        raise AdapterError(f"{path!r} is not a container of blocks (ModuleList/Sequential); containers: {known}")

    def chains(self, min_blocks: int = 2) -> List[Container]:
        """Candidate containers for compression, largest first (see `size`): same-type,
        shape-preserving blocks with parameters, not inside another candidate (wrapping
        both would nest groups). Needs a traced graph (from_model with a sample)."""
        found = [
            c for c in self.containers
            if len(c.blocks) >= min_blocks and c.uniform and c.shape_preserving and c.num_params > 0
        ]
        outer = [c for c in found if not any(_inside(c.path, o.path) for o in found if o is not c)]
        return sorted(outer, key=self.size, reverse=True)

    def candidates(self) -> List[Container]:
        """`chains()` when traced; without a sample, shapes are unknown, so every container of
        same-type blocks with parameters, ranked by parameters."""
        if self.traced:
            return self.chains()
        found = [c for c in self.containers if c.uniform and c.num_params > 0]
        return sorted(found, key=lambda c: c.num_params, reverse=True)

    def describe(self, full: bool = False) -> str:
        """The candidate containers, ranked, with block count, parameters and FLOPs share
        ("n/a" without a sample); with full=True also every container and block."""
        candidates = self.candidates()
        flops_known = self.total_flops is not None and self.total_flops > 0
        if self.traced:
            title = (f"Candidate containers (same-type blocks with equal input/output shapes), largest first by "
                     f"{self.ranking()}:")
        else:
            title = ("Candidate containers (same-type blocks; no sample, so shapes are not checked and FLOPs are "
                     "n/a: pass one to ModuleGraph.from_model(model, sample)), largest first by parameters:")
        lines = [title]
        if candidates:
            rows = [("#", "container", "blocks", "block type", "params (share)", "FLOPs (share)")]
            for rank, c in enumerate(candidates, 1):
                flops = f"{_short(c.flops)} ({c.flops / self.total_flops:.1%})" if flops_known else "n/a"
                rows.append((str(rank), c.path or "<root>", str(len(c.blocks)), c.block_type,
                             f"{_short(c.num_params)} ({c.num_params / max(self.total_params, 1):.1%})", flops))
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        else:
            lines.append("  none")
        total_flops = f", {_short(self.total_flops)} FLOPs on the sample" if flops_known else ""
        others = len(self.containers) - len(candidates)
        lines.append(f"Model: {_short(self.total_params)} params{total_flops}; {len(self.containers)} containers "
                     f"({others} not candidates). describe(full=True) lists every container and block.")
        if full:
            lines.append("")
            for c in self.containers:
                lines.append(f"{c.path or '<root>'} ({c.kind}, {len(c.blocks)} blocks)")
                for b in c.blocks:
                    shapes = f" {b.input_shape} -> {b.output_shape}" if b.input_shape is not None else ""
                    lines.append(f"  [{b.index}] {b.type_name} {b.num_params:,} params{shapes}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()


def _inside(path: str, outer: str) -> bool:
    return outer == "" or path.startswith(outer + ".")


def _short(n: Optional[int]) -> str:
    """1234567 -> "1.23M"."""
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def flop_counter() -> Optional[Any]:
    """The package's one FLOP counter: torch's FlopCounterMode (torch >= 2.1), else None."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover
        return None
    return FlopCounterMode(display=False)


def flops_of(fn: Any) -> int:
    """FLOPs of running ``fn()``, counted by `flop_counter`."""
    counter = flop_counter()
    if counter is None:  # pragma: no cover
        raise RuntimeError("Counting FLOPs needs torch.utils.flop_counter (torch >= 2.1).")
    with counter:
        fn()
    return int(counter.get_total_flops())


def count_parameters(module: nn.Module) -> int:
    """The package's one parameter counter: every parameter's elements, each parameter once."""
    return sum(p.numel() for p in module.parameters())


def containers_by_path(graph: ModuleGraph) -> Dict[str, Container]:
    return {c.path: c for c in graph.containers}
