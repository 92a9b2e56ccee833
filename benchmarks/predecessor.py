"""Train and save a quality-benchmark predecessor once, so that every column and variant starts
from the same trained model (quality.py --predecessor PATH).

Uses quality.py's own tasks and settings (the examples' per-family recipes, split seed 0):

    python benchmarks/predecessor.py --task text --save-to preds/text                  # a save_pretrained directory
    python benchmarks/predecessor.py --task vision --arch vit --save-to preds/vit.safetensors
    python benchmarks/predecessor.py --task vision --arch resnet --save-to preds/resnet.safetensors
"""

from __future__ import annotations

import os
import sys
import time

import torch
from safetensors.torch import save_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--save-to" not in argv:
        raise SystemExit("error: give --save-to PATH (a directory for text, a .safetensors file for vision)")
    at = argv.index("--save-to")
    path = argv[at + 1]
    args = quality.parse_args(argv[:at] + argv[at + 2:])
    torch.set_num_threads(args.threads)
    quality.quiet_transformers()
    started = time.time()
    task = quality.TextTask(args) if args.task == "text" else quality.VisionTask(args)
    model = task.predecessor().eval()
    if args.task == "text":
        model.save_pretrained(path)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_model(model, path)
    print(f"{args.task} {task.name}: {task.evaluate(model)} in {time.time() - started:.0f} s -> {path}")


if __name__ == "__main__":
    main()
