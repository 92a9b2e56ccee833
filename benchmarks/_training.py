"""Timing training steps, eager or compiled, with what dynamo compiled along the way (gpu_check, compile)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn


def batch_maker(batch: int, length: int, vocab: int, device: torch.device) -> Callable[[int], Dict[str, torch.Tensor]]:
    def make(step: int) -> Dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(1, vocab, (batch, length), generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g)
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}
    return make


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def dynamo_summary() -> Dict[str, Any]:
    """Graphs compiled, frames dynamo gave up on, and whether it hit the recompile limit
    (then it runs those frames eagerly: fast steps that are not compiled ones)."""
    from torch._dynamo.utils import counters

    gave_up = [reason.splitlines()[0] for reason in counters["unimplemented"]]
    return {
        "graphs": int(counters["stats"]["unique_graphs"]),
        "frames_total": int(counters["frames"]["total"]),
        "frames_compiled": int(counters["frames"]["ok"]),
        "recompile_limit_hit": any("recompile limit" in r.lower() for r in gave_up),
        "gave_up": gave_up,
    }


def time_training(forward: nn.Module, params, make_batch, device: torch.device, warmup: int, steps: int,
                  after_step: Callable[[], None] = lambda: None, budget_s: Optional[float] = None,
                  autocast: bool = True) -> Dict[str, Any]:
    """Step times of `steps` optimizer steps after `warmup` ones (bf16 autocast by default).
    For a `compiled` forward, also what dynamo compiled in warm-up, after it, and whether it gave up."""
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    forward.train()
    times, graphs_at = [], [dynamo_graphs()]
    started = time.perf_counter()
    stopped_early = False
    for step in range(warmup + steps):
        batch = make_batch(step)
        _sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = forward(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after_step()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if step + 1 == warmup:
            graphs_at.append(dynamo_graphs())
        if budget_s is not None and time.perf_counter() - started > budget_s and step + 1 < warmup + steps:
            stopped_early = True
            break
    measured = times[warmup:]
    is_compiled = hasattr(forward, "_orig_mod")  # what torch.compile returns
    result = {
        "step_s": statistics.median(measured) if measured else None,
        "first_step_s": times[0],
        "steps_run": len(times),
        "warmup_steps": warmup,
        "stopped_at_budget": stopped_early,
        "wall_s": time.perf_counter() - started,
    }
    if is_compiled:
        result["graphs_compiled_in_warmup"] = (graphs_at[1] if len(graphs_at) > 1 else dynamo_graphs()) - graphs_at[0]
        result["graphs_compiled_after_warmup"] = dynamo_graphs() - graphs_at[1] if len(graphs_at) > 1 else None
        result["dynamo"] = dynamo_summary()
    return result


def compiled(module: nn.Module, backend: str) -> nn.Module:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # each compiled variant starts from an empty cache and counts its own graphs
    counters.clear()
    return torch.compile(module, backend=backend)


def guarded(name: str, run: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    """A variant that fails is recorded with its error, not hidden and not fatal to the others."""
    try:
        result = run()
    except Exception as error:  # noqa: BLE001 - the JSON must say what broke
        result = {"error": f"{type(error).__name__}: {error}"[:2000]}
    print(f"  {name:<18} " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()),
          flush=True)
    return result


def plain_and_theseus_runs(build: Callable[[], nn.Module], successor_depth: int, make_batch, device: torch.device,
                           warmup: int, steps: int, backend: str, budget_s: float, autocast: bool):
    """The four timed runs compile.py and gpu_check.py compare: plain fine-tuning of `build()`, eager
    then compiled, and a Theseus run on a second `build()` (``ConstantScheduler(0.5)``, seed 0, so
    every step mixes draws), eager then compiled. Returns the runs (name -> result) and the engine,
    still wrapped (the caller exports or unwraps it)."""
    from theseus_general import ConstantScheduler, Theseus

    timing = dict(warmup=warmup, steps=steps, autocast=autocast)
    plain = build()
    runs = {"plain_eager": guarded("plain_eager", lambda: time_training(
        plain, plain.parameters(), make_batch, device, **timing))}
    runs["plain_compiled"] = guarded("plain_compiled", lambda: time_training(
        compiled(plain, backend), plain.parameters(), make_batch, device, budget_s=budget_s, **timing))
    th = Theseus(build(), successor_depth=successor_depth, scheduler=ConstantScheduler(0.5), seed=0)
    runs["theseus_eager"] = guarded("theseus_eager", lambda: time_training(
        th.model, th.trainable_parameters(), make_batch, device, after_step=th.step, **timing))
    runs["theseus_compiled"] = guarded("theseus_compiled", lambda: time_training(
        compiled(th.model, backend), th.trainable_parameters(), make_batch, device, after_step=th.step,
        budget_s=budget_s, **timing))
    return runs, th
