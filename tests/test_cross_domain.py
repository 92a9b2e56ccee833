"""The README's five lines, run as written on a BERT, a ViT and a ResNet."""

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision

from theseus_general import LinearScheduler, Theseus

from conftest import tiny_bert


def loss_fn(out, y):
    return F.cross_entropy(getattr(out, "logits", out), y)  # HF outputs carry .logits; vision models return logits


def compress(model, batches):
    th = Theseus(model, ratio=0.5, scheduler=LinearScheduler.reaching_one_at(3, base=0.3), train_rest=True)
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-3)
    for x, y in batches:
        loss_fn(th.model(x), y).backward(); opt.step(); opt.zero_grad(); th.step()  # noqa: E702
    return th, th.export()


def _bert():
    return tiny_bert(num_layers=4), lambda g: torch.randint(1, 100, (4, 8), generator=g)


def _vit():
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=2, embed_dim=16, depth=4, num_heads=2)
    return model, lambda g: torch.randn(4, 1, 16, 16, generator=g)


def _resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [2, 2, 2, 2], num_classes=2)
    return model, lambda g: torch.randn(4, 3, 32, 32, generator=g)


@pytest.mark.parametrize("make, adapter, depth", [(_bert, "bert", 2), (_vit, "vit", 2), (_resnet, "resnet", 4)])
def test_same_five_lines_compress_every_family(make, adapter, depth):
    model, inputs = make()
    g = torch.Generator().manual_seed(0)
    batches = [(inputs(g), torch.randint(0, 2, (4,), generator=g)) for _ in range(5)]
    th, successor = compress(model, batches)
    assert th.adapter.name == adapter
    assert sum(th.plan.successor_depth.values()) == depth
    assert type(successor) is type(model)
    assert sum(p.numel() for p in successor.parameters()) < sum(p.numel() for p in model.parameters())
