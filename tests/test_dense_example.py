"""The dense-prediction example end to end (--quick) on tiny idx files: a segmenter trained with its
own loss, compressed by the backbone adapter, exported as an FCN, compared with fine-tune-only."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import dense_prediction  # noqa: E402

from conftest import write_idx_dataset  # noqa: E402


def test_quick_run_reports_miou_for_the_three_models(tmp_path):
    data = write_idx_dataset(tmp_path / "data", train=120, test=40)
    report = dense_prediction.main(["--quick", "--data-dir", data, "--dev-size", "40", "--output", str(tmp_path / "out"),
                                    "--dev-canvases", "4", "--test-canvases", "4", "--round-steps", "2", "--steps", "2"])
    results = report["results"]
    assert list(results) == ["predecessor", "theseus", "fine_tune_only"]
    for r in results.values():
        assert 0.0 <= r["dev"]["miou"] <= 1.0 and set(r["test"]["iou"]) == set(dense_prediction.CLASSES)
    assert results["predecessor"]["blocks"] == [2, 2, 2]
    assert results["theseus"]["blocks"] == results["fine_tune_only"]["blocks"] == [1, 1, 1]
    assert results["theseus"]["adapter"] == "backbone" and results["theseus"]["exported_class"] == "FCN"
    assert results["theseus"]["predecessor_unchanged"]
    assert results["theseus"]["parameters"] == results["fine_tune_only"]["parameters"] < results["predecessor"]["parameters"]
    assert os.path.exists(tmp_path / "out" / "results.json")


def test_canvases_label_every_inked_pixel_with_its_garment():
    import torch

    x = torch.zeros(2, 1, 28, 28)
    x[0, 0, 5:10, 5:10] = 1.0  # a square garment of class 1, an empty one of class 2
    images, masks = dense_prediction.canvases(x, torch.tensor([1, 2]), 3, torch.Generator().manual_seed(0))
    assert images.shape == (3, 3, 64, 64) and masks.shape == (3, 64, 64)
    assert torch.equal(masks > 0, images[:, 0] > dense_prediction.INK)  # ink <-> a garment label
    assert set(masks.unique().tolist()) <= {0, 1}
