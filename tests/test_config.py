import pytest

from splitpeft.config import ConfigError, load_config


def test_presets_load_and_overrides_are_typed():
    config = load_config(preset="tiny", overrides=["federation.rounds=5", "lora.alpha=4", "placement.labels_on_device=true",
                                                   "lora.target_modules=q_proj,v_proj"])
    assert config.federation.rounds == 5
    assert config.lora.alpha == 4.0
    assert config.placement.labels_on_device is True
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    for preset in ("default", "e2e"):
        load_config(preset=preset, overrides=["data.path=x"] if preset == "e2e" else [])


@pytest.mark.parametrize("override,message", [
    ("federation.roundz=3", "unknown config key 'federation.roundz'"),
    ("colour=3", "unknown config key 'colour'"),
    ("federation.rounds=three", "federation.rounds must be an integer"),
    ("federation.rounds=0", "federation.rounds must be >= 1"),
    ("federation.devices_per_round=9", "federation.devices_per_round must be in 1..federation.num_devices"),
    ("placement.placement=ring", "placement.placement must be one of split, dlora, centralized"),
    ("placement.labels_on_device=maybe", "must be true or false"),
    ("data.partition=dirichlet", "data.partition_field is required"),
    ("lora.dropout=1.5", "lora.dropout must be in"),
    ("rounds", "is not of the form key=value"),
    ("federation=3", "is a section"),
])
def test_bad_config_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset="tiny", overrides=[override])


def test_missing_or_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(preset="huge")
