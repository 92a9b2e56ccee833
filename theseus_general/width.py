"""Width successors: a block of the same family with fewer hidden neurons or channels.

A width successor keeps the block's input and output (so it stands where the block
stood) and narrows what lies between: a transformer MLP's hidden neurons
(``fc1`` -> ``fc2``), a ResNet block's middle channels (``conv1`` -> ``conv2``).
It starts from its group's block by keeping the hidden units of largest *weight
magnitude*: unit j scores ``||W_in[j]|| * ||W_out[:, j]||`` (its incoming weights
times its outgoing weights; a batch norm between them multiplies in ``|gamma_j|``), the
usual magnitude criterion of structured pruning. It needs no sample.

Adapters say where a block's hidden units are (``Adapter.width_of`` / ``Adapter.narrow``);
the helpers here cut the tensors. Nothing here knows a model family.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from .errors import PlanError
from .graph import set_submodule


def kept_count(hidden: int, fraction: float) -> int:
    """How many of `hidden` units a width fraction keeps: rounded, at least one."""
    return max(1, min(hidden, int(round(hidden * fraction))))


def top_units(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores, in their original order (ties: lower index first)."""
    order = torch.sort(scores.detach().float().cpu(), descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


def _norms(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-unit L2 norm of `weight` over every axis but `dim`."""
    w = weight.detach().float().movedim(dim, 0)
    return w.reshape(w.shape[0], -1).norm(dim=1).cpu()


def linear_rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """`linear` with only the output units `keep` (a new module, same dtype and device)."""
    out = nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    index = keep.to(linear.weight.device)
    with torch.no_grad():
        out.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[index])
    out.train(linear.training)
    return out


def linear_columns(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """`linear` reading only the input units `keep`."""
    out = nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[:, keep.to(linear.weight.device)])
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
    out.train(linear.training)
    return out


def linear_hidden_scores(inputs: Sequence[nn.Linear], output: nn.Linear) -> torch.Tensor:
    """Magnitude score of each hidden unit between `inputs` (e.g. fc1, or gate and up) and `output`."""
    score = _norms(output.weight, 1)
    for linear in inputs:
        score = score * _norms(linear.weight, 0)
    return score


def narrow_linear_pair(block: nn.Module, inputs: Sequence[str], output: str, keep: int,
                       sizes: Sequence[str] = ()) -> nn.Module:
    """Narrow, in place, the hidden units between the Linear layers named `inputs` (dotted paths in
    `block`, each producing the hidden units) and `output` (reading them) to the `keep` of largest
    magnitude. `sizes`: dotted paths of int attributes that store the hidden size (kept in step)."""
    ins = [block.get_submodule(p) for p in inputs]
    out = block.get_submodule(output)
    for name, linear in zip(list(inputs) + [output], ins + [out]):
        if type(linear) is not nn.Linear:
            raise PlanError(f"{name} is a {type(linear).__name__}, not an nn.Linear; its width cannot be cut.")
    index = top_units(linear_hidden_scores(ins, out), keep)
    for path, linear in zip(inputs, ins):
        set_submodule(block, path, linear_rows(linear, index))
    set_submodule(block, output, linear_columns(out, index))
    for path in sizes:
        owner_path, _, attr = path.rpartition(".")
        owner = block.get_submodule(owner_path) if owner_path else block
        if isinstance(getattr(owner, attr, None), int):
            setattr(owner, attr, keep)
    return block


# ---------------------------------------------------------------- convolutions
def conv_out(conv: nn.Conv2d, keep: torch.Tensor) -> nn.Conv2d:
    return _conv(conv, conv.in_channels, len(keep), lambda w: w[keep.to(w.device)], keep_bias=keep)


def conv_in(conv: nn.Conv2d, keep: torch.Tensor) -> nn.Conv2d:
    return _conv(conv, len(keep), conv.out_channels, lambda w: w[:, keep.to(w.device)], keep_bias=None)


def _conv(conv: nn.Conv2d, cin: int, cout: int, take, keep_bias: Optional[torch.Tensor]) -> nn.Conv2d:
    if conv.groups != 1:
        raise PlanError(f"a grouped convolution (groups={conv.groups}) cannot be narrowed channel by channel")
    new = nn.Conv2d(cin, cout, conv.kernel_size, conv.stride, conv.padding, conv.dilation, 1,
                    conv.bias is not None, conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(take(conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias if keep_bias is None else conv.bias[keep_bias.to(conv.bias.device)])
    new.train(conv.training)
    return new


def batch_norm(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    """A copy of `bn` (same class: timm's BatchNormAct2d keeps its activation) over the channels `keep`."""
    import copy

    new = copy.deepcopy(bn)
    index = keep.to(bn.weight.device if bn.weight is not None else bn.running_mean.device)
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(bn, name)
            if p is not None:
                new._parameters[name] = nn.Parameter(p.detach()[index].clone(), requires_grad=p.requires_grad)
        for name in ("running_mean", "running_var"):
            b = getattr(bn, name)
            if b is not None:
                new._buffers[name] = b.detach()[index].clone()
    new.num_features = len(keep)
    return new


def narrow_conv_chain(block: nn.Module, chain: List[tuple], keep: int) -> nn.Module:
    """Narrow, in place, the channels between consecutive convolutions of a block. `chain` is a list
    of (producer conv, its batch norm, consumer conv) dotted paths; each link keeps the `keep`
    channels scoring highest by ``||producer filter|| * |gamma| * ||consumer input slice||``."""
    for producer, norm, consumer in chain:
        p, n, c = (block.get_submodule(x) for x in (producer, norm, consumer))
        score = _norms(p.weight, 0) * _norms(c.weight, 1)
        if getattr(n, "weight", None) is not None:
            score = score * n.weight.detach().float().abs().cpu()
        index = top_units(score, keep)
        set_submodule(block, producer, conv_out(p, index))
        set_submodule(block, norm, batch_norm(n, index))
        set_submodule(block, consumer, conv_in(block.get_submodule(consumer), index))
    return block


