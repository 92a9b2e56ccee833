"""One rank of a tiny FSDP2 Theseus run (gloo, CPU); tests start it with torchrun-style env vars.

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/_fsdp_worker.py OUT_DIR

Sharding: ``fully_shard`` on each replacement group (a TheseusGroup holds the
group's predecessor blocks and its successor, so both are gathered for the
group's forward) and then on the whole wrapped model. Each rank trains on its
slice of the same global batch and writes its per-step replacement draws
(draws-<rank>.json) and the engine's gathered tensors (weights-<rank>.safetensors).
Every rank calls th.export() (a collective on a sharded model); rank 0 writes the exported
successor model (exported.safetensors) and, for the equality check only, the export of an
unsharded twin loaded with the gathered state (twin.safetensors); rank 1 writes what its
export() returned (export-<rank>.txt).
With WORLD_SIZE unset, run(out, world_size=1) trains without sharding on the whole batch.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gloo import train_on_rank_slice  # noqa: E402
from conftest import ChainModel  # noqa: E402

from theseus_general import ConstantScheduler, Theseus  # noqa: E402

STEPS, GLOBAL_BATCH = 6, 8


def engine_weights(th: Theseus) -> dict:
    """Every tensor the engine trains (successors and, with train_rest, the copies of the stem
    and head), gathered whole (an FSDP2 parameter is a sharded DTensor)."""
    return {name: (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone().contiguous()
            for name, t in th.state_dict()["tensors"].items()}


def engine() -> Theseus:
    return Theseus(ChainModel(depth=6, seed=0), successor_depth=3, adapter="generic", container="blocks",
                   scheduler=ConstantScheduler(0.5), seed=11)


def export_through_twin(weights: dict, meta: dict):
    """What users had to do before export() handled sharded models, kept as a check of it: an
    unsharded twin (the same model and plan) with the gathered engine state loaded."""
    twin = engine()
    twin.load_state_dict({"tensors": weights, "meta": meta})
    return twin.export()


def run(out: str, rank: int = 0, world_size: int = 1) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    th = engine()
    if world_size > 1:
        from torch.distributed.fsdp import fully_shard

        for group in th.groups:
            fully_shard(group)
        fully_shard(th.model)
    opt = torch.optim.SGD(th.trainable_parameters(), lr=0.1)
    train_on_rank_slice(th, th.model, opt, out, rank, world_size, STEPS, GLOBAL_BATCH)
    weights = engine_weights(th)  # a collective under FSDP: every rank takes part
    save_file(weights, os.path.join(out, f"weights-{rank}.safetensors"))
    exported = th.export()  # sharded: a collective, the model on rank 0 and None on the others
    if rank != 0:
        with open(os.path.join(out, f"export-{rank}.txt"), "w") as f:
            f.write(repr(exported))
        return
    save_file({k: v.contiguous() for k, v in exported.state_dict().items()}, os.path.join(out, "exported.safetensors"))
    if world_size > 1:
        twin = export_through_twin(weights, th.state_dict()["meta"])
        save_file({k: v.contiguous() for k, v in twin.state_dict().items()}, os.path.join(out, "twin.safetensors"))


if __name__ == "__main__":
    from _gloo import run_as_rank

    run_as_rank(run)
