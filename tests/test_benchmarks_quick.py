"""Every benchmark script's --quick mode runs and writes the JSON fields its README promises."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os

import pytest
import torch

from conftest import ChainModel, save_tiny_classifier, tiny_bert, write_idx_dataset
from theseus_general.recipes import get_recipe

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()  # the scripts set torch's thread count
    yield
    torch.set_num_threads(threads)


def read(path) -> dict:
    with open(path) as f:
        return json.load(f)


def check_conditions(report: dict) -> None:
    c = report["conditions"]
    assert c["torch_threads"] == 1 and len(c["loadavg_1_5_15"]) == 3 and c["device"] == "cpu"


def _as_list(depth):
    return depth if isinstance(depth, list) else [depth]


def test_speed_quick(tmp_path):
    path = tmp_path / "speed.json"
    load("speed").main(["--quick", "--threads", "1", "--output", str(path)])
    report = read(path)
    check_conditions(report)
    assert {r["model"] for r in report["rows"]} == {"BERT-tiny", "ViT-tiny", "ResNet-tiny"}
    for row in report["rows"]:
        # the export dropped blocks and nothing else: fewer FLOPs, but no more than the blocks' share (the
        # rest, and a stage's downsampling block that is kept, cost the same in both)
        depth_ratio = sum(_as_list(row["predecessor_depth"])) / sum(_as_list(row["successor_depth"]))
        assert 1 < row["flops_ratio"] < depth_ratio and row["successor_params"] < row["predecessor_params"]
    resnet = next(r for r in report["rows"] if r["model"] == "ResNet-tiny")
    assert resnet["successor_depth"] == [1, 1, 1, 1]  # ceil(2 / 2) per stage
    bert = next(r for r in report["rows"] if r["model"] == "BERT-tiny")
    assert (bert["predecessor_depth"], bert["successor_depth"]) == (4, 2)


def test_overhead_quick(tmp_path):
    path = tmp_path / "overhead.json"
    load("overhead").main(["--quick", "--threads", "1", "--repeats", "3", "--output", str(path)])
    report = read(path)
    check_conditions(report)
    variants = {"plain_full", "plain_frozen", "theseus_p0", "theseus_p0.5", "theseus_p1",
                "successor_frozen_rest", "successor_full"}
    assert set(report["timing"]) == variants and set(report["memory"]) == variants
    assert all(t["n"] == 3 for t in report["timing"].values())  # --repeats is honoured
    assert math.isfinite(report["engine_overhead_p0"])
    assert report["config"]["depth"] < report["config"]["layers"]


def test_overhead_engine_variants_run_what_they_are_named_for():
    # theseus_p0 times the predecessor path (every group its blocks), theseus_p1 the successor path
    overhead = load("overhead")
    cfg = overhead.config(quick=True)
    batch = overhead.make_batch(cfg, torch.device("cpu"))
    for name, successor_ran in (("theseus_p0", False), ("theseus_p1", True)):
        variant = overhead.build_variant(name, cfg, torch.device("cpu"))
        before = [p.detach().clone() for s in variant.keep.successors() for p in s.parameters()]
        variant.step(batch)
        assert set(variant.keep.last_decisions.values()) == {successor_ran}, name
        moved = any(not torch.equal(a, p) for a, p in zip(before, (p for s in variant.keep.successors() for p in s.parameters())))
        assert moved == successor_ran, name  # idle successors stay put: the attached optimiser skips them


def test_plain_frozen_reference_trains_the_same_parameter_count_as_the_engine():
    overhead = load("overhead")
    cfg = overhead.config(quick=True)
    ref = overhead.build_variant("plain_frozen", cfg, torch.device("cpu"))
    engine = overhead.build_variant("theseus_p0", cfg, torch.device("cpu"))
    count = lambda v: sum(p.numel() for g in v.optimizer.param_groups for p in g["params"])  # noqa: E731
    assert count(ref) == count(engine) > 0


def test_quality_quick_and_its_report(tmp_path):
    path = tmp_path / "quality_vit_r0.5.json"
    data = write_idx_dataset(tmp_path / "fashion-mnist")  # the test's own data: no system dataset needed
    load("quality").main(["--quick", "--data-dir", data, "--output", str(path)])
    report = read(path)
    assert report["complete"] and report["predecessor_unchanged"]
    assert set(report["summary"]) == {"theseus", "theseus_paper", "finetune_trained", "finetune_initial", "kd"}
    for method, row in report["summary"].items():
        assert row["seeds"] == 2 and set(report["runs"][method]) == {"0", "1"}
        assert 0 <= row["test_mean"] <= 1 and row["test_std"] >= 0
    assert report["settings"]["steps"] == 6
    # each Theseus run records the start blocks chosen by matching error ({group: block}; empty with
    # the default recipe, which does not match; else the one group's successor is a copy of block 0 or 1)
    for run in report["runs"]["theseus"].values():
        assert set(run["start_blocks"]) <= {"0"} and set(run["start_blocks"].values()) <= {1}
        assert run["recipe"] == "default"  # and which recipe ran: the ViT family's
    assert "start_blocks" not in report["runs"]["finetune_trained"]["0"]
    assert report["depth"] == {"predecessor": {"blocks": 2}, "successor": {"blocks": 1}}
    assert report["data"].endswith(os.path.join("fashion-mnist"))
    # rule 3's paired intervals are kept with the result: Theseus minus the best baseline by test mean,
    # per seed, on test and on dev, and against each baseline
    paired = report["paired"]
    best = max(("finetune_trained", "finetune_initial", "kd"), key=lambda m: report["summary"][m]["test_mean"])
    assert paired["test"]["best_baseline"] == paired["dev"]["best_baseline"] == best
    for split in ("test", "dev"):
        assert paired[split]["differences"] == pytest.approx(
            [report["runs"]["theseus"][s][split] - report["runs"][best][s][split] for s in ("0", "1")])
    assert set(paired["against_each_baseline"]) == {"finetune_trained", "finetune_initial", "kd"}
    assert paired["against_each_baseline"][best]["mean"] == pytest.approx(paired["test"]["mean"])

    # The same run split by seed into two parts merges back into the same summary
    for seed in ("0", "1"):
        part = dict(report, runs={m: {seed: r[seed]} for m, r in report["runs"].items()},
                    settings=dict(report["settings"], seeds=[int(seed)]))
        (tmp_path / "parts").mkdir(exist_ok=True)
        (tmp_path / "parts" / f"{seed}.json").write_text(json.dumps(part))
    quality = load("quality")
    merged = quality.main(["--merge", str(tmp_path / "parts" / "0.json"), str(tmp_path / "parts" / "1.json"),
                           "--output", str(tmp_path / "merged.json")])
    assert merged["summary"] == report["summary"] and merged["settings"]["seeds"] == [0, 1]
    assert merged["paired"] == report["paired"]
    with pytest.raises(SystemExit, match="more than one part"):
        quality.main(["--merge", str(tmp_path / "parts" / "0.json"), str(tmp_path / "parts" / "0.json"),
                      "--output", str(tmp_path / "bad.json")])
    # ...unless one part took that seed over from the other (--reuse): then it is one run, kept once
    taken_over = json.loads((tmp_path / "parts" / "1.json").read_text())
    for method, by_seed in taken_over["runs"].items():
        by_seed["0"] = dict(report["runs"][method]["0"], reused_from="parts/0.json")
    (tmp_path / "parts" / "1b.json").write_text(json.dumps(taken_over))
    again = quality.main(["--merge", str(tmp_path / "parts" / "0.json"), str(tmp_path / "parts" / "1b.json"),
                          "--output", str(tmp_path / "merged_b.json")])
    assert again["runs"] == merged["runs"]
    changed = dict(taken_over)
    changed["runs"] = {m: dict(r, **{"0": dict(r["0"], test=r["0"]["test"] + 0.01)}) for m, r in taken_over["runs"].items()}
    (tmp_path / "parts" / "1c.json").write_text(json.dumps(changed))
    with pytest.raises(SystemExit, match="more than one part"):  # a different result is still a clash
        quality.main(["--merge", str(tmp_path / "parts" / "0.json"), str(tmp_path / "parts" / "1c.json"),
                      "--output", str(tmp_path / "bad_c.json")])

    # A part may give only some of its methods (one run's baselines, another's Theseus)
    whole = tmp_path / "whole.json"
    whole.write_text(json.dumps(report))
    picked = quality.main(["--merge", f"{whole}:finetune_trained,kd", f"{whole}:theseus",
                           "--output", str(tmp_path / "picked.json")])
    assert list(picked["summary"]) == ["theseus", "finetune_trained", "kd"]
    assert all(picked["summary"][m] == report["summary"][m] for m in picked["summary"])
    with pytest.raises(SystemExit, match="no runs of"):
        quality.main(["--merge", f"{whole}:theseus_linear", "--output", str(tmp_path / "bad.json")])

    summary = load("report_quality").main(["--results", str(tmp_path), "--repeats", "2", "--plot",
                                           str(tmp_path / "avs.png"), "--output", str(tmp_path / "summary.json")])
    rows = summary["rows"]
    assert [r["method"] for r in rows] == list(report["summary"])
    for r in rows:
        assert r["accuracy"] == report["summary"][r["method"]]["test_mean"]
        assert r["flops_ratio"] > 1 and r["speedup"] > 0 and r["task"] == "ViT / Fashion-MNIST, 2 -> 1"
    assert (tmp_path / "avs.png").read_bytes()[:4] == b"\x89PNG"
    (verdict,) = summary["verdicts"].values()  # the default recipe against the best other method
    others = {m: r["test_mean"] for m, r in report["summary"].items() if m != "theseus"}
    assert verdict["best_other"] == max(others, key=others.get)
    assert verdict["margin"] == pytest.approx(report["summary"]["theseus"]["test_mean"] - max(others.values()))
    assert verdict["at_least_as_high_as_every_other"] == (verdict["margin"] >= 0)


def test_scaling_quick(tmp_path):
    path = tmp_path / "scaling.json"
    load("scaling").main(["--quick", "--output", str(path)])
    report = read(path)
    check_conditions(report)
    assert [(r["layers"], r["hidden"], r["successor_layers"]) for r in report["rows"]] == [(2, 32, 1), (4, 32, 2)]
    scaling = load("scaling")
    for r in report["rows"]:
        # what the engine adds, derived from the model's structure: the successor layers' and the
        # rest's parameters (train_rest copies them), each with AdamW's two moments
        model = scaling.build(r["layers"], r["hidden"])
        layers = model.bert.encoder.layer
        per_layer = scaling.mb(layers[0].parameters())
        rest = scaling.mb(model.parameters()) - per_layer * len(layers)
        assert r["extra_mb"] == pytest.approx(3 * (per_layer * r["successor_layers"] + rest), rel=1e-9)


def test_budget_speed_quick(tmp_path):
    path = tmp_path / "budget_speed.json"
    load("budget_speed").main(["--quick", "--planners", "flops,flops+width", "--repeats", "2", "--output", str(path)])
    report = read(path)
    check_conditions(report)
    assert {r["model"] for r in report["rows"]} == {"BERT-tiny", "ViT-tiny", "ResNet-tiny"}
    for row in report["rows"]:
        assert row["predicted_speedup"] >= row["target_speedup"]
        # FLOPs planning predicts the export's FLOPs exactly
        assert row["measured_flops_fraction"] == pytest.approx(row["predicted_flops_fraction"], rel=1e-6)
    assert set(report["mean_abs_error"]) == {"BERT-tiny", "ViT-tiny", "ResNet-tiny"}


def test_quality_dev_grid_chooses_each_methods_settings_on_the_first_seed_only(tmp_path):
    path = tmp_path / "grid.json"
    data = write_idx_dataset(tmp_path / "fashion-mnist")
    load("quality").main(["--quick", "--data-dir", data, "--methods", "theseus", "theseus_kd", "kd", "--lr-grid", "1e-3", "4e-3",
                          "--kd-grid", "2:0.5", "4:0.9", "--output", str(path)])
    report = read(path)
    grid = report["grid"]
    # the hybrid's distillation term gets KD's grid
    assert grid["seed"] == 0 and [len(grid["runs"][m]) for m in ("theseus", "theseus_kd", "kd")] == [2, 4, 4]
    for method in ("theseus", "theseus_kd", "kd"):
        best = max(grid["runs"][method], key=lambda r: r["dev"])
        assert grid["chosen"][method]["lr"] == best["lr"]
        assert report["runs"][method]["0"]["dev"] == best["dev"]  # seed 0 is the chosen grid run itself
        assert set(report["runs"][method]) == {"0", "1"}
    assert set(grid["chosen"]["kd"]) == {"lr", "temperature", "alpha"}
    assert (grid["chosen"]["kd"]["temperature"], grid["chosen"]["kd"]["alpha"]) in {(2.0, 0.5), (4.0, 0.9)}


def test_grid_extension_steps_beyond_the_edge_the_best_dev_run_sits_on():
    extension = load("quality").grid_extension
    runs = [{"lr": 1e-3, "dev": 0.5}, {"lr": 2e-3, "dev": 0.6}, {"lr": 4e-3, "dev": 0.7}]
    assert extension(runs) == pytest.approx(8e-3)  # best at the top: one grid ratio above it
    runs[0]["dev"] = 0.9
    assert extension(runs) == pytest.approx(5e-4)  # best at the bottom
    runs[1]["dev"] = 0.95
    assert extension(runs) is None  # inside: the grid is done
    # KD's pairs share an lr: the edge is judged on lrs, over every pair
    kd = [{"lr": 1e-3, "dev": 0.5}, {"lr": 1e-3, "dev": 0.8}, {"lr": 2e-3, "dev": 0.7}, {"lr": 2e-3, "dev": 0.6}]
    assert extension(kd) == pytest.approx(5e-4)
    assert extension([{"lr": 1e-3, "dev": 0.5}]) is None  # one point has no ratio to extend by


def test_quality_extend_grid_runs_until_the_choice_is_inside_or_the_limit(tmp_path):
    path = tmp_path / "extended.json"
    data = write_idx_dataset(tmp_path / "fashion-mnist")
    quality = load("quality")
    quality.main(["--quick", "--data-dir", data, "--methods", "finetune_trained", "kd", "--seeds", "0",
                  "--lr-grid", "1e-3", "4e-3", "--kd-grid", "2:0.5", "4:0.9", "--extend-grid", "2",
                  "--output", str(path)])
    grid = read(path)["grid"]
    for method, per_lr in (("finetune_trained", 1), ("kd", 2)):
        runs, added = grid["runs"][method], grid.get("extended", {}).get(method, [])
        assert len(runs) == per_lr * (2 + len(added)) and len(added) <= 2
        tried = sorted({r["lr"] for r in runs})
        assert all(lr in tried for lr in added)
        if len(added) < 2:  # stopped early: the choice sits inside what was tried
            assert quality.grid_extension(runs) is None
        assert grid["chosen"][method]["lr"] == max(runs, key=lambda r: r["dev"])["lr"]


def test_converge_predecessor_keeps_the_best_dev_weights_and_applies_its_stopping_rule(tmp_path):
    from safetensors.torch import load_model

    data = write_idx_dataset(tmp_path / "fashion-mnist")
    path = tmp_path / "vit.safetensors"
    converge = load("converge_predecessor")
    report = converge.main(["--arch", "vit", "--quick", "--data-dir", data, "--save-to", str(path)])
    curve = report["curve"]
    assert [p["step"] for p in curve] == list(range(5, report["steps_run"] + 1, 5))
    best = max(curve, key=lambda p: p["dev"])  # first best on ties, as the run keeps it
    assert report["best_step"] == best["step"]
    if report["converged"]:  # the rule: the best is older than 20% of the steps, and the minimum is reached
        assert report["steps_run"] >= 10 and report["steps_run"] - best["step"] > 0.2 * report["steps_run"]
    else:
        assert report["stopped_by"] == "max_steps" and report["steps_run"] == 60
    # the saved weights are the best-on-dev ones: they score the best dev accuracy again
    quality = load("quality")
    args = quality.parse_args(["--task", "vision", "--quick", "--data-dir", data])
    task = quality.VisionTask(args)
    model = task._build(0)
    load_model(model, str(path))
    assert task.evaluate(model)["dev"] == pytest.approx(best["dev"]) == pytest.approx(report["dev"])
    assert read(tmp_path / "vit.json")["test"] == report["test"]


def test_converge_predecessor_in_two_sittings_ends_as_one_sitting_does(tmp_path):
    # --checkpoints: a run stopped by its time cap goes on, when run again, from its last evaluation, with the
    # same optimiser, lr schedule, data position, curve and best weights as if it had never stopped
    data = write_idx_dataset(tmp_path / "fashion-mnist")
    converge = load("converge_predecessor")
    quick = ["--arch", "vit", "--quick", "--data-dir", data]
    whole = converge.main([*quick, "--save-to", str(tmp_path / "whole.safetensors")])
    split = [*quick, "--save-to", str(tmp_path / "split.safetensors"), "--checkpoints", str(tmp_path / "ckpt")]
    first = converge.main([*split, "--max-seconds", "0"])  # the cap ends it at its first evaluation
    assert first["stopped_by"] == "max_seconds" and first["steps_run"] == 5 < whole["steps_run"]
    second = converge.main(split)
    assert len(second["sittings"]) == 2
    assert [(p["step"], p["dev"]) for p in second["curve"]] == [(p["step"], p["dev"]) for p in whole["curve"]]
    for key in ("steps_run", "best_step", "stopped_by", "dev", "test"):
        assert second[key] == whole[key], key
    again = converge.main(split)  # a finished run is reported again, not trained further
    assert again["steps_run"] == whole["steps_run"] and again["test"] == whole["test"]
    with pytest.raises(SystemExit, match="other settings .*pretrain_lr"):
        converge.main([*split, "--pretrain-lr", "1e-2"])


def test_the_plateau_cut_comes_when_neither_a_new_best_nor_a_cut_has_come_for_its_patience():
    plateau_class = load("converge_predecessor").Plateau
    plateau = plateau_class(10, 0.5)
    for step, best_step in ((5, 5), (10, 5), (15, 5), (20, 5), (25, 5), (30, 28), (40, 28), (45, 28)):
        plateau.update(step, best_step)
    assert plateau.cuts == [[15, 0.5], [25, 0.25], [40, 0.125]] and plateau(41) == 0.125
    again = plateau_class(10, 0.5, plateau.state()["cuts"])  # a later sitting goes on with the saved cuts
    again.update(50, 28), plateau.update(50, 28)
    assert again.state() == plateau.state() == {"scale": 0.0625, "last_cut": 50,
                                                "cuts": [[15, 0.5], [25, 0.25], [40, 0.125], [50, 0.0625]]}
    assert plateau_class(None, 0.5)(7) == 1.0  # without --lr-plateau: the constant lr


def test_converge_predecessor_with_lr_cuts_in_two_sittings_and_a_rule_turned_on_later(tmp_path):
    data = write_idx_dataset(tmp_path / "fashion-mnist")
    converge = load("converge_predecessor")
    quick = ["--arch", "vit", "--quick", "--data-dir", data, "--lr-plateau", "5"]
    whole = converge.main([*quick, "--save-to", str(tmp_path / "whole.safetensors")])
    curve = whole["curve"]
    assert whole["lr_cuts"], "the tiny run plateaus within its 60 steps"
    for cut_step, scale in whole["lr_cuts"]:  # each cut follows 5 steps without a new best or an earlier cut
        before = [p for p in curve if p["step"] < cut_step]
        best_step = max(before + [p for p in curve if p["step"] == cut_step], key=lambda p: p["dev"])["step"]
        assert cut_step - best_step >= 5 and next(p for p in curve if p["step"] == cut_step)["lr_multiplier"] == scale
    split = [*quick, "--save-to", str(tmp_path / "split.safetensors"), "--checkpoints", str(tmp_path / "ckpt")]
    converge.main([*split, "--max-seconds", "0"])
    second = converge.main(split)
    assert [(p["step"], p["dev"]) for p in second["curve"]] == [(p["step"], p["dev"]) for p in curve]
    assert second["lr_cuts"] == whole["lr_cuts"] and second["test"] == whole["test"]
    # a run begun at a constant lr may turn the cuts on at a later sitting: a phase from the step it goes on from
    later = ["--arch", "vit", "--quick", "--data-dir", data, "--save-to", str(tmp_path / "later.safetensors"),
             "--checkpoints", str(tmp_path / "later")]
    converge.main([*later, "--max-seconds", "0"])  # stops at its first evaluation, step 5
    report = converge.main([*later, "--lr-plateau", "5"])
    assert [(p["from_step"], p["lr_plateau"]) for p in report["phases"]] == [(0, None), (5, 5)]
    assert report["curve"][0] == {**curve[0], "seconds": report["curve"][0]["seconds"], "lr_multiplier": 1.0}
    assert all(cut >= 10 for cut, _ in report["lr_cuts"])
    with pytest.raises(SystemExit, match="other settings .*pretrain_lr"):
        converge.main([*later, "--lr-plateau", "5", "--pretrain-lr", "1e-2"])


def test_converge_predecessor_text_saves_the_best_dev_encoder_as_an_hf_directory(tmp_path):
    model_dir = save_tiny_classifier(tmp_path / "tiny")
    out = tmp_path / "pred"
    converge = load("converge_predecessor")
    report = converge.main(["--task", "text", "--model", model_dir, "--pretrain-lr", "1e-3", "--batch-size", "8",
                            "--max-length", "16", "--dev-size", "100", "--test-size", "100", "--eval-every", "5",
                            "--min-steps", "10", "--max-steps", "30", "--warmup-steps", "5", "--save-to", str(out)])
    curve = report["curve"]
    assert [p["step"] for p in curve] == list(range(5, report["steps_run"] + 1, 5))
    best = max(curve, key=lambda p: p["dev"])
    assert report["best_step"] == best["step"] and report["task"] == "text" and report["weight_decay"] == 0.01
    # what quality.py / recipe_lr.py --predecessor load is the best-on-dev encoder
    quality = load("quality")
    task = quality.TextTask(quality.parse_args(["--task", "text", "--model", model_dir, "--max-length", "16",
                                                "--dev-size", "100", "--test-size", "100", "--predecessor", str(out)]))
    scores = task.evaluate(task.predecessor())
    assert scores["dev"] == pytest.approx(best["dev"]) == pytest.approx(report["dev"])
    assert scores["test"] == pytest.approx(report["test"])
    assert read(tmp_path / "pred.json")["steps_run"] == report["steps_run"]
    for wrong in (["--quick"], ["--device", "cuda"]):  # vision-only settings are refused before any training
        with pytest.raises(SystemExit):
            converge.main(["--task", "text", "--model", model_dir, "--save-to", str(tmp_path / "x"), *wrong])


def test_budget_curve_report_pairs_seeds_per_budget_and_reads_equal_compute_off_the_curves():
    curve_module = load("report_budget_curve")

    def report(steps, theseus, finetune, seconds):
        runs = {"theseus": {str(s): {"test": t, "dev": t, "train_s": seconds[0]} for s, t in enumerate(theseus)},
                "finetune_trained": {str(s): {"test": t, "dev": t, "train_s": seconds[1]} for s, t in enumerate(finetune)}}
        summary = {m: {"test_mean": sum(r["test"] for r in by.values()) / len(by)} for m, by in runs.items()}
        return {"task": "vit", "target": {"ratio": 0.25}, "depth": {"predecessor": {"blocks": 8}, "successor": {"blocks": 2}},
                "settings": {"steps": steps, "seeds": [0, 1, 2]}, "predecessor": {"dev": 0.9, "test": 0.9},
                "runs": runs, "summary": summary, "grid": {"chosen": {"theseus": {"lr": 1e-3}, "finetune_trained": {"lr": 2e-3}}}}

    curve = curve_module.build([report(400, [0.80, 0.81, 0.82], [0.79, 0.80, 0.81], (40.0, 20.0)),
                                report(100, [0.70, 0.71, 0.70], [0.72, 0.73, 0.72], (10.0, 5.0))])
    low, high = curve["budgets"]  # sorted by steps
    assert low["steps"] == 100 and low["verdict"]["verdict"] == "behind"
    assert high["verdict"]["verdict"] == "ahead" and high["verdict"]["mean"] == pytest.approx(0.01)
    # fine-tune-only at Theseus's 10 s (100 steps): between its 5 s and 20 s points, linear in log time
    assert low["equal_compute"]["finetune_trained"] == pytest.approx((0.7233333 + 0.80) / 2, abs=1e-6)
    assert high["equal_compute"]["finetune_trained"] is None  # 40 s is past what it was measured at
    assert curve_module.advice(curve)[1].startswith("400 steps: Theseus;")
    assert curve_module.steps_label(curve) == "training steps"  # no batch size recorded
    for b, size in zip(curve["budgets"], (32, 32)):
        b["batch_size"] = size
    assert curve_module.steps_label(curve) == "training steps (batch 32)"
    curve["budgets"][1]["batch_size"] = 128
    assert curve_module.steps_label(curve) == "training steps"  # mixed sizes: no one batch to name


def test_budget_curve_equal_compute_never_mixes_devices():
    curve_module = load("report_budget_curve")

    def report(steps, seconds, device):
        runs = {m: {str(s): {"test": 0.8 + 0.01 * s, "dev": 0.8, "train_s": t} for s in range(3)}
                for m, t in (("theseus", seconds[0]), ("finetune_trained", seconds[1]))}
        return {"task": "vit", "target": {"ratio": 0.25}, "depth": {"predecessor": {"blocks": 8}, "successor": {"blocks": 2}},
                "settings": {"steps": steps, "seeds": [0, 1, 2], "device": device}, "predecessor": {"dev": 0.9, "test": 0.9},
                "runs": runs, "summary": {m: {"test_mean": 0.81} for m in runs},
                "grid": {"chosen": {"theseus": {"lr": 1e-3}, "finetune_trained": {"lr": 2e-3}}}}

    # on one time axis, Theseus's 30 s at 400 steps would sit between fine-tune-only's 20 s and 40 s
    curve = curve_module.build([report(400, (30.0, 20.0), "cpu"), report(6400, (35.0, 40.0), "cuda")])
    cpu, gpu = curve["budgets"]
    assert (cpu["device"], gpu["device"]) == ("cpu", "cuda")
    assert cpu["equal_compute"]["finetune_trained"] is None and gpu["equal_compute"]["finetune_trained"] is None
    assert "on cuda" in curve_module.table(curve) and "on cpu" not in curve_module.table(curve)


def test_budget_curve_machine_flag_keeps_another_machines_seconds_off_the_time_axis(tmp_path):
    curve_module = load("report_budget_curve")

    def write(steps, seconds, name):
        runs = {m: {str(s): {"test": 0.8 + 0.01 * s + 0.0001 * t, "dev": 0.8, "train_s": t} for s in range(3)}
                for m, t in (("theseus", seconds[0]), ("kd", seconds[1]))}
        report = {"task": "text", "target": {"depth": 3}, "depth": {"predecessor": {"blocks": 6}, "successor": {"blocks": 3}},
                  "settings": {"steps": steps, "seeds": [0, 1, 2]}, "predecessor": {"dev": 0.83, "test": 0.83},
                  "runs": runs, "summary": {m: {"test_mean": 0.81} for m in runs},
                  "grid": {"chosen": {"theseus": {"lr": 1e-4}, "kd": {"lr": 2e-4}}}}
        path = tmp_path / name
        path.write_text(json.dumps(report))
        return str(path)

    # 300 and 1,000 steps on one machine, 600 on a slower one: read as one axis, KD's 440 s at 600 steps
    # would put Theseus's 1,000-step 414 s between budgets timed on two machines
    paths = [write(300, (150.0, 190.0), "s300.json"), write(600, (355.0, 440.0), "s600.json"),
             write(1000, (414.0, 524.0), "s1000.json")]
    mixed = curve_module.main(paths)
    assert mixed["budgets"][2]["equal_compute"]["kd"] is not None  # what the flag is for
    kept = curve_module.main([*paths, "--machine", f"{paths[1]}=machine 2"])
    s300, s600, s1000 = kept["budgets"]
    assert s600["device"] == "cpu, machine 2" and s300["device"] == s1000["device"] == "cpu"
    assert s600["equal_compute"]["kd"] is None  # alone on its axis
    expected = curve_module.at_time([{"train_s": 190.0, "test": 0.8 + 0.01 + 0.019}, {"train_s": 524.0, "test": 0.8 + 0.01 + 0.0524}], 414.0)
    assert s1000["equal_compute"]["kd"] == pytest.approx(expected)  # along 300 and 1,000 only
    assert mixed["budgets"][2]["equal_compute"]["kd"] != pytest.approx(expected)  # the mixed axis reads otherwise
    assert "on cpu, machine 2" in curve_module.table(kept)
    for wrong in (["--machine", paths[1]], ["--machine", "elsewhere.json=machine 2"]):
        with pytest.raises(SystemExit):
            curve_module.main([*paths, *wrong])


def test_quality_reuse_extends_a_grid_without_rerunning_its_points(tmp_path):
    data = write_idx_dataset(tmp_path / "fashion-mnist")
    quality = load("quality")
    base = ["--quick", "--data-dir", data, "--methods", "theseus", "finetune_trained"]
    first = tmp_path / "first.json"
    quality.main(base + ["--lr-grid", "1e-3", "--output", str(first)])
    earlier = read(first)
    wider = tmp_path / "wider.json"
    quality.main(base + ["--lr-grid", "1e-3", "4e-3", "--reuse", str(first), "--output", str(wider)])
    report = read(wider)
    assert report["reused"] == [str(first)]
    for method in ("theseus", "finetune_trained"):
        old_point, new_point = report["grid"]["runs"][method]
        assert old_point["reused_from"] == str(first) and "reused_from" not in new_point
        assert old_point["dev"] == earlier["grid"]["runs"][method][0]["dev"]
        seed_1 = report["runs"][method]["1"]
        if report["grid"]["chosen"][method]["lr"] == 1e-3:  # the earlier run's choice: its seed 1 is taken over
            assert seed_1 == dict(earlier["runs"][method]["1"], reused_from=str(first))
        else:
            assert "reused_from" not in seed_1
    # a Theseus override that differs: the baseline's runs are still taken over, Theseus's are not
    frozen = tmp_path / "frozen.json"
    quality.main(base + ["--lr-grid", "1e-3", "--train-rest", "off", "--reuse", str(first), "--output", str(frozen)])
    runs = read(frozen)["grid"]["runs"]
    assert "reused_from" in runs["finetune_trained"][0] and "reused_from" not in runs["theseus"][0]
    with pytest.raises(SystemExit, match="not a run of the same benchmark"):
        quality.main(base + ["--steps", "4", "--lr-grid", "1e-3", "--reuse", str(first), "--output", str(tmp_path / "x.json")])


def test_quality_plans_budget_shapes_for_every_method_alike(tmp_path):
    path = tmp_path / "budget.json"
    data = write_idx_dataset(tmp_path / "fashion-mnist")
    load("quality").main(["--quick", "--data-dir", data, "--methods", "theseus", "finetune_trained",
                          "--seeds", "0", "--successor-width", "0.5", "--output", str(path)])
    report = read(path)
    assert report["target"] == {"successor_width": 0.5}  # width only: the depth stays
    assert report["depth"] == {"predecessor": {"blocks": 2}, "successor": {"blocks": 2}}
    assert set(report["runs"]) == {"theseus", "finetune_trained"}
    report_quality = load("report_quality")
    assert report_quality.shape_kind(report["target"]) == "width only"
    assert report_quality.shape_kind({"target_speedup": 2.0, "successor_width": "auto"}) == "depth and width"
    assert report_quality.shape_kind({"ratio": 0.5}) == "depth only"


def test_the_paired_verdict_tells_ahead_level_and_behind(tmp_path):
    report_quality = load("report_quality")
    assert report_quality.paired_interval([0.01, 0.012, 0.011, 0.009, 0.013])["verdict"] == "ahead"
    assert report_quality.paired_interval([-0.01, -0.012, -0.011, -0.009, -0.013])["verdict"] == "behind"
    level = report_quality.paired_interval([0.02, -0.01, 0.015, -0.02, 0.0])
    assert level["verdict"] == "level" and level["low"] < 0 < level["high"]
    # one seed has no interval, so no verdict: a single difference, however large, is not "level"
    one = report_quality.paired_interval([0.05])
    assert one["verdict"] == report_quality.NO_VERDICT and one["low"] is None and one["mean"] == 0.05
    # df = 4: t = 2.776; differences 1, 2, 3, 4, 5 points: mean 3, sd 1.581, half width 2.776 * 1.581 / sqrt(5)
    interval = report_quality.paired_interval([0.01, 0.02, 0.03, 0.04, 0.05])
    assert interval["half_width"] == pytest.approx(2.776 * 0.015811 / 5 ** 0.5, rel=1e-4)
    # the verdict pairs each seed of Theseus with the same seed of the best baseline (by test mean)
    report = {"summary": {"theseus": {"test_mean": 0.80}, "kd": {"test_mean": 0.79}, "finetune_trained": {"test_mean": 0.70},
                          "theseus_paper": {"test_mean": 0.95}},
              "runs": {"theseus": {"0": {"test": 0.81}, "1": {"test": 0.79}},
                       "kd": {"0": {"test": 0.80}, "1": {"test": 0.78}},
                       "finetune_trained": {"0": {"test": 0.7}, "1": {"test": 0.7}},
                       "theseus_paper": {"0": {"test": 0.95}, "1": {"test": 0.95}}}}
    paired = report_quality.paired_verdict(report)
    assert paired["best_baseline"] == "kd" and paired["differences"] == pytest.approx([0.01, 0.01])
    assert paired["verdict"] == "ahead"  # the same +1 point on both seeds: no spread
    # --annotate adds the intervals to a JSON written before quality.py kept them; dev pairs the same baseline
    for method, runs in report["runs"].items():
        for seed, run in runs.items():
            run["dev"] = run["test"] - (0.02 if method == "theseus" and seed == "1" else 0)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(report))
    report_quality.main(["--annotate", str(path)])
    kept = read(path)["paired"]
    assert kept["test"] == paired
    assert kept["dev"]["best_baseline"] == "kd" and kept["dev"]["differences"] == pytest.approx([0.01, -0.01])
    assert kept["against_each_baseline"]["finetune_trained"]["mean"] == pytest.approx(0.10)


def test_matching_collapse_quick(tmp_path):
    from theseus_general import wrapping

    data = write_idx_dataset(tmp_path / "fmnist", train=200, test=60)
    path = tmp_path / "collapse.json"
    load("matching_collapse").main(["--quick", "--data-dir", data, "--legacy-frozen-norm", "--variants",
                                    "default,fine_tune", "--out", str(path)])
    report = read(path)
    check_conditions(report)
    d = report["diagnostics"]
    assert 0 <= d["wrapped_predecessor_test_accuracy"] <= 1 and d["match_steps"] == 2
    assert set(report["variants"]) == {"default", "fine_tune"}
    assert 0 <= report["variants"]["default"]["test_accuracy"] <= 1
    assert "batch_norm" not in wrapping._FrozenNorm.forward.__code__.co_names  # the legacy switch is undone


def test_mechanisms_quick_pairs_each_variant_with_the_default_and_merges_parts(tmp_path):
    mechanisms = load("mechanisms")
    data = write_idx_dataset(tmp_path / "fashion-mnist")
    base = ["--quick", "--data-dir", data, "--steps", "4"]
    a, b, merged = (str(tmp_path / f"{n}.json") for n in ("a", "b", "merged"))
    mechanisms.main(base + ["--variants", "default", "blend", "--output", a])
    mechanisms.main(base + ["--variants", "importance_groups", "lr_compensation", "agreement_trigger", "--output", b])
    report = mechanisms.main(["--merge", a, b, "--output", merged])
    assert set(report["runs"]) == {"default", "blend", "importance_groups", "lr_compensation", "agreement_trigger"}
    seeds = set(report["runs"]["default"])
    assert len(seeds) >= 2
    for variant in ("blend", "importance_groups", "lr_compensation", "agreement_trigger"):
        assert set(report["runs"][variant]) == seeds
        pair = report["paired_dev_points"][variant]["default"]
        differences = [100 * (report["runs"][variant][s]["dev"] - report["runs"]["default"][s]["dev"]) for s in seeds]
        assert pair["n"] == len(seeds) and pair["mean"] == pytest.approx(sum(differences) / len(differences))
    planned = report["runs"]["importance_groups"]["0"]
    assert len(planned["block_influence"]) == sum(len(g) for g in planned["groups"])  # every block in one group
    with open(merged) as f:
        assert json.load(f)["complete"]
    with pytest.raises(SystemExit, match="in two parts"):  # a run in two parts is a clash, not a merge
        mechanisms.main(["--merge", a, a, "--output", str(tmp_path / "clash.json")])


def test_mechanisms_refuse_importance_groups_on_a_model_of_several_containers_before_any_run(tmp_path):
    data = write_idx_dataset(tmp_path / "fashion-mnist")
    output = tmp_path / "resnet.json"
    with pytest.raises(SystemExit, match=r"has 4 \(layer1, layer2, layer3, layer4\); leave it out"):
        load("mechanisms").main(["--quick", "--data-dir", data, "--steps", "4", "--arch", "resnet", "--ratio", "0.5",
                                 "--variants", "default", "importance_groups", "--output", str(output)])
    assert not output.exists()  # refused before the default's run wrote anything


def test_mechanisms_change_the_model_familys_recipe_not_always_the_default():
    # a text variant must keep the bert recipe's settings and change only its own one thing
    mechanisms = load("mechanisms")
    bert = tiny_bert(num_layers=4)
    args = argparse.Namespace(compensation_cap=3.0, matching_weight=1.0)
    bert_recipe = get_recipe("bert")
    assert bert_recipe != get_recipe("default")
    assert mechanisms.variant_recipe("default", bert, args) is None
    compensated = mechanisms.variant_recipe("lr_compensation", bert, args)
    assert compensated == dataclasses.replace(bert_recipe, lr_compensation=3.0)
    assert mechanisms.variant_recipe("blend", bert, args) == dataclasses.replace(bert_recipe, mixing="blend")
    assert mechanisms.variant_recipe("mixed_matching", ChainModel(depth=4), args) == dataclasses.replace(
        get_recipe("default"), mixed_matching=1.0)


def test_budget_curve_parallel_makes_the_choice_one_quality_run_makes(tmp_path):
    data = write_idx_dataset(tmp_path / "fashion-mnist")
    parallel = load("budget_curve_parallel")
    assert parallel.extension_points([1e-3, 4e-3], 2) == [1e-3 * 1e-3 / 4e-3, 4e-3 * 4e-3 / 1e-3,
                                                           2.5e-4 * 2.5e-4 / 1e-3, 1.6e-2 * 1.6e-2 / 4e-3]
    grid = ["--steps", "6", "--lr-grid", "1e-3", "4e-3", "--extend-grid", "1"]
    task = ["--quick", "--data-dir", data]
    status = parallel.main([*grid, "--methods", "finetune_trained", "--seeds", "0", "1", "--workers", "2",
                            "--out-dir", str(tmp_path / "curve"), "--name", "merged.json", "--", *task])
    assert status["complete_methods"] == ["finetune_trained"]
    assert all(p["returncode"] == 0 for p in status["processes"])
    single = tmp_path / "single.json"
    load("quality").main([*task, *grid, "--methods", "finetune_trained", "--output", str(single)])
    merged, one = read(status["merged"]), read(single)
    assert merged["grid"]["chosen"] == one["grid"]["chosen"]
    assert merged["grid"].get("extended", {}) == one["grid"].get("extended", {})
    for seed in ("0", "1"):
        ours, theirs = merged["runs"]["finetune_trained"][seed], one["runs"]["finetune_trained"][seed]
        assert (ours["dev"], ours["test"]) == (theirs["dev"], theirs["test"])


class ChainTask:  # the slice of quality.py's task that a recipe_lr run reads, on a tiny chain model
    target = {"successor_depth": 3, "adapter": "generic", "container": "blocks"}
    native = False

    @staticmethod
    def batches(seed):
        g = torch.Generator().manual_seed(seed)
        while True:
            x = torch.randn(8, 4, generator=g)
            yield x, (x.sum(1) > 0).long()


def test_recipe_lr_early_full_runs_the_default_with_a_short_mixed_phase():
    recipe_lr = load("recipe_lr")
    args = argparse.Namespace(steps=10, lr=1e-2, weight_decay=0.0, device="cpu")
    predecessor = ChainModel(depth=6)
    before = {k: v.clone() for k, v in predecessor.state_dict().items()}
    for name, matched in (("early_full_no_matching", False), ("early_full", None)):
        notes = {}
        model = recipe_lr.full_at_run(ChainTask, predecessor, 0, args, recipe_lr.VARIANTS[name], notes)
        assert notes["full_at"] == 0.1 and len(model.blocks) == 3
        if matched is False:
            assert notes["start_blocks"] == {}  # no matching, so no start chosen: successor i is block i
    assert all(torch.equal(v, before[k]) for k, v in predecessor.state_dict().items())


def test_recipe_lr_candidate_is_the_default_with_a_short_phase_matching_only_a_collapsed_start():
    common = load("_common")
    candidate, default = common.candidate_recipe(), get_recipe("default")
    round6_default = common.agreement_trigger_recipe()
    assert (candidate.full_at, default.full_at) == (0.1, 0.5)
    # MPNet's start (agreement 0.625, both classes answered): the round-6 default matched, the candidate and
    # today's default (round 7's collapsed_trigger) do not
    assert round6_default.match_steps(300, agreement=0.625, collapsed=False) == 60
    assert candidate.match_steps(300, agreement=0.625, collapsed=False) == 0
    assert default.match_steps(300, agreement=0.625, collapsed=False) == 0
    # round 7's and round 8's recipes as they ran (one batch read; no spread limit); round 9's candidate is today's
    # default but for matching's lr, fixed at 1e-3 until round 13 (today's: probed, "auto")
    assert default.match_lr == "auto"
    ran = dataclasses.replace(default, match_lr=1e-3)
    assert common.collapsed_trigger_recipe() == dataclasses.replace(ran, name="collapsed_trigger",
                                                                    start_check_predictions=1, collapse_spread=None)
    assert common.pooled_check_recipe() == dataclasses.replace(ran, name="pooled_check", collapse_spread=None)
    assert common.offset_aware_recipe() == dataclasses.replace(ran, name="offset_aware")
    # round 13's candidate is today's bert recipe; round 12's is it with the fixed lr
    assert common.bert_r13_recipe() == dataclasses.replace(get_recipe("bert"), name="bert_r13")
    assert common.bert_r12_recipe() == dataclasses.replace(get_recipe("bert"), name="bert_r12", match_lr=1e-3)
    # MiniLM 6 -> 3's start (one class for the whole batch): all match
    assert candidate.match_steps(300, agreement=0.5, collapsed=True) == default.match_steps(300, 0.5, True) == 60
    assert round6_default.match_steps(300, agreement=0.5, collapsed=True) == 60
    recipe_lr = load("recipe_lr")
    notes = {}
    args = argparse.Namespace(steps=10, lr=1e-2, weight_decay=0.0, device="cpu")
    model = recipe_lr.theseus_run(ChainTask, ChainModel(depth=6), 0, args, "candidate", {}, notes, recipe=candidate)
    assert notes["full_at"] == 0.1 and len(model.blocks) == 3
    assert isinstance(notes["start_collapsed"], bool) and 0 <= notes["start_agreement"] <= 1  # what decided it
    # the variant's recipe is built by main, not passed on as a flag
    assert not hasattr(recipe_lr.variant_args(args, "collapsed_trigger", 1e-4, 0), "recipe_factory")


def test_recipe_lr_round_10_candidates_are_the_default_with_one_change_each():
    common, recipe_lr = load("_common"), load("recipe_lr")
    default = dataclasses.replace(get_recipe("default"), match_lr=1e-3)  # as round 10 ran (fixed until round 13)
    assert common.rest_after_mixing_recipe() == dataclasses.replace(default, name="rest_after_mixing",
                                                                    rest_after_mixing=True)
    assert common.prefix_mixing_recipe() == dataclasses.replace(default, name="prefix_mixing", mixing="prefix")
    assert recipe_lr.VARIANTS["quarter_full"] == dict(method="theseus", full_at=0.25)
    args = argparse.Namespace(steps=6, lr=1e-2, weight_decay=0.0, device="cpu")
    for name in ("rest_after_mixing", "prefix_mixing"):
        notes = {}
        recipe = common.RECIPE_FACTORIES[name]()
        model = recipe_lr.theseus_run(ChainTask, ChainModel(depth=6), 0, args, name, {}, notes, recipe=recipe)
        assert len(model.blocks) == 3 and notes["full_at"] == 0.5


def test_recipe_lr_round_11_and_12_recipes_are_the_bert_recipe_with_their_changes():
    common = load("_common")
    bert = dataclasses.replace(get_recipe("bert"), match_lr=1e-3)  # round 12's candidate, adopted (lr fixed then)
    assert common.bert_r10_recipe() == dataclasses.replace(bert, name="bert_r10", collapse_spread=1e-3)
    assert common.bert_r11_recipe() == dataclasses.replace(bert, name="bert_r11", short_phase_if_collapsed=False)
    assert common.bert_r12_recipe() == dataclasses.replace(bert, name="bert_r12")
    names = {"bert_r10", "bert_r11", "bert_r12"}
    assert names <= set(common.RECIPE_FACTORIES) and names <= set(load("recipe_lr").VARIANTS)


@pytest.mark.parametrize("method", ["finetune_trained", "theseus"])
def test_a_benchmark_run_is_the_same_whatever_ran_before_it_in_the_process(method):
    """Dropout draws from torch's global generator, whose seed differs per process: unseeded, a text run
    depended on what ran before it (the same command gave dev 0.778 and 0.784 after 10 steps)."""
    transformers = pytest.importorskip("transformers")
    quality = load("quality")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                                     intermediate_size=32, hidden_dropout_prob=0.5, num_labels=2)
    torch.manual_seed(0)
    predecessor = transformers.BertForSequenceClassification(config)

    class Task:
        target = {"successor_depth": 2}
        native = True

        @staticmethod
        def batches(seed):
            g = torch.Generator().manual_seed(seed)
            while True:
                ids = torch.randint(1, 50, (8, 6), generator=g)
                yield {"input_ids": ids}, (ids[:, 0] > 25).long()

    args = quality.parse_args(["--steps", "4", "--lr", "1e-2"])
    first = quality.run_method(method, Task, predecessor, 0, args)
    torch.rand(7)  # whatever else the process does between two runs
    second = quality.run_method(method, Task, predecessor, 0, args)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def test_readme_path_seeds_runs_every_variant_on_the_readme_tests_task(tmp_path):
    report = load("readme_path_seeds").main(["--lrs", "1e-4", "--seeds", "0", "1", "--steps", "4", "--variants",
                                             "default", "finetune_group_last", "--output", str(tmp_path / "r.json")])
    runs = report["runs"]["0.0001"]
    assert set(runs) == {"finetune", "default", "finetune_group_last"}
    assert all(len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies) for accuracies in runs.values())
    assert json.loads((tmp_path / "r.json").read_text())["runs"] == report["runs"]
