"""unwrap() gives back the caller's model exactly as it was."""

import torch

from theseus_general import Theseus

from conftest import assert_same_state, bert_batch, state_snapshot, tiny_bert


def test_unwrap_restores_modules_flags_and_outputs():
    model = tiny_bert(num_layers=6)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a caller's own choice, kept
    layers = model.bert.encoder.layer
    layer_objects = list(layers)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = state_snapshot(model)
    model.eval()
    ids = bert_batch()["input_ids"]
    with torch.no_grad():
        reference = model(input_ids=ids).logits

    with Theseus(model, successor_depth=2, train_rest=True, scheduler=1.0) as th:
        assert model.bert.encoder.layer is not layers
        opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2)
        model.train()
        for i in range(3):
            model(**bert_batch(seed=i)).loss.backward()
            opt.step()
            opt.zero_grad()
            th.step()

    assert model.bert.encoder.layer is layers and list(layers) == layer_objects
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training  # the mode it had when wrapped
    assert_same_state(before, model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_state_checksum_tells_bit_changes_including_scalar_buffers():
    from theseus_general.measure import state_checksum

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))  # BN has a 0-d int buffer
    reference = state_checksum(model)
    assert state_checksum(model) == reference
    with torch.no_grad():
        model[0].weight[0, 0] = torch.nextafter(model[0].weight[0, 0], torch.tensor(1.0))
    assert state_checksum(model) != reference
