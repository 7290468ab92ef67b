import dataclasses
import re
import typing

import pytest

from splitpeft.config import ConfigError, ExperimentConfig, load_config


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
    ("federation.rounds=0", r"federation.rounds must be in \[1, 100000\], not 0"),
    ("federation.devices_per_round=9", "federation.devices_per_round must be in 1..federation.num_devices"),
    ("placement.placement=ring", "placement.placement must be one of split, dlora, centralized"),
    ("placement.labels_on_device=maybe", "must be true or false"),
    ("data.partition=dirichlet", "data.partition_field is required"),
    ("lora.dropout=1.5", "lora.dropout must be in"),
    ("rounds", "is not of the form key=value"),
    ("federation=3", "is a section"),
    ("fleet.max_step_s=[1.0,2.0]", "fleet.max_step_s lists need one value per device"),
    ("hsplit.planner=deepest", "hsplit.planner must be one of fixed, armsc, armsc_deepest, budget_rank, uniform"),
    ("kill_revive.selection=grad", "kill_revive.selection must be one of .*gradient"),
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


# Issue 12, finding 10: lr=inf, alpha=inf and max_message_bytes=0 ran to exit 0 with every device
# dropped; lora.rank=1e8 was killed by the kernel with no message; rounds=1e9 grew memory by 37 MB/s
# before the first round; eval.max_new_tokens=1e6 ran for minutes.
@pytest.mark.parametrize("override,message", [
    ("federation.lr=inf", "federation.lr must be a finite number, not inf"),
    ("lora.alpha=inf", "lora.alpha must be a finite number, not inf"),
    ("lora.alpha=.nan", "lora.alpha must be a finite number, not nan"),
    ("transport.max_message_bytes=0", "transport.max_message_bytes must be in [65536, 2147483647], not 0"),
    ("lora.rank=100000000", "lora.rank must be in [1, 65536], not 100000000"),
    ("federation.rounds=1000000000", "federation.rounds must be in [1, 100000], not 1000000000"),
    ("eval.max_new_tokens=1000000", "eval.max_new_tokens must be in [1, 2048], not 1000000"),
    ("eval.num_beams=1000", "eval.num_beams must be in [1, 32], not 1000"),
    ("federation.lr=5", "federation.lr must be in (0, 1], not 5"),
    ("fleet.bandwidth_bytes_per_s=[1e7,0,1e7]", "fleet.bandwidth_bytes_per_s must be in (0, 1e+15], not 0"),
    ("seed=-1", "seed must be in [0, 2147483647], not -1"),
    ("transport.idle_timeout_s=0", "transport.idle_timeout_s must be in (0, 86400], not 0"),
])
def test_numbers_out_of_range_stop_the_cli_with_one_line_naming_the_key(tmp_path, capsys, override, message):
    from splitpeft.cli import main

    out = tmp_path / "run"
    assert main(["simulate", "--preset", "tiny", override, "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"splitpeft: error: {message}\n"
    assert not out.exists()


def _numeric_keys(section=None, prefix=""):
    """(key, its type hint) for every key of a number or a list of numbers."""
    section = ExperimentConfig() if section is None else section
    hints = typing.get_type_hints(type(section))
    for item in dataclasses.fields(section):
        value, hint = getattr(section, item.name), hints[item.name]
        if dataclasses.is_dataclass(value):
            yield from _numeric_keys(value, f"{prefix}{item.name}.")
        elif any(t in str(hint) for t in ("int", "float")) and "Literal" not in str(hint):
            yield f"{prefix}{item.name}", hint


@pytest.mark.parametrize("key,hint", list(_numeric_keys()), ids=[key for key, _ in _numeric_keys()])
def test_every_numeric_key_is_refused_when_huge_or_negative(key, hint):
    """Every number (sections added later included) has both ends checked, by name."""
    for magnitude in (-1, 1):
        value = magnitude * (1e300 if "float" in str(hint) else 10**20)
        text = f"[{value}, {value}, {value}]" if str(hint).startswith("list") else str(value)
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(preset="tiny", overrides=[f"{key}={text}"])


def test_the_transport_deadlines_default_to_the_servers():
    from splitpeft.transport.grpc import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_STEP_TIMEOUT_S

    assert (ExperimentConfig().transport.idle_timeout_s, ExperimentConfig().transport.step_timeout_s) == (
        DEFAULT_IDLE_TIMEOUT_S, DEFAULT_STEP_TIMEOUT_S)


def test_each_section_checks_its_own_rules_and_each_bound_lives_on_its_field():
    """Rules of one section are that section's `problems` (as peft's LoraConfig checks itself);
    rules across sections are `cross_section_problems`; a number's range is its field's `bound`."""
    import dataclasses

    from splitpeft.config import NUMERIC_BOUNDS, DataConfig, ExperimentConfig, HSplitConfig, KillReviveConfig

    assert DataConfig(partition="dirichlet", partition_field=None).problems() == [
        "data.partition_field is required when data.partition is dirichlet"]
    assert HSplitConfig(min_split=5, max_split=2).problems() == ["hsplit.min_split must be <= hsplit.max_split"]
    assert KillReviveConfig().problems() == [] and ExperimentConfig().cross_section_problems() == []
    lora_rank = {f.name: f for f in dataclasses.fields(ExperimentConfig().lora)}["rank"]
    assert NUMERIC_BOUNDS["lora.rank"] is lora_rank.metadata["bound"]
    config = ExperimentConfig()
    config.placement.placement = "centralized"
    config.privacy.nopeek_weight = 1.0
    assert any("placement centralized sends nothing" in p for p in config.cross_section_problems())


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    """Found: PyYAML keeps the last of two equal keys, so a second `federation:` section silently
    dropped the first's settings."""
    path = tmp_path / "config.yaml"
    path.write_text("federation:\n  rounds: 7\n  lr: 0.01\nfederation:\n  local_steps: 2\n")
    with pytest.raises(ConfigError, match="key 'federation' is given twice"):
        load_config(path)


def test_a_string_setting_takes_the_text_typed_never_what_yaml_reads_a_number_as(tmp_path):
    """Found: `data.path=0755` became '493' and `data.partition_field=1:30` became '90' (YAML 1.1
    reads octals and sexagesimals); in a file such a number is refused, asking for quotes."""
    config = load_config(preset="tiny", overrides=["data.partition_field=1:30", "federation.spill_dir=1_000"])
    assert (config.data.partition_field, config.federation.spill_dir) == ("1:30", "1_000")
    path = tmp_path / "config.yaml"
    path.write_text("data:\n  partition_field: 0755\n")
    with pytest.raises(ConfigError, match=r"data.partition_field must be a string, not the number 493: quote it"):
        load_config(path)
    assert load_config(preset="tiny", overrides=["federation.rounds=4"]).federation.rounds == 4  # numbers stay numbers


def test_a_number_too_large_for_a_float_or_a_file_not_in_utf8_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"federation.rounds must be in .*not a number of 400 digits"):
        load_config(preset="tiny", overrides=["federation.rounds=" + "9" * 400])
    path = tmp_path / "config.yaml"
    path.write_bytes(b"federation:\n  rounds: 2\n# caf\xff\n")
    with pytest.raises(ConfigError, match=r"config file .*config.yaml is not UTF-8 text"):
        load_config(path)
