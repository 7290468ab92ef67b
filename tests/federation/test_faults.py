"""A device that dies or disconnects mid-round: the round completes with the others."""

import torch
from conftest import record_holders, tiny_config

from splitpeft.federation.simulation import Simulation


class DyingChannel:
    """Wraps a device's channel; the connection breaks after `after` exchanges."""

    def __init__(self, inner, after: int) -> None:
        self.inner, self.after = inner, after
        self.device_id, self.traffic = inner.device_id, inner.traffic

    def exchange(self, message):
        if self.after <= 0:
            raise ConnectionError(f"{self.device_id}: connection reset by peer")
        self.after -= 1
        return self.inner.exchange(message)

    def send(self, message, direction):
        return self.inner.send(message, direction)


def test_a_device_lost_mid_round_is_dropped_and_the_round_completes():
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=3", "federation.local_steps=3"))
    healthy = sim.channels["device-1"]
    sim.channels["device-1"] = DyingChannel(healthy, after=2)  # OPEN_SESSION + one step, then gone
    holders = record_holders(sim)
    record = sim.run_round()
    assert [entry["device"] for entry in record.dropped] == ["device-1"]
    assert "connection reset" in record.dropped[0]["error"]
    assert set(record.devices) == {"device-0", "device-2"}
    # neither the device's partial adapters nor its server session's partial ones were aggregated
    assert holders["model.layers.0.self_attn.q_proj"] == ["device-0", "device-2"]
    assert holders["model.layers.3.self_attn.q_proj"] == ["server/device-0", "server/device-2"]
    assert all(torch.isfinite(w.A).all() for w in sim.state.global_adapters.values())
    # it comes back next round and trains normally
    sim.channels["device-1"] = healthy
    record = sim.run_round()
    assert not record.dropped and set(record.devices) == {"device-0", "device-1", "device-2"}


def test_devices_per_round_trains_a_seeded_sample_and_aggregates_only_it():
    config = tiny_config("tiny-llama", "federation.num_devices=4", "federation.local_steps=2",
                         "federation.devices_per_round=2")
    sim = Simulation(config)
    holders = record_holders(sim)
    picks = []
    for _ in range(3):
        idle = {d.device_id: d.data.position for d in sim.devices}
        record = sim.run_round()
        picks.append(record.selected)
        assert len(record.selected) == 2 and set(record.devices) == set(record.selected) and not record.dropped
        # only the sample and its server sessions were aggregated, never an idle device's stale session
        assert holders["model.layers.0.self_attn.q_proj"] == sorted(record.selected)
        assert holders["model.layers.3.self_attn.q_proj"] == sorted(f"server/{d}" for d in record.selected)
        for device in sim.devices:  # a device not selected did not move through its data
            if device.device_id not in record.selected:
                assert device.data.position == idle[device.device_id]
    assert len({tuple(p) for p in picks}) > 1  # the sample changes from round to round
    # the same seed draws the same samples (a resumed or distributed run agrees)
    again = Simulation(config)
    assert [[d.device_id for d in again.selected_devices(r)] for r in range(3)] == picks
