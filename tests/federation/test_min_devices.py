"""federation.min_devices: a round in which too few devices completed stops the run (issue 21 finding 5)."""

import pytest
import torch
from conftest import tiny_config

from splitpeft.cli import _completed_per_round, main
from splitpeft.config import ConfigError
from splitpeft.experiment.report import round_entries
from splitpeft.federation.simulation import RoundError, Simulation


class BrokenChannel:
    """Wraps a device's channel; every exchange of the split traffic fails."""

    def __init__(self, inner, reason: str) -> None:
        self.inner, self.reason = inner, reason
        self.device_id, self.traffic = inner.device_id, inner.traffic

    def exchange(self, message):
        raise ConnectionError(f"{self.device_id}: {self.reason}")

    def send(self, message, direction):
        return self.inner.send(message, direction)


def _sim(*overrides: str) -> Simulation:
    return Simulation(tiny_config("tiny-llama", "federation.num_devices=3", "federation.local_steps=1",
                                  "data.max_length=48", *overrides))


def test_a_round_in_which_every_device_was_dropped_is_an_error_naming_each_reason():
    """Issue 21 finding 5: a run in which every device was dropped in every round exited 0 with the
    untrained model's numbers. Now the round is a RoundError naming each device's reason, and it is
    not recorded (so not checkpointed), and the global adapters are those it started from."""
    sim = _sim()
    for device_id in sim.device_ids:
        sim.channels[device_id] = BrokenChannel(sim.channels[device_id], f"link of {device_id} cut")
    before = {name: (w.A.clone(), w.B.clone()) for name, w in sim.state.global_adapters.items()}
    with pytest.raises(RoundError) as raised:
        sim.run_round()
    message = str(raised.value)
    assert message.startswith("round 1: 0 of 3 devices completed, fewer than federation.min_devices 1 (")
    for device_id in sim.device_ids:
        assert f"{device_id}: {device_id}: link of {device_id} cut" in message
    assert "\n" not in message
    assert sim.rounds == []
    for name, weights in sim.state.global_adapters.items():
        assert torch.equal(weights.A, before[name][0]) and torch.equal(weights.B, before[name][1])


def test_min_devices_counts_the_devices_that_completed():
    """Issue 21 finding 5: with one of three devices dropped, min_devices=2 lets the round complete
    and records who completed; min_devices=3 stops it."""
    sim = _sim("federation.min_devices=2")
    healthy = sim.channels["device-1"]
    sim.channels["device-1"] = BrokenChannel(healthy, "connection reset by peer")
    record = sim.run_round()
    assert record.completed == ["device-0", "device-2"] and record.selected == ["device-0", "device-1", "device-2"]
    assert round_entries([record])[0]["completed"] == ["device-0", "device-2"]
    assert _completed_per_round(round_entries([record])) == "2/3"

    strict = _sim("federation.min_devices=3")
    strict.channels["device-1"] = BrokenChannel(strict.channels["device-1"], "connection reset by peer")
    with pytest.raises(RoundError, match=r"round 1: 2 of 3 devices completed, fewer than federation.min_devices 3 "
                                         r"\(device-1: device-1: connection reset by peer\)"):
        strict.run_round()


def test_a_rejected_upload_does_not_count_as_completed():
    """Issue 21 finding 5: a device whose upload the aggregation refuses did not complete the round."""
    sim = _sim("federation.num_devices=2", "federation.min_devices=2")
    train = sim._train_in_process

    def poisoned(device, record):
        result = train(device, record)
        if device.device_id == "device-1":
            for weights in result.uploaded.values():
                weights.A.fill_(float("nan"))
        return result

    sim._train_in_process = poisoned
    with pytest.raises(RoundError, match=r"1 of 2 devices completed.*device-1: upload rejected"):
        sim.run_round()
    assert sim.rounds == []


def test_the_check_is_in_finish_round_which_every_engine_passes():
    """Issue 21 finding 5: the Flower engine drops devices with `drop` and closes the round with
    `finish_round`, as the in-process engine does: a round closed with no result is refused there."""
    sim = _sim()
    record = sim.begin_round()
    for device_id in record.selected:
        sim.drop(record, device_id, "its Flower node is not connected")
    with pytest.raises(RoundError, match="0 of 3 devices completed"):
        sim.finish_round(record, {})
    assert sim.rounds == []


@pytest.mark.parametrize("overrides,message", [
    (["federation.min_devices=4"], "federation.min_devices must be at most the devices that train in a round"),
    (["federation.devices_per_round=2", "federation.min_devices=3"],
     "federation.min_devices must be at most the devices that train in a round"),
    (["federation.min_devices=0"], "federation.min_devices must be in [1, 1000000], not 0"),
])
def test_min_devices_is_checked_against_the_fleet(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tiny_config("tiny-llama", *overrides)


def test_the_cli_run_in_which_every_device_was_dropped_exits_non_zero(tmp_path, capsys):
    """Issue 21 finding 5 as found: `lr=1 lora.alpha=1e6` drops every device in the first round; the
    run exited 0 and reported the untrained perplexity. Now: exit status 1, one line naming the
    round and the reasons, no run folder, and no checkpoint of the failed round."""
    out, checkpoint = tmp_path / "run", tmp_path / "checkpoint"
    status = main(["simulate", "--preset", "tiny", "--no-progress", "--out", str(out), "--checkpoint", str(checkpoint),
                   "federation.lr=1", "lora.alpha=1e6", "eval.generation=false", "data.max_length=48"])
    err = capsys.readouterr().err
    assert status == 1
    line = err.strip().splitlines()[-1]
    assert line.startswith("splitpeft: error: round 1: 0 of 3 devices completed, fewer than federation.min_devices 1")
    assert "device-0: " in line and "device-2: " in line
    assert not out.exists()
    assert not checkpoint.exists() or not any(checkpoint.iterdir())


def test_a_resumed_run_may_change_min_devices():
    """federation.min_devices decides whether a round counts, not what a checkpoint holds: a run
    resumed with another value is the same run."""
    from splitpeft.federation.checkpoint import run_identity

    assert run_identity(tiny_config("tiny-llama", "federation.min_devices=3")) == run_identity(tiny_config("tiny-llama"))
