"""examples/accelerate_example.py on a tiny BERT and a tiny CSV: one process in-process, and
two real CPU processes (gloo) started with `accelerate launch`, which must draw the same
modules at every step and end with identical weights, close to the one-process run."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

from conftest import save_tiny_classifier, tiny_bert, write_review_csv  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

import _accelerate_worker  # noqa: E402
from _gloo import free_port  # noqa: E402
import accelerate_example  # noqa: E402

from theseus_general.measure import state_checksum  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps its state in process-wide singletons; start and leave each test without it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def tiny_dirs(tmp_path):
    """A 4-layer BERT classifier and tokenizer (as a --model and a --predecessor), and a CSV
    of 120 four-word texts. Without dropout and padding (every text has the same length), one
    process on a batch of 8 computes what two processes on 4 rows each compute, up to float
    rounding (dropout masks come from each process's own random stream)."""
    return save_tiny_classifier(tmp_path / "model", dropout=False), write_review_csv(tmp_path / "data.csv")


def flags(model_dir, csv, out, *extra, fine_tune=False):
    """Tiny settings; the tiny BERT is the predecessor, or (fine_tune=True) the model to fine-tune first."""
    return ["--data", csv, "--test-size", "20", "--dev-size", "20", "--depth", "2", "--steps", "6",
            "--batch-size", "8", "--max-length", "16", "--lr", "1e-3", "--seed", "3", "--cpu", "--output", str(out),
            "--model", model_dir, *([] if fine_tune else ["--predecessor", model_dir]), *extra]


def test_one_process_saves_a_native_successor_and_leaves_the_predecessor(tiny_dirs, tmp_path):
    import transformers

    model_dir, csv = tiny_dirs
    seen = {}

    def record(th, accelerator):
        seen.setdefault("model", th.model)  # the predecessor object the example wrapped
        seen["steps"] = th.step_count

    result = accelerate_example.main(flags(model_dir, csv, tmp_path / "out"), on_step=record)
    # 6 steps, all mixed: the default recipe does no module matching
    assert result["processes"] == 1 and result["theseus_steps"] == seen["steps"] == 6
    assert result["predecessor_layers"] == 4 and result["successor_layers"] == 2
    assert result["predecessor_unchanged"] is True
    # independently: the wrapped-and-unwrapped predecessor equals the checkpoint it was loaded from
    assert state_checksum(seen["model"]) == state_checksum(transformers.AutoModelForSequenceClassification.from_pretrained(model_dir))
    saved = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "successor")
    assert saved.config.num_hidden_layers == 2 and len(saved.bert.encoder.layer) == 2
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out" / "successor")("the film")["input_ids"]
    assert 0.0 <= result["dev_accuracy_successor"] <= 1.0 and result["dev_examples"] == 20


def test_fine_tunes_a_predecessor_and_steps_once_per_optimiser_step(tiny_dirs, tmp_path):
    model_dir, csv = tiny_dirs
    args = flags(model_dir, csv, tmp_path / "out", "--gradient-accumulation-steps", "2", "--finetune-steps", "3",
                 fine_tune=True)
    rates = []
    result = accelerate_example.main(args, on_step=lambda th, acc: rates.append(th.replacement_rate))
    # 6 mixed optimiser steps of 2 micro-batches each: the schedule moved 6 times, not 12
    assert result["theseus_steps"] == 6 and len(rates) == 6 and rates[-1] == 1.0
    assert result["successor_layers"] == 2 and result["predecessor_unchanged"] is True


def test_two_cpu_processes_draw_alike_and_end_identical(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    model_dir, csv = tiny_dirs
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), os.path.join(HERE, "_accelerate_worker.py"), str(two)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(launch + flags(model_dir, csv, two / "out"), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _accelerate_worker.run(str(one), flags(model_dir, csv, one / "out"))  # meanwhile: one process, whole batches
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]

    results = [json.loads((two / f"result-{r}.json").read_text()) for r in range(2)]
    assert [r["processes"] for r in results] == [2, 2]
    draws = [json.loads((two / f"draws-{r}.json").read_text()) for r in range(2)]
    assert len(draws[0]) == 6 and draws[0] == draws[1] == json.loads((one / "draws-0.json").read_text())
    # some group ran its predecessor while the successors trained: with find_unused_parameters=False,
    # DDP would have failed at the next step if that successor had left the graph
    assert any(not used for step in draws[0][:-1] for used in step["successor"].values())
    assert draws[0][-1]["rate"] == 1.0  # and the rest-copies trained after the DDP re-wrap

    w0, w1 = (load_file(str(two / f"weights-{r}.safetensors")) for r in range(2))
    reference = load_file(str(one / "weights-0.safetensors"))
    assert set(w0) == set(w1) == set(reference) and any(k.startswith("rest.") for k in w0)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k  # DDP averaged the gradients: the processes never diverge
        torch.testing.assert_close(w0[k], reference[k], rtol=1e-4, atol=1e-5)  # same global batches as one process
    initial = tiny_bert(num_layers=4).classifier.weight
    # rest-copies come in wrapping order: the last one shaped like the classifier's weight is its copy
    head = max((k for k in w0 if k.startswith("rest.") and w0[k].shape == initial.shape), key=lambda k: int(k.split(".")[1]))
    assert not torch.equal(w0[head], initial)  # the classifier copy trained
    assert (two / "out" / "successor" / "config.json").exists()
