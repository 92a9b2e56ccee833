"""examples/llm_compression.py end to end on a tiny random Llama and a toy tokenizer (the real
SmolLM2 GGUF is used by the example itself, not by the tests), and its layer-removal grouping."""

import json
import os
import sys

import pytest

transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import llm_compression  # noqa: E402


class ToyTokenizer:
    """Words -> ids by a fixed hash: enough for packing and a prompt."""

    eos_token_id = 1

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [2 + sum(map(ord, word)) % 90 for word in text.split()]
        return {"input_ids": torch.tensor([ids])} if return_tensors == "pt" else {"input_ids": ids}


def tiny_llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, eos_token_id=1, pad_token_id=0)).eval()


def test_removal_groups_keep_one_layer_per_group_in_place():
    assert llm_compression.removal_groups([0, 3, 4], 6) == [(0, 1, 2), (3,), (4, 5)]
    assert llm_compression.removal_groups([2, 5], 6) == [(0, 1, 2, 3, 4), (5,)]  # layers before the first kept join it
    kwargs, kept = llm_compression.layer_removal_student_kwargs([0.9, 0.1, 0.2, 0.8, 0.05, 0.7], 3)
    assert kept == [0, 3, 5] and kwargs["groups"] == [(0, 1, 2), (3, 4), (5,)]


def test_example_runs_every_method_and_exports_the_kept_layers(tmp_path, monkeypatch):
    model = tiny_llama()
    monkeypatch.setattr(llm_compression, "load_smollm2", lambda: (model, ToyTokenizer()))
    words = "a fine film with a dull plot and great acting but too long".split()
    texts = [" ".join(words[i % 7:] + words[:i % 5]) for i in range(120)]
    monkeypatch.setattr(llm_compression, "review_texts", lambda seed: (texts[:100], texts[100:]))
    results = llm_compression.main(["--depths", "3", "--steps", "5", "--batch-size", "2", "--seq-len", "12",
                                    "--test-rows", "4", "--calibration-rows", "4", "--speed-repeats", "1",
                                    "--methods", *llm_compression.METHODS, "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["students"]) == {f"{m}@3" for m in llm_compression.METHODS}
    assert len(saved["block_influence"]) == 6
    for name, row in saved["students"].items():
        assert row["depth"] == 3 and row["perplexity"] > 1.0 and row["flops_ratio"] > 1.0, name
        assert row["generate_speedup"] > 0 and row["forward_speedup"] > 0
    # start blocks are chosen only where module matching runs (recipe="matching"); the default records {}
    starts = saved["students"]["theseus@3"]["start_blocks"]
    assert all(0 <= int(group) < 3 and 0 <= block < 6 for group, block in starts.items())
    assert saved["students"]["theseus_bi@3"]["start_blocks"] == {}  # init= given: its successors are kept
    assert "start_blocks" not in saved["students"]["fine_tune_only@3"]
    kept = saved["students"]["layer_removal@3"]["kept_layers"]
    scores = saved["block_influence"]
    assert kept == sorted(sorted(range(6), key=lambda i: -scores[i])[:3])
    assert results["predecessor"]["perplexity"] == saved["predecessor"]["perplexity"]


def test_the_layer_removal_student_holds_exactly_the_kept_layers():
    from theseus_general.baselines import successor_shaped_copy

    model = tiny_llama()
    kwargs, kept = llm_compression.layer_removal_student_kwargs([0.9, 0.1, 0.2, 0.8, 0.05, 0.7], 3)
    student = successor_shaped_copy(model, **kwargs)
    assert student.config.num_hidden_layers == 3
    for new, old in enumerate(kept):
        ours, theirs = student.model.layers[new].state_dict(), model.model.layers[old].state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
