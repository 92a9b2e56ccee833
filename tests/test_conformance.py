"""One contract, every registered adapter (like timm's test_models.py over its registry).

Each adapter lists tiny random models in CASES: a factory, a batch maker, the
Theseus target, and a native rebuild (the model's own class built at the new
depth). Every case runs through the same checks: plan, a few training steps,
frozen predecessor unchanged, eval runs successors only, export matches the
engine, the native rebuild loads the export strictly and matches it, and the
exported parameter count and depth are as planned. Transformers models also go
through save_pretrained -> from_pretrained (safetensors, equal logits) and, for
decoders, generate() with the KV cache. A newly registered adapter fails
`test_every_adapter_has_cases` until it adds its cases here.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from theseus_general import ConstantScheduler, Theseus, list_adapters
from theseus_general.graph import get_submodule, run_model
from theseus_general.measure import count_parameters

from conftest import assert_same_state, state_snapshot, tiny_bert


@dataclass
class Case:
    id: str
    make: Callable[[], nn.Module]  # the predecessor, seeded
    batch: Callable[[int], tuple]  # seed -> (model input, target)
    loss: Callable[[nn.Module, object, torch.Tensor], torch.Tensor]
    logits: Callable[[nn.Module, object], torch.Tensor]
    rebuild: Callable[[List[int]], nn.Module]  # successor depths (plan order) -> native model
    target: Dict = field(default_factory=dict)  # Theseus(...) keyword arguments
    after_export: Optional[Callable[[nn.Module, object, torch.Tensor], None]] = None  # (export, input, engine output)


def _images(channels: int, size: int, classes: int):
    def batch(seed: int):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(4, channels, size, size, generator=g), torch.randint(0, classes, (4,), generator=g)
    return batch


def _tokens(vocab: int, classes: int):
    def batch(seed: int):
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(1, vocab, (4, 8), generator=g)}, torch.randint(0, classes, (4,), generator=g)
    return batch


def _ce(model, x, y):
    return F.cross_entropy(run_model(model, x), y)


def _out(model, x):
    return run_model(model, x)


def _seeded(build):
    def make(*args):
        torch.manual_seed(0)
        return build(*args)
    return make


# ---------------------------------------------------------------- bert
def _bert_rebuild(depths):
    import transformers

    model = tiny_bert(num_layers=4)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**{**model.config.to_dict(), "num_hidden_layers": depths[0]}))


def _bert_rebuild_width(depths):
    import transformers

    model = tiny_bert(num_layers=4)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        **{**model.config.to_dict(), "num_hidden_layers": depths[0], "intermediate_size": 32}))


BERT = [
    Case("bert-seqcls", make=lambda: tiny_bert(num_layers=4), batch=_tokens(100, 2),
         loss=lambda m, x, y: m(**x, labels=y).loss, logits=lambda m, x: m(**x).logits,
         rebuild=_bert_rebuild, target={"successor_depth": 2}),
    # width successors (issue 12): half the MLP neurons; config.intermediate_size describes them
    Case("bert-width", make=lambda: tiny_bert(num_layers=4), batch=_tokens(100, 2),
         loss=lambda m, x, y: m(**x, labels=y).loss, logits=lambda m, x: m(**x).logits,
         rebuild=_bert_rebuild_width, target={"successor_depth": 2, "successor_width": 0.5}),
]


# ---------------------------------------------------------------- vit
def _timm_vit(depth, mlp_ratio=4.0):
    import timm

    return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=depth, img_size=16, patch_size=4,
                             embed_dim=32, num_heads=2, num_classes=3, mlp_ratio=mlp_ratio)


def _tv_vit(depth, mlp_dim=64):
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=4, num_layers=depth, num_heads=2, hidden_dim=32, mlp_dim=mlp_dim,
                             num_classes=3)


VIT = [
    Case("timm-deit", make=_seeded(lambda: _timm_vit(6)), batch=_images(3, 16, 3), loss=_ce, logits=_out,
         rebuild=lambda d: _timm_vit(d[0]), target={"successor_depth": 3}),
    Case("torchvision-vit", make=_seeded(lambda: _tv_vit(4)), batch=_images(3, 16, 3), loss=_ce, logits=_out,
         rebuild=lambda d: _tv_vit(d[0]), target={"ratio": 0.5}),
    Case("timm-deit-width", make=_seeded(lambda: _timm_vit(6)), batch=_images(3, 16, 3), loss=_ce, logits=_out,
         rebuild=lambda d: _timm_vit(d[0], mlp_ratio=2.0), target={"successor_depth": 3, "successor_width": 0.5}),
    Case("torchvision-vit-width", make=_seeded(lambda: _tv_vit(4)), batch=_images(3, 16, 3), loss=_ce, logits=_out,
         rebuild=lambda d: _tv_vit(d[0], mlp_dim=32), target={"ratio": 0.5, "successor_width": 0.5}),
]


# ---------------------------------------------------------------- resnet
def _timm_resnet(layers, base_width=16):
    from timm.models.resnet import Bottleneck, ResNet

    return ResNet(Bottleneck, layers, channels=(8, 16, 32, 64), stem_width=8, base_width=base_width, num_classes=3)


def _tv_resnet(layers):
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, layers, num_classes=3)


RESNET = [
    Case("timm-resnet50-shape", make=_seeded(lambda: _timm_resnet([3, 4, 6, 3])), batch=_images(3, 32, 3), loss=_ce,
         logits=_out, rebuild=_timm_resnet, target={"successor_depth": [2, 2, 3, 2]}),
    # layer3 and layer4 hold one block: the adapter leaves them out of the plan.
    Case("torchvision-resnet-basic", make=_seeded(lambda: _tv_resnet([2, 2, 1, 1])), batch=_images(3, 16, 3),
         loss=_ce, logits=_out, rebuild=lambda d: _tv_resnet(d + [1, 1]), target={"ratio": 0.5}),
    # half the bottleneck width in every stage: base_width 16 -> 8
    Case("timm-resnet-width", make=_seeded(lambda: _timm_resnet([3, 4, 6, 3])), batch=_images(3, 32, 3), loss=_ce,
         logits=_out, rebuild=lambda d: _timm_resnet(d, base_width=8),
         target={"successor_depth": [2, 2, 3, 2], "successor_width": 0.5}),
]


def _timm_features(layers):
    import timm

    return timm.create_model("resnet18", pretrained=False, features_only=True, layers=layers, out_indices=(1, 2, 3))


def _features(model, x):  # a features_only model returns one map per out_index
    return torch.cat([f.flatten(1) for f in run_model(model, x)], 1)


RESNET += [
    # a timm features_only ResNet (FeatureListNet) is a ResNet body: rebuilt with features_only=True
    Case("timm-features-only", make=_seeded(lambda: _timm_features([2, 2, 2, 1])), batch=_images(3, 32, 3),
         loss=lambda m, x, y: _features(m, x).pow(2).mean(), logits=_features,
         rebuild=lambda d: _timm_features(d + [1]), target={"ratio": 0.5}),
]


# ---------------------------------------------------------------- backbone: a family model nested in another
def _tv_body(block: str, layers, **kwargs):
    from torchvision.models import resnet

    return resnet.ResNet(getattr(resnet, block), layers, **kwargs)


def _detector(layers):
    """A tiny Faster R-CNN as fasterrcnn_resnet50_fpn builds one, on a BasicBlock ResNet with a narrow FPN."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    backbone = BackboneWithFPN(_tv_body("BasicBlock", layers), {f"layer{i}": str(i - 1) for i in range(1, 5)},
                               [64, 128, 256, 512], out_channels=16)
    return FasterRCNN(backbone, num_classes=3, min_size=32, max_size=32, rpn_pre_nms_top_n_test=50,
                      rpn_post_nms_top_n_test=20, box_detections_per_img=10)


def _boxes(seed: int):
    """Two 32 x 32 images with one box each: the detector's own training targets."""
    g = torch.Generator().manual_seed(seed)
    images = list(torch.rand(2, 3, 32, 32, generator=g))
    corners = torch.randint(0, 12, (2, 2), generator=g).float()
    targets = [{"boxes": torch.cat([c, c + 16]).unsqueeze(0), "labels": torch.randint(1, 3, (1,), generator=g)}
               for c in corners]
    return images, targets


def _detections(model, images):  # eval: boxes and scores of every image, one tensor
    return torch.cat([torch.cat([d["boxes"], d["scores"][:, None]], 1) for d in model(images)])


def _segmenter(layers, width_per_group=16):
    """DeepLabV3 as deeplabv3_resnet50 builds it (Bottleneck, dilated layer3/4), narrow and with a 1x1 head."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation import DeepLabV3

    body = _tv_body("Bottleneck", layers, width_per_group=width_per_group,
                    replace_stride_with_dilation=[False, True, True])
    return DeepLabV3(IntermediateLayerGetter(body, {"layer4": "out"}), nn.Conv2d(2048, 3, 1))


def _masks(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 3, (2, 32, 32), generator=g)


class _Wrapped(nn.Module):
    """A model of one's own around a ViT (a classifier on its pooled features)."""

    def __init__(self, depth):
        super().__init__()
        self.encoder = _timm_vit(depth)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


BACKBONE = [
    Case("torchvision-faster-rcnn", make=_seeded(lambda: _detector([2, 2, 1, 1])), batch=_boxes,
         loss=lambda m, x, y: sum(m(x, y).values()), logits=_detections,
         rebuild=lambda d: _detector(d + [1, 1]), target={"ratio": 0.5}),
    Case("torchvision-deeplabv3", make=_seeded(lambda: _segmenter([1, 2, 2, 1])), batch=_masks,
         loss=lambda m, x, y: F.cross_entropy(m(x)["out"], y), logits=lambda m, x: m(x)["out"],
         rebuild=lambda d: _segmenter([1, *d, 1]), target={"ratio": 0.5}),
    # width successors in a nested body: half the bottleneck width in every stage, width_per_group 16 -> 8
    Case("torchvision-deeplabv3-width", make=_seeded(lambda: _segmenter([2, 2, 2, 2])), batch=_masks,
         loss=lambda m, x, y: F.cross_entropy(m(x)["out"], y), logits=lambda m, x: m(x)["out"],
         rebuild=lambda d: _segmenter(d, width_per_group=8), target={"ratio": 0.5, "successor_width": 0.5}),
    Case("timm-vit-in-a-wrapper", make=_seeded(lambda: _Wrapped(4)), batch=lambda s: (_images(3, 16, 2)(s)), loss=_ce,
         logits=_out, rebuild=lambda d: _Wrapped(d[0]), target={"successor_depth": 2}),
]


# ---------------------------------------------------------------- hf: any transformers model
def _hf(config_cls: str, model_cls: str, depth_key: str = "num_hidden_layers", **config):
    """model(depth): a tiny random `model_cls` with `depth` layers (seeded), e.g. _hf("LlamaConfig", "LlamaForCausalLM")."""
    def make(depth: int) -> nn.Module:
        import transformers

        torch.manual_seed(0)
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**config, depth_key: depth}))
    return make


_DECODER = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64)
LLAMA = _hf("LlamaConfig", "LlamaForCausalLM", **_DECODER)
LLAMA_NARROW = _hf("LlamaConfig", "LlamaForCausalLM", **{**_DECODER, "intermediate_size": 32})
QWEN2 = _hf("Qwen2Config", "Qwen2ForCausalLM", **_DECODER)
MISTRAL = _hf("MistralConfig", "MistralForCausalLM", **_DECODER)
GPT2 = _hf("GPT2Config", "GPT2LMHeadModel", "n_layer", vocab_size=96, n_positions=64, n_embd=32, n_head=2,
           bos_token_id=1, eos_token_id=2)
OPT = _hf("OPTConfig", "OPTForCausalLM", vocab_size=96, hidden_size=32, ffn_dim=64, num_attention_heads=2,
          max_position_embeddings=64, word_embed_proj_dim=32)
DISTILBERT = _hf("DistilBertConfig", "DistilBertForSequenceClassification", "n_layers", vocab_size=96, dim=32,
                 hidden_dim=64, n_heads=2, max_position_embeddings=64, num_labels=3)
# Stages of 2, 4, 2 blocks (config.depths); window 2 keeps the shifted windows active.
SWIN = _hf("SwinConfig", "SwinForImageClassification", "depths", image_size=32, patch_size=4, embed_dim=16,
           num_heads=[2, 2, 4], window_size=2, num_labels=3)
HF_VIT = _hf("ViTConfig", "ViTForImageClassification", image_size=16, patch_size=4, hidden_size=32,
             intermediate_size=64, num_attention_heads=2, num_labels=3)


def _pixels(size: int):
    def batch(seed: int):
        images, labels = _images(3, size, 3)(seed)
        return {"pixel_values": images}, labels
    return batch


def _lm_loss(model, x, y):
    # use_cache=False: training needs no KV cache (and a group's successor and predecessor
    # layers must not write the same cache slot in one forward).
    return model(**x, labels=x["input_ids"], use_cache=False).loss


def _reloads_the_same(exported, x, engine_out):
    """save_pretrained -> from_pretrained gives the same model; a decoder generates the same
    with the KV cache, and its layers are numbered 0..depth-1 for that cache."""
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        exported.save_pretrained(directory, safe_serialization=True)
        assert any(f.endswith(".safetensors") for f in os.listdir(directory))
        reloaded = type(exported).from_pretrained(directory).eval()
    assert reloaded.config.num_hidden_layers == exported.config.num_hidden_layers
    assert _shared(reloaded) == _shared(exported)  # tied embeddings stay tied
    with torch.no_grad():
        torch.testing.assert_close(_out_logits(reloaded, x), engine_out, rtol=1e-5, atol=1e-6)
    if exported.can_generate():
        indices = [m.layer_idx for m in exported.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        assert sorted(set(indices)) == list(range(exported.config.num_hidden_layers))
        ids = x["input_ids"][:2]
        settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
        ours = exported.generate(ids, **settings)
        assert ours.shape == (2, ids.shape[1] + 5)
        assert torch.equal(ours, reloaded.generate(ids, **settings))
        assert torch.equal(ours, reloaded.generate(ids, use_cache=False, **settings))  # the cache changes nothing


def _shared(model):
    names = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return sorted(group for group in names.values() if len(group) > 1)


def _out_logits(model, x):
    return model(**x).logits


def _hf_case(id, make, batch, loss, depth, target, **extra):
    return Case(id, make=lambda: make(depth), batch=batch, loss=loss, logits=_out_logits,
                rebuild=lambda d: make(d[0]), target=target, after_export=_reloads_the_same, **extra)


HF = [
    _hf_case("llama-causal-lm", LLAMA, _tokens(96, 2), _lm_loss, 6, {"successor_depth": 3}),
    Case("llama-width", make=lambda: LLAMA(6), batch=_tokens(96, 2), loss=_lm_loss, logits=_out_logits,
         rebuild=lambda d: LLAMA_NARROW(d[0]), target={"successor_depth": 3, "successor_width": 0.5},
         after_export=_reloads_the_same),
    _hf_case("qwen2-causal-lm", QWEN2, _tokens(96, 2), _lm_loss, 6, {"ratio": 0.5}),
    # group_first: successors start as layers 0, 2, 4 (their layer_idx); the export renumbers them.
    _hf_case("mistral-causal-lm", MISTRAL, _tokens(96, 2), _lm_loss, 6, {"successor_depth": 3, "init": "group_first"}),
    _hf_case("gpt2-causal-lm", GPT2, _tokens(96, 2), _lm_loss, 4, {"successor_depth": 2}),
    _hf_case("opt-causal-lm", OPT, _tokens(96, 2), _lm_loss, 4, {"successor_depth": 2}),
    _hf_case("distilbert-seqcls", DISTILBERT, _tokens(96, 3), lambda m, x, y: m(**x, labels=y).loss, 4,
             {"successor_depth": 2}),
    _hf_case("vit-imgcls", HF_VIT, _pixels(16),
             lambda m, x, y: m(**x, labels=y).loss, 4, {"ratio": 0.5}),
    Case("swin-stages-imgcls", make=lambda: SWIN([2, 4, 2]), batch=_pixels(32), loss=lambda m, x, y: m(**x, labels=y).loss,
         logits=_out_logits, rebuild=lambda d: SWIN(d), target={"successor_depth": [1, 2, 1]},
         after_export=_reloads_the_same),
]


# ---------------------------------------------------------------- generic: families without an adapter
def _convnext(depths):
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=depths, dims=(8, 16, 16, 32), num_classes=3)


def _gpt2(layers):
    import transformers

    return transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=layers, n_head=2, num_labels=2, pad_token_id=0))


GENERIC = [
    Case("timm-convnext-stages", make=_seeded(lambda: _convnext((1, 2, 4, 1))), batch=_images(3, 32, 3), loss=_ce,
         logits=_out, rebuild=lambda d: _convnext((1, d[0], d[1], 1)),
         target={"adapter": "generic", "container": ["stages.1.blocks", "stages.2.blocks"], "successor_depth": [1, 2]}),
    Case("transformers-gpt2", make=_seeded(lambda: _gpt2(4)), batch=_tokens(50, 2),
         loss=lambda m, x, y: m(**x, labels=y).loss, logits=lambda m, x: m(**x).logits,
         rebuild=lambda d: _gpt2(d[0]), target={"adapter": "generic", "container": "transformer.h", "successor_depth": 2}),
    # issue 11: 6 -> 3 through the generic route used to keep config.num_hidden_layers = 6, and
    # from_pretrained then built 3 random layers; the export now rebuilds the config natively.
    Case("transformers-llama-regression", make=lambda: LLAMA(6), batch=_tokens(96, 2), loss=_lm_loss,
         logits=_out_logits, rebuild=lambda d: LLAMA(d[0]), after_export=_reloads_the_same,
         target={"adapter": "generic", "container": "model.layers", "successor_depth": 3}),
]

CASES: Dict[str, List[Case]] = {"bert": BERT, "vit": VIT, "resnet": RESNET, "hf": HF, "backbone": BACKBONE,
                               "generic": GENERIC}
ADAPTERS = list_adapters()  # at collection: the built-in adapters


def test_every_adapter_has_cases():
    missing = [name for name in ADAPTERS if not CASES.get(name)]
    assert not missing, f"registered adapters without conformance cases: {missing}; add tiny models to CASES"


@pytest.mark.parametrize("case", [pytest.param(c, id=f"{name}:{c.id}") for name in ADAPTERS for c in CASES.get(name, [])])
def test_adapter_contract(case: Case):
    adapter = next(name for name, cases in CASES.items() if case in cases)
    model = case.make()
    before = state_snapshot(model)
    predecessor_params = count_parameters(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x, y = case.batch(0)
    sample = x if adapter == "generic" else None
    th = Theseus(model, scheduler=ConstantScheduler(0.5, replace_all_at=2), sample=sample, **case.target)
    plan = th.plan
    assert th.adapter.name == adapter and plan.adapter == adapter
    depths = list(plan.successor_depth.values())
    assert sum(depths) < sum(plan.containers.values())

    # a few training steps: the successors learn, nothing else of the caller's moves
    initial = [p.detach().clone() for p in th.trainable_parameters()]
    optimizer = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2)
    th.attach(optimizer)
    th.model.train()
    for step in range(4):
        xb, yb = case.batch(step)
        loss = case.loss(th.model, xb, yb)
        assert torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        th.step()
    assert th.phase == "successor"
    assert any(not torch.equal(a, b) for a, b in zip(initial, th.trainable_parameters())), "successors did not train"

    # eval runs each successor once and no predecessor block
    calls = {"pred": 0, "succ": 0}
    hooks = [b.register_forward_hook(lambda *a: calls.__setitem__("pred", calls["pred"] + 1))
             for g in th.groups for b in g.predecessor]
    hooks += [g.successor.register_forward_hook(lambda *a: calls.__setitem__("succ", calls["succ"] + 1)) for g in th.groups]
    th.model.eval()
    with torch.no_grad():
        engine_out = case.logits(th.model, x)
    for h in hooks:
        h.remove()
    assert calls == {"pred": 0, "succ": len(plan.groups)}

    # export: same outputs, planned depth and parameter count
    exported = th.export()
    assert type(exported) is type(model)
    with torch.no_grad():
        assert torch.equal(case.logits(exported, x), engine_out)
    for path, depth in plan.successor_depth.items():
        assert len(get_submodule(exported, path)) == depth
    replaced = sum(g.predecessor_params for g in plan.groups) - sum(g.successor_params for g in plan.groups)
    assert count_parameters(exported) == predecessor_params - replaced

    # the model's own class at the new depth loads the export strictly and computes the same
    native = case.rebuild(depths)
    assert type(native) is type(model)
    native.load_state_dict(exported.state_dict(), strict=True)
    native.eval()
    with torch.no_grad():
        torch.testing.assert_close(case.logits(native, x), engine_out, rtol=1e-5, atol=1e-6)
    assert count_parameters(native) == count_parameters(exported)
    if case.after_export is not None:
        case.after_export(exported, x, engine_out)

    # the frozen predecessor comes back bit-identical
    th.unwrap()
    assert_same_state(before, model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ---------------------------------------------------------------- the default recipe does not collapse
# Issue 27: module matching wrecked a timm mobile CNN through the generic route (frozen batch norm
# dropped timm's in-norm activation, so successors were matched to another function). Per family: on a
# learnable signal (the predecessor's own centred predictions, so a successor-shaped model can learn
# it), Theseus + fit at the family's default recipe must end with a training loss no worse than
# fine-tune-only's at equal steps by more than NO_COLLAPSE_SHARE of fine-tune-only's own loss
# reduction: Theseus keeps at least a third of what fine-tuning gains in the same steps, where a
# collapse gains nothing or ends above the start. (Measured when written, share of fine-tune-only's
# reduction Theseus reached: bert 0.62, vit 0.49, resnet 0.64, hf 0.64, convnext 0.90, efficientnet 0.87.)
NO_COLLAPSE_SHARE = 2 / 3
NO_COLLAPSE_STEPS, NO_COLLAPSE_LR = 40, 1e-3


def _tiny_efficientnet():
    """A BN-heavy mobile CNN as timm builds them: depthwise convolutions, BatchNormAct2d (the
    activation inside the norm), a stage of 4 same-shaped inverted-residual blocks."""
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    torch.manual_seed(0)
    return EfficientNet(decode_arch_def([["ds_r1_k3_s1_e1_c8"], ["ir_r4_k3_s2_e3_c8"]]), num_classes=3, stem_size=8,
                        num_features=32, in_chans=3)


NO_COLLAPSE = {  # family -> a classification case of it (logits [batch, classes])
    "bert": "bert-seqcls", "vit": "timm-deit", "resnet": "timm-resnet50-shape", "hf": "distilbert-seqcls",
    "backbone": "timm-vit-in-a-wrapper", "generic": "timm-convnext-stages",
}
NO_COLLAPSE_EXTRA = [  # BN-heavy CNNs through the generic route, the kind of model
    Case("timm-efficientnet-bnact", make=_tiny_efficientnet, batch=_images(3, 16, 3), loss=_ce, logits=_out,
         rebuild=lambda d: None, target={"adapter": "generic", "container": "blocks.1", "successor_depth": 2}),
]


def _no_collapse_cases():
    params = []
    for name in ADAPTERS:
        wanted = NO_COLLAPSE.get(name)
        case = next((c for c in CASES.get(name, []) if c.id == wanted), (CASES.get(name) or [None])[0])
        if case is not None:
            params.append(pytest.param(case, id=f"{name}:{case.id}"))
    return params + [pytest.param(c, id=f"generic:{c.id}") for c in NO_COLLAPSE_EXTRA]


def _final_loss(model, case, pool):
    model.eval()
    with torch.no_grad():
        return sum(F.cross_entropy(case.logits(model, x), y).item() for x, y in pool) / len(pool)


@pytest.mark.parametrize("case", _no_collapse_cases())
def test_default_recipe_does_not_collapse(case: Case):
    from theseus_general import fit
    from theseus_general.baselines import successor_shaped_copy

    model = case.make().train()
    inputs = [case.batch(seed)[0] for seed in range(4)]
    model.eval()
    with torch.no_grad():
        logits = [case.logits(model, x) for x in inputs]
    centred = torch.cat(logits) - torch.cat(logits).mean(0)
    pool = [(x, y) for x, y in zip(inputs, centred.argmax(-1).split([len(l) for l in logits]))]
    model.train()
    sample = inputs[0] if case.target.get("adapter") == "generic" else None

    def trained(target, net):
        torch.manual_seed(0)
        fit(target, itertools.cycle(pool), NO_COLLAPSE_STEPS, lr=NO_COLLAPSE_LR, progress=False,
            loss=lambda x, y: F.cross_entropy(case.logits(net, x), y))
        return _final_loss(net, case, pool)

    student = successor_shaped_copy(model, sample=sample, **case.target)
    start = _final_loss(student, case, pool)
    fine_tune = trained(student, student)
    th = Theseus(model, sample=sample, **case.target)  # the family's default recipe
    theseus = trained(th, th.model)
    th.unwrap()
    assert fine_tune < start  # the signal is learnable: otherwise the comparison says nothing
    assert theseus <= fine_tune + NO_COLLAPSE_SHARE * (start - fine_tune), (
        f"{case.id}: Theseus ({th.recipe.name} recipe) ended at training loss {theseus:.4f}, fine-tune-only at "
        f"{fine_tune:.4f}, from {start:.4f}, after {NO_COLLAPSE_STEPS} steps")
