"""The text example end to end on a tiny model and a tiny CSV, and its data errors."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import text_classification  # noqa: E402
from text_data import DataError, load_table, split  # noqa: E402

from conftest import save_tiny_classifier, write_review_csv  # noqa: E402

@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_classifier(tmp_path / "model")


@pytest.fixture
def tiny_csv(tmp_path):
    return write_review_csv(tmp_path / "data.csv")


def test_example_runs_end_to_end(tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "out"
    report = text_classification.main([
        "--model", tiny_model_dir, "--data", tiny_csv, "--test-size", "20", "--dev-size", "20", "--depth", "2",
        "--finetune-steps", "4", "--steps", "6", "--batch-size", "8", "--max-length", "16", "--output", str(out),
    ])
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"].keys() == {"predecessor", "theseus", "baseline_paper", "baseline_stronger"}
    assert saved["results"]["theseus"]["layers"] == 2 and saved["results"]["predecessor"]["layers"] == 4
    assert saved["results"]["theseus"]["predecessor_unchanged"] is True
    assert report["speed"]["depth_ratio"] == 2.0 and report["speed"]["flops_ratio"] > 1.0
    import transformers

    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out / "theseus_successor")
    assert reloaded.config.num_hidden_layers == 2
    from theseus_general.metrics import read_metrics

    logged = read_metrics(str(out / "theseus"))
    assert [s for s, _ in logged["replacement_rate"]] == list(range(6))  # 6 mixed steps: the default recipe does not match
    assert len(saved["matching_curve"]) == 0
    check = saved["start_check"]  # what decided it, for the user to read
    assert 0 <= check["agreement"] <= 1 and isinstance(check["collapsed"], bool)
    assert check["predictions"] >= 128  # the default pools its first batches until 128 predictions
    assert [v for _, v in logged["loss"]] == [loss for _, _, loss in saved["replacement_curve"]]
    for plot in ("curriculum.png", "comparison.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_quick_runs_the_whole_job_and_explicit_flags_win(tiny_model_dir, tiny_csv, tmp_path):
    out = tmp_path / "quick"
    args = ["--model", tiny_model_dir, "--data", tiny_csv, "--test-size", "20", "--dev-size", "20", "--depth", "2",
            "--output", str(out), "--mixed-precision", "bf16", "--device", "cpu", "--no-plots"]
    parsed = text_classification.parse_args(["--quick", *args])
    assert (parsed.steps, parsed.finetune_steps, parsed.batch_size, parsed.max_length) == (20, 30, 16, 32)
    assert parsed.test_size == 20 and parsed.output == str(out) and parsed.no_save_models  # given flags win
    assert text_classification.parse_args([]).steps == 600  # without --quick: the full job
    report = text_classification.main(["--quick", *args])
    assert set(report["results"]) == {"predecessor", "theseus", "baseline_paper", "baseline_stronger"}
    assert len(report["matching_curve"]) == 0 and len(report["replacement_curve"]) == 20  # the recipe: no matching
    assert report["settings"]["mixed_precision"] == "bf16"
    assert not (out / "predecessor").exists()  # --quick saves no models


def test_table_errors(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="does not exist"):
        load_table(str(missing))
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_table(str(empty))
    no_label = tmp_path / "nolabel.csv"
    no_label.write_text("text,score\nhello,1\n")
    with pytest.raises(DataError, match="no column 'label'.*--label-column"):
        load_table(str(no_label))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\xe9,1\nbad,0\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_table(str(latin))
    negative = tmp_path / "neg.csv"
    negative.write_text("text,label\na,-1\nb,0\n")
    with pytest.raises(DataError, match="negative labels"):
        load_table(str(negative))
    gap = tmp_path / "gap.csv"
    gap.write_text("text,label\na,0\nb,1\nc,7\n")
    with pytest.raises(DataError, match=r"labels \[0, 1, 7\] out of range"):
        load_table(str(gap))


def test_jsonl_and_string_labels(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": "neg"}\n')
    texts, labels, names = load_table(str(path))
    assert texts == ["a", "b"] and labels == [1, 0] and names == ["neg", "pos"]


def test_split_is_fixed_and_disjoint():
    texts = [str(i) for i in range(100)]
    a, b = split(texts, [0] * 100, 10, 20, seed=0), split(texts, [0] * 100, 10, 20, seed=0)
    assert a == b
    parts = [set(a[k][0]) for k in ("train", "dev", "test")]
    assert sum(map(len, parts)) == 100 and len(set.union(*parts)) == 100
