"""benchmarks/gpu_check.py --toy and benchmarks/compile.py --quick run and write the fields their docs promise."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from test_benchmarks_quick import keep_threads, load  # noqa: F401 - keep_threads is an autouse fixture

TRAINING = {"plain_eager", "plain_compiled", "theseus_eager", "theseus_compiled"}


def _check_compiled(run: dict) -> None:
    assert "error" not in run, run
    assert run["graphs_compiled_in_warmup"] >= 1  # torch.compile really traced something
    dynamo = run["dynamo"]
    assert dynamo["graphs"] == run["graphs_compiled_in_warmup"] + run["graphs_compiled_after_warmup"]
    assert isinstance(dynamo["recompile_limit_hit"], bool)


def test_gpu_check_toy(tmp_path):
    path = tmp_path / "gpu_check.json"
    load("gpu_check").main(["--toy", "--backend", "eager", "--warmup", "1", "--steps", "1", "--output", str(path)])
    report = json.loads(path.read_text())
    assert report["conditions"]["device"] == "cpu"
    assert set(report["training"]) == TRAINING
    for name, run in report["training"].items():
        assert "error" not in run, (name, run)
        assert run["step_s"] > 0 and run["steps_run"] == run["warmup_steps"] + 1
        assert run["vs_plain_eager"] == pytest.approx(run["step_s"] / report["training"]["plain_eager"]["step_s"])
    _check_compiled(report["training"]["plain_compiled"])
    _check_compiled(report["training"]["theseus_compiled"])
    assert report["export"]["layers"] == 2 and report["export"]["type"] == "BertForSequenceClassification"
    assert report["export"]["successor_params"] < report["export"]["predecessor_params"]
    rows = report["inference"]["rows"]
    assert [r["batch"] for r in rows] == [1, 8, 64]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["predecessor_s"] / r["successor_s"])
    assert report["inference"]["flops_ratio"] > 1.5  # 4 -> 2 layers of a model that is mostly layers
    assert report["command"].startswith("python benchmarks/gpu_check.py --toy")
    _check_deepspeed(report["deepspeed"])


def _check_deepspeed(deepspeed: dict) -> None:
    """The DeepSpeed part (benchmarks/deepspeed_check.py --toy, DeepSpeed's CPU accelerator): ZeRO-2 and
    ZeRO-3 trained and exported the successor the unsharded engine exports."""
    if importlib.util.find_spec("deepspeed") is None:  # CI installs it (the [test] extra)
        assert "deepspeed is not installed" in deepspeed["skipped"]
        return
    assert deepspeed["conditions"]["deepspeed_accelerator"] == "cpu", deepspeed
    assert set(deepspeed["stages"]) == {"zero2", "zero3"}
    for name, stage in deepspeed["stages"].items():
        assert "error" not in stage, (name, stage.get("traceback"))
        assert stage["engine_stage"] == int(name[-1]) and stage["theseus_steps"] == stage["steps_run"]
        assert (stage["partitioned_parameters"] > 0) == (name == "zero3")  # ZeRO-3 really partitioned
        assert stage["step_s"] > 0 and stage["loss_last"] is not None
        export = stage["export"]
        assert export["type"] == "BertForSequenceClassification" and export["layers"] == 2 and export["runs"]
        assert export["equals_unsharded_export"] and export["max_abs_diff_to_unsharded"] == 0.0
        assert export["params"] < export["predecessor_params"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_check_without_cuda_says_so_and_exits_nonzero(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        load("gpu_check").main(["--output", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_compile_quick(tmp_path):
    path = tmp_path / "compile.json"
    load("compile").main(["--quick", "--backend", "eager", "--warmup", "2", "--steps", "4", "--output", str(path)])
    report = json.loads(path.read_text())
    assert report["conditions"]["torch_threads"] == 1 and report["setup"]["backend"] == "eager"
    assert set(report["runs"]) == TRAINING
    for name in ("plain_compiled", "theseus_compiled"):
        run = report["runs"][name]
        _check_compiled(run)
        # the property the engine promises: new draw patterns after warm-up compile nothing new
        assert run["graphs_compiled_after_warmup"] == 0 and run["dynamo"]["recompile_limit_hit"] is False, run
        eager = report["runs"][name.replace("compiled", "eager")]
        assert run["speedup_vs_eager"] == pytest.approx(eager["step_s"] / run["step_s"])
