"""DeepSpeed ZeRO on the CPU (DeepSpeed's CPU accelerator, gloo), one process and two real processes
(tests/_deepspeed_worker.py, all started at once by one fixture):

  * ZeRO-2 and ZeRO-3 through TheseusTrainer: a tiny BERT 4 -> 2 with mixed draws; ``trainer.export()``
    gives the native successor, equal to an unsharded twin's export of the same weights; two processes
    match one; a run resumed from the Trainer's DeepSpeed checkpoint ends bit-identical; without idle
    successors (p = 1) the run ends where the one without DeepSpeed ends;
  * ``deepspeed.initialize`` (ZeRO-3, bf16) and Accelerate's loop with a DeepSpeed plugin, exported
    with ``ZeroExport``;
  * ZeroExport's mechanism and refusal, in this process, without DeepSpeed."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

# the workers import deepspeed; this process does not (its import has process-wide effects: logging,
# accelerator detection), so only its presence is checked. CI installs it (the [test] extra).
if importlib.util.find_spec("deepspeed") is None:
    pytest.skip("deepspeed is not installed (pip install -e '.[test]')", allow_module_level=True)
pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from conftest import bert_batch, tiny_bert  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import _deepspeed_worker as worker  # noqa: E402
from _gloo import free_port  # noqa: E402

from theseus_general import ConstantScheduler, LinearScheduler, Theseus  # noqa: E402
from theseus_general.errors import EngineStateError, ExportError  # noqa: E402
from theseus_general.integrations.deepspeed import ZeroExport  # noqa: E402

STAGES = (2, 3)


def launch(out, world_size: int):
    """Start `world_size` worker processes (every run of the worker each) writing to `out`."""
    out.mkdir()
    port = free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
    procs = []
    for rank in range(world_size):
        env = dict(base, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        command = [sys.executable, os.path.join(HERE, "_deepspeed_worker.py"), str(out), *map(str, STAGES), "raw3", "acc3"]
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{1: one-process dir, 2: two-process dir}; the three processes run at once."""
    root = tmp_path_factory.mktemp("deepspeed")
    procs = {1: launch(root / "one", 1), 2: launch(root / "two", 2)}
    try:
        for group in procs.values():
            for p in group:
                output, _ = p.communicate(timeout=300)
                assert p.returncode == 0, output[-6000:]
    finally:
        for group in procs.values():
            for p in group:
                p.kill()
    return {1: root / "one", 2: root / "two"}


def report(directory, stage: int, rank: int = 0) -> dict:
    return json.loads((directory / f"zero{stage}-{rank}.json").read_text())


@pytest.mark.parametrize("stage", STAGES)
def test_zero_run_trains_and_exports_a_plain_native_successor(runs, stage):
    r = report(runs[1], stage)
    assert r["engine_stage"] == stage and r["step_count"] == worker.STEPS
    # ZeRO-3 really partitioned every parameter (and ZeRO-2 none): export had to gather them
    assert (r["partitioned_parameters"] > 0) == (stage == 3)
    # mixed draws: some group ran its predecessor while the successors trained
    assert any(not ran for step in r["draws"] for ran in step.values())
    assert r["export_type"] == "BertForSequenceClassification" and r["export_layers"] == worker.DEPTH
    assert r["deepspeed_attributes_on_export"] == [] and r["hooks_on_export"] == 0
    assert r["export_twice_equal"]
    # the export set DeepSpeed's hooks and state aside and put them back: the engine computes as before
    assert r["loss_after_export"] == r["loss_before_export"]
    exported = load_file(str(runs[1] / f"zero{stage}-0.export.safetensors"))
    untrained = Theseus(worker.tiny_bert_without_dropout(), successor_depth=worker.DEPTH)
    with pytest.warns(UserWarning, match="never trained"):
        initial = untrained.export().state_dict()
    assert set(exported) == set(initial)
    assert not torch.equal(exported["bert.encoder.layer.1.output.dense.weight"],
                           initial["bert.encoder.layer.1.output.dense.weight"])  # a successor trained


@pytest.mark.parametrize("stage", STAGES)
def test_zero_export_equals_the_unsharded_export_of_the_same_weights(runs, stage):
    """The twin (an unsharded engine loaded with the tensors DeepSpeed's own GatheredParameters gave)
    exports exactly what trainer.export() exported from the sharded run."""
    r = report(runs[1], stage)
    twin = Theseus(worker.tiny_bert_without_dropout(), successor_depth=worker.DEPTH, seed=0,
                   scheduler=LinearScheduler(base=0.25, k=0.15))
    twin.load_state_dict({"tensors": load_file(str(runs[1] / f"zero{stage}-0.engine.safetensors")), "meta": r["meta"]})
    expected = twin.export().state_dict()
    exported = load_file(str(runs[1] / f"zero{stage}-0.export.safetensors"))
    assert set(exported) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


@pytest.mark.parametrize("stage", STAGES)
def test_two_processes_draw_alike_and_export_what_one_process_exports(runs, stage):
    ranks = [report(runs[2], stage, rank) for rank in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["draws"] == ranks[1]["draws"] == report(runs[1], stage)["draws"]
    exports = [load_file(str(runs[2] / f"zero{stage}-{rank}.export.safetensors")) for rank in range(2)]
    one = load_file(str(runs[1] / f"zero{stage}-0.export.safetensors"))
    assert set(exports[0]) == set(exports[1]) == set(one)
    for name in one:
        assert torch.equal(exports[0][name], exports[1][name]), name  # every rank exports the same model
        # the same global batches of 4 rows, 2 per process: one process's result up to float rounding
        torch.testing.assert_close(exports[0][name], one[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("processes", (1, 2))
@pytest.mark.parametrize("stage", STAGES)
def test_a_run_resumed_from_its_deepspeed_checkpoint_ends_bit_identical(runs, stage, processes):
    """A new engine and TheseusTrainer resumed from the Trainer's DeepSpeed checkpoint of step 3 (each
    rank its ZeRO shards) draw what the uninterrupted run drew and export the same model."""
    for rank in range(processes):
        r = report(runs[processes], stage, rank)
        assert r["resumed_step_count"] == worker.STEPS
        assert r["resumed_draws"] == r["draws"][worker.STEPS // 2:]
        resumed = load_file(str(runs[processes] / f"zero{stage}-{rank}.resumed.safetensors"))
        uninterrupted = load_file(str(runs[processes] / f"zero{stage}-{rank}.export.safetensors"))
        assert set(resumed) == set(uninterrupted)
        for name, tensor in uninterrupted.items():
            assert torch.equal(resumed[name], tensor), (rank, name)


@pytest.fixture(scope="module")
def without_deepspeed(tmp_path_factory):
    """The export of the workers' p = 1 run by TheseusTrainer without DeepSpeed (one process, this one)."""
    from theseus_general.integrations.hf_trainer import TheseusTrainer

    th = Theseus(worker.tiny_bert_without_dropout(), successor_depth=worker.DEPTH, seed=0,
                 scheduler=LinearScheduler(base=1.0, k=0.15))
    args = worker.trainer_arguments(str(tmp_path_factory.mktemp("plain")), 1, save_strategy="no", use_cpu=True)
    trainer = TheseusTrainer(theseus=th, model=th.model, args=args, train_dataset=worker.train_rows())
    trainer.train()
    return trainer.export().state_dict()


@pytest.mark.parametrize("processes", (1, 2))
@pytest.mark.parametrize("stage", STAGES)
def test_without_idle_successors_zero_trains_what_the_run_without_deepspeed_trains(runs, without_deepspeed, stage,
                                                                                   processes):
    """Every successor running from step 0 (p = 1): ZeRO-2/3 with 1 or 2 processes end where the same
    TheseusTrainer run without DeepSpeed ends, up to float rounding (with idle successors they do not:
    docs/training.md, DeepSpeed)."""
    for rank in range(processes):
        exported = load_file(str(runs[processes] / f"zero{stage}-{rank}.p1.safetensors"))
        assert set(exported) == set(without_deepspeed)
        for name, tensor in without_deepspeed.items():
            torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("processes", (1, 2))
def test_zero_export_without_the_trainer_bf16_zero3(runs, processes):
    """deepspeed.initialize itself, ZeRO-3 in bf16: ZeroExport(th) before it, zero.export() after; the
    export equals the unsharded bf16 export, and zero.state_dict() holds DeepSpeed's gathered tensors."""
    directory = runs[processes]
    meta = json.loads((directory / "raw3-0.json").read_text())
    assert meta["partitioned_parameters"] > 0 and meta["step_count"] == 3
    reference = load_file(str(directory / "raw3-0.engine.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in reference.values() if t.is_floating_point())
    state = load_file(str(directory / "raw3-0.zero_state.safetensors"))
    assert set(state) == set(reference) and all(torch.equal(state[k], reference[k]) for k in reference)
    twin = Theseus(worker.tiny_bert_without_dropout().to(torch.bfloat16), successor_depth=worker.DEPTH, seed=0,
                   scheduler=ConstantScheduler(0.5))
    twin.load_state_dict({"tensors": reference, "meta": meta["meta"]})
    expected = twin.export().state_dict()
    for rank in range(processes):
        exported = load_file(str(directory / f"raw3-{rank}.export.safetensors"))
        assert set(exported) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(exported[name], tensor), (rank, name)


def test_accelerate_with_a_deepspeed_plugin_zero3(runs):
    """Accelerate's own loop, DeepSpeedPlugin(zero_stage=3): 1 and 2 processes export the unsharded
    export of their weights, on every rank the same, and 2 processes what 1 process exports."""
    one = {}
    for processes in (1, 2):
        directory = runs[processes]
        meta = json.loads((directory / "acc3-0.json").read_text())
        assert meta["processes"] == processes and meta["engine"] == "DeepSpeedEngine"
        assert meta["partitioned_parameters"] > 0 and meta["step_count"] == 4
        twin = Theseus(worker.tiny_bert_without_dropout(), successor_depth=worker.DEPTH, seed=0,
                       scheduler=ConstantScheduler(0.5))
        twin.load_state_dict({"tensors": load_file(str(directory / "acc3-0.engine.safetensors")), "meta": meta["meta"]})
        expected = twin.export().state_dict()
        for rank in range(processes):
            exported = load_file(str(directory / f"acc3-{rank}.export.safetensors"))
            assert set(exported) == set(expected)
            for name, tensor in expected.items():
                assert torch.equal(exported[name], tensor), (processes, rank, name)
        if processes == 1:
            one = expected
        else:
            for name, tensor in expected.items():
                torch.testing.assert_close(tensor, one[name], rtol=1e-4, atol=1e-5)


def test_zero_export_refuses_a_model_deepspeed_already_partitioned():
    th = Theseus(tiny_bert(num_layers=4), successor_depth=2)
    next(th.model.parameters()).ds_id = 0  # what ZeRO-3 leaves on every parameter it partitions
    with pytest.raises(EngineStateError, match="before"):
        ZeroExport(th)


def test_zero_export_sets_aside_what_was_added_to_the_modules_and_puts_it_back():
    """The mechanism alone, without DeepSpeed: an attribute, a hook and a _parameters dict type added
    after ZeroExport(th), as ZeRO-3 adds them, are gone inside gathered() and back after it."""
    from collections import OrderedDict

    class OwnDict(OrderedDict):
        pass

    th = Theseus(tiny_bert(num_layers=4), successor_depth=2)
    th.mark_trained()  # no untrained-export warning: the export itself is what is checked
    zero = ZeroExport(th)
    layer = th.model.bert.embeddings.LayerNorm
    layer.ds_grads_remaining = 0

    def refuse(module, args):
        raise RuntimeError("DeepSpeed's hook ran")

    handle = layer.register_forward_pre_hook(refuse)
    layer._parameters = OwnDict(layer._parameters)
    inputs = {k: v for k, v in bert_batch(seed=0).items() if k != "labels"}
    with pytest.raises(ExportError, match="ds_grads_remaining"):
        th.export()  # what th.export() alone does with the model DeepSpeed changed
    with zero.gathered() as model:
        assert not hasattr(layer, "ds_grads_remaining") and type(layer._parameters) is dict
        model.eval()
        model(**inputs)  # the hook is set aside
    assert layer.ds_grads_remaining == 0 and type(layer._parameters) is OwnDict
    with pytest.raises(RuntimeError, match="hook ran"):
        th.model(**inputs)  # and back
    successor = zero.export()
    assert successor.config.num_hidden_layers == 2
    assert not hasattr(successor.bert.embeddings.LayerNorm, "ds_grads_remaining")
    handle.remove()
