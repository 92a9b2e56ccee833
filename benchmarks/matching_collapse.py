"""Does module matching collapse a BN-heavy CNN through the generic route? (issue 27)

A timm mobile CNN (depthwise convolutions, batch norm with the activation inside it:
timm's BatchNormAct2d) at random init is trained on Fashion-MNIST (padded to 32x32) as
the predecessor until its dev accuracy stops improving. Then one stage goes from 4 blocks
to 2 through ``Theseus(model, adapter="generic", container="blocks.5", successor_depth=2)``
and ``fit(th, batches, steps, lr)``, compared with fine-tune-only (the same successor-shaped
copy trained directly) at the same steps, and with single changes to the default recipe:
``match_steps=0``, a lower ``match_lr``, ``choose_start=False``.

Diagnostics, measured on a separate engine that runs the default's matching phase alone:
  * predecessor fidelity: test accuracy of the wrapped model running its (frozen) predecessor
    blocks, against the predecessor's own: the wrapping must not change what the blocks compute;
  * the matching loss at the start and end (mean of the first / last 5 steps);
  * the rest's batch-norm running statistics (train_rest copies) before / after matching;
  * the test accuracy of the successors alone (eval) right after matching.

``--legacy-frozen-norm`` puts back the frozen batch norm as it was before the fix (a plain
batch_norm call as its forward), to reproduce the collapse.

    python benchmarks/matching_collapse.py                       # fixed library, all variants
    python benchmarks/matching_collapse.py --legacy-frozen-norm --variants default,no_match
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from _common import RESULTS_DIR, conditions, finish  # noqa: E402
from image_data import load_fashion_mnist  # noqa: E402

from theseus_general import Theseus  # noqa: E402
from theseus_general import wrapping  # noqa: E402
from theseus_general.baselines import successor_shaped_copy  # noqa: E402
from theseus_general.training import fit, match_successors  # noqa: E402

VARIANTS = {  # name -> fit() options (None: fine-tune-only)
    "default": {},
    "no_match": {"match_steps": 0},
    "match_lr_0.1x": "match_lr_low",
    "no_choose_start": {"choose_start": False},
    "fine_tune": None,
}


def legacy_frozen_forward(self, input):
    """The frozen batch norm's forward before the fix: normalisation only (drops timm's activation)."""
    self._check_input_dim(input)
    return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def build(name: str, width: float) -> torch.nn.Module:
    from timm.models import efficientnet as en
    if name == "tf_efficientnet_lite0":
        return en._gen_efficientnet_lite(name, channel_multiplier=width, depth_multiplier=1.0, pretrained=False,
                                         num_classes=10, in_chans=1)
    return en._gen_efficientnet(name, channel_multiplier=width, depth_multiplier=1.0, pretrained=False,
                                num_classes=10, in_chans=1)


def prepare(x: torch.Tensor) -> torch.Tensor:
    return (F.pad(x, (2, 2, 2, 2)) - 0.2860) / 0.3530  # 28x28 -> 32x32, Fashion-MNIST mean/std


def stream(x, y, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            yield x[idx], y[idx]


@torch.no_grad()
def accuracy(model, x, y, batch: int = 500) -> float:
    was = model.training
    model.eval()
    hits = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    model.train(was)
    return hits / len(x)


def train_predecessor(args, data):
    torch.manual_seed(args.seed)
    model = build(args.model, args.width)
    batches = stream(*data.train, args.batch, args.seed + 1)
    best, best_state, evals, since = -1.0, None, [], 0
    for start in range(0, args.pred_max_steps, args.pred_eval_every):
        fit(model, batches, args.pred_eval_every, lr=args.pred_lr, lr_schedule="constant", progress=False)
        dev = accuracy(model, *data.dev)
        evals.append({"step": start + args.pred_eval_every, "dev_accuracy": dev})
        print(f"predecessor step {start + args.pred_eval_every}: dev {dev:.4f}", flush=True)
        if dev > best:
            best, best_state, since = dev, copy.deepcopy(model.state_dict()), 0
        else:
            since += 1
            if since >= args.pred_patience:
                break
    model.load_state_dict(best_state)
    return model, evals


def engine(predecessor, args):
    model = copy.deepcopy(predecessor).train()
    return Theseus(model, adapter="generic", container=args.container, successor_depth=args.successor_depth)


def rest_bn_stats(th):
    return {name: (m.running_mean.clone(), m.running_var.clone()) for name, m in th.model.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and ".predecessor." not in name
            and ".successor." not in name and m.running_mean is not None}


def diagnose(predecessor, data, args):
    """The default recipe's matching phase alone, with what it does to the model measured."""
    th = engine(predecessor, args)
    test = data.test
    with th.matching_mode():  # every group runs its predecessor blocks (and measures its successor beside them)
        wrapped_predecessor = accuracy(th.model, *test)
    before = rest_bn_stats(th)
    steps = th.recipe.match_steps(args.steps)
    result = match_successors(th, stream(*data.train, args.batch, args.seed + 2), steps, lr=th.recipe.match_lr,
                                 weight_decay=0.01, progress=False)
    after = rest_bn_stats(th)
    # how far each rest batch norm's running mean moved, in its channels' standard deviations
    shifts = sorted(((after[k][0] - before[k][0]).abs() / before[k][1].sqrt().clamp_min(1e-6)).max().item()
                    for k in before)
    losses = result.losses
    out = {
        "predecessor_test_accuracy": accuracy(predecessor, *test),
        "wrapped_predecessor_test_accuracy": wrapped_predecessor,
        "match_steps": steps,
        "match_loss_start": sum(losses[:5]) / len(losses[:5]),
        "match_loss_end": sum(losses[-5:]) / len(losses[-5:]),
        "rest_bn_mean_shift_in_std_median": shifts[len(shifts) // 2],
        "rest_bn_mean_shift_in_std_max": shifts[-1],
        "successors_test_accuracy_after_matching": accuracy(th.model, *test),
        "successor_starts": dict(th.successor_starts),
    }
    th.unwrap()
    return out


def run_variant(name, predecessor, data, args):
    torch.manual_seed(args.seed + 3)
    batches = stream(*data.train, args.batch, args.seed + 2)
    options = VARIANTS[name]
    started = time.time()
    if options is None:
        student = successor_shaped_copy(copy.deepcopy(predecessor), adapter="generic", container=args.container,
                                        successor_depth=args.successor_depth)
        result = fit(student, batches, args.steps, lr=args.lr, progress=False)
        return {"test_accuracy": accuracy(student, *data.test), "final_train_loss": _tail(result.losses),
                "seconds": time.time() - started}
    if options == "match_lr_low":
        options = {"match_lr": 1e-4}
    th = engine(predecessor, args)
    result = fit(th, batches, args.steps, lr=args.lr, progress=False, **options)
    out = {"options": options, "test_accuracy": accuracy(th.model, *data.test),
           "final_train_loss": _tail(result.losses), "seconds": time.time() - started}
    if result.matching is not None:
        m = result.matching.losses
        out.update(match_loss_start=_head(m), match_loss_end=_tail(m), successor_starts=dict(th.successor_starts))
    exported = th.export()
    out["export_test_accuracy"] = accuracy(exported, *data.test)
    th.unwrap()
    return out


def _head(values, n=5):
    return sum(values[:n]) / len(values[:n])


def _tail(values, n=10):
    return sum(values[-n:]) / len(values[-n:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0", choices=["tf_efficientnet_lite0", "efficientnet_b0"])
    parser.add_argument("--width", type=float, default=0.5, help="timm channel multiplier (speed on one CPU thread)")
    parser.add_argument("--container", default="blocks.5")
    parser.add_argument("--successor-depth", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pred-lr", type=float, default=2e-3)
    parser.add_argument("--pred-max-steps", type=int, default=1500)
    parser.add_argument("--pred-eval-every", type=int, default=150)
    parser.add_argument("--pred-patience", type=int, default=2)
    parser.add_argument("--dev-size", type=int, default=2000)
    parser.add_argument("--test-limit", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--legacy-frozen-norm", action="store_true",
                        help="the frozen batch norm's forward as it was before the fix (reproduces the collapse)")
    parser.add_argument("--cache", default="/tmp/matching_collapse_predecessor.pt",
                        help="predecessor weights are saved here and reused ('' to retrain)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default: examples/image_data.py's)")
    parser.add_argument("--quick", action="store_true", help="a few steps of everything, tiny splits (smoke test)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.pred_max_steps, args.pred_eval_every, args.steps, args.batch = 4, 2, 10, 8
        args.dev_size, args.test_limit, args.cache, args.width = 50, 50, "", 0.25
    torch.set_num_threads(args.threads)
    started = time.time()
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")

    data = load_fashion_mnist(args.data_dir, dev_size=args.dev_size, seed=args.seed)
    data.train = (prepare(data.train[0]), data.train[1])
    data.dev = (prepare(data.dev[0]), data.dev[1])
    data.test = (prepare(data.test[0][:args.test_limit]), data.test[1][:args.test_limit])

    key = f"{args.cache}.{args.model}.{args.width}.{args.seed}" if args.cache else None
    if key and os.path.exists(key):
        predecessor = build(args.model, args.width)
        saved = torch.load(key)
        predecessor.load_state_dict(saved["state"])
        evals = saved["evals"]
    else:
        predecessor, evals = train_predecessor(args, data)
        if key:
            torch.save({"state": predecessor.state_dict(), "evals": evals}, key)
    predecessor.train()

    fixed = wrapping._FrozenNorm.forward
    if args.legacy_frozen_norm:
        wrapping._FrozenNorm.forward = legacy_frozen_forward
    try:
        report = run(args, data, predecessor, evals, variants)
    finally:  # the library as it was (the smoke test runs this script inside its own process)
        wrapping._FrozenNorm.forward = fixed
    path = args.out or os.path.join(RESULTS_DIR, "matching_collapse" + ("_legacy" if args.legacy_frozen_norm else "")
                                    + f"_s{args.seed}.json")
    finish(report, path, "matching_collapse.py", argv, started)
    print("wrote", path)


def run(args, data, predecessor, evals, variants):
    report = {"benchmark": "matching_collapse", "args": vars(args), "conditions": conditions(torch.device("cpu")),
              "predecessor": {"dev_evals": evals, "test_accuracy": accuracy(predecessor, *data.test)}}
    print(f"predecessor test accuracy {report['predecessor']['test_accuracy']:.4f}", flush=True)
    report["diagnostics"] = diagnose(predecessor, data, args)
    print("diagnostics", report["diagnostics"], flush=True)
    report["variants"] = {}
    for name in variants:
        report["variants"][name] = run_variant(name, predecessor, data, args)
        print(name, report["variants"][name], flush=True)
    return report


if __name__ == "__main__":
    main()
