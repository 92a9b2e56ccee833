"""The adapter contract: what a model family must tell the engine.

An adapter only *describes* a model: where its replaceable containers are, how
to make a sample input, and how to build the exported successor as a proper
native model (the family's constructor at the new depth, loaded strictly). The engine does
everything else. Subclass `Adapter`, fill in what differs, and register it with
``@register_adapter("name")``.
"""

from __future__ import annotations

from typing import Any, List, Optional

from torch import nn

from .errors import AdapterError
from .suggest import check_names, keyword_names


class Adapter:
    name: str = ""  # set by @register_adapter
    supports: str = ""  # one line for people: which models this adapter handles
    auto_detect: bool = True  # False: used only when asked for by name
    # Keyword under which a block receives the carried state, when a container's
    # owner calls its blocks with keywords only (e.g. layer(hidden_states=x)).
    state_kwarg: str = "hidden_states"
    # Where a budget plan's successors start: "kept" (a copy of its group's kept, most important
    # block) or "first" (successor k is a copy of block k, for families whose blocks behave by
    # position, like Swin's shifted windows, so that the native model at the new depth agrees).
    budget_init: str = "kept"
    # The recipe (theseus_general.recipes) that Theseus(model) uses for this family's models when
    # recipe= is not given; a family gets its own only when the dev splits say so.
    default_recipe: str = "default"

    def __init__(self, **options: Any):
        check_names(options, [], "adapter option", f"The {self.name or type(self).__name__} adapter takes no options.")

    @classmethod
    def option_names(cls) -> List[str]:
        """The options this adapter's constructor takes (e.g. ["container"] for the generic one)."""
        return keyword_names(cls.__init__)

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        """True when this adapter recognises `model` (used for auto-detection)."""
        return False

    def check(self, model: nn.Module) -> None:
        """Raise AdapterError when `model` is not one this adapter supports."""
        if not self.matches(model):
            raise AdapterError(
                f"The {self.name!r} adapter does not support a {type(model).__qualname__}; it supports: "
                f"{self.supports}. Leave adapter= unset to auto-detect, or use adapter='generic' with container=..."
            )

    def containers(self, model: nn.Module, sample: Optional[Any] = None) -> List[str]:
        """Dotted paths of the containers whose blocks are grouped, in forward order.
        `sample` is the caller's sample input, when one was given."""
        raise NotImplementedError

    def sample_input(self, model: nn.Module) -> Optional[Any]:
        """A small input the model accepts (dict, tuple or tensor), used to check
        successors against their groups before training; None when unknown."""
        return None

    def finalize_export(self, model: nn.Module, depths: dict, native: Optional[bool] = None) -> nn.Module:
        """Turn the exported copy (each container holding its successors) into the model to return.

        `depths` maps container path -> successor depth. A family adapter builds its
        model with the family's own constructor at the new depth and loads `model`'s
        state strictly (native=True), raising ExportError when it cannot; with
        native=False it returns the copy, made consistent with its depth. The engine
        always passes the flag (an adapter whose method lacks it is called only for
        native exports). This default keeps the copy."""
        return model

    def check_successor(self, group_blocks: List[nn.Module], successor: nn.Module) -> Optional[str]:
        """A reason why native export will not be possible with this successor, or None."""
        return None

    def width_of(self, block: nn.Module) -> Optional[int]:
        """The number of hidden units a width successor of `block` narrows (an MLP's hidden
        neurons, a ResNet block's middle channels), or None when this adapter has no width
        successors for such a block. Default: None."""
        return None

    def narrow(self, block: nn.Module, keep: int) -> nn.Module:
        """A new block like `block` with only `keep` of its `width_of(block)` hidden units (those of
        largest weight magnitude, see `theseus_general.width`); `block` is not changed."""
        from .errors import PlanError

        raise PlanError(f"The {self.name or type(self).__name__} adapter has no width successors "
                        f"(successor_width=) for a {type(block).__name__}.")

    def width_export_problem(self, model: nn.Module, widths: dict) -> Optional[str]:
        """Why width successors at `widths` (container -> fraction) will not export natively, or
        None. Checked when the plan is made, so that the engine can warn before training."""
        return None

    def width_reference(self, group_blocks: List[nn.Module], successor: nn.Module) -> nn.Module:
        """The block a successor must be built like: the group's first block, narrowed to the
        successor's width when the successor is a width successor."""
        reference = group_blocks[0]
        ours, theirs = self.width_of(reference), None
        if ours is not None:
            try:
                theirs = self.width_of(successor)
            except (AttributeError, TypeError):
                theirs = None
        if ours is not None and theirs is not None and theirs != ours and 0 < theirs < ours:
            return self.narrow(reference, theirs)
        return reference

    def prepare_successor(self, group_blocks: List[nn.Module], successor: nn.Module) -> None:
        """Adjust a successor in place before training, for what depends on its position in the
        model (e.g. the hf adapter gives it its group's KV-cache slot, ``layer_idx``, so that it
        never shares a slot with another group's predecessor layer). Export rebuilds such
        settings natively. Default: nothing."""
        return None
