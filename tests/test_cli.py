"""theseus-compress: config checking names the field; a run on a tiny BERT writes a native successor."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import tiny_bert

from theseus_general.cli import FIELDS, ConfigError, check_config, main


def test_config_errors_name_the_field():
    good = {"task": "text-classification", "model": "m", "data": "d.csv", "output": "o", "depth": 2}
    assert check_config(good)["steps"] == FIELDS["steps"][1]
    with pytest.raises(ConfigError, match="field 'depth' is required"):
        check_config({k: v for k, v in good.items() if k != "depth"})
    with pytest.raises(ConfigError, match="field 'lr' must be a float"):
        check_config({**good, "lr": "fast"})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['stpes'\]"):
        check_config({**good, "stpes": 3})
    with pytest.raises(ConfigError, match="field 'base_rate' must be within"):
        check_config({**good, "base_rate": 1.5})


def test_help_documents_every_field_and_imports_no_model_library():
    code = ("import sys, theseus_general.cli as cli; "
            "print('loaded:', sorted(m for m in ('transformers', 'timm', 'torchvision') if m in sys.modules)); "
            "cli.main(['--help'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    assert "loaded: []" in out
    for name in FIELDS:
        assert f" {name}: " in out, name


def test_cli_compresses_a_tiny_bert_with_checkpoints(tmp_path):
    from transformers import AutoConfig, BertTokenizerFast

    words = ["good", "bad", "film", "great", "awful", "plot", "fun", "dull"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]))
    model_dir = tmp_path / "model"
    tiny_bert(num_layers=4).save_pretrained(model_dir)
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(model_dir)
    rows = [(f"{a} {b} film", int(a in ("good", "great", "fun"))) for a in words for b in words]
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in rows))
    config = {"task": "text-classification", "model": str(model_dir), "data": str(tmp_path / "train.csv"),
              "output": str(tmp_path / "out"), "depth": 2, "steps": 6, "batch_size": 8, "checkpoint_every": 3}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "c.yaml")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "out" / "successor").num_hidden_layers == 2
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["data_position"] == 6 and state["engine"]["step"] == 6
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "depth": "two"}))
    assert main([str(tmp_path / "bad.yaml")]) == 2
