"""Backbones inside detectors, segmenters and wrappers (issue 24): found, compressed by their
family's rules, exported as the same model class that torchvision's own builders load strictly."""

import warnings

import pytest
import torch
from torch import nn

from theseus_general import AdapterError, ExportError, Theseus, detect_adapter

from test_conformance import _detector, _timm_vit, _tv_vit, _Wrapped


def _export(th):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"export\(\) of an engine that was never trained")
        return th.export()


def test_fasterrcnn_resnet50_fpn_exports_a_fasterrcnn_that_torchvision_builds_at_the_new_depths():
    from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64)
    th = Theseus(model, ratio=0.5, validate=False)
    assert th.adapter.name == "backbone" and th.adapter.path == "backbone.body"
    assert th.plan.successor_depth == {"backbone.body.layer1": 1, "backbone.body.layer2": 2,
                                       "backbone.body.layer3": 3, "backbone.body.layer4": 1}
    exported = _export(th)
    assert type(exported) is FasterRCNN
    # what fasterrcnn_resnet50_fpn does, with the successor's layers instead of resnet50's [3, 4, 6, 3]
    fresh = FasterRCNN(_resnet_fpn_extractor(ResNet(Bottleneck, [1, 2, 3, 1]), 5), num_classes=3, min_size=64, max_size=64)
    fresh.load_state_dict(exported.state_dict(), strict=True)
    x = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().backbone(x[0][None]), exported.backbone(x[0][None]))


@pytest.mark.parametrize("build, path", [
    ("maskrcnn_resnet50_fpn", "backbone.body"), ("retinanet_resnet50_fpn", "backbone.body"),
    ("fcn_resnet50", "backbone"), ("deeplabv3_resnet50", "backbone"),
])
def test_torchvision_detectors_and_segmenters_are_found(build, path):
    from torchvision.models import detection, segmentation

    module = detection if hasattr(detection, build) else segmentation
    model = getattr(module, build)(weights=None, weights_backbone=None, num_classes=3)
    adapter = detect_adapter(model)
    adapter.check(model)
    assert (adapter.name, adapter.path, adapter.inner.name) == ("backbone", path, "resnet")
    assert adapter.containers(model) == [f"{path}.layer{i}" for i in range(1, 5)]


def test_a_resnet_body_alone_is_a_resnet():
    """Theseus(detector.backbone.body) used to say 'No registered adapter recognises a IntermediateLayerGetter'."""
    from torchvision.models._utils import IntermediateLayerGetter

    body = _detector([2, 2, 1, 1]).backbone.body
    th = Theseus(body, ratio=0.5)
    assert th.adapter.name == "resnet"
    exported = _export(th)
    assert type(exported) is IntermediateLayerGetter and exported.return_layers == body.return_layers
    assert [len(getattr(exported, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]


def test_frozen_batch_norm_of_a_pretrained_style_detector_is_rebuilt_frozen():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.models.resnet import BasicBlock, ResNet
    from torchvision.ops.misc import FrozenBatchNorm2d

    def build(layers):
        # as with weights=...: FrozenBatchNorm2d, and conv1 / layer1 frozen (trainable_backbone_layers=3)
        return FasterRCNN(_resnet_fpn_extractor(ResNet(BasicBlock, layers, norm_layer=FrozenBatchNorm2d), 3),
                          num_classes=3, min_size=32, max_size=32)

    torch.manual_seed(0)
    exported = _export(Theseus(build([2, 2, 1, 1]), ratio=0.5))
    assert isinstance(exported.backbone.body.layer1[0].bn1, FrozenBatchNorm2d)
    build([1, 1, 1, 1]).load_state_dict(exported.state_dict(), strict=True)


def test_a_body_the_constructor_would_build_differently_is_refused_at_export():
    model = _detector([2, 2, 1, 1])
    model.backbone.body.layer3[0].bn2.eps = 1e-3  # no ResNet(...) call builds this
    th = Theseus(model, ratio=0.5)
    with pytest.raises(ExportError, match=r"layer3\.0\.bn2\.eps.*0\.001.*1e-05.*native=False"):
        _export(th)
    copy = th.export(native=False)  # the trained model as it is
    assert type(copy) is type(model) and copy.backbone.body.layer3[0].bn2.eps == 1e-3


def test_several_backbones_must_be_named():
    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right = _timm_vit(4), _timm_vit(4)

    torch.manual_seed(0)
    model = Siamese()
    with pytest.raises(AdapterError, match=r"several backbones \(left \(vit\), right \(vit\)\).*backbone='left'"):
        Theseus(model, ratio=0.5)
    th = Theseus(model, adapter="backbone", backbone="right", ratio=0.5)
    assert list(th.plan.containers) == ["right.blocks"]
    th.unwrap()
    with pytest.raises(AdapterError, match=r"backbone='head'.*no such submodule.*\['left', 'right'\]"):
        Theseus(model, adapter="backbone", backbone="head", ratio=0.5)


def test_a_nested_vit_export_is_the_wrapper_with_a_native_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = _Wrapped(4)
    exported = _export(Theseus(model, successor_depth=2))
    assert type(exported) is _Wrapped and type(exported.encoder) is VisionTransformer
    assert len(exported.encoder.blocks) == 2 and exported.head is not model.head


def test_a_timm_features_only_vit_is_refused_because_it_picks_blocks_by_index():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, features_only=True, img_size=16, patch_size=8,
                              depth=4, out_indices=(1, 3))
    with pytest.raises(AdapterError, match=r"FeatureGetterNet.*by index.*without features_only"):
        Theseus(model, ratio=0.5)
    assert all(p.requires_grad for p in model.parameters())  # refused before any change


def test_a_budget_target_is_planned_on_the_detectors_own_sample():
    torch.manual_seed(0)
    th = Theseus(_detector([3, 3, 1, 1]), target_flops=0.95)  # measured on the adapter's sample: a list of images
    assert sum(th.plan.successor_depth.values()) < 6 and th.plan.budget is not None


def test_a_torchvision_vit_in_a_sequential_is_found_and_rebuilt():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = nn.Sequential(_tv_vit(4), nn.Linear(3, 2))
    x = torch.randn(2, 3, 16, 16)
    th = Theseus(model, ratio=0.5, sample=x)
    assert (th.adapter.path, list(th.plan.containers)) == ("0", ["0.encoder.layers"])
    th.model.eval()
    with torch.no_grad():
        engine = th.model(x)
    exported = _export(th)
    assert type(exported) is nn.Sequential and type(exported[0]) is VisionTransformer
    assert len(exported[0].encoder.layers) == 2
    with torch.no_grad():
        assert torch.equal(exported(x), engine)
