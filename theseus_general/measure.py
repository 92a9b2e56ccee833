"""Measuring a compression: parameters, FLOPs and wall-clock speed.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (what PyTorch
dispatches, not a hand count). Latency is measured for several models in the
same process, alternating between them on every repeat after a warm-up, and
reported as the median, so that a slow moment of the machine hits all of them.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from typing import Any, Dict

import torch
from torch import nn

from .graph import count_parameters, first_tensor, flops_of, run_model


def count_flops(model: nn.Module, sample: Any) -> int:
    """FLOPs of one forward pass on `sample` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return flops_of(lambda: run_model(model, sample))
    finally:
        model.train(was_training)


def _sync(sample: Any) -> None:
    tensor = first_tensor(sample)  # any input kind: a tensor, a tuple, a list, a Mapping
    if torch.cuda.is_available() and tensor is not None and tensor.is_cuda:
        torch.cuda.synchronize()


def measure_latency(models: Dict[str, nn.Module], sample: Any, warmup: int = 3, repeats: int = 20) -> Dict[str, float]:
    """Median seconds per forward pass for each model, measured alternately."""
    times: Dict[str, list] = {name: [] for name in models}
    flags = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                for m in models.values():
                    run_model(m, sample)
            for _ in range(repeats):
                for name, m in models.items():
                    _sync(sample)
                    start = time.perf_counter()
                    run_model(m, sample)
                    _sync(sample)
                    times[name].append(time.perf_counter() - start)
    finally:
        for name, m in models.items():
            m.train(flags[name])
    return {name: statistics.median(t) for name, t in times.items()}


def state_checksum(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names and bytes): equal exactly when every
    parameter and buffer is bit-identical, e.g. before and after a compression."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
