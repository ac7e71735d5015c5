"""Configs: round trips, checked overrides, presets."""

import pytest

from vaelab.config import (
    Config,
    ModelConfig,
    dumps,
    load_config,
    load_preset,
    loads,
    override,
    preset_description,
    preset_names,
    save_config,
    valid_keys,
)
from vaelab.model import build_model

PRESET_SHAPES = {
    "digits": (1, 8, 8),
    "mnist": (1, 28, 28),
    "frey-face": (1, 28, 20),
    "cifar10": (3, 32, 32),
    "celeba": (3, 64, 48),
}


def test_round_trip_toml_and_json(tmp_path):
    cfg = override(Config(), ["model.hidden=512,256", "train.lr=3e-4", "data.subset_train=6000"])
    for name in ("c.toml", "c.json"):
        save_config(cfg, tmp_path / name)
        assert load_config(tmp_path / name) == cfg
    assert loads(dumps(cfg)) == cfg


def test_overrides_are_typed():
    cfg = override(
        Config(),
        [
            "model.latent_dim=5",
            "train.bf16=true",
            "objective.beta=4",
            "data.binarize=dynamic",
            "data.valid_size=none",
            "name=abc",
        ],
    )
    assert cfg.model.latent_dim == 5 and cfg.train.bf16 is True and cfg.objective.beta == 4.0
    assert cfg.data.binarize == "dynamic" and cfg.data.valid_size is None and cfg.name == "abc"


def test_unknown_key_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown config key 'train.learning_rate'.*train.lr"):
        override(Config(), ["train.learning_rate=1"])
    with pytest.raises(ValueError, match="valid keys"):
        loads("[model]\nlatent = 3\n")


def test_wrong_type_says_what_was_expected():
    with pytest.raises(ValueError, match="expected an integer"):
        override(Config(), ["model.latent_dim=two"])
    with pytest.raises(ValueError, match="expected true/false"):
        override(Config(), ["train.bf16=maybe"])
    with pytest.raises(ValueError, match="key=value"):
        override(Config(), ["train.lr"])
    with pytest.raises(ValueError, match="is a section"):
        override(Config(), ["model=3"])
    with pytest.raises(TypeError, match="expected a number"):
        loads('[train]\nlr = "fast"\n')


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().model.latent_dim = 3  # type: ignore[misc]


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nfoo = 1\n")
    with pytest.raises(ValueError, match="bad.toml"):
        load_config(bad)


def test_valid_keys_cover_sections():
    keys = valid_keys()
    assert "train.lr" in keys and "model.latent_dim" in keys and "objective.k" in keys


@pytest.mark.parametrize("name", preset_names())
def test_presets_load_round_trip_and_build(name):
    cfg = load_preset(name)
    assert loads(dumps(cfg)) == cfg
    assert preset_description(name)
    build_model(cfg.model, PRESET_SHAPES[cfg.data.name])


def test_seed_presets_present():
    names = set(preset_names())
    for required in (
        "quickstart",
        "zhao-mlp",
        "zhao-conv",
        "astorga-mlp",
        "tf-walkthrough",
        "pytorch-examples",
        "kingma-mnist",
        "kingma-frey",
        "chakravarthy-cifar",
        "astorga-celeba",
    ):
        assert required in names
    with pytest.raises(ValueError, match="quickstart"):
        load_preset("nonexistent")


def test_default_model_config():
    assert ModelConfig().arch == "mlp"
