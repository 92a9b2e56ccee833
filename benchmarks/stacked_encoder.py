"""A 12-layer encoder from all-MiniLM-L6-v2: its 6 layers stacked twice (0..5, 0..5, copied).

A stand-in for a pretrained 12-layer encoder (none ships offline here): 12 layers, the same width
(384) and tokenizer, pretrained weights in every layer. Fine-tuned on the task, it is a predecessor
whose depth is the paper's, for benchmarks/quality.py (--model DIR):

    python benchmarks/stacked_encoder.py /tmp/stack12
    python benchmarks/quality.py --task text --model /tmp/stack12 --depth 6 ...
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


def stacked(model, times: int = 2):
    """`model` with its encoder layers repeated `times` times (each a copy: no weights shared)."""
    from torch import nn

    layers = model.base_model.encoder.layer
    model.base_model.encoder.layer = nn.ModuleList(copy.deepcopy(layer) for _ in range(times) for layer in layers)
    model.config.num_hidden_layers = len(model.base_model.encoder.layer)
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="directory for the stacked model and its tokenizer")
    p.add_argument("--model", default=None, help="HF model path (default all-MiniLM-L6-v2)")
    p.add_argument("--times", type=int, default=2)
    args = p.parse_args(argv)
    import text_classification as tc
    from transformers import AutoModel, AutoTokenizer

    path = args.model or tc.default_model_path()
    model = stacked(AutoModel.from_pretrained(path), args.times)
    model.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(path).save_pretrained(args.output)
    print(f"wrote {args.output}: {model.config.num_hidden_layers} layers")


if __name__ == "__main__":
    main()
