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


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _normal(value):
    if isinstance(value, list | tuple):
        return [_normal(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@pytest.mark.parametrize("name,model", [("training.toml", "TrainingConfig"), ("livernode.toml", "DaemonConfig")])
def test_example_files_show_exactly_the_defaults(name, model):
    """Each example file says its values are the defaults: every key it sets equals the code's default."""
    import tomllib

    import livernode.config as config

    defaults = getattr(config, model)().model_dump()
    shown = dict(_leaves(tomllib.loads((REPO / "config" / name).read_text())))
    assert len(shown) > 15
    sections = {k for k, v in defaults.items() if isinstance(v, dict)}
    assert sections <= {path.split(".")[0] for path in shown}, f"{name} leaves out {sections - set(shown)}"
    for path, value in shown.items():
        node = defaults
        for part in path.split("."):
            node = node[part]
        assert _normal(node) == _normal(value), f"{name}: {path} = {value!r}, but the default is {node!r}"
    getattr(config, model).model_validate(tomllib.loads((REPO / "config" / name).read_text()))  # and it loads


def test_flips_are_off_by_default_and_the_demo_recipe_loads():
    assert load_training_config(None).train.augment.flip is False
    demo = load_training_config(REPO / "config" / "demo.toml")
    assert demo.preprocess.size == 128 and demo.train.augment.flip is False


def test_the_comparison_recipes_load_and_differ_only_in_epochs():
    short = load_training_config(REPO / "config" / "compare.toml")
    long = load_training_config(REPO / "config" / "compare-long.toml")
    assert short.volume.patch == (32, 64, 64) and short.split.test == 0.25
    assert long.train.epochs > short.train.epochs
    assert long.model_copy(update={"train": short.train}) == short


def test_context_and_vnet_settings_are_checked():
    from livernode.errors import ConfigError

    assert load_training_config(None, {"model.context": 1}).input_channels == 3
    with pytest.raises(ConfigError, match="vnet sees whole volumes"):
        load_training_config(None, {"model.arch": "vnet", "model.context": 1})
    with pytest.raises(ConfigError, match="leave channels at 1"):
        load_training_config(None, {"model.context": 1, "preprocess.channels": 3})
    with pytest.raises(ConfigError, match="multiple of 16"):
        load_training_config(None, {"volume.patch": [24, 64, 64]})
