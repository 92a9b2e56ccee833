"""Save and resume a Theseus run: crash-safe writes, loads that never unpickle code.

    ckpt = CheckpointManager("runs/ckpt", keep=2)
    resumed = ckpt.resume(th, optimizer, lr_scheduler)     # None on a fresh start
    start = resumed.data_position if resumed else 0
    for step in range(start, total):
        ...; optimizer.step(); lr_scheduler.step(); th.step()
        ckpt.save(th, optimizer, lr_scheduler, data_position=step + 1)

A checkpoint is one directory ``step-<n>/`` holding
  * ``engine.safetensors``: successor weights (and the rest-copies with train_rest);
  * ``rng.safetensors``: torch CPU/CUDA generator states and numpy's, when numpy is loaded;
  * ``optimizer.pt``: optimiser and LR-scheduler state dicts (read with weights_only=True);
  * ``state.json``: step, seed, plan, the run's `TheseusConfig`, data position, Python's RNG,
    your ``extra`` and the SHA-256 of every file above, so a truncated or altered file is named on load.

Writes go to a hidden temporary directory that is renamed into place (os.replace) once
complete, so a crash mid-write leaves the previous checkpoint as the latest. Loading
reads and checks everything first (files, hashes, plan, shapes, optimiser layout) and
changes nothing of the model, optimiser or RNGs when any check fails.
Under DDP, save from rank 0 only; every rank loads.

A plain model trained by ``fit(model, ..., checkpoints=)`` saves the same files, its whole state_dict in
``engine.safetensors`` (`ModuleState`).

A sharded run (FSDP2) saves with ``torch.distributed.checkpoint`` instead, every rank taking part:
``save_sharded_checkpoint(dir, th, optimizer, lr_scheduler)`` and ``load_sharded_checkpoint(...)``
(each rank writes and reads its own shards and RNG states; see their docstrings).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from .errors import CheckpointError

# The engine is known here only through its state_dict() / load_state_dict() / check_state_dict(), so
# this file format sits below the engine, which rebuilds itself from a checkpoint (Theseus.from_checkpoint).
Theseus = Any

FORMAT = 1
_STEP_DIR = re.compile(r"step-(\d+)")
_FILES = ("engine.safetensors", "rng.safetensors", "optimizer.pt")
MODULE_KIND = "module"  # state.json's "engine" part of a plain model's checkpoint says so


class ModuleState:
    """A plain model's side of a checkpoint, in the engine's format: its state_dict and the optimiser steps
    done. What fit(model, ..., checkpoints=) saves and resumes for an ``nn.Module`` (a baseline, a predecessor
    being trained); an engine's own checkpoints hold its successors and plan instead."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.step_count = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"tensors": dict(self.model.state_dict()),
                "meta": {"kind": MODULE_KIND, "step": self.step_count, "model": type(self.model).__qualname__}}

    def check_state_dict(self, state: Dict[str, Any]) -> None:
        """Raises CheckpointError when the checkpoint is not this model's; changes nothing."""
        if state["meta"].get("kind") != MODULE_KIND:
            raise CheckpointError("The checkpoint holds a Theseus run (successors and plan), not a plain model's "
                                  "weights; resume it with that run's Theseus engine as fit()'s target.")
        live, saved = self.model.state_dict(), state["tensors"]
        missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
        reshaped = sorted(k for k in set(live) & set(saved) if live[k].shape != saved[k].shape)
        if missing or unexpected or reshaped:
            raise CheckpointError(
                f"The checkpoint's weights do not fit this {type(self.model).__qualname__} (saved from a "
                f"{state['meta'].get('model')}): missing {missing[:5]}, unexpected {unexpected[:5]}, other shapes "
                f"{reshaped[:5]}. Resume with the model that was being trained, or use a new checkpoint directory.")

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["tensors"])
        self.step_count = int(state["meta"]["step"])


def _refuse_module_checkpoint(path: str, meta: Dict[str, Any]) -> None:
    if meta.get("kind") == MODULE_KIND:
        raise CheckpointError(f"{path} holds a plain model's training state (fit() of an nn.Module, no successors "
                              "or plan); resume it with that model as fit()'s target, not a Theseus engine.")


@dataclass
class Resumed:
    """What load_checkpoint restored, besides the objects it was given."""

    path: str
    step: int
    data_position: Optional[int]
    extra: Dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- saving
def save_checkpoint(path: str, th: Theseus, optimizer: Optional[torch.optim.Optimizer] = None,
                    lr_scheduler: Any = None, data_position: Optional[int] = None,
                    extra: Optional[Dict[str, Any]] = None) -> str:
    """Write a checkpoint directory at `path` atomically; returns `path`.

    data_position: how far the data has been read (e.g. batches consumed), given back on load.
    extra: any JSON-safe dict of your own (e.g. best dev accuracy so far)."""
    from safetensors.torch import save as st_save

    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    try:
        extra_json = json.loads(json.dumps(extra or {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"extra= must be JSON-safe (numbers, strings, lists, dicts): {e}") from None

    engine = th.state_dict()
    # Copies: safetensors refuses shared storage (tied weights), and the run goes on.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in engine["tensors"].items()}
    rng_tensors, rng_json = _capture_rng()
    blobs = {"engine.safetensors": st_save(tensors), "rng.safetensors": st_save(rng_tensors)}
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None}, buffer)
    blobs["optimizer.pt"] = buffer.getvalue()

    state = {
        "format": FORMAT,
        "engine": engine["meta"],
        "data_position": data_position,
        "extra": extra_json,
        "rng": rng_json,
        "has_optimizer": optimizer is not None,
        "has_lr_scheduler": lr_scheduler is not None,
        "files": {name: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for name, b in blobs.items()},
    }
    tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        for name, data in blobs.items():
            _write(os.path.join(tmp, name), data)
        _write(os.path.join(tmp, "state.json"), json.dumps(state, indent=1).encode())
        if os.path.exists(path):  # re-saving the same step: move the old one aside first
            old = tmp + "-old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _capture_rng():
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, internal, gauss = random.getstate()
    info: Dict[str, Any] = {"python": [version, list(internal), gauss]}
    np = sys.modules.get("numpy")  # only when the run uses numpy
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
        info["numpy"] = [name, int(pos), int(has_gauss), float(cached)]
    return tensors, info


# ---------------------------------------------------------------- loading
def load_checkpoint(path: str, th: Theseus, optimizer: Optional[torch.optim.Optimizer] = None,
                    lr_scheduler: Any = None, restore_rng: bool = True) -> Resumed:
    """Restore a checkpoint into `th` (and the optimiser, LR scheduler and RNGs).

    Everything is read and checked before anything is changed; on any problem
    CheckpointError says which file or field and nothing of yours was modified."""
    from safetensors.torch import load as st_load

    state, blobs = _read_verified(path)
    try:
        tensors = st_load(blobs["engine.safetensors"])
        rng_tensors = st_load(blobs["rng.safetensors"])
    except Exception as e:  # safetensors raises its own error types on bad headers
        raise CheckpointError(f"{path}: a safetensors file cannot be parsed ({e}); the checkpoint is corrupted.") from None
    try:
        saved = torch.load(io.BytesIO(blobs["optimizer.pt"]), weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(f"{path}/optimizer.pt cannot be read with weights_only=True ({e}).") from None

    for what, obj, flag in (("optimizer", optimizer, "has_optimizer"), ("lr_scheduler", lr_scheduler, "has_lr_scheduler")):
        if obj is not None and not state.get(flag):
            raise CheckpointError(f"{path} holds no {what} state, but one was given to restore; pass {what}=None.")
    engine_state = {"tensors": tensors, "meta": state["engine"]}
    if not isinstance(th, ModuleState):
        _refuse_module_checkpoint(path, state["engine"])
    th.check_state_dict(engine_state)  # plan first: the most telling difference
    if optimizer is not None:
        _check_optimizer(path, optimizer, saved["optimizer"])

    th.load_state_dict(engine_state)
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if restore_rng:
        _restore_rng(rng_tensors, state["rng"])
    return Resumed(os.path.abspath(path), int(state["engine"]["step"]), state.get("data_position"), state.get("extra") or {})


def read_engine_meta(path: str) -> Dict[str, Any]:
    """The engine's part of a checkpoint's state.json (step, seed, plan, config), checked against its hashes."""
    state, _ = _read_verified(path)
    _refuse_module_checkpoint(path, state["engine"])
    return state["engine"]


def _read_verified(path: str):
    if not os.path.isdir(path):
        raise CheckpointError(f"No checkpoint directory at {path!r}; check the path (CheckpointManager.latest() finds the newest).")
    state_path = os.path.join(path, "state.json")
    try:
        with open(state_path, "rb") as f:
            state = json.loads(f.read().decode())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no state.json: it is not a complete checkpoint.") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_path} is not valid JSON ({e}); the checkpoint is corrupted.") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{state_path}: unknown checkpoint format {state.get('format') if isinstance(state, dict) else state!r} (expected {FORMAT}).")
    blobs = {}
    for name in _FILES:
        file_path = os.path.join(path, name)
        try:
            with open(file_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise CheckpointError(f"{file_path} is missing; the checkpoint is incomplete.") from None
        expected = state["files"][name]
        if len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
            raise CheckpointError(
                f"{file_path} is corrupted or truncated ({len(data)} bytes, expected {expected['bytes']}; "
                "SHA-256 differs). Resume from an earlier checkpoint."
            )
        blobs[name] = data
    return state, blobs


def _check_optimizer(path: str, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    ours = optimizer.param_groups
    theirs = saved.get("param_groups", [])
    sizes = [len(g["params"]) for g in ours], [len(g["params"]) for g in theirs]
    if sizes[0] != sizes[1]:
        raise CheckpointError(
            f"{path}: the optimiser has parameter groups of sizes {sizes[0]}, the checkpoint {sizes[1]}. "
            "Build the optimiser over th.trainable_parameters() as in the saved run."
        )
    params = [p for g in ours for p in g["params"]]
    ids = [i for g in theirs for i in g["params"]]
    for param, pid in zip(params, ids):
        for key, value in saved.get("state", {}).get(pid, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise CheckpointError(
                    f"{path}: optimiser state {key!r} has shape {tuple(value.shape)} for a parameter of shape "
                    f"{tuple(param.shape)}; the optimiser was built over different parameters."
                )


def _restore_rng(tensors: Dict[str, torch.Tensor], info: Dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    version, internal, gauss = info["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in info and "numpy_keys" in tensors:
        import numpy as np

        name, pos, has_gauss, cached = info["numpy"]
        np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------- a directory of checkpoints
class CheckpointManager:
    """Numbered checkpoints ``root/step-<n>`` keeping the newest `keep`.

    Only complete checkpoints are ever named ``step-<n>`` (they are renamed into
    place), so `latest()` never returns a half-written one."""

    def __init__(self, root: str, keep: int = 2):
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise CheckpointError(f"keep must be an int >= 1, got {keep!r}.")
        self.root = os.path.abspath(root)
        self.keep = keep

    def _found(self) -> List[tuple]:
        """(step, path) of each complete checkpoint, oldest first."""
        if not os.path.isdir(self.root):
            return []
        found = [(int(m.group(1)), name) for name in os.listdir(self.root) if (m := _STEP_DIR.fullmatch(name))]
        return [(step, os.path.join(self.root, name)) for step, name in sorted(found)]

    def checkpoints(self) -> List[str]:
        """Complete checkpoints, oldest first."""
        return [path for _, path in self._found()]

    def latest(self) -> Optional[str]:
        found = self._found()
        return found[-1][1] if found else None

    def latest_step(self) -> Optional[int]:
        """The optimizer steps the latest checkpoint holds (where a resumed run goes on), or None."""
        found = self._found()
        return found[-1][0] if found else None

    def save(self, th: Theseus, optimizer: Optional[torch.optim.Optimizer] = None, lr_scheduler: Any = None,
             data_position: Optional[int] = None, extra: Optional[Dict[str, Any]] = None) -> str:
        os.makedirs(self.root, exist_ok=True)
        for name in os.listdir(self.root):  # leftovers of a crash mid-write
            if name.startswith(".tmp-"):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        path = save_checkpoint(os.path.join(self.root, f"step-{th.step_count:08d}"), th, optimizer, lr_scheduler,
                               data_position, extra)
        for old in self.checkpoints()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def resume(self, th: Theseus, optimizer: Optional[torch.optim.Optimizer] = None, lr_scheduler: Any = None,
               restore_rng: bool = True) -> Optional[Resumed]:
        """Load the latest checkpoint, or return None when there is none yet."""
        path = self.latest()
        return None if path is None else load_checkpoint(path, th, optimizer, lr_scheduler, restore_rng)


# ---------------------------------------------------------------- sharded runs: torch.distributed.checkpoint
SHARDED_FORMAT = "theseus-dcp-1"


def _rank_and_world() -> tuple:
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def save_sharded_checkpoint(path: str, th: Theseus, optimizer: Optional[torch.optim.Optimizer] = None,
                            lr_scheduler: Any = None, data_position: Optional[int] = None,
                            extra: Optional[Dict[str, Any]] = None) -> str:
    """Save a sharded run (FSDP2) with ``torch.distributed.checkpoint`` (DCP) into the directory `path`.

    A collective: **every rank calls it**, with the same arguments. Each rank writes its shards of the
    engine's tensors (successors, rest copies) and of the optimiser's state (DCP's files, in
    ``get_optimizer_state_dict``'s layout, keyed by parameter name), and its own RNG states
    (``rng-<rank>.safetensors``, ``rng-<rank>.json``); rank 0 then writes the optimiser's parameter groups
    and the LR scheduler (``optimizer.pt``, read with weights_only=True) and, last, ``state.json``
    (step, seed, plan, config, data position, your ``extra``): a directory without it is incomplete.
    `load_sharded_checkpoint` resumes it bit-identically. Unsharded runs: `save_checkpoint`."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    rank, world = _rank_and_world()
    try:
        extra_json = json.loads(json.dumps(extra or {}))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"extra= must be JSON-safe (numbers, strings, lists, dicts): {e}") from None
    path = os.path.abspath(path)
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        if os.path.exists(os.path.join(path, "state.json")):  # re-saving: incomplete until written again
            os.remove(os.path.join(path, "state.json"))
    engine = th.state_dict()
    shards: Dict[str, Any] = {"engine": engine["tensors"]}
    optimizer_rest: Dict[str, Any] = {}
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        saved = get_optimizer_state_dict(th.model, optimizer)
        shards["optimizer"] = {name: {k: v for k, v in s.items() if isinstance(v, torch.Tensor)}
                               for name, s in saved["state"].items()}
        optimizer_rest = {"param_groups": saved["param_groups"],
                          "state_keys": {name: sorted(s) for name, s in shards["optimizer"].items()},
                          "other_state": {name: {k: v for k, v in s.items() if not isinstance(v, torch.Tensor)}
                                          for name, s in saved["state"].items()}}
    dcp.save(shards, checkpoint_id=path)  # ends in a collective: every rank's shards are written
    rng_tensors, rng_json = _capture_rng()
    save_file(rng_tensors, os.path.join(path, f"rng-{rank}.safetensors"))
    _write(os.path.join(path, f"rng-{rank}.json"), json.dumps(rng_json).encode())
    if dist.is_initialized():
        dist.barrier()  # every rank's RNG files are there before state.json says the checkpoint is complete
    if rank == 0:
        buffer = io.BytesIO()
        torch.save({"optimizer": optimizer_rest or None,
                    "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None}, buffer)
        _write(os.path.join(path, "optimizer.pt"), buffer.getvalue())
        state = {"format": SHARDED_FORMAT, "engine": engine["meta"], "world_size": world,
                 "data_position": data_position, "extra": extra_json,
                 "has_optimizer": optimizer is not None, "has_lr_scheduler": lr_scheduler is not None}
        _write(os.path.join(path, "state.json"), json.dumps(state, indent=1).encode())
        _fsync_dir(path)
    return path


def load_sharded_checkpoint(path: str, th: Theseus, optimizer: Optional[torch.optim.Optimizer] = None,
                            lr_scheduler: Any = None, restore_rng: bool = True) -> Resumed:
    """Resume a `save_sharded_checkpoint` directory into a sharded run built as the saved one (the same
    model, plan, ``fully_shard`` calls, and an optimiser over ``th.trainable_parameters()``).

    A collective: **every rank calls it**. DCP reads each rank's shards of the engine's tensors and the
    optimiser's state (a fresh optimiser first gets its state made by torch's ``get_optimizer_state_dict``,
    a step at learning rate 0 that leaves the parameters bit-identical); each rank restores its own RNG
    states, so restore_rng needs the saved number of ranks. The files, plan, schedule, tensor names and
    shapes and the optimiser's parameter groups are checked (CheckpointError) before anything changes; the
    names of the optimiser's state, once torch has made a fresh optimiser's state. Directories without
    ``state.json`` are incomplete saves: pick the newest one that has it."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file

    rank, world = _rank_and_world()
    state_path = os.path.join(path, "state.json")
    try:
        with open(state_path, "rb") as f:
            state = json.loads(f.read().decode())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no state.json: it is not a complete sharded checkpoint "
                              "(save_sharded_checkpoint writes it last).") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_path} is not valid JSON ({e}); the checkpoint is corrupted.") from None
    if not isinstance(state, dict) or state.get("format") != SHARDED_FORMAT:
        raise CheckpointError(f"{path} is not a sharded checkpoint (format {state.get('format') if isinstance(state, dict) else state!r}); "
                              "load a save_checkpoint directory with load_checkpoint.")
    for what, obj, flag in (("optimizer", optimizer, "has_optimizer"), ("lr_scheduler", lr_scheduler, "has_lr_scheduler")):
        if obj is not None and not state.get(flag):
            raise CheckpointError(f"{path} holds no {what} state, but one was given to restore; pass {what}=None.")
    if restore_rng and state["world_size"] != world:
        raise CheckpointError(f"{path} was saved by {state['world_size']} ranks, this run has {world}: each rank's RNG "
                              "state cannot be restored. Resume with as many ranks, or pass restore_rng=False.")
    try:
        saved = torch.load(os.path.join(path, "optimizer.pt"), weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}/optimizer.pt is missing; the checkpoint is incomplete.") from None
    if restore_rng and not os.path.exists(os.path.join(path, f"rng-{rank}.safetensors")):
        raise CheckpointError(f"{path} has no RNG state of rank {rank}; the checkpoint is incomplete.")
    engine_tensors = {k: torch.empty_like(v) for k, v in th.state_dict()["tensors"].items()}
    engine_state = {"tensors": engine_tensors, "meta": state["engine"]}
    th.check_state_dict(engine_state)
    shards: Dict[str, Any] = {"engine": engine_tensors}
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        groups = saved["optimizer"]["param_groups"]
        sizes = [len(g["params"]) for g in optimizer.param_groups], [len(g["params"]) for g in groups]
        if sizes[0] != sizes[1]:
            raise CheckpointError(f"{path}: the optimiser has parameter groups of sizes {sizes[0]}, the checkpoint "
                                  f"{sizes[1]}. Build the optimiser over th.trainable_parameters() as in the saved run.")
        live = get_optimizer_state_dict(th.model, optimizer)["state"]
        missing = sorted(f"{name}.{k}" for name, keys in saved["optimizer"]["state_keys"].items()
                         for k in keys if k not in live.get(name, {}))
        if missing:
            raise CheckpointError(f"{path}: this optimiser has no state {missing[:3]}; build the optimiser of the saved run.")
        shards["optimizer"] = {name: {k: torch.empty_like(live[name][k]) for k in keys}
                               for name, keys in saved["optimizer"]["state_keys"].items()}
    dcp.load(shards, checkpoint_id=path)
    th.load_state_dict(engine_state)
    if optimizer is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        other = saved["optimizer"]["other_state"]
        # strict=False: a parameter the saved run's optimiser never stepped (a successor that had not run
        # yet) has no state in the checkpoint and must have none after the resume, as in the saved run
        set_optimizer_state_dict(th.model, optimizer, {
            "state": {name: {**tensors, **other.get(name, {})} for name, tensors in shards["optimizer"].items()},
            "param_groups": groups}, options=StateDictOptions(strict=False))
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if restore_rng:
        with open(os.path.join(path, f"rng-{rank}.json"), "rb") as f:
            rng_json = json.loads(f.read().decode())
        _restore_rng(load_file(os.path.join(path, f"rng-{rank}.safetensors")), rng_json)
    return Resumed(os.path.abspath(path), int(state["engine"]["step"]), state.get("data_position"), state.get("extra") or {})
