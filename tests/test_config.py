from pathlib import Path

import pytest

from livernode.config import load_training_config
from livernode.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_example_config_is_valid():
    cfg = load_training_config(REPO / "config" / "training.toml")
    assert cfg.model.backbone == "resnet34"
    assert cfg.preprocess.window.low == -100 and cfg.preprocess.window.high == 400


def test_unknown_key_names_its_path(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text("[train]\nepoch = 3\n")
    with pytest.raises(ConfigError, match=r"t.toml: unknown key 'train.epoch'"):
        load_training_config(p)


def test_wrong_type_names_its_path(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text("[preprocess.window]\nlow = 'cold'\n")
    with pytest.raises(ConfigError, match=r"key 'preprocess.window.low'"):
        load_training_config(p)


def test_size_must_be_multiple_of_32():
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_training_config(None, {"preprocess.size": 100})


def test_overrides_apply():
    cfg = load_training_config(REPO / "config" / "training.toml", {"train.epochs": 2, "preprocess.size": 64})
    assert cfg.train.epochs == 2 and cfg.preprocess.size == 64
