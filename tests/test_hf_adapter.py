"""The hf adapter's refusals and guards (the working paths are in test_conformance.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from theseus_general import ConstantScheduler, Theseus
from theseus_general.errors import AdapterError, ExportError

from conftest import assert_same_state, state_snapshot, tiny_bert

transformers = pytest.importorskip("transformers")


def _llama(layers=6, **config):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **config))


def _swin(init_window=2):
    torch.manual_seed(0)
    return transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 4, 2], num_heads=[2, 2, 4], window_size=init_window,
        num_labels=3))


def test_detection_order_keeps_specific_adapters():
    assert Theseus(tiny_bert(num_layers=4), successor_depth=2).adapter.name == "bert"
    llama = _llama()
    assert Theseus(llama, successor_depth=3).adapter.name == "hf"


def test_t5_encoder_is_refused_because_layers_get_per_layer_arguments():
    torch.manual_seed(0)
    model = transformers.T5EncoderModel(transformers.T5Config(vocab_size=96, d_model=32, d_kv=16, d_ff=64, num_layers=4,
                                                              num_heads=2))
    before = state_snapshot(model)
    with pytest.raises(AdapterError, match="position_bias"):
        Theseus(model, successor_depth=2)
    assert_same_state(before, model)


def test_encoder_decoder_is_refused():
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(vocab_size=96, d_model=32, d_kv=16, d_ff=64,
                                                                          num_layers=2, num_heads=2))
    with pytest.raises(AdapterError, match="encoder-decoder"):
        Theseus(model, successor_depth=1)


def test_mixed_layer_types_are_refused():
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=3))
    with pytest.raises(AdapterError, match="layer_types"):
        Theseus(model, successor_depth=3)


def test_a_stack_that_does_not_match_the_config_is_refused_with_what_was_found():
    model = _llama(4)
    del model.model.layers[3]  # config.num_hidden_layers still says 4
    with pytest.raises(AdapterError, match=r"model\.layers: 3 x LlamaDecoderLayer.*adapter='generic'"):
        Theseus(model, successor_depth=2)


def test_successor_from_another_position_is_refused_at_export():
    # Swin's odd blocks shift their windows; a successor copied from block 2 (no shift)
    # cannot stand at position 1 of a natively built stage.
    th = Theseus(_swin(), successor_depth=[1, 2, 1], init="group_first")
    with pytest.raises(ExportError, match="init='first'"):
        th.export()


def test_generic_route_refuses_a_container_the_config_does_not_count():
    model = _swin()
    th = Theseus(model, adapter="generic", container="swin.encoder.layers.1.blocks", successor_depth=2,
                 sample={"pixel_values": torch.randn(2, 3, 32, 32)})
    with pytest.raises(ExportError, match="would reload differently"):
        th.export()


def test_diverged_tied_embeddings_are_refused():
    from theseus_general.adapters._hf_common import native_config, rebuild_native

    model = _llama(4, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1.0)
    with pytest.raises(ExportError, match="tied"):
        rebuild_native(model, lambda m: native_config(m, list(m.model.layers)))


def test_training_with_the_default_kv_cache_computes_like_without_it():
    # A successor copied from layer k and another group's predecessor layer k would write the same
    # KV-cache slot in one training forward with use_cache=True (the transformers default); the engine
    # calls HfAdapter.prepare_successor, which gives each successor its group's first layer index.
    model = _llama()
    twin = copy.deepcopy(model)
    th = Theseus(model, successor_depth=3, scheduler=ConstantScheduler(0.5))
    th_twin = Theseus(twin, successor_depth=3, scheduler=ConstantScheduler(0.5))  # same seed: same draws
    ids = torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    th.model.train()
    th_twin.model.train()
    worst, mixed = 0.0, 0
    with torch.no_grad():
        for step in range(6):
            without = th_twin.model(input_ids=ids, use_cache=False).logits
            worst = max(worst, (th.model(input_ids=ids).logits - without).abs().max().item())
            assert th.decisions() == th_twin.decisions()
            mixed += len({d[0] for d in th.decisions().values()}) == 2
            th.step(), th_twin.step()
    assert worst == 0.0 and mixed > 0


def test_export_keeps_dtype_and_shares_the_trained_tensors():
    model = _llama(4, tie_word_embeddings=True).to(torch.bfloat16)
    th = Theseus(model, successor_depth=2)
    th.model.eval()
    ids = torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        engine_out = th.model(input_ids=ids).logits
    exported = th.export()
    assert {p.dtype for p in exported.parameters()} == {torch.bfloat16}
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    assert exported.config.num_hidden_layers == 2 and [l.self_attn.layer_idx for l in exported.model.layers] == [0, 1]
    with torch.no_grad():
        assert torch.equal(exported(input_ids=ids).logits, engine_out)
    # the engine's successors are untouched: exporting twice gives equal models
    again = th.export()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), exported.state_dict().values()))


def test_the_engine_gives_each_successor_its_group_first_layer_index():
    model = _llama()
    th = Theseus(model, successor_depth=3)
    assert [g.successor.self_attn.layer_idx for g in th.groups] == [0, 2, 4]
    assert [layer.self_attn.layer_idx for layer in th.export().model.layers] == [0, 1, 2]


def test_export_native_false_returns_the_copy_when_a_native_rebuild_is_refused():
    model = _llama(tie_word_embeddings=True)
    # the config says the head is tied to the embeddings, but here it is not: a reload would tie them
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1.0)
    th = Theseus(model, successor_depth=3)
    with pytest.raises(ExportError, match="tied.*native=False"):
        th.export()
    loose = th.export(native=False)
    assert type(loose) is type(model) and len(loose.model.layers) == 3
    ids = torch.randint(1, 96, (2, 8), generator=torch.Generator().manual_seed(2))
    th.model.eval()
    with torch.no_grad():
        assert torch.equal(loose(input_ids=ids, use_cache=False).logits, th.model(input_ids=ids, use_cache=False).logits)
