"""Check successors against their groups on a real sample, before any change.

The model runs once (eval mode, no gradients) with hooks that capture what each
group's first block receives and what its last block returns. Each successor
then runs on the captured input; its output must have the same structure
(tensor, or tuple/list of the same arity), shapes, dtypes and devices.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, List

import torch
from torch import nn

from .errors import InputError, SuccessorMismatchError
from .graph import run_model
from .plan import Plan


def describe(value: Any) -> Any:
    """A comparable summary of an output: structure, shapes, dtypes, devices."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), str(value.device))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(describe(v) for v in value))
    if isinstance(value, Mapping):
        return ("dict", tuple((k, describe(v)) for k, v in value.items()))
    if value is None:
        return None
    return type(value).__name__


def format_description(d: Any) -> str:
    if isinstance(d, tuple) and d and d[0] == "tensor":
        return f"tensor{list(d[1])} {d[2]} on {d[3]}"
    if isinstance(d, tuple) and d and d[0] in ("tuple", "list"):
        return f"{d[0]} of {len(d[1])}: (" + ", ".join(format_description(x) for x in d[1]) + ")"
    return str(d)


def check_successors(model: nn.Module, containers: Dict[str, nn.Module], plan: Plan,
                     successors: List[nn.Module], sample: Any) -> None:
    inputs: Dict[int, tuple] = {}
    outputs: Dict[int, Any] = {}
    hooks = []

    def take_input(index: int):
        def hook(module, args, kwargs):
            inputs.setdefault(index, (args, kwargs))
        return hook

    def take_output(index: int):
        def hook(module, args, output):
            outputs.setdefault(index, output)
        return hook

    for group in plan.groups:
        container = containers[group.container]
        hooks.append(container[group.blocks[0]].register_forward_pre_hook(take_input(group.index), with_kwargs=True))
        hooks.append(container[group.blocks[-1]].register_forward_hook(take_output(group.index)))
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            run_model(model, sample)
    except InputError:
        raise  # already says how to spell the sample
    except Exception as error:
        raise SuccessorMismatchError(
            f"The model failed on the sample used to check successors ({type(error).__name__}: {error}). "
            "Pass sample= with an input the model's forward takes: a Mapping of keyword arguments (a dict, a "
            "BatchEncoding), a tuple of positional arguments, or one argument (a tensor, a list); or validate=False "
            "to skip the check."
        ) from error
    finally:
        for h in hooks:
            h.remove()
        for m, flag in training.items():
            m.training = flag

    for group, successor in zip(plan.groups, successors):
        where = f"group {group.index} ({group.container} blocks {list(group.blocks)}, successor {type(successor).__name__})"
        if group.index not in inputs or group.index not in outputs:
            raise SuccessorMismatchError(
                f"The sample never reached {where}, so its successor cannot be checked. "
                "Pass a sample= that runs every block, or validate=False."
            )
        args, kwargs = inputs[group.index]
        was_training = successor.training
        try:
            successor.eval()
            with torch.no_grad():
                produced = successor(*args, **kwargs)
        except Exception as error:
            raise SuccessorMismatchError(
                f"The successor of {where} failed on the group's input ({type(error).__name__}: {error}). "
                "A successor must accept the same arguments as the group's first block."
            ) from error
        finally:
            successor.train(was_training)
        want, got = describe(outputs[group.index]), describe(produced)
        if want != got:
            raise SuccessorMismatchError(
                f"The successor of {where} does not produce what its predecessor blocks produce: "
                f"predecessor gives {format_description(want)}, successor gives {format_description(got)}. "
                "A successor must map the group's input to an output of the same structure, shape, dtype and device."
            )
