"""Adding a placement is one class plus one registry line: a toy placement registered here runs
through `simulate` without any other file knowing its name."""

from dataclasses import dataclass, field

import pytest
import torch
from conftest import tiny_config

from splitpeft.config import ConfigError, load_config
from splitpeft.experiment.run import run_experiment
from splitpeft.placements import registry
from splitpeft.placements.split import SplitPlacement


@dataclass
class MirrorSplit(SplitPlacement):
    """A toy: U-shaped split under another name, whose only new fact is the config rule it adds."""

    name: str = field(default="mirror", init=False)

    def config_problems(self, config):
        return super().config_problems(config) + (
            ["mirror needs placement.split_layer >= 1"] if config.placement.split_layer < 1 else [])


def test_a_registered_toy_placement_runs_through_simulate_and_checks_its_own_config(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.REGISTRY, "mirror", lambda labels_on_device: MirrorSplit(labels_on_device=labels_on_device))
    monkeypatch.setattr(registry, "PLACEMENTS", tuple(registry.REGISTRY))
    with pytest.raises(ConfigError, match="mirror needs placement.split_layer >= 1"):  # its own rule, checked
        load_config(preset="tiny", overrides=["placement.placement=mirror", "placement.split_layer=0"])
    common = ["federation.rounds=1", "federation.local_steps=2", "placement.split_layer=2", "eval.generation=false",
              "privacy.estimate=false"]
    mirror = run_experiment(tiny_config("tiny-llama", "placement.placement=mirror", *common), tmp_path / "mirror", progress=False)
    split = run_experiment(tiny_config("tiny-llama", *common), tmp_path / "split", progress=False)
    assert mirror["config"]["placement"]["placement"] == "mirror"
    assert mirror["totals"]["bytes_up"] == split["totals"]["bytes_up"] > 0  # the same protocol, under its own name
    torch.testing.assert_close(torch.tensor(mirror["rounds"][0]["eval_perplexity"]),
                               torch.tensor(split["rounds"][0]["eval_perplexity"]), rtol=1e-5, atol=0)


def test_an_unknown_placement_names_the_registered_ones():
    with pytest.raises(ConfigError) as raised:
        load_config(preset="tiny", overrides=["placement.placement=nowhere"])
    assert str(raised.value) == f"placement.placement must be one of {', '.join(registry.PLACEMENTS)}, not 'nowhere'"
