"""A misspelt keyword, adapter option, adapter name or config field names the closest valid one."""

import pytest

from theseus_general import AdapterError, Theseus, TheseusError, UnknownOptionError, get_adapter
from theseus_general.adapters.generic import GenericAdapter
from theseus_general.cli import ConfigError, check_config

from conftest import assert_same_state, state_snapshot, tiny_bert


@pytest.mark.parametrize("kwargs, suggestion", [
    ({"contianer": "bert.encoder.layer"}, "container"),  # an adapter option, adapter auto-detected
    ({"schedular": 0.5}, "scheduler"),  # an engine keyword
    ({"adapter": "generic", "contianer": "bert.encoder.layer"}, "container"),
    ({"adapter": "generic", "container": "bert.encoder.layer", "train_rets": True}, "train_rest"),
    ({"adapter": "bert", "sucessors": []}, "successors"),
    ({"adapter": GenericAdapter("bert.encoder.layer"), "sead": 1}, "seed"),
])
def test_theseus_keyword_typo_suggests_the_name(kwargs, suggestion):
    model = tiny_bert()
    before = state_snapshot(model)
    with pytest.raises(UnknownOptionError, match=rf"unknown keyword argument '\w+' \(did you mean '{suggestion}'\?\)") as info:
        Theseus(model, successor_depth=3, **kwargs)
    assert isinstance(info.value, TheseusError) and isinstance(info.value, TypeError)
    assert_same_state(before, model)


def test_every_typo_is_listed_and_an_unrelated_name_lists_the_valid_ones():
    with pytest.raises(UnknownOptionError, match=r"'contianer' \(did you mean 'container'\?\), 'schedular' "
                                                 r"\(did you mean 'scheduler'\?\)"):
        Theseus(tiny_bert(), successor_depth=3, adapter="generic", schedular=1, contianer="x")
    with pytest.raises(UnknownOptionError, match=r"'frobnicate'\. Theseus\(\) takes successor_depth, config, ratio.*"
                                                 r"adapter options: backbone, container"):
        Theseus(tiny_bert(), successor_depth=3, frobnicate=1)


def test_adapter_option_typo_and_adapter_name_typo():
    with pytest.raises(UnknownOptionError, match=r"'contaner' \(did you mean 'container'\?\).*generic adapter takes: container"):
        get_adapter("generic", contaner="a")
    with pytest.raises(UnknownOptionError, match="bert adapter takes no options"):
        get_adapter("bert", container="a")
    with pytest.raises(AdapterError, match=r"No adapter named 'vitt' \(did you mean 'vit'\?\)\. Registered adapters"):
        Theseus(tiny_bert(), successor_depth=3, adapter="vitt")


def test_config_field_typo_suggests_the_field():
    good = {"task": "text-classification", "model": "m", "data": "d.csv", "output": "o", "depth": 2}
    with pytest.raises(ConfigError, match=r"unknown field 'batch_sise' \(did you mean 'batch_size'\?\)") as info:
        check_config({**good, "batch_sise": 8})
    assert isinstance(info.value, UnknownOptionError)
