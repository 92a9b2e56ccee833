"""benchmarks/onnx_speed.py --quick runs and records what docs/results.md reads from it."""

from __future__ import annotations

import math

import pytest

from test_benchmarks_quick import _as_list, check_conditions, keep_threads, load, read  # noqa: F401  (fixture)

pytest.importorskip("onnxruntime")


def test_onnx_speed_quick(tmp_path):
    path = tmp_path / "onnx_speed.json"
    load("onnx_speed").main(["--quick", "--threads", "1", "--exporter", "torchscript", "--output", str(path)])
    report = read(path)
    check_conditions(report)
    assert report["exporter"] == "torchscript" and report["provider"] == "CPUExecutionProvider"
    assert {r["model"] for r in report["rows"]} == {"BERT-tiny", "ViT-tiny", "ResNet-tiny"}
    for row in report["rows"]:
        # what ONNX Runtime timed is the model PyTorch timed: the same outputs on the timed input
        assert set(row["onnx_max_abs_diff"]) == {"predecessor", "successor"}
        assert max(row["onnx_max_abs_diff"].values()) < 1e-4, row
        # the successor dropped blocks and nothing else (see test_speed_quick)
        depth_ratio = sum(_as_list(row["predecessor_depth"])) / sum(_as_list(row["successor_depth"]))
        assert 1 < row["flops_ratio"] < depth_ratio + 1e-9
        for key in ("onnx_predecessor_s", "onnx_successor_s", "eager_predecessor_s", "eager_successor_s"):
            assert math.isfinite(row[key]) and row[key] > 0
    assert sorted(r["batch"] for r in report["rows"] if r["model"] == "BERT-tiny") == [1, 4]
