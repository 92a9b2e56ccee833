import os
import shutil
import tempfile
from pathlib import Path

# Caches in a temp dir, before any library reads its cache location at import: no test reads a
# model or font cache filled by hand on this machine (a fresh machine has none).
_CACHE = tempfile.mkdtemp(prefix="theseus-tests-cache-")
for _name, _sub in (("HF_HOME", "huggingface"), ("XDG_CACHE_HOME", "xdg"), ("MPLCONFIGDIR", "matplotlib"),
                    ("TORCH_HOME", "torch")):
    os.environ[_name] = os.path.join(_CACHE, _sub)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from _file_guard import FileAccessGuard, default_roots  # noqa: E402

CHECKOUT = str(Path(__file__).resolve().parent.parent)
# THESEUS_FILE_GUARD=0 turns the guard off (e.g. to debug a test that needs a system file).
FILE_GUARD = (FileAccessGuard(default_roots(CHECKOUT)).install()
              if os.environ.get("THESEUS_FILE_GUARD", "1") != "0" else None)


def fail_on_outside_files(guard, when: str) -> None:
    """Fail the current test if `guard` recorded paths outside the checkout, temp dirs and installed software."""
    offences = guard.take() if guard is not None else []
    if offences:
        listed = "\n".join(f"  {path} (mode {mode!r})" for path, mode in sorted(set(offences))[:10])
        pytest.fail(f"{when} opened files outside the checkout, the temp dirs and the installed packages; "
                    f"a fresh machine does not have them. Write a fixture under tmp_path instead:\n{listed}",
                    pytrace=False)


@pytest.fixture(autouse=True)
def _files_stay_inside():
    fail_on_outside_files(FILE_GUARD, "imports or collection before this test")
    yield
    fail_on_outside_files(FILE_GUARD, "this test")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)

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


def write_idx_dataset(directory, train: int = 300, test: int = 100, classes: int = 10, seed: int = 0) -> str:
    """Fashion-MNIST-shaped idx files (gzipped, 28 x 28 uint8) in `directory`: `train` and `test` (t10k)
    random images whose label is written into their brightness, so a few steps learn something."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", train), ("t10k", test)):
        labels = rng.integers(0, classes, n)
        images = rng.integers(0, 100, (n, 28, 28)) + (labels * 15)[:, None, None]
        for name, array in ((f"{stem}-images-idx3-ubyte.gz", images), (f"{stem}-labels-idx1-ubyte.gz", labels)):
            array = array.astype(np.uint8)
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            with gzip.open(directory / name, "wb") as f:
                f.write(header + array.tobytes())
    return str(directory)


class FlatSuccessor(nn.Module):
    """A successor that lost its input: the same output for every example (a collapsed start)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.level = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return torch.zeros_like(x) + self.level


def sign_batches(size: int = 8, seed: int = 0):
    """An endless stream of (x, label) for ChainModel: 4 random features, label = whether they sum above 0."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(size, 4, generator=g)
        yield x, (x.sum(1) > 0).long()


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


class ConvBlock(nn.Module):
    """A residual conv + batch-norm block (frozen batch-norm tests)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return x + torch.relu(self.bn(self.conv(x)))


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


def tiny_resnet(seed: int = 0):
    """A timm ResNet [2, 2, 2, 2] of width 8: the resnet adapter's family, in milliseconds."""
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(seed)
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=3, stem_width=8, channels=(8, 8, 8, 8))


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
