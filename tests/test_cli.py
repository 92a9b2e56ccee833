"""theseus-compress: config checking names the field; a run on a tiny BERT writes a native successor."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import save_tiny_classifier, tiny_resnet

from theseus_general.cli import FIELDS, ConfigError, check_config, main

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "configs")


def test_config_errors_name_the_field():
    good = {"task": "text-classification", "model": "m", "data": "d.csv", "output": "o", "depth": 2}
    assert check_config(good)["steps"] == FIELDS["steps"][1]
    with pytest.raises(ConfigError, match="exactly one of the fields 'depth'.*and 'ratio'"):
        check_config({k: v for k, v in good.items() if k != "depth"})
    with pytest.raises(ConfigError, match="exactly one of the fields 'depth'"):
        check_config({**good, "ratio": 0.5})
    with pytest.raises(ConfigError, match="field 'model' is required for text-classification"):
        check_config({k: v for k, v in good.items() if k != "model"})
    with pytest.raises(ConfigError, match="field 'lr' must be a number"):
        check_config({**good, "lr": "fast"})
    with pytest.raises(ConfigError, match=r"unknown field 'stpes' \(did you mean 'steps'\?\)"):
        check_config({**good, "stpes": 3})
    with pytest.raises(ConfigError, match="field 'base_rate' must be within"):
        check_config({**good, "base_rate": 1.5})
    with pytest.raises(ConfigError, match="field 'task' must be one of"):
        check_config({**good, "task": "segmentation"})
    with pytest.raises(ConfigError, match="field 'architecture' applies to image-classification only"):
        check_config({**good, "architecture": "timm:resnet18"})
    image = {**good, "task": "image-classification", "model": "w.safetensors", "depth": None, "ratio": 0.5}
    with pytest.raises(ConfigError, match="field 'architecture' is required for image-classification"):
        check_config({k: v for k, v in image.items() if k != "depth"})
    with pytest.raises(ConfigError, match="field 'max_length' applies to text-classification only"):
        check_config({**image, "architecture": "timm:resnet18", "max_length": 32})
    with pytest.raises(ConfigError, match="field 'ratio' must be below 1"):
        check_config({**{k: v for k, v in image.items() if k != "depth"}, "architecture": "timm:x", "ratio": 1.0})



def test_train_rest_is_the_recipes_unless_given():
    good = {"task": "text-classification", "model": "m", "data": "d.csv", "output": "o", "depth": 2}
    # not given: the engine takes the family's recipe's (build_engine records what ran)
    assert check_config(good)["train_rest"] is None and check_config(good)["recipe"] is None
    assert check_config({**good, "train_rest": False})["train_rest"] is False

@pytest.mark.parametrize("name", ["text", "vit", "resnet"])
def test_example_configs_are_valid_as_written(name):
    with open(os.path.join(CONFIGS, f"{name}.yaml")) as f:
        config = check_config(yaml.safe_load(f), name)
    assert config["task"] == ("text-classification" if name == "text" else "image-classification")


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
    from transformers import AutoConfig

    files = tiny_text_model(tmp_path, num_layers=4)
    config = {"task": "text-classification", "model": files["model"], "data": files["data"],
              "output": str(tmp_path / "out"), "depth": 2, "steps": 6, "batch_size": 8, "checkpoint_every": 3,
              "plots": False}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "c.yaml")]) == 0
    assert AutoConfig.from_pretrained(tmp_path / "out" / "successor").num_hidden_layers == 2
    # the default recipe does no module matching: 6 mixed steps
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["data_position"] == 6 and state["engine"]["step"] == 6
    assert json.loads((tmp_path / "out" / "results.json").read_text())["models"]["successor"]["accuracy"] is None
    assert not (tmp_path / "out" / "curriculum.png").exists()  # plots: false
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "depth": "two"}))
    assert main([str(tmp_path / "bad.yaml")]) == 2


def write_idx(path, array):
    import gzip

    import numpy as np

    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def tiny_image_data(directory, n=64, size=28):
    """MNIST-style idx files (train and t10k) whose label is the brightest quadrant: learnable in a few steps."""
    import numpy as np

    rng = np.random.default_rng(0)
    directory.mkdir()
    for split, count in (("train", n), ("t10k", n // 2)):
        labels = rng.integers(0, 4, count)
        images = rng.integers(0, 60, (count, size, size))
        half = size // 2
        for image, label in zip(images, labels):
            r, c = divmod(int(label), 2)
            image[r * half:(r + 1) * half, c * half:(c + 1) * half] += 180
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    return directory


def tiny_text_model(tmp_path, num_layers=6):
    words = ["good", "bad", "film", "great", "awful", "plot", "fun", "dull"]
    model_dir = save_tiny_classifier(tmp_path / "model", num_layers=num_layers, words=words)
    rows = [(f"{a} {b} film", int(a in ("good", "great", "fun"))) for a in words for b in words]
    (tmp_path / "train.csv").write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in rows))
    return {"model": model_dir, "data": str(tmp_path / "train.csv"), "eval_data": str(tmp_path / "train.csv")}


def tiny_predecessor(tmp_path, name, config):
    """Weights for the config's own architecture, at a tiny size, saved like the vision example does."""
    from safetensors.torch import save_model

    from theseus_general.integrations.cli_image import build_model

    args = ({"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 16, "depth": 4,
             "num_heads": 2, "mlp_ratio": 2.0} if name == "vit" else {"width": 4, "blocks_per_stage": [2, 2, 2, 2]})
    torch.manual_seed(0)
    model = build_model(config["architecture"], args)
    path = tmp_path / "predecessor.safetensors"
    save_model(model, str(path))
    return {"model": str(path), "model_args": args}


@pytest.mark.parametrize("name", ["text", "vit", "resnet"])
def test_each_example_config_runs_end_to_end(name, tmp_path, monkeypatch):
    """The example config as written, with only the files, sizes and steps made tiny: a native successor,
    metrics (CSV), results with accuracy and speed for both models, and both plots."""
    monkeypatch.chdir(os.path.dirname(os.path.dirname(CONFIGS)))  # the repository root, as the README runs it
    with open(os.path.join(CONFIGS, f"{name}.yaml")) as f:
        config = yaml.safe_load(f)
    config.update(output=str(tmp_path / "out"), steps=6, batch_size=8, checkpoint_every=3)
    saved = {}
    if name == "text":
        config.update(tiny_text_model(tmp_path))
    else:
        from theseus_general.integrations import cli_image

        data = str(tiny_image_data(tmp_path / "idx"))
        config.update(data=data, eval_data=data, **tiny_predecessor(tmp_path, name, config))

        def keep(model, path):  # the successor the task writes, to compare with its rebuild
            saved["successor"] = model
            return save_model(model, path)

        save_model = cli_image.save_model
        monkeypatch.setattr(cli_image, "save_model", keep)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "c.yaml")]) == 0
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    pred, succ = results["models"]["predecessor"], results["models"]["successor"]
    assert sum(succ["blocks"].values()) * 2 == sum(pred["blocks"].values())
    assert 0 <= succ["accuracy"] <= 1 and 0 <= pred["accuracy"] <= 1
    assert succ["parameters"] < pred["parameters"] and results["flops_ratio"] > 1
    # 6 steps, all mixed: neither the default recipe nor a ResNet's does module matching
    assert (out / "metrics.csv").read_text().count("replacement_rate") == 6
    assert results["config"]["recipe"] == {"resnet": "resnet", "text": "bert"}.get(name, "default")  # the family's
    for plot in ("curriculum.png", "comparison.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    if name == "text":
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(out / "successor").num_hidden_layers == 3
    else:
        assert_successor_json_rebuilds_it(out, config, succ["blocks"], saved["successor"])


def assert_successor_json_rebuilds_it(out, config, blocks, successor):
    """successor.json's architecture + model_args build the successor; its weights load strictly and
    the outputs are the exported successor's."""
    from safetensors.torch import load_model

    from theseus_general.integrations.cli_image import build_model

    info = json.loads((out / "successor.json").read_text())
    assert info["successor_depth"] == blocks and info["predecessor_model_args"] == config["model_args"]
    assert info["model_args"] != config["model_args"]  # the depth argument changed
    rebuilt = build_model(info["architecture"], info["model_args"])
    load_model(rebuilt, str(out / info["weights"]), strict=True)
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    successor.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), successor(x))



def test_image_task_errors_name_the_problem(tmp_path):
    import numpy as np
    from safetensors.torch import save_model

    from theseus_general.integrations.cli_image import ImageDataError, build_model, load_images
    from theseus_general.errors import TheseusError

    np.savez(tmp_path / "ok.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(4))
    x, y = load_images(str(tmp_path / "ok.npz"), "train")
    assert x.shape == (4, 1, 8, 8) and y.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((4, 8, 8)))
    with pytest.raises(ImageDataError, match="needs arrays 'images' and 'labels'.*pictures"):
        load_images(str(tmp_path / "bad.npz"), "train")
    with pytest.raises(ImageDataError, match="has no train-images-idx3-ubyte"):
        load_images(str(tmp_path), "train")
    with pytest.raises(TheseusError, match="expected 'timm:NAME'"):
        build_model("resnet18", {})
    with pytest.raises(TheseusError, match="cannot import nowhere"):
        build_model("examples.vision_classification:nowhere", {})
    # Weights of another size: a clear error, raised before training or any output
    vit = {"img_size": 8, "patch_size": 4, "in_chans": 1, "num_classes": 4, "embed_dim": 8, "depth": 2, "num_heads": 2}
    save_model(build_model("timm:vit_tiny_patch16_224", vit), str(tmp_path / "w.safetensors"))
    config = {"task": "image-classification", "model": str(tmp_path / "w.safetensors"), "data": str(tmp_path / "ok.npz"),
              "architecture": "timm:vit_tiny_patch16_224", "model_args": {**vit, "embed_dim": 16},
              "output": str(tmp_path / "out"), "ratio": 0.5}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "c.yaml")]) == 1
    assert not (tmp_path / "out").exists()


def test_image_task_messages_name_the_file_and_the_field(tmp_path, capsys):
    """A missing weights file says it does not exist; an impossible depth names the field 'depth'."""
    with open(os.path.join(CONFIGS, "vit.yaml")) as f:
        config = yaml.safe_load(f)
    data = str(tiny_image_data(tmp_path / "idx"))
    config.update(output=str(tmp_path / "out"), data=data, eval_data=data, steps=2, batch_size=8,
                  **tiny_predecessor(tmp_path, "vit", config))
    cases = [({"model": str(tmp_path / "nope.safetensors")}, r"model: '.*nope\.safetensors' does not exist"),
             ({"ratio": None, "depth": 4}, r"field 'depth' is 4, but the model has 4 blocks \(blocks: 4\); .*"
                                           r"between 1 and 3"),
             ({"ratio": 0.1}, r"field 'ratio': ratio=0.1 leaves no block .* set the field 'depth' to 1")]
    for change, words in cases:
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({**config, **change}))
        assert main([str(tmp_path / "c.yaml")]) == 1
        err = capsys.readouterr().err
        assert re.search(words, err), err
        assert "successor_depth" not in err
    assert not (tmp_path / "out").exists()


def test_resnet_stage_depths_in_successor_json(tmp_path):
    """timm's resnet18 takes its stage depths as `layers`; successor_model_args finds it although
    model_args does not name it, and refuses to guess when no argument rebuilds the model."""
    from theseus_general import Theseus
    from theseus_general.integrations.cli_image import build_model, successor_model_args

    for architecture, expected in (("timm:resnet18", {"num_classes": 4, "layers": [1, 1, 1, 1]}),
                                   ("torchvision:resnet18", None)):  # get_model cannot take layers=
        torch.manual_seed(0)
        model = build_model(architecture, {"num_classes": 4})
        th = Theseus(model, ratio=0.5)
        depths = {"predecessor": dict(th.plan.containers), "successor": th.plan.successor_depth}
        successor = th.export()
        th.unwrap()
        assert successor_model_args(architecture, {"num_classes": 4}, model, depths, successor) == expected


def test_cli_device_and_mixed_precision_reach_the_loop(tmp_path, capsys):
    from theseus_general.metrics import read_metrics

    files = tiny_text_model(tmp_path, num_layers=4)
    config = {"task": "text-classification", "model": files["model"], "data": files["data"], "depth": 2, "steps": 3,
              "batch_size": 8, "plots": False, "device": "cpu", "mixed_precision": "bf16", "output": str(tmp_path / "o")}
    defaults = check_config({k: v for k, v in config.items() if k not in ("device", "mixed_precision")})
    assert (defaults["device"], defaults["mixed_precision"]) == ("auto", "no")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main([str(tmp_path / "c.yaml")]) == 0
    assert len(read_metrics(str(tmp_path / "o"))["loss"]) == 3
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(dict(config, mixed_precision="fp8", output=str(tmp_path / "b"))))
    assert main([str(tmp_path / "bad.yaml")]) == 1
    assert "mixed_precision must be one of ['bf16', 'fp16', 'no'], got 'fp8'" in capsys.readouterr().err


def test_the_engine_takes_the_familys_recipe_and_fields_override_parts_of_it():
    from theseus_general.integrations.cli_runner import build_engine

    def config(**fields):
        return {"depth": None, "ratio": 0.5, "recipe": None, "train_rest": None, "seed": 0,
                "base_rate": None, "replace_by": None, "match_fraction": None, **fields}

    model = tiny_resnet()
    given = config()
    th = build_engine(model, given)
    assert (th.recipe.name, th.train_rest, th.scheduler.full_at, th.scheduler.base) == ("resnet", False, 0.3, 0.6)
    assert (given["recipe"], given["train_rest"]) == ("resnet", False)  # results.json says what ran
    th.unwrap()
    th = build_engine(model, config(base_rate=0.5))  # one field given: the other is the recipe's
    assert (th.recipe.name, th.scheduler.full_at, th.scheduler.base) == ("resnet", 0.3, 0.5)
    th.unwrap()
    th = build_engine(model, config(recipe="default", replace_by=0.25, train_rest=True))
    assert (th.recipe.name, th.train_rest, th.scheduler.full_at, th.scheduler.base) == ("default", True, 0.25, 0.3)
    th.unwrap()
    given = config(recipe="default", match_fraction=0.1)
    th = build_engine(model, given)  # fit reads the share of matching from the resolved config
    assert th.recipe.match_steps(100) == 10 and given["theseus_config"] == th.config.to_dict()
    th.unwrap()
