"""The vision example end to end on tiny idx files, its baseline's initialisation, and its data errors."""

import gzip
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import vision_classification  # noqa: E402
from image_data import DataError, load_fashion_mnist, read_idx  # noqa: E402

from theseus_general import Theseus  # noqa: E402


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for stem, n in (("train", 48), ("t10k", 16)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), compress=(stem == "train"))
    return tmp_path


def test_loader_reads_idx_and_holds_out_dev_from_train(idx_dir):
    data = load_fashion_mnist(str(idx_dir), dev_size=8)
    assert data.train[0].shape == (40, 1, 28, 28) and data.dev[0].shape == (8, 1, 28, 28)
    assert data.test[0].shape == (16, 1, 28, 28) and data.test[1].dtype == torch.int64
    assert 0.0 <= data.train[0].min() and data.train[0].max() <= 1.0


def test_loader_errors_name_the_file_and_the_fix(idx_dir, tmp_path):
    with pytest.raises(DataError, match="does not exist.*apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist(str(tmp_path / "nowhere"))
    (idx_dir / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="Missing .*t10k-labels-idx1-ubyte.gz.*--data-dir"):
        load_fashion_mnist(str(idx_dir), dev_size=8)
    empty = tmp_path / "empty.gz"
    with gzip.open(empty, "wb"):
        pass
    with pytest.raises(DataError, match="empty.gz is empty"):
        read_idx(str(empty))
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="corrupt.gz.*corrupt"):
        read_idx(str(corrupt))


@pytest.mark.parametrize("family, extra", [("vit", ["--width", "16", "--depth-pred", "4"]),
                                           ("resnet", ["--width", "4", "--depth-pred", "2"])])
def test_example_runs_end_to_end(idx_dir, tmp_path, family, extra):
    out = tmp_path / "out"
    report = vision_classification.main([
        "--family", family, "--data-dir", str(idx_dir), "--dev-size", "8", "--batch-size", "8",
        "--pretrain-steps", "2", "--steps", "4", "--output", str(out), "--no-save-models", *extra,
    ])
    assert set(report["results"]) == {"predecessor", "theseus", "baseline"}
    assert report["results"]["theseus"]["predecessor_unchanged"] is True
    pred, succ = report["results"]["predecessor"], report["results"]["theseus"]
    assert [2 * b for b in succ["blocks"]] == pred["blocks"]
    assert succ["parameters"] < pred["parameters"] and succ["flops_per_image"] < pred["flops_per_image"]
    assert json.loads((out / "results.json").read_text())["family"] == family
    # the ViT's default recipe asks the first batch whether to match; the ResNet's recipe never matches
    assert (report["start_check"]["agreement"] is None) == (family == "resnet")
    assert (out / "theseus" / "metrics.csv").read_text().count("replacement_rate") == 4
    for plot in ("curriculum.png", "comparison.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_baseline_starts_where_the_theseus_successor_starts():
    torch.manual_seed(0)
    model = vision_classification.build_resnet(4, [2, 2, 2, 2])
    th = Theseus(model, ratio=0.5)
    expected = th.export()  # before any training: successors are the init copies
    th.unwrap()
    baseline = vision_classification.truncated_copy(model, th.plan.successor_depth)
    assert baseline.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in baseline.state_dict().items())


def test_quick_sets_a_small_job_and_explicit_flags_win():
    quick = vision_classification.parse_args(["--family", "resnet", "--quick", "--steps", "7"])
    assert (quick.train_limit, quick.pretrain_steps, quick.steps, quick.no_save_models) == (2000, 30, 7, True)
    assert quick.output == os.path.join("examples", "output", "resnet_quick") and quick.lr == 1e-3  # family default
    full = vision_classification.parse_args(["--family", "resnet"])
    assert (full.train_limit, full.pretrain_steps, full.steps, full.no_save_models) == (None, 800, 300, False)
