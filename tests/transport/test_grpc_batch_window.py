"""Issue 22 item 3 over the network: the gRPC split server with `server.batch_devices` serves the
steps that arrive within `server.batch_window_ms` as one pass (`parties/window.py`), and devices
training at the same time over real loopback streams get what one device at a time gets."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_config

from splitpeft.federation.simulation import Simulation
from splitpeft.parties.window import BatchWindow
from splitpeft.transport.channel import InProcessChannel
from splitpeft.transport.grpc import GrpcChannel, GrpcSplitServer
from splitpeft.transport.messages import Kind, Message

ROUND = ("federation.num_devices=3", "federation.local_steps=2", "federation.aggregator=noise_free",
         "data.max_length=64")


def _concurrent_round(sim: Simulation) -> None:
    """A round whose devices train at the same time, each in its own thread (as separate processes would)."""
    record = sim.begin_round()
    results = {}

    def train(device) -> None:
        result = sim._train_in_process(device, record)
        if result is not None:
            results[device.device_id] = result

    threads = [threading.Thread(target=train, args=(device,)) for device in sim.devices]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    sim.finish_round(record, results)


PLACEMENTS = {
    "plain_split": ["placement.labels_on_device=false"],
    "u_shaped": ["placement.labels_on_device=true"],
    "dlora": ["placement.placement=dlora", "placement.split_layer=0"],
}


@pytest.mark.parametrize("placement", PLACEMENTS, ids=list(PLACEMENTS))
def test_devices_training_at_once_over_grpc_are_served_in_one_pass_with_one_at_a_time_results(placement):
    overrides = (*ROUND, *PLACEMENTS[placement])
    reference = Simulation(tiny_config("tiny-llama", *overrides, "server.batch_devices=false"))
    reference.run_round()
    sim = Simulation(tiny_config("tiny-llama", *overrides, "server.batch_devices=true"))
    window = BatchWindow(sim.server, window_s=2.0)  # long: on a loaded machine every device's step arrives within it
    tokens = {d: f"secret-{d}" for d in sim.device_ids}
    server = GrpcSplitServer(window, tokens=tokens, serialize=False)
    address = f"127.0.0.1:{server.start()}"
    channels = [GrpcChannel(d, address, token=tokens[d], deadline_s=60) for d in sim.device_ids]
    try:
        for channel in channels:
            sim.channels[channel.device_id] = channel
        _concurrent_round(sim)
    finally:
        for channel in channels:
            channel.close()
        server.stop()
    assert max(window.waves) == 3  # the three devices' steps ran as one pass
    one, many = reference.rounds[-1], sim.rounds[-1]
    assert not many.rejected and not many.dropped
    for device_id, stats in one.devices.items():
        assert many.devices[device_id].losses == pytest.approx(stats.losses, abs=1e-5)
    for name, weights in reference.state.global_adapters.items():
        torch.testing.assert_close(sim.state.global_adapters[name].A, weights.A, rtol=0, atol=1e-5)
        torch.testing.assert_close(sim.state.global_adapters[name].B, weights.B, rtol=0, atol=1e-5)
    for (name, a), (_, b) in zip(reference.loaded.model.named_parameters(), sim.loaded.model.named_parameters()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5, msg=name)


def test_a_device_lost_mid_wave_does_not_hold_the_others():
    """U-shaped: two devices share a forward pass; one never sends its head gradient and its stream
    is reset (as the server does for a lost device): the other's head gradient is served."""
    sim = Simulation(tiny_config("tiny-llama", *ROUND, "placement.labels_on_device=true", "server.batch_devices=true"))
    window = BatchWindow(sim.server, window_s=0.5)
    sim.server.begin_round(expected=["device-0", "device-1"])
    for device in sim.devices[:2]:
        device.open_session(InProcessChannel(device.device_id, window))
    hidden = sim.server.sessions["device-0"].hidden_size
    replies: dict[str, Message] = {}

    def step(device_id: str, send_head: bool) -> None:
        reply = window.handle(device_id, Message(Kind.ACTIVATIONS, {"hidden": torch.randn(1, 8, hidden)}))
        assert reply.kind == Kind.FINAL_HIDDEN
        if send_head:
            replies[device_id] = window.handle(device_id, Message(Kind.HEAD_GRADIENT, {"grad": torch.randn(1, 8, hidden)}))

    threads = [threading.Thread(target=step, args=("device-0", True)), threading.Thread(target=step, args=("device-1", False))]
    for thread in threads:
        thread.start()
    threads[1].join(timeout=30)
    window.reject("device-1", ConnectionError("split stream closed: lost"))
    threads[0].join(timeout=30)
    assert not threads[0].is_alive()
    assert replies["device-0"].kind == Kind.CUT_GRADIENT
