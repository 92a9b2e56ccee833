"""One process of a DeepSpeed ZeRO run of `TheseusTrainer` on the CPU (DeepSpeed's CPU accelerator, gloo).

    DS_ACCELERATOR=cpu RANK=r WORLD_SIZE=n LOCAL_RANK=r MASTER_ADDR=... MASTER_PORT=... \\
        python tests/_deepspeed_worker.py OUT_DIR STAGE [STAGE ...]     (a STAGE: 2, 3, raw3 or acc3)

For each ZeRO stage: a 4-layer tiny BERT without dropout, wrapped 4 -> 2, trained 6 optimiser steps
by TheseusTrainer with TrainingArguments(deepspeed={"zero_optimization": {"stage": STAGE}, ...}) on
a global batch of 4 rows (4 / n per process), checkpointed at step 3, then ``trainer.export()``; then a
new engine and Trainer resume from the step-3 checkpoint, train to step 6 and export
(.resumed.safetensors); then a run with every successor from step 0 (p = 1) exports (.p1.safetensors). Writes, per stage and rank,
to OUT_DIR/zero<STAGE>-<rank>.*: the export's state dict (.export.safetensors), the engine's tensors
gathered with DeepSpeed's own ``GatheredParameters`` and its meta (.engine.safetensors, .json, for an
unsharded twin to export), and what the test checks (.json: draws of every step, step count, the
export's type and depth, DeepSpeed attributes or hooks left on it, the run's loss on a batch through
the DeepSpeed engine before and after the export).

raw3: ``deepspeed.initialize`` itself (no Trainer) with ZeRO-3 and bf16, a client AdamW, 3 steps at
p = 0.5, exported with ``ZeroExport``; writes raw3-<rank>.* (the export, DeepSpeed's gathered engine
tensors and ZeroExport.state_dict()'s, the meta).

acc3: Accelerate's own loop with a DeepSpeed plugin (ZeRO-3, fp32), 4 steps of a global batch of 4
split over the processes, at p = 0.5, exported with ``ZeroExport``; writes acc3-<rank>.* (the export,
DeepSpeed's gathered engine tensors, the meta and the number of processes Accelerate counted).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

STEPS, GLOBAL_BATCH, LAYERS, DEPTH = 6, 4, 4, 2


def tiny_bert_without_dropout():
    """conftest.tiny_bert's shape, without dropout (so n processes compute what one process does)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def deepspeed_config(stage: int) -> dict:
    # "auto": the Trainer fills these from TrainingArguments
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": stage}}


def cpu_processes() -> None:
    """Accelerate's process state for DeepSpeed on the CPU. TrainingArguments(deepspeed=...) alone makes
    Accelerate (1.16) look for a device backend, find none on the CPU and count one process, although
    DeepSpeed's gloo group has several (DeepSpeed then fails: "train_batch_size is not equal to
    micro_batch_per_gpu * gradient_acc_step * world_size 2 != 2 * 1 * 2"). With the backend named, it
    counts them; TrainingArguments(accelerator_config={"use_configured_state": True}) then uses this state."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what TrainingArguments sets for its own PartialState
    try:
        PartialState(backend="gloo")
    finally:
        del os.environ["ACCELERATE_USE_DEEPSPEED"]


def trainer_arguments(output_dir: str, world_size: int, **settings):
    """The Trainer settings every run here shares (with DeepSpeed or, for the tests' reference, without)."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world_size,
                             learning_rate=1e-3, seed=0, report_to="none", logging_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0, **settings)


def train_rows():
    from conftest import bert_batch

    batch = bert_batch(batch=16, length=10, seed=5)
    return [{k: v[i] for k, v in batch.items()} for i in range(16)]


def trainer_for_stage(out: str, stage: int, world_size: int, resume: bool = False, base: float = 0.25):
    """(th, TheseusTrainer) of the ZeRO-`stage` run: a new engine on the tiny BERT; it checkpoints at
    half of its steps (DeepSpeed's own checkpoint, through the Trainer), and resume=True starts a new
    engine and Trainer from that checkpoint; `base` is the first step's replacement rate (1.0: every
    successor runs from step 0, no checkpoint). Returns (th, trainer, draws)."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers import TrainerCallback

    from theseus_general import LinearScheduler, Theseus
    from theseus_general.integrations.hf_trainer import TheseusTrainer

    AcceleratorState._reset_state(reset_partial_state=True)  # several Trainers in this process
    GradientState._reset_state()
    cpu_processes()
    th = Theseus(tiny_bert_without_dropout(), successor_depth=DEPTH, seed=0,
                 scheduler=LinearScheduler(base=base, k=0.15))  # base 0.25: mixed draws, p = 1 from step 5
    draws = []

    class RecordDraws(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):  # before TheseusCallback's th.step()
            draws.append({str(g): ran for g, ran in th.last_decisions.items()})

    checkpoint = not resume and base < 1.0
    args = trainer_arguments(args_dir(out, stage) + ("" if base < 1.0 else "-p1"), world_size,
                             save_strategy="steps" if checkpoint else "no", save_steps=STEPS // 2,
                             deepspeed=deepspeed_config(stage), accelerator_config={"use_configured_state": True},
                             # BERT's loss is a mean over the process's rows; left True, the Trainer would
                             # multiply it by the number of processes (it expects a loss summed over rows)
                             average_tokens_across_devices=False)
    trainer = TheseusTrainer(theseus=th, model=th.model, args=args, train_dataset=train_rows(),
                             callbacks=[RecordDraws()])
    return th, trainer, draws


def run_stage(out: str, stage: int, rank: int, world_size: int) -> None:
    import torch
    import deepspeed
    from safetensors.torch import save_file

    from conftest import bert_batch

    th, trainer, draws = trainer_for_stage(out, stage, world_size)
    trainer.train()
    engine = trainer.model_wrapped
    assert isinstance(engine, deepspeed.DeepSpeedEngine), type(engine)

    probe = bert_batch(batch=4, length=10, seed=9)
    engine.eval()
    with torch.no_grad():
        loss_before = engine(**probe).loss.item()
    successor = trainer.export()
    with torch.no_grad():
        loss_after = engine(**probe).loss.item()  # DeepSpeed's hooks and state were put back
    successor_again = trainer.export()

    # the reference, independent of ZeroExport: DeepSpeed's own gather of the engine's tensors
    params = [p for p in th.model.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        state = th.state_dict()
        engine_tensors = {k: v.detach().clone().contiguous() for k, v in state["tensors"].items()}

    prefix = os.path.join(out, f"zero{stage}-{rank}")
    save_file({k: v.contiguous() for k, v in successor.state_dict().items()}, prefix + ".export.safetensors")
    save_file(engine_tensors, prefix + ".engine.safetensors")
    exported_again = successor_again.state_dict()
    report = {
        "stage": stage, "world_size": world_size, "engine_stage": engine.zero_optimization_stage(),
        "partitioned_parameters": len(params), "step_count": th.step_count, "draws": draws, "meta": state["meta"],
        "export_type": type(successor).__name__, "export_layers": successor.config.num_hidden_layers,
        "export_twice_equal": all(torch.equal(v, exported_again[k]) for k, v in successor.state_dict().items()),
        "deepspeed_attributes_on_export": sorted({a for m in successor.modules() for a in vars(m) if a.startswith("ds_")}
                                                 | {a for p in successor.parameters() for a in vars(p) if a.startswith("ds_")}),
        "hooks_on_export": sum(len(h) for m in successor.modules() for n, h in vars(m).items()
                               if "_hooks" in n and isinstance(h, dict)),
        "loss_before_export": loss_before, "loss_after_export": loss_after,
    }
    # a new engine and Trainer resumed from the DeepSpeed checkpoint of step STEPS // 2
    resumed_th, resumed, resumed_draws = trainer_for_stage(out, stage, world_size, resume=True)
    resumed.train(resume_from_checkpoint=os.path.join(args_dir(out, stage), f"checkpoint-{STEPS // 2}"))
    save_file({k: v.contiguous() for k, v in resumed.export().state_dict().items()}, prefix + ".resumed.safetensors")
    report.update(resumed_step_count=resumed_th.step_count, resumed_draws=resumed_draws)
    with open(prefix + ".json", "w") as f:
        json.dump(report, f)

    # every successor running from step 0: no idle successor, so the run is the one without DeepSpeed
    _, every_step, _ = trainer_for_stage(out, stage, world_size, base=1.0)
    every_step.train()
    save_file({k: v.contiguous() for k, v in every_step.export().state_dict().items()}, prefix + ".p1.safetensors")


def args_dir(out: str, stage: int) -> str:
    return os.path.join(out, f"trainer{stage}")


def run_raw(out: str, rank: int, world_size: int) -> None:
    import torch
    import deepspeed
    from safetensors.torch import save_file

    from conftest import bert_batch
    from theseus_general import ConstantScheduler, Theseus
    from theseus_general.integrations.deepspeed import ZeroExport

    th = Theseus(tiny_bert_without_dropout(), successor_depth=DEPTH, seed=0, scheduler=ConstantScheduler(0.5))
    zero = ZeroExport(th)  # before deepspeed.initialize
    optimizer = torch.optim.AdamW(th.trainable_parameters(), lr=1e-3)
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    engine, _, _, _ = deepspeed.initialize(model=th.model, optimizer=optimizer, config=config)
    per_rank = GLOBAL_BATCH // world_size
    for step in range(3):
        batch = {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in bert_batch(batch=GLOBAL_BATCH, seed=step).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        th.step(loss)
    successor = zero.export()
    full = zero.state_dict()
    params = [p for p in th.model.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # the reference, without ZeroExport
        state = th.state_dict()
        reference = {k: v.detach().clone().contiguous() for k, v in state["tensors"].items()}
    prefix = os.path.join(out, f"raw3-{rank}")
    save_file({k: v.contiguous() for k, v in successor.state_dict().items()}, prefix + ".export.safetensors")
    save_file(reference, prefix + ".engine.safetensors")
    save_file(full["tensors"], prefix + ".zero_state.safetensors")
    with open(prefix + ".json", "w") as f:
        json.dump({"meta": state["meta"], "partitioned_parameters": len(params), "step_count": th.step_count}, f)


def run_accelerate(out: str, rank: int, world_size: int) -> None:
    import torch
    import deepspeed
    from accelerate import Accelerator, DataLoaderConfiguration, DeepSpeedPlugin, InitProcessGroupKwargs
    from accelerate.state import AcceleratorState, GradientState
    from safetensors.torch import save_file

    from conftest import bert_batch
    from theseus_general import ConstantScheduler, Theseus
    from theseus_general.integrations.deepspeed import ZeroExport

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    th = Theseus(tiny_bert_without_dropout(), successor_depth=DEPTH, seed=0, scheduler=ConstantScheduler(0.5))
    zero = ZeroExport(th)  # before accelerator.prepare
    # backend="gloo": on the CPU, Accelerate (1.16) finds no device backend and would count one process
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=3, gradient_accumulation_steps=1),
                              dataloader_config=DataLoaderConfiguration(split_batches=True),
                              kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    batch = bert_batch(batch=16, length=10, seed=5)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(16)]
    optimizer = torch.optim.AdamW(th.trainable_parameters(), lr=1e-3)
    model, optimizer, loader = accelerator.prepare(th.model, optimizer,
                                                   torch.utils.data.DataLoader(rows, batch_size=GLOBAL_BATCH))
    model.train()
    for inputs in loader:
        loss = model(**inputs).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        th.step(loss)
    successor = zero.export()
    params = [p for p in th.model.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # the reference, without ZeroExport
        state = th.state_dict()
        reference = {k: v.detach().clone().contiguous() for k, v in state["tensors"].items()}
    prefix = os.path.join(out, f"acc3-{rank}")
    save_file({k: v.contiguous() for k, v in successor.state_dict().items()}, prefix + ".export.safetensors")
    save_file(reference, prefix + ".engine.safetensors")
    with open(prefix + ".json", "w") as f:
        json.dump({"meta": state["meta"], "partitioned_parameters": len(params), "step_count": th.step_count,
                   "processes": accelerator.num_processes, "engine": type(model).__name__}, f)


def main() -> None:
    import torch

    torch.set_num_threads(1)
    import deepspeed.ops

    # DeepSpeed's CPU backend otherwise JIT-compiles its shared-memory all-reduce op (g++, about a minute
    # and a half here) on creating its communication backend; training does not use it (gloo does the
    # collectives), and DeepSpeed keeps this dict for such edits.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    out, stages = sys.argv[1], sys.argv[2:]
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    try:
        for stage in stages:
            if stage == "raw3":
                run_raw(out, rank, world_size)
            elif stage == "acc3":
                run_accelerate(out, rank, world_size)
            else:
                run_stage(out, int(stage), rank, world_size)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # both ranks done before either tears gloo down
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
