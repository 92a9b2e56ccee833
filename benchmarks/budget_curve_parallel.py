"""One budget of the budget curve (issue 23), split over many processes: for a machine with many cores
and one GPU, where benchmarks/budget_curve.sh's two sequential queues would leave most of it idle.

The runs and the choices are quality.py's own, exactly as one `quality.py --lr-grid ... --extend-grid N
--seeds 0 1 2 3 4` would make them; only the order differs, so that independent runs overlap:

  1. seed 0 at every grid point of every method, one process each, and also at the points the grid
     extension may reach (``--prerun-extensions``: that many grid steps beyond each edge), so that an
     extension, when the choice asks for one, is already run;
  2. per method, as soon as its points are in: ``quality.py --seeds 0 --lr-grid GRID --extend-grid N
     --reuse <its points>`` makes the protocol's choice (on dev, seed 0; a further extension it needs
     and that was not pre-run runs here);
  3. per method and seed k = 1..4: ``--seeds 0 k ... --reuse <step 2>`` runs seed k at the chosen
     settings (seed 0 and the grid are taken over, so the choice is the same);
  4. ``quality.py --merge`` of the step-3 parts into the budget's report.

Pre-run extension points the choice never reaches stay in their part files: run, never used. Every
process runs with one thread; ``--workers`` processes at a time. ``--deadline`` stops what still runs
after that many seconds and merges whatever is complete (the report then says ``"complete": false``).

    python benchmarks/budget_curve_parallel.py --steps 6400 --lr-grid 1e-3 2e-3 4e-3 --extend-grid 2 \\
        --kd-grid 2:0.5 --workers 14 --out-dir /tmp/curve -- \\
        --task vision --arch vit --ratio 0.25 --predecessor PRED.safetensors --data-dir DATA --device cuda
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from quality import KD_METHODS, merge  # noqa: E402


def extension_points(grid: List[float], steps: int) -> List[float]:
    """The lrs `steps` grid extensions could reach at each edge, by quality.grid_extension's own arithmetic
    (the same floats, so --reuse finds them)."""
    lrs = sorted(grid)
    low, high, out = list(lrs), list(lrs), []
    for _ in range(steps):
        low.insert(0, low[0] * low[0] / low[1])
        high.append(high[-1] * high[-1] / high[-2])
        out += [low[0], high[-1]]
    return out


class Runner:
    """Runs quality.py commands, at most `workers` at once, each with a log; stops them all at the deadline."""

    def __init__(self, workers: int, deadline: float, log_dir: str, python: str):
        self.pool = cf.ThreadPoolExecutor(max_workers=workers)
        self.deadline, self.log_dir, self.python = deadline, log_dir, python
        self.lock, self.procs, self.records = threading.Lock(), set(), []

    def submit(self, name: str, argv: List[str]) -> "cf.Future[bool]":
        return self.pool.submit(self._run, name, argv)

    def _run(self, name: str, argv: List[str]) -> bool:
        left = self.deadline - time.time()
        if left <= 0:
            self._record(name, argv, None, 0.0, "not started: past the deadline")
            return False
        started = time.time()
        env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
        with open(os.path.join(self.log_dir, f"{name}.log"), "w") as log:
            proc = subprocess.Popen([self.python, os.path.join(HERE, "quality.py"), *argv], stdout=log,
                                    stderr=subprocess.STDOUT, env=env)
            with self.lock:
                self.procs.add(proc)
            try:
                rc: Optional[int] = proc.wait(timeout=left)
                note = "ok" if rc == 0 else f"exit status {rc}"
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc, note = None, "stopped at the deadline"
            finally:
                with self.lock:
                    self.procs.discard(proc)
        self._record(name, argv, rc, time.time() - started, note)
        return rc == 0

    def _record(self, name: str, argv: List[str], rc: Optional[int], seconds: float, note: str) -> None:
        with self.lock:
            self.records.append({"name": name, "argv": argv, "returncode": rc, "seconds": round(seconds, 1), "note": note})
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {note} ({seconds:.0f} s)", flush=True)


def method_chain(runner: Runner, method: str, args: argparse.Namespace, base: List[str], parts: str) -> Tuple[List[str], bool]:
    """Steps 1-3 for one method: the part files to merge, and whether every seed finished."""
    pairs = args.kd_grid if method in KD_METHODS and args.kd_grid else [None]
    grid_flags = ["--lr-grid", *map(repr, args.lr_grid), "--extend-grid", str(args.extend_grid)]
    kd_flags = ["--kd-grid", *args.kd_grid] if method in KD_METHODS and args.kd_grid else []
    points = []
    for lr in list(args.lr_grid) + extension_points(args.lr_grid, min(args.prerun_extensions, args.extend_grid)):
        for pair in pairs:
            tag = f"{method}_lr{lr:g}" + (f"_kd{pair.replace(':', '-')}" if pair else "")
            out = os.path.join(parts, f"point_{tag}.json")
            flags = ["--lr-grid", repr(lr)] + (["--kd-grid", pair] if pair else [])
            points.append((out, runner.submit(f"point_{tag}", [*base, "--seeds", "0", "--methods", method, *flags,
                                                                 "--output", out])))
    done = [out for out, future in points if future.result()]
    choice = os.path.join(parts, f"{method}_choice.json")
    reuse = ["--reuse", *done] if done else []
    if not runner.submit(f"{method}_choice", [*base, "--seeds", "0", "--methods", method, *grid_flags, *kd_flags,
                                              *reuse, "--output", choice]).result():
        return [], False
    seeds = []
    for seed in args.seeds[1:]:
        out = os.path.join(parts, f"{method}_s{seed}.json")
        seeds.append((out, runner.submit(f"{method}_s{seed}", [*base, "--seeds", str(args.seeds[0]), str(seed),
                                                               "--methods", method, *grid_flags, *kd_flags,
                                                               "--reuse", choice, "--output", out])))
    finished = [out for out, future in seeds if future.result()]
    return finished or [choice], len(finished) == len(seeds)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--methods", nargs="+", default=["theseus", "finetune_trained", "kd"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="the first is the grid's seed")
    p.add_argument("--lr-grid", type=float, nargs="+", required=True)
    p.add_argument("--extend-grid", type=int, default=2)
    p.add_argument("--prerun-extensions", type=int, default=1, help="grid extensions run ahead at each edge")
    p.add_argument("--kd-grid", nargs="+", default=None, metavar="T:ALPHA")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--deadline", type=float, default=None, help="seconds; stop what still runs then, merge what is done")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--name", default=None, help="the merged report's file name in --out-dir (default budget_s<STEPS>.json)")
    p.add_argument("quality_args", nargs=argparse.REMAINDER, help="after --: quality.py's task flags")
    args = p.parse_args(argv)
    rest = [a for a in args.quality_args if a != "--"]
    for own in ("--steps", "--seeds", "--methods", "--lr-grid", "--kd-grid", "--output", "--threads", "--reuse", "--merge"):
        if own in rest:
            raise SystemExit(f"error: {own} is this script's to set; remove it from quality.py's flags")
    parts, logs = os.path.join(args.out_dir, "parts"), os.path.join(args.out_dir, "logs")
    os.makedirs(parts, exist_ok=True)
    os.makedirs(logs, exist_ok=True)
    started = time.time()
    deadline = started + (args.deadline if args.deadline else 10 ** 9)
    runner = Runner(args.workers, deadline, logs, sys.executable)
    sharing = f"up to {args.workers} quality.py processes of benchmarks/budget_curve_parallel.py at once"
    base = [*rest, "--steps", str(args.steps), "--threads", "1", "--sharing", sharing]
    methods = sorted(args.methods, key=lambda m: m != "theseus")  # the slowest chain first
    with cf.ThreadPoolExecutor(max_workers=len(methods)) as chains:
        finished = dict(zip(methods, chains.map(lambda m: method_chain(runner, m, args, base, parts), methods)))
    runner.pool.shutdown()
    name = args.name or f"budget_s{args.steps}.json"
    output = os.path.join(args.out_dir, name)
    files = [f for m in methods for f in finished[m][0]]
    merged_ok = False
    if files:
        try:
            merge(files, output)
            merged_ok = True
        except SystemExit as error:  # quality.merge refuses parts that do not belong together
            print(f"merge failed: {error}", flush=True)
    status = {"steps": args.steps, "seconds": round(time.time() - started, 1), "merged": output if merged_ok else None,
              "complete_methods": [m for m in methods if finished[m][1]],
              "command": "python benchmarks/budget_curve_parallel.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "processes": runner.records}
    with open(os.path.join(args.out_dir, f"status_s{args.steps}.json"), "w") as f:
        json.dump(status, f, indent=2)
    print(f"budget {args.steps}: {len(status['complete_methods'])}/{len(methods)} methods complete, "
          f"{status['seconds']:.0f} s; merged: {status['merged']}", flush=True)
    return status


if __name__ == "__main__":
    main()
