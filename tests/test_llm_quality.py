"""benchmarks/llm_quality.py on a tiny random Llama: LLM-Streamline's span choice and its span-only
training, the paired verdict in log perplexity, merging parts, and the test-size check."""

import argparse
import importlib.util
import json
import os

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_llm_quality", os.path.join(BENCHMARKS, "llm_quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


llm_quality = load_benchmark()


def tiny_llama(layers=6):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1, pad_token_id=0)).eval()


def silence(layer):
    """A decoder layer that adds nothing to the residual stream: its output is its input."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


def rows(n=4, length=12, seed=1):
    return torch.randint(2, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def test_streamline_groups_put_the_span_in_one_group_and_every_other_layer_alone():
    assert llm_quality.streamline_groups(2, 3, 6) == [(0,), (1,), (2, 3, 4), (5,)]
    assert llm_quality.streamline_groups(0, 6, 6) == [(0, 1, 2, 3, 4, 5)]
    assert llm_quality.streamline_groups(3, 3, 6) == [(0,), (1,), (2,), (3, 4, 5)]  # a span that ends the model


@pytest.mark.parametrize("start", [0, 2, 3])
def test_streamline_span_finds_the_layers_that_change_nothing(start):
    model = tiny_llama()
    for i in range(start, start + 3):
        silence(model.model.layers[i])
    chosen, cosines = llm_quality.streamline_span(model, rows(), 3)
    assert chosen == start and len(cosines) == 4
    assert cosines[start] == pytest.approx(1.0, abs=1e-5)
    assert all(c < 0.999 for i, c in enumerate(cosines) if i != start)


def test_streamline_trains_only_the_span_layer_and_leaves_the_original_untouched(monkeypatch):
    model = tiny_llama()
    for i in range(2, 5):  # quiet, not silent: the span to replace, with an output its first layer does not copy
        with torch.no_grad():
            model.model.layers[i].self_attn.o_proj.weight.mul_(0.05)
            model.model.layers[i].mlp.down_proj.weight.mul_(0.05)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = rows(16, 12, seed=2)
    batch_at = lambda position: ({"input_ids": data[(2 * position) % 16:(2 * position) % 16 + 2]},  # noqa: E731
                                 data[(2 * position) % 16:(2 * position) % 16 + 2])
    monkeypatch.setattr(llm_quality, "fit", lambda *args, **kwargs: None)  # the fine-tuning after the span's matching
    args = argparse.Namespace(seed=0, match_fraction=0.5, lr=1e-3, progress=False)
    student, notes = llm_quality.train_streamline(model, 4, batch_at, 8, args, data[:4])
    assert notes["span"] == [2, 4] and notes["match_steps"] == 4
    assert student.config.num_hidden_layers == 4
    for new, old in [(0, 0), (1, 1), (3, 5)]:  # the layers outside the span: exactly the originals
        ours, theirs = student.model.layers[new].state_dict(), model.model.layers[old].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    span_layer, first = student.model.layers[2].state_dict(), model.model.layers[2].state_dict()
    assert not all(torch.equal(span_layer[k], first[k]) for k in first)  # trained on the span's output
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in student.parameters())  # the fine-tuning trains every layer


def run(test_loss, dev_loss=None):
    return {"test_loss": test_loss, "dev_loss": test_loss if dev_loss is None else dev_loss,
            "test_perplexity": 2.718281828 ** test_loss}


def test_summary_pairs_theseus_against_the_baseline_of_lowest_test_loss():
    report = {"runs": {
        "theseus": {"0": run(5.00), "1": run(5.10), "2": run(5.05)},
        "layer_removal": {"0": run(5.20), "1": run(5.31), "2": run(5.24)},
        "kd_bi": {"0": run(5.50), "1": run(5.40), "2": run(5.60)},
    }}
    llm_quality.summarise(report)
    assert report["summary"]["layer_removal"]["test_mean"] == pytest.approx(
        sum(2.718281828 ** x for x in (5.20, 5.31, 5.24)) / 3)
    verdict = report["paired"]["theseus"]
    assert verdict["best_baseline"] == "layer_removal" and verdict["verdict"] == "ahead"
    assert verdict["against"]["layer_removal"]["differences"] == pytest.approx([0.20, 0.21, 0.19])
    report["runs"]["theseus"] = {"0": run(5.30), "1": run(5.41), "2": run(5.33)}  # higher loss: behind
    llm_quality.summarise(report)
    assert report["paired"]["theseus"]["verdict"] == "behind"


def test_merge_joins_parts_and_refuses_a_run_given_twice(tmp_path):
    a = {"settings": {"methods": ["theseus"], "depth": 20, "lr": 1e-4}, "runs": {"theseus": {"0": run(5.0)}}}
    b = {"settings": {"methods": ["kd_bi"], "depth": 20, "lr": 3e-4}, "runs": {"kd_bi": {"0": run(5.2)}}}
    paths = []
    for name, part in (("a", a), ("b", b)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(part, f)
    merged = llm_quality.merge(paths, str(tmp_path / "m.json"))
    assert set(merged["runs"]) == {"theseus", "kd_bi"}
    assert merged["paired"]["theseus"]["against"]["kd_bi"]["differences"] == pytest.approx([0.2])
    with pytest.raises(SystemExit, match="theseus seed 0 is in two parts"):
        llm_quality.merge([paths[0], paths[0]], str(tmp_path / "n.json"))
    other_depth = dict(b, settings=dict(b["settings"], depth=15))
    with open(tmp_path / "c.json", "w") as f:
        json.dump(other_depth, f)
    with pytest.raises(SystemExit, match="depth differs between the parts"):
        llm_quality.merge([paths[0], str(tmp_path / "c.json")], str(tmp_path / "o.json"))


def test_a_kd_run_records_its_temperature_and_alpha(monkeypatch):
    """A merged column takes KD from the part of its chosen setting, so each KD row says which it is."""
    calls = []
    monkeypatch.setattr(llm_quality, "distill", lambda *args, **kwargs: calls.append(kwargs) or "student")
    args = argparse.Namespace(seed=0, lr=3e-4, steps=3, kd_temperature=4.0, kd_alpha=0.9)
    student, notes = llm_quality.train("kd_bi", tiny_llama(), 4, None, args, [0.5, 0.1, 0.4, 0.3, 0.2, 0.6], None)
    assert student == "student" and calls[0]["temperature"] == 4.0 and calls[0]["alpha"] == 0.9
    assert notes == {"kept_layers": [0, 2, 3, 5], "kd_temperature": 4.0, "kd_alpha": 0.9}


def test_merge_takes_only_the_named_methods_of_a_part(tmp_path):
    """A column at the chosen settings takes each method from the sitting of its own lr."""
    at_1e4 = {"settings": {"depth": 20, "lr": 1e-4}, "runs": {"theseus": {"0": run(5.0)}, "kd_bi": {"0": run(5.9)}}}
    at_3e4 = {"settings": {"depth": 20, "lr": 3e-4}, "runs": {"theseus": {"0": run(5.5)}, "kd_bi": {"0": run(5.2)}}}
    paths = []
    for name, part in (("lr1e-4", at_1e4), ("lr3e-4", at_3e4)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(part, f)
    merged = llm_quality.merge([f"{paths[0]}:theseus", f"{paths[1]}:kd_bi"], str(tmp_path / "m.json"))
    assert merged["runs"] == {"theseus": {"0": run(5.0)}, "kd_bi": {"0": run(5.2)}}
    assert merged["paired"]["theseus"]["against"]["kd_bi"]["differences"] == pytest.approx([0.2])
    again = llm_quality.merge([str(tmp_path / "m.json:kd_bi"), f"{paths[0]}:theseus"], str(tmp_path / "r.json"))
    assert again["runs"] == merged["runs"]  # a merged file is a part too, and brings its parts' settings
    assert again["parts"] == [at_1e4["settings"], at_3e4["settings"], at_1e4["settings"]]
    with pytest.raises(SystemExit, match="has no runs of streamline"):
        llm_quality.merge([f"{paths[0]}:streamline"], str(tmp_path / "n.json"))
    with pytest.raises(SystemExit, match="kd is not a method"):
        llm_quality.merge([f"{paths[0]}:theseus,kd"], str(tmp_path / "o.json"))


def test_data_refuses_a_test_split_under_100k_tokens(monkeypatch):
    class Tokenizer:
        eos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [2 + len(word) for word in text.split()]}

    texts = [f"review number {i} was fine" for i in range(300)]
    monkeypatch.setattr(llm_quality, "load_rotten_tomatoes", lambda: (texts, [0] * 300, ["neg", "pos"]))
    args = argparse.Namespace(test_snippets=100, dev_snippets=50, seq_len=8)
    with pytest.raises(SystemExit, match="at least 100000"):
        llm_quality.data(Tokenizer(), args)


def test_importance_groups_are_the_hand_built_block_influence_start():
    """benchmarks/importance_groups_check.py on a tiny Llama whose layers 1, 2 and 4 add nothing:
    groups="importance" keeps the same layers as the example's Block Influence, with the same groups,
    starting weights and training losses (so theseus_bi's measured figures are that option's)."""
    spec = importlib.util.spec_from_file_location("importance_groups_check",
                                                  os.path.join(BENCHMARKS, "importance_groups_check.py"))
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    model = tiny_llama(6)
    for i in (1, 2, 4):
        silence(model.model.layers[i])
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(2, 96, (12, 16), generator=g)
    row = check.check_depth(model, 3, rows[:4], check.llm.batches_of(rows, 4, 0),
                            argparse.Namespace(seed=0, steps=3, lr=1e-3))
    assert row["kept_by_hand"] == [0, 3, 5]
    assert row["groups_importance"] == [[0, 1, 2], [3, 4], [5]]
    assert row["same_groups"] and row["same_start_weights"] and row["same_losses"]
    assert len(row["losses_importance"]) == 3 and not row["may_choose_starts_importance"]
