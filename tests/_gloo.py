"""Two real CPU processes (gloo) against one: what the DDP and FSDP tests share.

A worker module defines ``run(out_dir, rank=0, world_size=1)`` and ends with
``if __name__ == "__main__": run_as_rank(run)``; a test calls
``run_two_ranks(worker_file, run, tmp_path)``. Extra command-line arguments reach
``run(out_dir, rank, world_size, *args)``.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(worker: str, out: Path, args: Sequence[str]) -> List[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, worker, str(out), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish_ranks(procs: List[subprocess.Popen], timeout: int) -> bool:
    """Wait for both ranks, asserting each succeeded (with its output); False if a rank hung past
    `timeout`, after killing both."""
    for p in procs:
        try:
            output, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
                q.communicate()
            return False
        assert p.returncode == 0, output
    return True


def run_two_ranks(worker: str, run: Optional[Callable[..., None]], out: Path, timeout: int = 120,
                  args: Sequence[str] = ()) -> Path:
    """Start ranks 0 and 1 of `worker` writing to `out` (`args` follow `out` on their command line);
    meanwhile run(out/"single") in this process (one rank, the whole batch) unless `run` is None.
    Fails with a rank's output if it fails. Returns out/"single".

    A pair that hangs past `timeout` is killed and started once more on a fresh port: on a loaded
    2-core CI machine gloo's start-up has hung once in many runs (the same test takes about 10 s).
    A second hang fails the test, so a deadlock of our own still shows."""
    procs = start_ranks(worker, out, args)
    single = out / "single"
    if run is not None:
        single.mkdir()
        run(str(single))
    if not finish_ranks(procs, timeout):
        if not finish_ranks(start_ranks(worker, out, args), timeout):
            raise AssertionError(f"{worker}: both ranks still running after {timeout} s, twice on fresh ports")
    return single


def run_as_rank(run: Callable[..., None]) -> None:
    """A worker's main: join the gloo group from torchrun-style variables and run this rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        run(sys.argv[1], dist.get_rank(), dist.get_world_size(), *sys.argv[2:])
        # both ranks done before either tears gloo down: a rank that leaves while the other still
        # talks to it can die in gloo's threads at exit ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # the barrier did not always suffice (one abort in CI, 2026-12-05, after both ranks had finished): a rank
    # whose work is done and written leaves without running C++ destructors, where gloo's threads can abort it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def train_on_rank_slice(th, forward, opt, out: str, rank: int, world_size: int, steps: int, global_batch: int) -> None:
    th.attach(opt)  # under DDP idle successors get the zero anchor; the run's optimiser skips them
    """The workers' loop: each step's global batch (seeded by the step), this rank's slice of it,
    a mean loss per rank (DDP and FSDP average the gradients over ranks); writes the draws of
    every step to out/draws-<rank>.json."""
    import json

    import torch

    per_rank = global_batch // world_size
    draws = []
    forward.train()
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(global_batch, 4, generator=g), torch.randint(0, 2, (global_batch,), generator=g)
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        loss = torch.nn.functional.cross_entropy(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        draws.append({str(k): v for k, v in sorted(th.last_decisions.items())})
        th.step()
    with open(os.path.join(out, f"draws-{rank}.json"), "w") as f:
        json.dump(draws, f)
