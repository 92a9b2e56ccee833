"""theseus-general: compress trained networks by progressive module replacement.

Public surface:
  * `Theseus`: wrap a model, train its successors, export a native shallower model; a depth
    (`successor_depth`, `ratio`, `groups`) or a budget (`target_flops`, `target_speedup`,
    planned by `theseus_general.budget`), and narrower successors (`successor_width`);
  * schedules: `ConstantScheduler`, `LinearScheduler`, or any callable step -> p;
  * adapters: `Adapter`, `register_adapter`, `list_adapters`, `get_adapter`, `detect_adapter`;
  * `ModuleGraph`: a model's containers and blocks, with traced shapes;
  * `Plan` / `Group`: what a Theseus run replaces, printable as a table;
  * `fit` (`theseus_general.training`): one training loop for an engine or a plain model
    (device, autocast, accumulation, progress, metrics, checkpoints, NaN stops), and
    `match_successors` (module matching, the default recipe's first phase, which `fit` runs);
  * `theseus_general.checkpoint`: save and resume a run (`CheckpointManager`, `save_checkpoint`, `load_checkpoint`;
    a sharded FSDP2 run: `save_sharded_checkpoint`, `load_sharded_checkpoint`).

The engine knows no model family; ``theseus_general.adapters`` describes them.
"""

from .adapter import Adapter
from .engine import Theseus
from .errors import (
    AdapterError,
    CheckpointError,
    EngineStateError,
    ExportError,
    InputError,
    CollapsedSuccessorWarning,
    MatchingDivergedWarning,
    NonFiniteLossError,
    PlanError,
    ScheduleError,
    SuccessorMismatchError,
    TheseusError,
    TrainingError,
    UnknownOptionError,
)
from .graph import ModuleGraph
from .measure import count_flops, count_parameters, measure_latency
from .plan import Group, Plan, split_evenly
from .registry import detect_adapter, get_adapter, list_adapters, register_adapter
from .recipes import RECIPES, Recipe
from .schedulers import CallableScheduler, ConstantScheduler, LinearScheduler, RunLinearScheduler, Scheduler
from .training import fit, match_successors, planned_match_steps, probe_match_lr

from . import adapters  # noqa: E402,F401  (registers the built-in adapters)

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterError", "CheckpointError", "CallableScheduler", "ConstantScheduler", "EngineStateError", "ExportError", "InputError", "CollapsedSuccessorWarning", "MatchingDivergedWarning", "NonFiniteLossError",
    "Group", "LinearScheduler", "RECIPES", "Recipe", "RunLinearScheduler", "ModuleGraph", "Plan", "PlanError", "ScheduleError", "Scheduler",
    "SuccessorMismatchError", "Theseus", "TheseusError", "TrainingError", "UnknownOptionError", "fit", "match_successors", "planned_match_steps", "probe_match_lr", "detect_adapter", "get_adapter", "list_adapters",
    "register_adapter", "split_evenly", "count_flops", "count_parameters", "measure_latency",
]
