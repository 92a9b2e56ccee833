"""What makes two blocks interchangeable in a natively rebuilt model.

Two blocks have the same *structure* when they have the same class, the same
state-dict keys and shapes, and the same convolution geometry (stride, padding,
dilation, groups: a stride-2 block and a stride-1 block can hold tensors of the
same shapes). A native constructor at a new depth builds blocks of a fixed
structure at each position, so an exported block must have exactly that one.
"""

from __future__ import annotations

from typing import Hashable, List, Optional

from torch import nn


def structure(block: nn.Module) -> Hashable:
    tensors = tuple((k, tuple(v.shape)) for k, v in block.state_dict().items())
    geometry = tuple(
        (name, m.stride, m.padding, m.dilation, m.groups)
        for name, m in block.named_modules()
        if isinstance(m, nn.modules.conv._ConvNd)
    )
    return type(block), tensors, geometry


def structure_difference(reference: nn.Module, other: nn.Module) -> Optional[str]:
    """Why `other` cannot stand where `reference` stands, or None when it can."""
    (rtype, rtensors, rgeometry), (otype, otensors, ogeometry) = structure(reference), structure(other)
    if otype is not rtype:
        return f"it is a {otype.__name__}, not a {rtype.__name__}"
    if otensors != rtensors:
        missing = sorted(set(dict(rtensors)) - set(dict(otensors)))
        extra = sorted(set(dict(otensors)) - set(dict(rtensors)))
        if missing or extra:
            return f"its weights differ in names (missing {missing[:3]}, unexpected {extra[:3]})"
        ours, theirs = dict(rtensors), dict(otensors)
        key = next((k for k in ours if ours[k] != theirs[k]), None)
        if key is None:
            return "its weights are registered in another order"
        return f"its weights differ in shape ({key!r}: {theirs[key]} instead of {ours[key]})"
    if ogeometry != rgeometry:
        return "its convolutions differ in stride, padding, dilation or groups"
    return None


def first_mismatch(blocks: List[nn.Module]) -> Optional[int]:
    """Index of the first block whose structure differs from blocks[0], or None."""
    reference = structure(blocks[0])
    for i, block in enumerate(blocks[1:], start=1):
        if structure(block) != reference:
            return i
    return None
