"""federation.device_waves: devices that cut at the same block with the same ranks run their
forward to the cut and backward from it as one pass; the adapters, AdamW moments and per-device
numbers equal one device at a time's."""

import threading

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from splitpeft.experiment.run import run_experiment
from splitpeft.federation.simulation import Simulation
from splitpeft.model import adapters as lora
from splitpeft.transport.messages import Kind

RUNS = {
    "split_u": ["count_flops=false"],
    # FLOPs counted: a device computes alone while its meter counts a batch shape it has not seen,
    # in a wave once it knows what that shape costs
    "split_u_counted": ["federation.local_steps=4", "data.limit=40"],
    "plain_batched": ["placement.labels_on_device=false", "server.batch_devices=true", "count_flops=false"],
    "hsplit_warm": ["hsplit.planner=armsc_deepest", "federation.aggregator=noise_free", "federation.noise_free_start=warm",
                    "hsplit.max_split=3", "fleet.memory_bytes=[900000,900000,4000000,4000000,4000000]", "count_flops=false"],
    "nopeek_kr": ["privacy.nopeek_weight=0.5", "kill_revive.enabled=true", "kill_revive.warmup=1",
                  "kill_revive.interval=1", "kill_revive.revive_interval=2", "kill_revive.active_fraction=0.5",
                  "count_flops=false"],
}
COMMON = ["federation.num_devices=5", "federation.rounds=3", "federation.local_steps=2", "data.max_length=48",
          "eval.generation=false", "eval.baseline=false", "eval.perplexity_examples=8"]


def train(tmp_path, name, waves, *extra):
    config = tiny_config("tiny-llama", *COMMON, *RUNS[name], f"federation.device_waves={str(waves).lower()}", *extra)
    out = tmp_path / f"{name}-{waves}"
    report = run_experiment(config, out, progress=False, checkpoint=tmp_path / f"{name}-{waves}.ckpt")
    return report, load_file(str(tmp_path / f"{name}-{waves}.ckpt" / "tensors.safetensors"))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_device_waves_train_the_adapters_of_one_device_at_a_time(tmp_path, name):
    report_1, want = train(tmp_path, name, False)
    report_2, got = train(tmp_path, name, True)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    for a, b in zip(report_1["rounds"], report_2["rounds"]):
        assert b["completed"] == a["completed"] and b["dropped"] == a["dropped"]
        for device, stats in a["devices"].items():
            for key in ("tokens", "flops", "steps"):
                assert b["devices"][device][key] == stats[key], (device, key)
            # the same frames, but for the last digits of a step's loss in their metadata (a JSON
            # header padded to 8 bytes)
            for key in ("bytes_up", "bytes_down"):
                assert abs(b["devices"][device][key] - stats[key]) <= 8 * stats["steps"], (device, key)
            assert b["devices"][device]["train_loss"] == pytest.approx(stats["train_loss"], rel=1e-5)
        assert a["device_waves"] == []
    # devices shared passes once their meters knew their steps' FLOPs (a shape seen before)
    sizes = [size for entry in report_2["rounds"] for size in entry["device_waves"]]
    assert sizes and max(sizes) >= 2, sizes


def lose_on_second_step(sim, device_id):
    """`device_id`'s link drops when it sends its second step's activations (after its forward ran
    in a wave with the others)."""
    channel = sim.channels[device_id]
    exchange = channel.exchange
    seen = []

    def failing(message):
        if message.kind == Kind.ACTIVATIONS:
            seen.append(message)
            if len(seen) == 2:
                raise ConnectionError("link lost")
        return exchange(message)

    channel.exchange = failing


@pytest.mark.parametrize("labels_on_device", [True, False], ids=["u_shaped", "plain_split"])
def test_a_device_lost_mid_wave_drops_alone_and_the_others_train_as_one_at_a_time(labels_on_device):
    """The lost device's wave runs its backward without it (no device waits for it); it is dropped;
    the others' adapters equal a run of one device at a time losing the same device."""
    states = {}
    for waves in (False, True):
        sim = Simulation(tiny_config("tiny-llama", *COMMON, "count_flops=false", f"federation.device_waves={str(waves).lower()}",
                                     f"placement.labels_on_device={str(labels_on_device).lower()}"))
        lose_on_second_step(sim, "device-2")
        done = []
        worker = threading.Thread(target=lambda: done.append(sim.run_round()), daemon=True)  # noqa: B023
        worker.start()
        worker.join(timeout=300)
        assert not worker.is_alive(), "the round hangs"
        record = done[0]
        assert [entry["device"] for entry in record.dropped] == ["device-2"] and "link lost" in record.dropped[0]["error"]
        assert record.completed == ["device-0", "device-1", "device-3", "device-4"]
        if waves:
            assert record.device_waves and max(record.device_waves) == 5  # the lost one was in the waves
        states[waves] = {k: v.clone() for k, v in lora.to_tensors(sim.state.global_adapters).items()}
        sim.close()
    for key, want in states[False].items():
        torch.testing.assert_close(states[True][key], want, rtol=1e-5, atol=1e-5, msg=key)
