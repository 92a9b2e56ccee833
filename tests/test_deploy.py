"""Exported successors deploy to ONNX Runtime: BERT, ViT, ResNet and a Llama decoder go through
`torch.onnx.export` (both of torch's exporters) and give PyTorch's outputs in `onnxruntime`, on an
input of another batch size (and sequence length) than the one they were exported with.
docs/deploy.md shows the same steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_bert, tiny_resnet

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


class Logits(nn.Module):
    """The successor with named tensor inputs and one tensor output, as an inference runtime takes it."""

    def __init__(self, model: nn.Module, text: bool, **options):
        super().__init__()
        self.model, self.text, self.options = model, text, options

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.text:
            input_ids, attention_mask = inputs
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **self.options).logits
        return self.model(*inputs)


def tiny_llama(num_layers: int = 4):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def tiny_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)


def text_inputs(batch: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # one padded row: the mask reaches the attention
    return ids, mask


def image_inputs(batch: int, seed: int):
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed)),)


def depth(model: nn.Module) -> int:
    if hasattr(model, "config"):
        return model.config.num_hidden_layers
    if hasattr(model, "blocks"):
        return len(model.blocks)
    return sum(len(getattr(model, f"layer{i}")) for i in range(1, 5))


# name: (build, successor_depth, text model, forward options)
MODELS = {
    "bert": (lambda: tiny_bert(num_layers=4), 2, True, {}),
    "llama": (tiny_llama, 2, True, {"use_cache": False}),  # logits only, no key/value cache
    "vit": (tiny_vit, 2, False, {}),
    "resnet": (tiny_resnet, [1, 1, 1, 1], False, {}),
}


def export_successor(name: str):
    from theseus_general import Theseus

    build, successor_depth, text, options = MODELS[name]
    predecessor = build().eval()
    th = Theseus(predecessor, successor_depth=successor_depth)
    with pytest.warns(UserWarning, match="never trained"):  # speed and equality do not depend on training
        successor = th.export()
    th.unwrap()
    assert depth(successor) < depth(predecessor) and type(successor) is type(predecessor)
    return Logits(successor, text, **options).eval(), text


def onnx_export(model: nn.Module, inputs, path: str, text: bool, dynamo: bool) -> None:
    """torch.onnx.export with the batch (and sequence) axes left dynamic, as docs/deploy.md does it."""
    names = ["input_ids", "attention_mask"] if text else ["pixel_values"]
    axes = {0: "batch", 1: "sequence"} if text else {0: "batch"}
    if dynamo:  # torch.export-based (torch's default since 2.9): dynamic_shapes, keyed by forward argument
        from torch.export import Dim

        shapes = tuple({axis: Dim.AUTO for axis in axes} for _ in names)
        torch.onnx.export(model, tuple(inputs), path, input_names=names, output_names=["logits"], dynamo=True,
                          dynamic_shapes=(shapes,), verbose=False)
    else:  # the TorchScript exporter: dynamic_axes, keyed by input name
        with pytest.warns(DeprecationWarning):
            torch.onnx.export(model, tuple(inputs), path, input_names=names, output_names=["logits"], dynamo=False,
                              dynamic_axes={**{n: axes for n in names}, "logits": {0: "batch"}})


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_successor_runs_in_onnxruntime_with_pytorchs_outputs(name, dynamo, tmp_path):
    model, text = export_successor(name)
    traced = text_inputs(2, 10, seed=0) if text else image_inputs(2, seed=0)
    path = str(tmp_path / f"{name}.onnx")
    onnx_export(model, traced, path, text, dynamo)

    # another batch size and sequence length than the export saw: the axes are dynamic
    inputs = text_inputs(3, 7, seed=1) if text else image_inputs(3, seed=1)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == (["input_ids", "attention_mask"] if text else ["pixel_values"])
    got = session.run(["logits"], {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)})[0]
    with torch.no_grad():
        expected = model(*inputs).numpy()
    assert got.shape == expected.shape and got.shape[0] == 3
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_same_onnx_file_runs_in_openvino(name, tmp_path, monkeypatch):
    """OpenVINO as a second runtime: it reads the ONNX file as it is (TorchScript exporter, the fast one)."""
    monkeypatch.setenv("HOME", str(tmp_path))  # OpenVINO's telemetry reads and writes ~/intel
    ov = pytest.importorskip("openvino")
    model, text = export_successor(name)
    path = str(tmp_path / f"{name}.onnx")
    onnx_export(model, text_inputs(2, 10, seed=0) if text else image_inputs(2, seed=0), path, text, dynamo=False)
    inputs = text_inputs(3, 7, seed=1) if text else image_inputs(3, seed=1)
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"})
    names = ["input_ids", "attention_mask"] if text else ["pixel_values"]
    got = compiled({n: x.numpy() for n, x in zip(names, inputs)})[compiled.output(0)]
    with torch.no_grad():
        expected = model(*inputs).numpy()
    assert got.shape == expected.shape and got.shape[0] == 3
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
