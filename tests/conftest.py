from pathlib import Path

import pytest
import torch
from torch import nn

# Tiny models run fastest on one thread, and threads fighting over a shared
# 2-core machine slow them by an order of magnitude; one thread also keeps
# float reductions in a fixed order.
torch.set_num_threads(1)


def tiny_bert(num_layers: int = 6, num_labels: int = 2, seed: int = 0, cls_name: str = "BertForSequenceClassification"):
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
    )
    return getattr(transformers, cls_name)(config)


REVIEW_WORDS = "good bad great awful fine dull fun boring film movie plot the a is was".split()


def save_tiny_classifier(directory, num_layers: int = 4, words=REVIEW_WORDS, dropout: bool = True) -> str:
    """tiny_bert and a word-level tokenizer over `words`, written with save_pretrained to `directory`."""
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    model = tiny_bert(num_layers=num_layers)
    if not dropout:
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(directory)
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    return str(directory)


def write_review_csv(path, rows: int = 120) -> str:
    """`rows` texts "the film was good|bad" labelled pos|neg, the word matching the label 90% of the time."""
    g = torch.Generator().manual_seed(0)
    lines = ["text,label"]
    for i in range(rows):
        label = i % 2
        word = ["bad", "good"][label] if torch.rand(1, generator=g).item() < 0.9 else ["good", "bad"][label]
        lines.append(f"the film was {word},{['neg', 'pos'][label]}")
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


def bert_batch(batch: int = 4, length: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, 100, (batch, length), generator=g),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


class Block(nn.Module):
    """A residual MLP block: shape preserving, like a transformer layer."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.linear(x))


class ChainModel(nn.Module):
    """stem -> blocks (ModuleList) -> head; the kind of model the generic route handles."""

    def __init__(self, depth: int = 6, width: int = 8, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Linear(4, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def state_snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict, model: nn.Module) -> None:
    after = model.state_dict()
    assert set(before) == set(after)
    for k in before:
        assert torch.equal(before[k], after[k]), f"{k} changed"


@pytest.fixture
def bert():
    return tiny_bert()
