"""DistributedDataParallel for a Theseus run.

    th = Theseus(model, successor_depth=3, seed=0)      # same seed on every rank
    ddp = wrap_ddp(th, device_ids=[local_rank])         # DDP(th.model, find_unused_parameters=False)
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-4)
    loss = ddp(**batch).loss; loss.backward(); opt.step(); opt.zero_grad(); th.step()

Why plain DDP over the whole wrapped model, wrapped once, is right:
  * DDP reduces only parameters with requires_grad=True when it is built. Wrapping
    fixed that set for the whole run (the successors, and with train_rest=True the
    copies of embeddings/stem/head, which train from step 0), so one DDP wrap covers
    the run; the frozen predecessor is not reduced.
  * The replacement draws are a pure function of (seed, step, group, micro-batch), so
    every rank runs the same modules at the same step without any communication.
  * find_unused_parameters=False is enough: a group that runs its predecessor adds
    0 * sum(successor params) to its output (TheseusGroup._keep_successor_in_graph),
    so every successor parameter gets a (zero) gradient and the reducer never waits
    for a parameter that took no part in the forward. After the reduction, the
    engine's optimiser step pre-hook sets the gradients of successors idle for the
    whole step to None, so the optimiser leaves them unchanged on every rank.
  * The caller's original tensors that the rest copies replaced are non-persistent
    buffers of the model, listed in ``model._ddp_params_and_buffers_to_ignore``, so
    DDP (also under Accelerate or the Trainer) does not broadcast them every step.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .engine import Theseus


def wrap_ddp(th: Theseus, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(th.model, find_unused_parameters=False, **ddp_kwargs)``, once per run."""
    from torch.nn.parallel import DistributedDataParallel

    ddp_kwargs.setdefault("find_unused_parameters", False)
    return DistributedDataParallel(th.model, **ddp_kwargs)
