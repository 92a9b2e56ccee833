"""The successor's speed-up over its predecessor in ONNX Runtime on the CPU, beside eager PyTorch,
with the FLOPs ratio as the limit.

The predecessors and successors are those of benchmarks/speed.py (random weights: speed does not
depend on trained values): BERT-base 12 -> 6 layers (sequence 128), ViT-S/16 12 -> 6 blocks and
ResNet-50 [3, 4, 6, 3] -> [2, 2, 3, 2] (224 x 224). Each model is exported with `torch.onnx.export`
(dynamic batch axis) and run by an `onnxruntime.InferenceSession` on the CPU execution provider with
`--threads` intra-op threads (torch gets the same number). Predecessor and successor alternate on
every repeat after a warm-up, in both runtimes; the median is reported. Each row also records the
largest difference between ONNX Runtime's and PyTorch's outputs on the timed input.

    OMP_NUM_THREADS=1 python benchmarks/onnx_speed.py --threads 1   # full run; benchmarks/results/onnx_speed.json
    python benchmarks/onnx_speed.py --quick --threads 1             # tiny models, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, conditions, finish, quiet_transformers  # noqa: E402
from speed import cases, depth_of, halve_per_stage  # noqa: E402  (the same models and targets)

from theseus_general import Theseus  # noqa: E402
from theseus_general.measure import count_flops, measure_latency  # noqa: E402


class TensorForward(nn.Module):
    """A model with positional tensor inputs and one tensor output: what an ONNX graph takes and gives."""

    def __init__(self, model: nn.Module, keys: Sequence[str]):
        super().__init__()
        self.model, self.keys = model, list(keys)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.keys:
            return self.model(*inputs)
        return self.model(**dict(zip(self.keys, inputs))).logits


def as_tuple(sample: Any):
    """(input names, tensors) of a speed.py sample: a dict of text inputs or an image batch."""
    if isinstance(sample, dict):
        return list(sample), tuple(sample.values())
    return [], (sample,)


def onnx_export(model: nn.Module, inputs: tuple, names: List[str], path: str, exporter: str) -> None:
    input_names = names or ["pixel_values"]
    if exporter == "dynamo":
        from torch.export import Dim

        shapes = (tuple({0: Dim.AUTO} for _ in input_names),)
        torch.onnx.export(model, inputs, path, input_names=input_names, output_names=["logits"], dynamo=True,
                          dynamic_shapes=shapes, verbose=False)
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(model, inputs, path, input_names=input_names, output_names=["logits"], dynamo=False,
                              dynamic_axes={**{n: {0: "batch"} for n in input_names}, "logits": {0: "batch"}})


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_latency(sessions: Dict[str, Any], feeds: Dict[str, Dict[str, Any]], warmup: int, repeats: int) -> Dict[str, float]:
    """Median seconds per run for each session, alternating between them on every repeat (as measure_latency)."""
    times: Dict[str, list] = {name: [] for name in sessions}
    for _ in range(warmup):
        for name, s in sessions.items():
            s.run(None, feeds[name])
    for _ in range(repeats):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(quick: bool, threads: int, exporter: str, repeats: int = 0, warmup: int = 0) -> Dict[str, Any]:
    import onnxruntime as ort

    rows = []
    workdir = tempfile.mkdtemp(prefix="onnx_speed-")
    for case in cases(quick):
        torch.manual_seed(0)
        predecessor = case["build"](quick).eval()
        target = case["targets"][0]  # one successor per family: the first of speed.py's
        if target.get("successor_depth") == "halve_per_stage":
            target = {"successor_depth": halve_per_stage(predecessor)}
        engine = Theseus(predecessor, **target)
        try:
            successor = engine.export().eval()
        finally:
            engine.unwrap()
        models = {"predecessor": predecessor, "successor": successor}
        names, first = as_tuple(next(iter(case["samples"].values()))(torch.device("cpu")))
        wrapped = {k: TensorForward(m, names).eval() for k, m in models.items()}
        sessions = {}
        started = time.time()
        for k, m in wrapped.items():  # once per model: the batch axis is dynamic
            path = os.path.join(workdir, f"{case['name'].replace('/', '_')}-{k}.onnx")
            onnx_export(m, first, names, path, exporter)
            sessions[k] = ort_session(path, threads)
        export_s = time.time() - started
        for batch, make in case["samples"].items():
            sample = make(torch.device("cpu"))
            _, inputs = as_tuple(sample)
            feeds, diffs = {}, {}
            for k, m in wrapped.items():
                feeds[k] = {i.name: x.numpy() for i, x in zip(sessions[k].get_inputs(), inputs)}
                with torch.no_grad():
                    expected = m(*inputs)
                diffs[k] = float((torch.from_numpy(sessions[k].run(None, feeds[k])[0]) - expected).abs().max())
            n = repeats or (5 if quick else max(5, min(20, 80 // batch)))
            w = warmup or (1 if quick else 2)
            started = time.time()
            eager = measure_latency(models, sample, warmup=w, repeats=n)
            onnx = ort_latency(sessions, feeds, warmup=w, repeats=n)
            seconds = time.time() - started
            flops = {k: count_flops(m, sample) for k, m in models.items()}
            rows.append({
                "model": case["name"], "input": case["input"], "batch": batch,
                "predecessor_depth": depth_of(predecessor), "successor_depth": depth_of(successor),
                "flops_ratio": flops["predecessor"] / flops["successor"],
                "eager_predecessor_s": eager["predecessor"], "eager_successor_s": eager["successor"],
                "eager_speedup": eager["predecessor"] / eager["successor"],
                "onnx_predecessor_s": onnx["predecessor"], "onnx_successor_s": onnx["successor"],
                "onnx_speedup": onnx["predecessor"] / onnx["successor"],
                "onnx_vs_eager_successor": eager["successor"] / onnx["successor"],
                "onnx_max_abs_diff": diffs, "repeats": n, "export_s": export_s, "timing_wall_s": seconds,
                "loadavg_1min_after": os.getloadavg()[0],
            })
            print(f"  {case['name']} batch {batch}: {n} repeats in {seconds:.0f} s (export {export_s:.0f} s)", flush=True)
    return {"benchmark": "onnx_speed", "quick": quick, "exporter": exporter, "onnxruntime": ort.__version__,
            "provider": "CPUExecutionProvider", "ort_threads": threads,
            "method": "alternating predecessor/successor after a warm-up, median; eager: measure_latency; "
                      "onnx: InferenceSession.run", "rows": rows}


def print_table(report: Dict[str, Any]) -> None:
    c = report["conditions"]
    print(f"\nSpeed-up in ONNX Runtime {report['onnxruntime']} (CPU, {report['ort_threads']} threads, {report['exporter']} "
          f"exporter) beside eager PyTorch ({c['torch_threads']} threads); load avg {c['loadavg_1_5_15'][0]:.2f} at start")
    print(f"{'model':<12} {'depth':>26} {'batch':>5} {'ORT pred ms':>11} {'ORT succ ms':>11} {'ORT x':>6} "
          f"{'eager x':>7} {'FLOPs x':>7}")
    for r in report["rows"]:
        depth = f"{r['predecessor_depth']} -> {r['successor_depth']}"
        print(f"{r['model']:<12} {depth:>26} {r['batch']:>5} {1e3 * r['onnx_predecessor_s']:>11.1f} "
              f"{1e3 * r['onnx_successor_s']:>11.1f} {r['onnx_speedup']:>5.2f}x {r['eager_speedup']:>6.2f}x "
              f"{r['flops_ratio']:>6.2f}x")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, seconds (smoke test)")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads (default 1)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx.export(dynamo=True) (torch's default) or the TorchScript exporter (dynamo=False)")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats per batch (default: by batch size)")
    p.add_argument("--warmup", type=int, default=0, help="untimed repeats first (default 2; 1 with --quick)")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/onnx_speed[_quick].json)")
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_transformers()
    started = time.time()
    before = conditions(torch.device("cpu"))
    before["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    report = run(args.quick, args.threads, args.exporter, args.repeats, args.warmup)
    report["conditions"] = before
    path = args.output or os.path.join(RESULTS_DIR, "onnx_speed_quick.json" if args.quick else "onnx_speed.json")
    finish(report, path, "onnx_speed.py", argv, started)
    print_table(report)
    print(f"wrote {path} ({report['total_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
