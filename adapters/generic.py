"""The generic route: any model with a chain of blocks.

Name the container(s) to compress::

    Theseus(model, adapter="generic", container="encoder.blocks", successor_depth=3)
    Theseus(model, adapter="generic", container=["features.1", "features.3"], ratio=0.5)

or give a sample input and let the adapter find the *chains*: containers of at
least two same-type blocks whose input and output shapes match (traced with the
module graph's forward hooks), not nested in another chain::

    Theseus(model, adapter="generic", sample=x, ratio=0.5)                   # the largest chain
    Theseus(model, adapter="generic", sample=x, ratio=0.5, container="all")  # every chain

The *largest* chain is the one with the most FLOPs on the sample (what a
shallower successor saves), then the most parameters; the most parameters when
the FLOPs cannot be counted. When the sample shows more than one chain, the
adapter warns (`UserWarning`) with what it chose, why and the alternatives; the
same report is kept as ``adapter.discovery`` (``print(th.adapter.discovery)``).
Naming the container(s), or ``container="all"``, is an explicit choice and
silences the warning. ``ModuleGraph.from_model(model, x).describe()`` shows the
same ranking without wrapping anything.

Export returns the same model type with the container shortened. Whatever the
model keeps about its own depth (a config field, a stored count) is not
updated, with one exception: a transformers `PreTrainedModel` is reloaded from
its config, so its layer stack is rebuilt natively (as the hf adapter does) and
any other shortened container raises `ExportError` rather than save a model that
would reload differently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union

from torch import nn

from theseus_general.adapter import Adapter
from theseus_general.errors import AdapterError, warn_user
from theseus_general.graph import ModuleGraph, get_submodule
from theseus_general.registry import register_adapter

from ._hf_common import finalize_generic, is_pretrained_model

logger = logging.getLogger(__name__)

ALL = "all"


@dataclass
class Discovery:
    """What the generic adapter found on a sample, what it chose and why."""

    chosen: List[str]
    reason: str
    table: str  # the graph's ranked candidates (ModuleGraph.describe())
    candidates: List[str]

    def __str__(self) -> str:
        others = [c for c in self.candidates if c not in self.chosen]
        if others:
            advice = (f"To compress another chain or several, pass container=... (e.g. container={others[:2]!r}); "
                      "container='all' compresses every candidate.")
        else:
            advice = "Every candidate chain is compressed."
        return f"generic adapter: compressing {', '.join(self.chosen)}: {self.reason}.\n{self.table}\n{advice}"


@register_adapter("generic")
class GenericAdapter(Adapter):
    supports = (
        "any nn.Module: name the container(s) with container='path' (or a list), or pass sample= to find "
        "chains of blocks (container='all' compresses every chain)"
    )
    auto_detect = False

    def __init__(self, container: Union[str, Sequence[str], None] = None):
        super().__init__()
        if container is not None and not isinstance(container, str):
            container = list(container)
            if not container or not all(isinstance(c, str) for c in container):
                raise AdapterError(f"container must be a dotted path, a list of them or 'all', got {container!r}.")
        self.container = container
        self.discovery: Optional[Discovery] = None  # set when the containers were found on a sample

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.Module)

    def containers(self, model: nn.Module, sample: Optional[Any] = None) -> List[str]:
        if self.container is not None and self.container != ALL:
            paths = [self.container] if isinstance(self.container, str) else self.container
            for path in paths:
                get_submodule(model, path)  # clear error when the path does not exist
            return paths
        if sample is None:
            raise AdapterError(
                "The generic adapter needs to know which blocks to compress: pass container='path.to.blocks' "
                "(ModuleGraph.from_model(model, sample).describe() ranks the candidates), or sample= with an "
                "input so that it can find chains of same-shaped blocks"
                + (" (container='all' needs one too)." if self.container == ALL else ".")
            )
        graph = ModuleGraph.from_model(model, sample)
        chains = graph.chains()
        if not chains:
            raise AdapterError(
                "No container of same-type, shape-preserving blocks was found on the sample.\n"
                f"{graph.describe(full=True)}\nName one with container='...'."
            )
        candidates = [c.path for c in chains]
        if self.container == ALL:
            chosen = [c.path for c in graph.containers if c.path in candidates]  # forward (module) order
            reason = f"container='all' takes every candidate chain ({len(chosen)})"
        else:
            chosen = candidates[:1]
            reason = (f"the largest of {len(chains)} candidate chains by {graph.ranking()}" if len(chains) > 1
                      else "the only candidate chain")
        self.discovery = Discovery(chosen, reason, graph.describe(), candidates)
        if len(chains) > 1 and self.container is None:
            warn_user(f"{self.discovery}\nName the container(s) to silence this warning.")
        else:
            logger.info("%s", self.discovery)
        return chosen

    def finalize_export(self, model: nn.Module, depths: dict, native: Optional[bool] = True) -> nn.Module:
        """A transformers model is reloaded from its config, so the config must describe the export:
        the layer stack config.num_hidden_layers counts is rebuilt natively (as the hf adapter does);
        any other shortened container of a PreTrainedModel raises ExportError. native=False: the copy."""
        return finalize_generic(model, depths) if native is not False and is_pretrained_model(model) else model
