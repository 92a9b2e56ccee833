"""Native export: each family's constructor at the new depth, state loaded strictly.

Depth-dependent settings (timm drop-path schedules, feature_info, BERT layer_idx)
are those of a model built at the new depth; the export computes what the
engine computed in eval; its saved weights load into a freshly built model; dtype
is kept; what cannot be rebuilt raises ExportError naming it.
"""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from theseus_general import ConstantScheduler, ExportError, Theseus
from theseus_general.graph import run_model

from conftest import tiny_bert
from test_conformance import _timm_resnet, _timm_vit, _tv_resnet, _tv_vit


def _seeded(build, *args, **kwargs):
    torch.manual_seed(0)
    return build(*args, **kwargs)


def _drop_path_rates(model):
    return [getattr(block.drop_path1, "drop_prob", 0.0) for block in model.blocks]


def _train(th, batch, steps=3):
    optimizer = torch.optim.SGD(th.trainable_parameters(), lr=0.05)
    th.model.train()
    for step in range(steps):
        out = run_model(th.model, batch(step))
        logits = out.logits if hasattr(out, "logits") else out
        logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        th.step()


def _images(seed, size=16):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _tokens(seed):
    return {"input_ids": torch.randint(1, 100, (2, 8), generator=torch.Generator().manual_seed(seed))}


def test_timm_vit_gets_the_drop_path_schedule_of_its_new_depth():
    import timm

    def vit(depth):
        return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=depth, img_size=16, patch_size=4,
                                 embed_dim=32, num_heads=2, num_classes=3, drop_path_rate=0.1)

    model = _seeded(vit, 8)
    exported = Theseus(model, successor_depth=4).export()
    reference = vit(4)
    assert _drop_path_rates(exported) == _drop_path_rates(reference)
    assert _drop_path_rates(exported)[-1] == pytest.approx(0.1)  # the copy route kept 0.1 * 3/7 here
    assert exported.feature_info == reference.feature_info
    assert [type(b.drop_path1) for b in exported.blocks] == [type(b.drop_path1) for b in reference.blocks]


def test_bert_layer_indices_are_those_of_the_new_depth():
    model = tiny_bert(num_layers=6)
    th = Theseus(model, successor_depth=3, init="group_first")  # successors copied from layers 0, 2, 4
    exported = th.export()
    indices = [layer.attention.self.layer_idx for layer in exported.bert.encoder.layer]
    assert indices == [0, 1, 2]
    assert exported.config.num_hidden_layers == 3 and model.config.num_hidden_layers == 6


@dataclass
class Family:
    id: str
    make: Callable[[], nn.Module]
    batch: Callable[[int], object]
    target: dict
    fresh: Callable[[nn.Module], nn.Module]  # the exported model -> a new native model of its shape


def _fresh_vit_timm(exported):
    return _timm_vit(len(exported.blocks))


FAMILIES = [
    Family("bert", lambda: tiny_bert(num_layers=4), _tokens, {"successor_depth": 2}, None),
    Family("timm-vit", lambda: _seeded(_timm_vit, 6), _images, {"successor_depth": 3}, _fresh_vit_timm),
    Family("torchvision-vit", lambda: _seeded(_tv_vit, 4), _images, {"successor_depth": 2},
           lambda e: _tv_vit(len(e.encoder.layers))),
    Family("timm-resnet", lambda: _seeded(_timm_resnet, [3, 2, 2, 2]), lambda s: _images(s, 32),
           {"successor_depth": [2, 1, 1, 1]}, lambda e: _timm_resnet([len(getattr(e, f"layer{i}")) for i in range(1, 5)])),
    Family("torchvision-resnet", lambda: _seeded(_tv_resnet, [3, 2, 1, 1]), _images, {"successor_depth": [1, 1]},
           lambda e: _tv_resnet([len(getattr(e, f"layer{i}")) for i in range(1, 5)])),
]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.id)
def test_export_equals_the_engine_and_reloads_into_a_fresh_native_model(family, tmp_path):
    model = family.make()
    th = Theseus(model, scheduler=ConstantScheduler(0.5, replace_all_at=2), **family.target)
    _train(th, family.batch)
    sample = family.batch(99)
    th.model.eval()  # in eval the wrapped model runs only the successors
    with torch.no_grad():
        engine_out = run_model(th.model, sample)
    exported = th.export()
    assert type(exported) is type(model) and not exported.training
    with torch.no_grad():
        out = run_model(exported, sample)
    if family.id == "bert":
        engine_out, out = engine_out.logits, out.logits
    torch.testing.assert_close(out, engine_out, rtol=1e-5, atol=1e-6)

    if family.id == "bert":
        import transformers

        exported.save_pretrained(tmp_path)
        reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
        assert reloaded.config.num_hidden_layers == 2
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**sample).logits, out, rtol=1e-5, atol=1e-6)
        return
    save_file({k: v.contiguous() for k, v in exported.state_dict().items()}, str(tmp_path / "model.safetensors"))
    fresh = family.fresh(exported)
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(sample), out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_export_keeps_the_model_dtype(dtype):
    model = _seeded(_timm_vit, 4).to(dtype)
    exported = Theseus(model, successor_depth=2).export()
    assert {p.dtype for p in exported.parameters()} == {dtype}
    bert = tiny_bert(num_layers=4).to(dtype)
    exported = Theseus(bert, successor_depth=2).export()
    assert {p.dtype for p in exported.parameters()} == {dtype}


def test_bert_export_keeps_tied_weights():
    model = tiny_bert(num_layers=4, cls_name="BertForMaskedLM")
    exported = Theseus(model, successor_depth=2).export()
    assert exported.cls.predictions.decoder.weight is exported.bert.embeddings.word_embeddings.weight


def test_timm_grad_checkpointing_is_carried_over():
    model = _seeded(_timm_vit, 4)
    model.set_grad_checkpointing(True)
    assert Theseus(model, successor_depth=2).export().grad_checkpointing


def _tv_vit_with_relu_blocks():
    model = _seeded(_tv_vit, 4)
    for layer in model.encoder.layers:
        layer.mlp[1] = nn.ReLU()  # inside the blocks: no VisionTransformer(...) builds this
    return model


def test_a_model_its_constructor_cannot_rebuild_raises_naming_the_difference():
    th = Theseus(_tv_vit_with_relu_blocks(), successor_depth=2)
    with pytest.raises(ExportError, match=r"VisionTransformer\(num_layers=n, \.\.\.\) does not rebuild.*"
                                          r"mlp\.1' is a ReLU in the model but a GELU.*export\(native=False\)"):
        th.export()


def test_a_stem_or_head_replaced_after_construction_is_kept():
    """A small-image stem or a new head (set after the constructor ran, outside the blocks)
    stays the model's own; everything else is rebuilt at the new depth."""
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    resnet = ResNet(BasicBlock, [2, 2, 2, 2], in_chans=1, num_classes=3, channels=(8, 16, 32, 64), drop_path_rate=0.1)
    resnet.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    vit = _seeded(_tv_vit, 4)
    vit.heads = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    for model, sample, depth in ((resnet, torch.randn(2, 1, 16, 16), [1, 1, 1, 1]), (vit, _images(0), 2)):
        th = Theseus(model, successor_depth=depth)
        th.model.eval()
        with torch.no_grad():
            engine_out = th.model(sample)
        exported = th.export()
        with torch.no_grad():
            torch.testing.assert_close(exported(sample), engine_out, rtol=1e-5, atol=1e-6)
    assert exported.heads[0].out_features == 16
    # the ResNet's blocks come from ResNet(..., layers=[1, 1, 1, 1], drop_path_rate=0.1): the last one has rate 0.1
    rebuilt_resnet = Theseus(resnet.__class__(BasicBlock, [2, 2, 2, 2], in_chans=1, num_classes=3,
                                              channels=(8, 16, 32, 64), drop_path_rate=0.1), successor_depth=[1, 1, 1, 1])
    assert rebuilt_resnet.export().layer4[0].drop_path.drop_prob == pytest.approx(0.1)


def test_native_false_exports_a_model_its_constructor_cannot_rebuild():
    loose = Theseus(_tv_vit_with_relu_blocks(), successor_depth=2).export(native=False)
    assert len(loose.encoder.layers) == 2 and isinstance(loose.encoder.layers[0].mlp[1], nn.ReLU)


def test_a_torchvision_vit_with_a_conv_stem_raises_naming_it():
    from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=3, conv_stem_configs=[ConvStemConfig(8, 3, 2), ConvStemConfig(8, 3, 2)])  # stride 4 = patch_size
    th = Theseus(model, successor_depth=2)
    with pytest.raises(ExportError, match="conv_stem_configs"):
        th.export()


def test_bert_with_mixed_layer_types_raises():
    model = tiny_bert(num_layers=4)
    model.config.layer_types = ["full_attention", "sliding_attention"] * 2
    th = Theseus(model, successor_depth=2)
    with pytest.raises(ExportError, match="layer_types mixes"):
        th.export()


def test_finalize_export_native_flag():
    """native=True refuses successors unlike the rebuild (two MLP widths, which one
    config.intermediate_size cannot describe); native=False keeps them as they are."""
    import transformers

    model = tiny_bert(num_layers=4)
    narrow = [transformers.models.bert.modeling_bert.BertLayer(transformers.BertConfig(
        **{**model.config.to_dict(), "intermediate_size": width})) for width in (16, 24)]
    th = Theseus(model, successor_depth=2, successors=narrow)
    loose = th.export(native=False)
    with pytest.raises(ExportError, match="different MLP widths"):
        th.adapter.finalize_export(loose, th.plan.successor_depth, native=True)
    again = th.adapter.finalize_export(loose, th.plan.successor_depth, native=False)
    assert again.bert.encoder.layer[0].intermediate.dense.out_features == 16
