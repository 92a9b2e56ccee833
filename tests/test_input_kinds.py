"""`sample=` and `fit` batches take what the model's forward takes: a Mapping (a transformers
BatchEncoding is a UserDict, not a dict) as keyword arguments, a tuple as positional arguments, a
list as one argument (the images a torchvision detection model takes); an ambiguous list raises
with both spellings."""

from typing import List

import pytest
import torch
import transformers
from torch import nn

from theseus_general import InputError, Theseus, TrainingError
from theseus_general.graph import model_arguments
from theseus_general.training import fit

from conftest import Block, ChainModel, bert_batch, tiny_bert


def _encoding(seed: int) -> transformers.BatchEncoding:
    batch = bert_batch(seed=seed)
    return transformers.BatchEncoding({"input_ids": batch["input_ids"],
                                       "attention_mask": torch.ones_like(batch["input_ids"])})


class ListModel(nn.Module):
    """A forward that takes a list of images, as torchvision's detection models do."""

    def __init__(self, depth: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(Block(8) for _ in range(depth))
        self.head = nn.Linear(8, 2)

    def forward(self, images: List[torch.Tensor], targets=None):
        if not isinstance(images, list):
            raise TypeError(f"images must be a list of tensors, got {type(images).__name__}")
        h = self.stem(torch.stack([image.mean(0) for image in images]))
        for block in self.blocks:
            h = block(h)
        return self.head(h)


class TwoArgumentModel(ChainModel):
    def forward(self, x, mask):
        return super().forward(x * mask)


def test_a_batch_encoding_sample_is_passed_as_keywords():
    model = tiny_bert(num_layers=6)
    th = Theseus(model, target_speedup=2.0, sample=_encoding(1))  # planner, validation: all on the BatchEncoding
    assert th.plan.successor_depth["bert.encoder.layer"] < 6
    th.validate(_encoding(2))


def test_fit_trains_on_batch_encodings_and_on_hugging_face_style_mappings_with_labels():
    th = Theseus(tiny_bert(num_layers=4), successor_depth=2, recipe="matching")
    pairs = [(_encoding(i), bert_batch(seed=i)["labels"]) for i in range(5)]
    result = fit(th, pairs, steps=5, lr=1e-4, progress=False)  # matching then the mixed phase
    assert len(result.losses) + len(result.matching.losses) == 5
    mappings = [transformers.BatchEncoding({**_encoding(i), "labels": bert_batch(seed=i)["labels"]}) for i in range(3)]
    assert len(fit(th.model, mappings, steps=3, lr=1e-4, progress=False).losses) == 3


def test_a_list_is_one_positional_argument_in_sample_and_in_fit():
    model = ListModel()
    images = [torch.randn(3, 4) for _ in range(5)]
    th = Theseus(model, successor_depth=2, adapter="generic", container="blocks", sample=images)
    labels = torch.tensor([0, 1, 0, 1, 1])
    fit(th, [(images, labels)] * 4, steps=4, lr=1e-3, progress=False)
    assert th.model(images).shape == (5, 2)


def test_a_list_the_forward_takes_only_as_several_arguments_is_refused_with_both_spellings():
    model = TwoArgumentModel()
    x, mask = torch.randn(2, 4), torch.ones(2, 4)
    with pytest.raises(InputError) as caught:
        Theseus(model, successor_depth=3, adapter="generic", container="blocks", sample=[x, mask])
    assert "(a, b, ...)" in str(caught.value) and "[a, b, ...]" in str(caught.value)
    Theseus(model, successor_depth=3, adapter="generic", container="blocks", sample=(x, mask)).unwrap()


def test_model_arguments_by_kind():
    model = ChainModel()
    x = torch.randn(2, 4)
    assert model_arguments(model, {"x": x}) == ((), {"x": x})
    assert model_arguments(model, (x,)) == ((x,), {})
    assert model_arguments(model, x)[0][0] is x
    args, kwargs = model_arguments(model, [x, x])
    assert len(args) == 1 and isinstance(args[0], list) and not kwargs


def test_a_batch_that_is_neither_a_pair_nor_a_mapping_is_refused_by_fit():
    with pytest.raises(TrainingError, match=r"\(inputs, labels\)"):
        fit(ChainModel(), [torch.randn(2, 4)], steps=1, progress=False)
