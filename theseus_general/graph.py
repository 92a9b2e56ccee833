"""The module graph: a model seen as ordered, named blocks inside their containers.

A *container* is an ``nn.ModuleList`` or ``nn.Sequential`` with at least two
children; its children are the *blocks* that Theseus can group and replace.
With a sample input, each block's input and output shapes are recorded by
running the model once with forward hooks. Hooks see what actually runs, so
models with control flow or dict inputs work (torch.fx tracing would not).

Adapters and the generic block finder read this graph; nothing here knows a
model family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .errors import AdapterError

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
    """The tensor a block chain carries: the value itself, or the first tensor in a tuple/list/dict."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for v in value:
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(value, dict):
        for v in value.values():
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def run_model(model: nn.Module, sample: Any) -> Any:
    """Call a model on a sample: dict -> keyword arguments, tuple/list -> positional, else one argument."""
    if isinstance(sample, dict):
        return model(**sample)
    if isinstance(sample, (tuple, list)):
        return model(*sample)
    return model(sample)


class ModuleGraph:
    """All containers of a model, in the order `named_modules` visits them."""

    def __init__(self, containers: List[Container]):
        self.containers = containers

    @classmethod
    def from_model(cls, model: nn.Module, sample: Any = None) -> "ModuleGraph":
        containers = []
        for path, module in model.named_modules():
            if isinstance(module, CONTAINER_TYPES) and len(module) >= 2:
                blocks = [
                    Block(i, f"{path}.{name}" if path else name, type(child).__name__, _count(child))
                    for i, (name, child) in enumerate(module.named_children())
                ]
                containers.append(Container(path, type(module).__name__, blocks))
        graph = cls(containers)
        if sample is not None:
            graph._trace(model, sample)
        return graph

    def _trace(self, model: nn.Module, sample: Any) -> None:
        """Record each block's carried input/output shape from one forward pass (first call only)."""
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
        try:
            model.eval()
            with torch.no_grad():
                run_model(model, sample)
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()

    def container(self, path: str) -> Container:
        for c in self.containers:
            if c.path == path:
                return c
        known = [c.path for c in self.containers]
        raise AdapterError(f"{path!r} is not a container of blocks (ModuleList/Sequential); containers: {known}")

    def chains(self, min_blocks: int = 2) -> List[Container]:
        """Containers of same-type, shape-preserving blocks: the ones that can be grouped safely.
        Needs a traced graph; largest first."""
        found = [c for c in self.containers if len(c.blocks) >= min_blocks and c.uniform and c.shape_preserving]
        return sorted(found, key=lambda c: sum(b.num_params for b in c.blocks), reverse=True)

    def describe(self) -> str:
        lines = []
        for c in self.containers:
            lines.append(f"{c.path or '<root>'} ({c.kind}, {len(c.blocks)} blocks)")
            for b in c.blocks:
                shapes = f" {b.input_shape} -> {b.output_shape}" if b.input_shape is not None else ""
                lines.append(f"  [{b.index}] {b.type_name} {b.num_params:,} params{shapes}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.describe()


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_params(module: nn.Module) -> int:
    return _count(module)


def containers_by_path(graph: ModuleGraph) -> Dict[str, Container]:
    return {c.path: c for c in graph.containers}
