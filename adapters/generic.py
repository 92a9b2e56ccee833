"""The generic route: any model with a chain of blocks.

Name the container(s) to compress::

    Theseus(model, adapter="generic", container="encoder.blocks", successor_depth=3)

or give only a sample input and let the adapter pick the largest container of
same-type blocks whose input and output shapes match (found with the module
graph's forward hooks)::

    Theseus(model, adapter="generic", sample=x, successor_depth=3)

Export returns the same model type with the container shortened. Whatever the
model keeps about its own depth (a config field, a stored count) is not
updated: a family that has such fields deserves its own adapter.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Union

from torch import nn

from theseus_general.adapter import Adapter
from theseus_general.errors import AdapterError
from theseus_general.graph import ModuleGraph, get_submodule
from theseus_general.registry import register_adapter

from ._hf_common import finalize_generic, is_pretrained_model


@register_adapter("generic")
class GenericAdapter(Adapter):
    supports = "any nn.Module: name the container(s) with container='path', or pass sample= to find a chain of blocks"
    auto_detect = False

    def __init__(self, container: Union[str, Sequence[str], None] = None):
        super().__init__()
        if container is not None and not isinstance(container, str):
            container = list(container)
            if not container or not all(isinstance(c, str) for c in container):
                raise AdapterError(f"container must be a dotted path or a list of them, got {container!r}.")
        self.container = container

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return isinstance(model, nn.Module)

    def containers(self, model: nn.Module, sample: Optional[Any] = None) -> List[str]:
        if self.container is not None:
            paths = [self.container] if isinstance(self.container, str) else self.container
            for path in paths:
                get_submodule(model, path)  # clear error when the path does not exist
            return paths
        if sample is None:
            raise AdapterError(
                "The generic adapter needs to know which blocks to compress: pass container='path.to.blocks' "
                "(see ModuleGraph.from_model(model).describe() for the candidates), or sample= with an input "
                "so that it can find a chain of same-shaped blocks."
            )
        graph = ModuleGraph.from_model(model, sample)
        chains = graph.chains()
        if not chains:
            raise AdapterError(
                "No container of same-type, shape-preserving blocks was found on the sample. "
                f"Containers seen:\n{graph.describe()}\nName one with container='...'."
            )
        return [chains[0].path]

    def finalize_export(self, model: nn.Module, depths: dict) -> nn.Module:
        """A transformers model is reloaded from its config, so the config must describe the export:
        the layer stack config.num_hidden_layers counts is rebuilt natively (as the hf adapter does);
        any other shortened container of a PreTrainedModel raises ExportError."""
        return finalize_generic(model, depths) if is_pretrained_model(model) else model
