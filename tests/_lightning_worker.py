"""A tiny Theseus run under lightning.Trainer with TheseusCallback: shared by tests/test_lightning.py
and its two-process (DDP on gloo, CPU) test, which starts this file once per rank:

    RANK=0 LOCAL_RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/_lightning_worker.py OUT_DIR

Each rank trains twice, with module matching first ("matched") and without ("plain"), and writes its
successor and rest weights (weights-<run>-<rank>.safetensors) and what the engine did
(run-<run>-<rank>.json); rank 0 also writes the exported successor to OUT_DIR/successor-<run>.
"""

import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import ChainModel  # noqa: E402

import lightning as L  # noqa: E402

from theseus_general import Theseus  # noqa: E402
from theseus_general.integrations.lightning import TheseusCallback  # noqa: E402

GLOBAL_BATCH, SAMPLES = 8, 48


class ChainTask(L.LightningModule):
    """The user's LightningModule: the wrapped model as an attribute, the engine's trainable set to the optimiser."""

    def __init__(self, th: Theseus, lr: float = 0.05):
        super().__init__()
        self.th, self.lr = th, lr
        self.model = th.model
        self.batches = 0

    def training_step(self, batch, batch_idx):
        self.batches += 1
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.th.trainable_parameters(), lr=self.lr, weight_decay=0.1)


def loader(batch_size: int = GLOBAL_BATCH, samples: int = SAMPLES, rank: int = 0, world_size: int = 1):
    """Batches of `batch_size` in a fixed order; with world_size > 1, this rank's slice of each of them."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(samples, 4, generator=g), torch.randint(0, 2, (samples,), generator=g)
    per_rank = batch_size // world_size
    rows = [i for start in range(0, samples, batch_size) for i in range(start + rank * per_rank, start + (rank + 1) * per_rank)]
    data = torch.utils.data.TensorDataset(x[rows], y[rows])
    return torch.utils.data.DataLoader(data, batch_size=per_rank, shuffle=False)


def engine(**options) -> Theseus:
    return Theseus(ChainModel(depth=6, seed=0), successor_depth=3, adapter="generic", container="blocks", seed=3, **options)


def trainer(callback: TheseusCallback, world_size: int = 1, **options) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=world_size, strategy="ddp" if world_size > 1 else "auto", logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    callbacks=[callback])
    settings.update(options)
    return L.Trainer(**settings)


def run(out: str, rank: int = 0, world_size: int = 1, max_steps: int = 5) -> None:
    """Two runs: "matched" (recipe="matching": module matching first) and "plain" (match_steps=0)."""
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    for name, match_steps in (("matched", None), ("plain", 0)):
        th = engine(recipe="matching")
        callback = TheseusCallback(th, match_steps=match_steps, export_dir=os.path.join(out, f"successor-{name}"))
        task = ChainTask(th)
        # each rank reads its slice of every global batch (not Lightning's DistributedSampler, whose order
        # differs from one process's)
        trainer(callback, world_size, max_steps=max_steps, use_distributed_sampler=False).fit(
            task, loader(GLOBAL_BATCH, rank=rank, world_size=world_size))
        save_file({k: v.contiguous() for k, v in th.state_dict()["tensors"].items()},
                  os.path.join(out, f"weights-{name}-{rank}.safetensors"))
        with open(os.path.join(out, f"run-{name}-{rank}.json"), "w") as f:
            json.dump({"steps": th.step_count, "rates": callback.rates, "matched": callback.matched_steps,
                       "global_step": task.trainer.global_step}, f)


if __name__ == "__main__":
    from _gloo import run_as_rank

    run_as_rank(run)
