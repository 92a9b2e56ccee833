"""ViT and ResNet adapters: detection, stage heads, single-block stages, what they refuse."""

import pytest
import torch
from torch import nn

from theseus_general import AdapterError, ExportError, PlanError, Theseus, detect_adapter

from conftest import tiny_bert
from test_conformance import _timm_resnet, _timm_vit, _tv_resnet, _tv_vit


def _seeded(build, *args):
    torch.manual_seed(0)
    return build(*args)


@pytest.mark.parametrize("build, args, name", [
    (_timm_vit, (4,), "vit"), (_tv_vit, (4,), "vit"),
    (_timm_resnet, ([2, 2, 2, 2],), "resnet"), (_tv_resnet, ([2, 1, 1, 1],), "resnet"),
])
def test_each_family_is_detected_by_its_own_adapter(build, args, name):
    assert detect_adapter(_seeded(build, *args)).name == name


def test_bert_is_not_claimed_by_vision_adapters():
    assert detect_adapter(tiny_bert(num_layers=2)).name == "bert"


def test_group_last_would_lose_the_downsampling_head():
    model = _seeded(_timm_resnet, [2, 2, 2, 2])
    with pytest.raises(PlanError, match=r"init='group_last'.*layer1 blocks \[0, 1\].*copy of block 1.*downsampling"):
        Theseus(model, ratio=0.5, init="group_last")
    assert all(p.requires_grad for p in model.parameters())  # refused before any change
    th = Theseus(model, ratio=0.5, init="group_first")
    assert [g.successor for g in th.plan.groups] == ["copy of block 0"] * 4


def test_single_block_stages_are_left_out_and_all_single_is_refused():
    th = Theseus(_seeded(_tv_resnet, [3, 1, 2, 1]), successor_depth=[2, 1])
    assert th.plan.containers == {"layer1": 3, "layer3": 2}
    exported = th.export()
    assert [len(getattr(exported, f"layer{i}")) for i in range(1, 5)] == [2, 1, 1, 1]
    with pytest.raises(AdapterError, match="single block.*layer1: 1"):
        Theseus(_seeded(_tv_resnet, [1, 1, 1, 1]), ratio=0.5)


def test_resnet_successor_built_unlike_the_stage_head_cannot_export_natively():
    model = _seeded(_timm_resnet, [2, 2, 2, 2])
    plain = [nn.Sequential() for _ in range(4)]  # identities: shape-compatible only in no stage with a head
    th = Theseus(model, successor_depth=[1, 1, 1, 1], successors=[m for m in plain], validate=False)
    with pytest.raises(ExportError, match="layer1 blocks \\[0, 1\\].*downsampling"):
        th.export()


def test_resnet_with_mismatched_blocks_is_refused():
    model = _seeded(_timm_resnet, [3, 2, 2, 2])
    model.layer1[2] = model.layer2[1]  # a block of another width: no ResNet(...) builds this
    with pytest.raises(AdapterError, match="cannot rebuild.*layer1, block 2 differs from block 1"):
        Theseus(model, ratio=0.5)


def test_vit_with_mismatched_blocks_is_refused():
    from timm.models.vision_transformer import Block

    model = _seeded(_timm_vit, 4)
    model.blocks[2] = Block(dim=32, num_heads=2, mlp_ratio=2.0, qkv_bias=True)
    with pytest.raises(AdapterError, match="cannot rebuild.*block 2 differs from block 0.*shape"):
        Theseus(model, successor_depth=2)


def test_timm_vit_export_keeps_feature_info_consistent():
    exported = Theseus(_seeded(_timm_vit, 6), successor_depth=2).export()
    assert [f["module"] for f in exported.feature_info] == ["blocks.0", "blocks.1"]
    assert len(exported.forward_intermediates(torch.randn(1, 3, 16, 16), intermediates_only=True)) == 2
