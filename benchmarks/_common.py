"""What every benchmark records next to its numbers: where and under what load they were measured."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, REPO_ROOT)


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was given but torch sees no CUDA device.")
    return torch.device(name)


def conditions(device: torch.device) -> Dict[str, Any]:
    """Threads, machine load and versions: timings mean little without them."""
    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": list(os.getloadavg()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    return info


def write_json(report: Dict[str, Any], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    return path


def quiet_transformers() -> None:
    """No transformers warnings or download bars among a benchmark's table."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def finish(report: Dict[str, Any], path: str, script: str, argv, started: float) -> Dict[str, Any]:
    """Record the load at the end, the wall time and the command line, and write the JSON."""
    report["loadavg_1_5_15_at_end"] = list(os.getloadavg())
    report["total_s"] = time.time() - started
    report["command"] = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json(report, path)
    return report


def part_spec(spec: str, methods: Sequence[str]) -> Tuple[str, Optional[List[str]]]:
    """A `--merge` argument: 'PATH' (every method of the part) or 'PATH:METHOD[,METHOD...]' (only those
    methods of it, e.g. each method from the sitting of its own lr)."""
    path, _, names = spec.rpartition(":")
    if os.path.exists(spec) or not path or not names:
        return spec, None
    chosen = names.split(",")
    unknown = [m for m in chosen if m not in methods]
    if unknown:
        raise SystemExit(f"--merge {spec}: {', '.join(unknown)} is not a method ({', '.join(methods)}); write PATH "
                         "or PATH:METHOD[,METHOD...].")
    return path, chosen


def load_part(spec: str, methods: Sequence[str]) -> Tuple[Dict[str, Any], Optional[List[str]]]:
    """A `--merge` part read from its JSON, keeping only the named methods' runs for 'PATH:METHOD,...';
    also returns those methods (None: every method of the part)."""
    path, chosen = part_spec(spec, methods)
    with open(path) as f:
        part = json.load(f)
    if chosen is not None:
        missing = [m for m in chosen if m not in part["runs"]]
        if missing:
            raise SystemExit(f"--merge {spec}: {path} has no runs of {', '.join(missing)}.")
        part["runs"] = {m: part["runs"][m] for m in chosen}
    return part, chosen


def seed_run(seed: int) -> None:
    """Seed torch's global generator before a training run. Dropout draws from it, and its seed differs
    per process, so unseeded, a run depended on what ran before it in the process (the same text command
    gave dev 0.778 and 0.784); seeded, methods paired by seed also see the same dropout stream."""
    torch.manual_seed(seed)


def _default_with(name: str, **changes):
    """The default recipe with `changes`, and matching at the fixed lr 1e-3 every round before 13 ran with (the
    default probes it per model since round 13), so that the earlier rounds' recipes rerun as they were."""
    from theseus_general.recipes import get_recipe

    return dataclasses.replace(get_recipe("default"), name=name, **dict(dict(match_lr=1e-3), **changes))


def agreement_trigger_recipe():
    """The default recipe before round 7 (issue 26): module matching when the successors alone agree with the
    predecessor on under 2/3 of the first batch, instead of when they collapsed (the check reads that batch only)."""
    return _default_with("agreement_trigger", match_below_agreement=2 / 3, match_if_collapsed=False,
                         start_check_predictions=1, collapse_spread=None)


def collapsed_trigger_recipe():
    """Issue 26's candidate of round 7 (docs/results.md, "Round 7, the start check alone"): the default recipe of
    that time with one change, module matching only for a start that collapsed (`match_if_collapsed`) instead of
    one that agrees on under 2/3 of the first batch; the curriculum is the default's (p = 1 at 50%). Adopted: it is
    the default since, under its own name, kept so that round 7's commands rerun as they were."""
    return _default_with("collapsed_trigger", match_below_agreement=None, match_if_collapsed=True,
                         start_check_predictions=1, collapse_spread=None)


def candidate_recipe():
    """Issue 26's candidate default (round 6, docs/results.md, "A candidate default (round 6)"): round 7's
    `collapsed_trigger_recipe` (matching only a collapsed start) with the mixed phase ending at 10% of the run
    (p = 1 there) instead of 50%."""
    return _default_with("candidate", full_at=0.1, match_below_agreement=None, match_if_collapsed=True,
                         start_check_predictions=1, collapse_spread=None)


def pooled_check_recipe():
    """Issue 26's candidate of round 8 (docs/results.md, "Round 8, the start check over more examples"): round 7's
    default (`collapsed_trigger_recipe`) with the start check pooled over the first batches until 128 predictions,
    instead of the first batch alone. Adopted in round 8; round 9's default also judges a binary start's one class
    by its spread, which this recipe, as it ran, does not (collapse_spread=None)."""
    return _default_with("pooled_check", match_below_agreement=None, match_if_collapsed=True,
                         start_check_predictions=128, collapse_spread=None)


def offset_aware_recipe():
    """Issue 26's candidate of round 9 (docs/results.md, "Round 9, a collapse that is only an offset"): round 8's
    default, where a binary start that answers one class counts as collapsed only if its logits' spread is also
    below 1/1,000 of the predecessor's (`Recipe.collapse_spread`). Adopted: it is the default since, under its own
    name, kept so that round 9's commands rerun as they were."""
    return _default_with("offset_aware", match_below_agreement=None, match_if_collapsed=True,
                         start_check_predictions=128, collapse_spread=1e-3)


def rest_after_mixing_recipe():
    """Issue 26's candidate of round 10 (docs/results.md, "Round 10, the rest frozen while the successors mix in"):
    round 9's default, with the rest's copies (embeddings, pooler, head) taking no step until the replacement rate
    reaches 1 (`Recipe.rest_after_mixing`)."""
    return dataclasses.replace(offset_aware_recipe(), name="rest_after_mixing", rest_after_mixing=True)


def prefix_mixing_recipe():
    """Issue 26's second candidate of round 10 (docs/results.md, "Round 10 ..."): round 9's default with
    `mixing="prefix"`: the paper's draws count how many groups, from the first, run their successors, so a
    successor always reads a successor's output, as it will in the compressed model."""
    return dataclasses.replace(offset_aware_recipe(), name="prefix_mixing", mixing="prefix")


def bert_r10_recipe():
    """The bert adapter's family recipe as round 10 adopted it (docs/results.md, "Round 10, the short phase for a
    start that disagrees"): round 9's default with p = 1 at 10% of the run for a start whose pooled agreement is
    below 2/3, matched or not; kept so that round 10's commands rerun as they were."""
    return dataclasses.replace(offset_aware_recipe(), name="bert_r10", short_phase_below_agreement=2 / 3,
                               short_full_at=0.1)


def bert_r11_recipe():
    """Issue 26's candidate of round 11 (docs/results.md, "Round 11, a nearly collapsed start"): round 10's bert
    recipe, where a binary start answering one class counts as collapsed (and so is matched) below 1/100 of the
    predecessor's logit spread instead of 1/1,000, and a matched start keeps the default's phase (p = 1 at 50%)."""
    return dataclasses.replace(bert_r10_recipe(), name="bert_r11", collapse_spread=1e-2,
                               short_phase_if_collapsed=False)


def bert_r12_recipe():
    """Issue 26's candidate of round 12 (docs/results.md, "Round 12, the short phase after matching"): round 10's
    bert recipe with round 11's `collapse_spread=1e-2` alone, so that a matched start also gets the short phase."""
    return dataclasses.replace(bert_r10_recipe(), name="bert_r12", collapse_spread=1e-2)


def bert_r13_recipe():
    """Issue 26's candidate of round 13 (docs/results.md, "Round 13, matching's lr probed per model"): round 12's
    bert recipe (the shipped one) with `match_lr="auto"`: matching's lr chosen per model by `probe_match_lr`."""
    return dataclasses.replace(bert_r12_recipe(), name="bert_r13", match_lr="auto")


# the named recipes a benchmark variant can ask for (recipe_lr's `recipe_factory`)
RECIPE_FACTORIES = {"candidate": candidate_recipe, "collapsed_trigger": collapsed_trigger_recipe,
                    "agreement_trigger": agreement_trigger_recipe, "pooled_check": pooled_check_recipe,
                    "offset_aware": offset_aware_recipe, "rest_after_mixing": rest_after_mixing_recipe,
                    "prefix_mixing": prefix_mixing_recipe, "bert_r10": bert_r10_recipe,
                    "bert_r11": bert_r11_recipe, "bert_r12": bert_r12_recipe, "bert_r13": bert_r13_recipe}
