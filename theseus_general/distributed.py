"""DistributedDataParallel for a Theseus run.

    th = Theseus(model, successor_depth=3, seed=0)      # same seed on every rank
    ddp = wrap_ddp(th, device_ids=[local_rank])         # DDP(th.model, find_unused_parameters=False)
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-4)
    loss = ddp(**batch).loss; loss.backward(); opt.step(); opt.zero_grad(); th.step()

Why plain DDP over the whole wrapped model is right:
  * DDP reduces only parameters with requires_grad=True when it is built. Wrapping
    froze the predecessor, so only the successors are reduced; the frozen model is
    not a separate module to keep outside (as a distillation teacher would be).
  * The replacement draws are a pure function of (seed, step, group, call), so every
    rank runs the same modules at the same step without any communication.
  * find_unused_parameters=False is enough: a group that runs its predecessor adds
    0 * sum(successor params) to its output (TheseusGroup._keep_successor_in_graph),
    so every successor parameter gets a (zero) gradient and the reducer never waits
    for a parameter that took no part in the forward.
  * With unfreeze_rest=True the rest-copies start training when the rate reaches 1,
    after DDP fixed its parameter list: call wrap_ddp(th) again at that step
    (th.phase becomes "successor") so that they are reduced too.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from .engine import Theseus


def wrap_ddp(th: Theseus, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(th.model, find_unused_parameters=False, **ddp_kwargs)``."""
    from torch.nn.parallel import DistributedDataParallel

    if th.unfreeze_rest and th.phase != "successor":
        warnings.warn(
            "unfreeze_rest=True: the rest-copies start training when the rate reaches 1, but DDP only reduces "
            "parameters that require gradients now. Call wrap_ddp(th) again once th.phase == 'successor'.",
            RuntimeWarning, stacklevel=2,
        )
    ddp_kwargs.setdefault("find_unused_parameters", False)
    return DistributedDataParallel(th.model, **ddp_kwargs)
