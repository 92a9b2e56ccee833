"""The DeepSpeed part of the GPU check: ZeRO-2 and ZeRO-3 runs of a Theseus BERT through TheseusTrainer,
each exported with ``trainer.export()`` and compared with the unsharded export of the same weights.

One process, on the GPU (BERT-base 12 -> 6 as in gpu_check.py, random init, bf16 by default), or with
--toy on DeepSpeed's CPU accelerator (gloo; the tiny BERT, fp32, seconds). Per stage it reports the
median training step time, the first and last loss, how many parameters ZeRO partitioned, the exported
successor's type, depth and parameter count, whether the successor runs, and whether it equals what
an unsharded engine loaded with the gathered weights (DeepSpeed's own ``GatheredParameters``) exports.

    python benchmarks/deepspeed_check.py                # CUDA; writes benchmarks/results/deepspeed_check.json
    python benchmarks/deepspeed_check.py --toy          # tiny BERT on the CPU

benchmarks/gpu_check.py runs it as a subprocess (DeepSpeed's process group and Accelerate's
process-wide state stay out of the rest) and puts its report under "deepspeed". A stage that fails
is reported with its error; the other still runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from typing import Any, Dict

# DeepSpeed picks its accelerator at first use: the CPU one for --toy, before anything imports it
if "--toy" in sys.argv[1:]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
for _name, _value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
    os.environ.setdefault(_name, _value)  # one process; deepspeed.init_distributed reads these

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, conditions, finish, quiet_transformers  # noqa: E402
from _training import batch_maker  # noqa: E402
from gpu_check import bert_config, build  # noqa: E402

from theseus_general import ConstantScheduler, Theseus  # noqa: E402
from theseus_general.measure import count_parameters  # noqa: E402

STAGES = (2, 3)


def deepspeed_config(stage: int, bf16: bool) -> Dict[str, Any]:
    # "auto": the Trainer fills these from TrainingArguments
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": stage}}


def run_stage(stage: int, config, device: torch.device, bf16: bool, batch: int, seq: int, warmup: int, steps: int,
              workdir: str) -> Dict[str, Any]:
    import deepspeed
    from accelerate.state import AcceleratorState, GradientState
    from transformers import TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from theseus_general.integrations.hf_trainer import TheseusTrainer

    AcceleratorState._reset_state(reset_partial_state=True)  # one Trainer per stage in this process
    GradientState._reset_state()
    depth = config.num_hidden_layers // 2
    dtype = torch.bfloat16 if bf16 else torch.float32

    def engine(model):  # the same model and plan for the run and its unsharded twin
        return Theseus(model, successor_depth=depth, seed=0, scheduler=ConstantScheduler(0.5))

    th = engine(build(config, torch.device("cpu")))  # the Trainer moves it; DeepSpeed casts it to bf16
    make = batch_maker(batch, seq, config.vocab_size, torch.device("cpu"))
    rows = [{k: v[i] for k, v in make(step).items()} for step in range(warmup + steps) for i in range(batch)]
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())

    args = TrainingArguments(output_dir=os.path.join(workdir, f"zero{stage}"), max_steps=warmup + steps,
                             per_device_train_batch_size=batch, learning_rate=1e-5, seed=0, bf16=bf16,
                             report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
                             dataloader_num_workers=0, deepspeed=deepspeed_config(stage, bf16),
                             average_tokens_across_devices=False)
    trainer = TheseusTrainer(theseus=th, model=th.model, args=args, train_dataset=rows, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # the losses are in the report, not printed per step
    started = time.perf_counter()
    trainer.train()
    wrapped = trainer.model_wrapped
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    step_times = [b - a for a, b in zip([started] + stamps, stamps)][warmup:]

    successor = trainer.export()  # every rank; ZeRO-3 gathers
    partitioned = [p for p in th.model.parameters() if hasattr(p, "ds_id")]
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):  # the reference, without ZeroExport
        state = th.state_dict()
        state["tensors"] = {k: v.detach().to("cpu", copy=True) for k, v in state["tensors"].items()}
    twin = engine(build(config, torch.device("cpu")).to(dtype))
    twin.load_state_dict(state)
    expected = twin.export().state_dict()
    exported = {k: v.detach().cpu() for k, v in successor.state_dict().items()}
    same_keys = set(exported) == set(expected)
    max_diff = max(((exported[k].float() - expected[k].float()).abs().max().item() for k in expected), default=0.0) \
        if same_keys else None

    successor.to(device)
    sample = {k: v.to(device) for k, v in make(10_000).items() if k != "labels"}
    with torch.no_grad():
        logits = successor(**sample).logits
    return {
        "stage": stage, "engine": type(wrapped).__name__, "engine_stage": wrapped.zero_optimization_stage(),
        "partitioned_parameters": len(partitioned), "steps_run": len(stamps), "warmup_steps": warmup,
        "step_s": statistics.median(step_times) if step_times else None,
        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
        "theseus_steps": th.step_count,
        "export": {"type": type(successor).__name__, "layers": successor.config.num_hidden_layers,
                   "dtype": str(next(successor.parameters()).dtype), "params": count_parameters(successor),
                   "predecessor_params": count_parameters(twin.unwrap()),
                   "equals_unsharded_export": same_keys and max_diff == 0.0, "max_abs_diff_to_unsharded": max_diff,
                   "runs": bool(torch.isfinite(logits.float()).all())},
    }


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="tiny BERT on DeepSpeed's CPU accelerator (seconds)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="default bf16 on CUDA, fp32 with --toy")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 32; toy 4)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 128; toy 16)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; toy 1)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default 20; toy 2)")
    parser.add_argument("--stages", default="2,3", help="ZeRO stages, comma-separated (default 2,3)")
    parser.add_argument("--output", default=os.path.join(RESULTS_DIR, "deepspeed_check.json"))
    args = parser.parse_args(argv)
    started = time.time()
    if not args.toy and not torch.cuda.is_available():
        print("error: deepspeed_check.py needs a CUDA device (torch sees none); pass --toy for the CPU run.",
              file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cpu" if args.toy else "cuda")
    if args.toy:
        torch.set_num_threads(1)
    os.environ.setdefault("MASTER_PORT", "29500")
    import deepspeed

    if args.toy:
        import deepspeed.ops

        # the CPU backend would JIT-compile its shared-memory all-reduce op (g++, minutes); gloo does the work
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    quiet_transformers()
    bf16 = (args.precision or ("fp32" if args.toy else "bf16")) == "bf16"
    batch, seq = args.batch or (4 if args.toy else 32), args.seq or (16 if args.toy else 128)
    warmup = args.warmup if args.warmup is not None else (1 if args.toy else 5)
    steps = args.steps or (2 if args.toy else 20)
    config = bert_config(args.toy)
    report: Dict[str, Any] = {
        "conditions": {**conditions(device), "deepspeed": deepspeed.__version__,
                       "deepspeed_accelerator": deepspeed.get_accelerator()._name},
        "setup": {"model": "BertForSequenceClassification(BertConfig(...)) random init", "layers": config.num_hidden_layers,
                  "successor_depth": config.num_hidden_layers // 2, "batch": batch, "seq": seq, "warmup": warmup,
                  "steps": steps, "precision": "bf16" if bf16 else "fp32", "scheduler": "ConstantScheduler(0.5)",
                  "optimizer": "TheseusTrainer's AdamW(lr=1e-5)", "processes": 1},
        "stages": {},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for stage in (int(s) for s in args.stages.split(",")):
            try:
                result = run_stage(stage, config, device, bf16, batch, seq, warmup, steps, workdir)
            except Exception as error:  # reported, and the other stage still runs
                result = {"stage": stage, "error": f"{type(error).__name__}: {error}",
                          "traceback": traceback.format_exc()[-3000:]}
            report["stages"][f"zero{stage}"] = result
            print(f"  ZeRO-{stage}: " + (result["error"] if "error" in result else
                  f"{result['step_s'] * 1e3:.1f} ms/step, loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}, "
                  f"export {result['export']['type']} ({result['export']['layers']} layers), equal to the unsharded "
                  f"export: {result['export']['equals_unsharded_export']}"), flush=True)
    finish(report, args.output, "deepspeed_check.py", argv, started)
    return report


if __name__ == "__main__":
    main()
