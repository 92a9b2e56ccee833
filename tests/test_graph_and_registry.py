import pytest
import torch
from torch import nn

from theseus_general import Adapter, AdapterError, ModuleGraph, Theseus, get_adapter, list_adapters, register_adapter
from theseus_general import registry

from conftest import ChainModel, tiny_bert


def test_graph_lists_containers_and_traces_shapes_with_dict_input():
    model = tiny_bert(num_layers=3)
    graph = ModuleGraph.from_model(model, {"input_ids": torch.randint(1, 100, (2, 5))})
    layers = graph.container("bert.encoder.layer")
    assert [b.index for b in layers.blocks] == [0, 1, 2]
    assert all(b.input_shape == (2, 5, 32) == b.output_shape for b in layers.blocks)
    assert layers.shape_preserving and layers.uniform
    assert "bert.encoder.layer (ModuleList, 3 blocks)" in graph.describe(full=True)


def test_generic_adapter_finds_the_chain_from_a_sample():
    model = ChainModel(depth=6)
    th = Theseus(model, adapter="generic", sample=torch.randn(2, 4), successor_depth=3)
    assert list(th.plan.containers) == ["blocks"]
    exported = th.export()
    assert type(exported) is ChainModel and len(exported.blocks) == 3


def test_generic_adapter_without_container_or_sample_says_what_to_do():
    with pytest.raises(AdapterError, match="container='path.to.blocks'"):
        Theseus(ChainModel(), adapter="generic", successor_depth=3)


def test_register_custom_adapter_and_auto_detect():
    class Chain(Adapter):
        supports = "ChainModel"

        @classmethod
        def matches(cls, model):
            return isinstance(model, ChainModel)

        def containers(self, model, sample=None):
            return ["blocks"]

    try:
        register_adapter("chain-test")(Chain)
        assert "chain-test" in list_adapters()
        assert isinstance(get_adapter("chain-test"), Chain)
        th = Theseus(ChainModel(), successor_depth=2)
        assert th.adapter.name == "chain-test"
        with pytest.raises(AdapterError, match="already registered"):
            register_adapter("chain-test")(type("Other", (Adapter,), {}))
        with pytest.raises(AdapterError, match="subclass of theseus_general.Adapter"):
            register_adapter("bad")(object)
    finally:
        registry._REGISTRY.pop("chain-test", None)


def test_plan_prints_a_table():
    th = Theseus(tiny_bert(num_layers=6), successor_depth=4)
    text = str(th.plan)
    assert "group" in text and "predecessor blocks" in text and "successor" in text
    assert "0-1" in text and "copy of block 3" in text
    assert th.plan.to_dict()["groups"][2]["blocks"] == [4]
