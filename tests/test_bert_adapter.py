"""BERT adapter: detection, plan, export through save_pretrained and plain transformers."""

import pytest
import torch
import transformers

from theseus_general import ConstantScheduler, ExportError, Theseus, detect_adapter

from conftest import bert_batch, tiny_bert


def _train_a_little(th, steps=6):
    opt = torch.optim.AdamW(th.trainable_parameters(), lr=1e-2)
    th.model.train()
    for i in range(steps):
        th.model(**bert_batch(seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()
        th.step()


@pytest.mark.parametrize("cls_name", ["BertForSequenceClassification", "BertModel", "BertForMaskedLM"])
def test_detected_for_bert_classes(cls_name):
    model = tiny_bert(cls_name=cls_name)
    assert detect_adapter(model).name == "bert"
    th = Theseus(model, successor_depth=2)
    assert list(th.plan.containers.values()) == [6]
    assert th.plan.successor_depth == {next(iter(th.plan.containers)): 2}


def test_forward_signature_and_outputs_unchanged(bert):
    th = Theseus(bert, successor_depth=3, scheduler=ConstantScheduler(0.5))
    out = th.model(**bert_batch())
    assert isinstance(out, transformers.modeling_outputs.SequenceClassifierOutput)
    assert out.loss.ndim == 0 and out.logits.shape == (4, 2)


def test_export_round_trip_through_save_pretrained(tmp_path, bert):
    th = Theseus(bert, successor_depth=3, scheduler=ConstantScheduler(0.5, replace_all_at=3))
    _train_a_little(th)
    exported = th.export()
    assert type(exported) is transformers.BertForSequenceClassification
    assert exported.config.num_hidden_layers == 3 and len(exported.bert.encoder.layer) == 3
    ids = bert_batch()["input_ids"]
    th.model.eval()
    with torch.no_grad():
        engine_logits = th.model(input_ids=ids).logits
        exported_logits = exported(input_ids=ids).logits
    assert torch.equal(engine_logits, exported_logits)
    exported.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is transformers.BertForSequenceClassification
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, engine_logits)
    assert sum(p.numel() for p in reloaded.parameters()) < sum(p.numel() for p in bert.parameters())


def test_uneven_split_exports_right_depth(bert):
    th = Theseus(bert, successor_depth=4)  # 6 -> 4: groups of 2, 2, 1, 1
    assert [g.blocks for g in th.plan.groups] == [(0, 1), (2, 3), (4,), (5,)]
    assert th.export().config.num_hidden_layers == 4


def test_init_choices_copy_the_right_blocks(bert):
    layers = list(bert.bert.encoder.layer)
    for init, sources in (("first", [0, 1, 2]), ("group_first", [0, 2, 4]), ("group_last", [1, 3, 5])):
        th = Theseus(bert, successor_depth=3, init=init)
        for succ, src in zip(th.successors(), sources):
            assert succ is not layers[src]
            for a, b in zip(succ.parameters(), layers[src].parameters()):
                assert torch.equal(a, b)
        th.unwrap()


def test_custom_successor_must_be_native_for_native_export(bert):
    def layers(*widths):
        return [transformers.models.bert.modeling_bert.BertLayer(transformers.BertConfig(
            **{**bert.config.to_dict(), "intermediate_size": w})) for w in widths]

    # narrower layers of one width: config.intermediate_size describes them (width successors)
    th = Theseus(bert, successor_depth=3, successors=layers(16, 16, 16))
    assert "custom BertLayer" in str(th.plan)
    assert th.export().config.intermediate_size == 16
    th.unwrap()
    # two widths: no config describes them
    th = Theseus(bert, successor_depth=3, successors=layers(16, 24, 16))
    with pytest.raises(ExportError, match="different MLP widths.*export\\(native=False\\)"):
        th.export()
    loose = th.export(native=False)
    assert loose.bert.encoder.layer[0].intermediate.dense.out_features == 16


def test_roberta_is_handled_by_the_same_adapter():
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=70)
    model = transformers.RobertaForSequenceClassification(config)
    th = Theseus(model, successor_depth=2)
    assert th.adapter.name == "bert"
    exported = th.export()
    assert type(exported) is transformers.RobertaForSequenceClassification
    assert exported.config.num_hidden_layers == 2
