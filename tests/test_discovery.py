"""The generic adapter says which chain it chose, why and what else was possible; container='all'
takes every chain; describe() leads with the ranked candidates."""

import warnings

import pytest
import torch

from theseus_general import AdapterError, ModuleGraph, Theseus

SWIN_STAGES = ["features.1", "features.3", "features.5", "features.7"]


@pytest.fixture(scope="module")
def swin():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torchvision.models.swin_t(), torch.randn(1, 3, 64, 64)


def test_discovery_on_swin_names_the_choice_the_rule_and_the_alternatives(swin):
    model, x = swin
    with pytest.warns(UserWarning, match=r"compressing features\.5: the largest of 4 candidate chains by FLOPs") as caught:
        th = Theseus(model, adapter="generic", sample=x, ratio=0.5)
    try:
        # features.7 holds the most parameters, features.5 the most blocks and FLOPs: FLOPs decide.
        assert th.plan.containers == {"features.5": 6}
        report = str(caught[0].message)
        for stage in SWIN_STAGES:
            assert stage in report
        assert "container='all'" in report and caught[0].filename == __file__  # points at the caller's line
        assert th.adapter.discovery.candidates == ["features.5", "features.7", "features.3", "features.1"]
        assert str(th.adapter.discovery) in report
    finally:
        th.unwrap()


def test_container_all_compresses_every_stage_of_swin(swin):
    model, x = swin
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice: no warning
        th = Theseus(model, adapter="generic", sample=x, ratio=0.5, container="all")
    try:
        assert th.plan.containers == {"features.1": 2, "features.3": 2, "features.5": 6, "features.7": 2}
        assert th.plan.successor_depth == {"features.1": 1, "features.3": 1, "features.5": 3, "features.7": 1}
        assert len(th.plan.groups) == 6 and "every candidate chain" in th.adapter.discovery.reason
        exported = th.export()
        assert [len(exported.features[i]) for i in (1, 3, 5, 7)] == [1, 1, 3, 1]
        assert exported(x).shape == (1, 1000)
    finally:
        th.unwrap()


def test_container_all_without_a_sample_says_so():
    from conftest import ChainModel

    with pytest.raises(AdapterError, match="container='all' needs one too"):
        Theseus(ChainModel(), adapter="generic", container="all", successor_depth=3)


def test_describe_leads_with_ranked_candidates_and_hides_the_tree():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnext_tiny")
    graph = ModuleGraph.from_model(model, torch.randn(1, 3, 64, 64))
    short = graph.describe()
    lines = short.splitlines()
    assert len(lines) < 30, short
    assert "largest first by FLOPs on the sample" in lines[0]
    ranked = [line.split()[1] for line in lines[2:6]]
    assert ranked[0] == "stages.2.blocks" and sorted(ranked) == [f"stages.{i}.blocks" for i in range(4)]
    assert "9       ConvNeXtBlock" in lines[2] and "%" in lines[2].split("ConvNeXtBlock")[1]
    assert "stages.2.blocks.0.mlp" not in short  # inner sub-blocks only in the full tree
    full = graph.describe(full=True)
    assert full.startswith(short) and "stages.2.blocks (Sequential, 9 blocks)" in full and len(full.splitlines()) > len(lines) + 30
    untraced = ModuleGraph.from_model(model).describe()
    assert "FLOPs are n/a" in untraced and "stages.2.blocks" in untraced and untraced.splitlines()[2].endswith("n/a")


class TwoChains(torch.nn.Module):
    """A conv chain on 16 x 16 maps (few parameters, many FLOPs), then a wide linear chain (many
    parameters, few FLOPs)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = torch.nn.Sequential(*[torch.nn.Conv2d(4, 4, 3, padding=1) for _ in range(3)])
        self.linears = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(2))

    def forward(self, x):
        h = self.convs(x).mean((2, 3)).repeat(1, 16)
        for layer in self.linears:
            h = layer(h)
        return h


def test_largest_means_flops_then_parameters():
    model = TwoChains()
    traced = ModuleGraph.from_model(model, torch.randn(1, 4, 16, 16))
    convs, linears = traced.container("convs"), traced.container("linears")
    assert convs.flops > linears.flops and convs.num_params < linears.num_params
    assert [c.path for c in traced.chains()] == ["convs", "linears"]
    assert traced.ranking() == "FLOPs on the sample, then parameters"
    untraced = ModuleGraph.from_model(model)
    assert [c.path for c in untraced.candidates()] == ["linears", "convs"]  # no sample: parameters


class _Wide(torch.nn.Module):
    """Two chains: `many` (a ModuleList, iterated by forward, 4 wide blocks) and `few` (a Sequential,
    called as one module, 2 narrow blocks)."""

    def __init__(self):
        super().__init__()
        self.many = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(4))
        self.down = torch.nn.Linear(64, 8)
        self.few = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(2)])

    def forward(self, x):
        for block in self.many:
            x = block(x)
        return self.few(self.down(x))


def test_a_module_list_chain_gets_its_blocks_flops_and_ranks_first():
    # A ModuleList is never called itself, so the FLOP counter has no entry for it: its FLOPs are
    # its blocks'. Counted as 0, it would rank below the smaller Sequential chain.
    torch.manual_seed(0)
    graph = ModuleGraph.from_model(_Wide(), torch.randn(2, 64))
    chains = {c.path: c.flops for c in graph.chains()}
    assert chains["many"] == 4 * 2 * 2 * 64 * 64 and chains["few"] == 2 * 2 * 2 * 8 * 8
    assert [c.path for c in graph.chains()] == ["many", "few"]
    with pytest.warns(UserWarning, match="compressing many"):
        th = Theseus(_Wide(), adapter="generic", sample=torch.randn(2, 64), successor_depth=2, validate=False)
    assert "generic adapter: compressing many" in str(th.plan)
    assert "trained as copies (train_rest=True)" in str(th.plan)
    th.unwrap()
