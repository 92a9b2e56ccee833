"""The HF Trainer example end to end on a tiny model and a tiny CSV."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import trainer_example  # noqa: E402

from conftest import save_tiny_classifier, write_review_csv  # noqa: E402


def test_trainer_example_fine_tunes_compresses_and_saves_a_native_successor(tmp_path):
    import transformers

    model_dir = save_tiny_classifier(tmp_path / "model")
    data = write_review_csv(tmp_path / "data.csv")
    out = tmp_path / "out"
    result = trainer_example.main([
        "--model", model_dir, "--data", data, "--test-size", "20", "--dev-size", "20", "--depth", "2",
        "--finetune-steps", "4", "--steps", "6", "--batch-size", "8", "--max-length", "16", "--output", str(out),
    ])
    saved = json.loads((out / "results.json").read_text())
    assert (saved["predecessor_layers"], saved["successor_layers"], saved["dev_examples"]) == (4, 2, 20)
    assert 0.0 <= saved["dev_accuracy_successor"] <= 1.0 and saved["wall_seconds"] > 0
    assert saved["dev_accuracy_successor"] == result["dev_accuracy_successor"]
    assert all(0 <= int(group) < 2 and 0 <= block < 4 for group, block in saved["start_blocks"].items())
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out / "successor")
    assert reloaded.config.num_hidden_layers == 2 and len(reloaded.bert.encoder.layer) == 2
