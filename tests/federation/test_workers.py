"""federation.workers: the round's devices train in worker processes; the adapters equal one
process's, checkpoints gather the workers' parties, a dead worker stops the run by name."""

import json
import os
import signal

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from splitpeft.config import ConfigError
from splitpeft.experiment.run import run_experiment
from splitpeft.federation.engine import InProcessEngine
from splitpeft.federation.simulation import Simulation
from splitpeft.federation.workers import WorkerError, receive, send

RUNS = {
    "split_u": [],
    "split_u_device_waves": ["federation.device_waves=true", "count_flops=false"],
    "plain_batched": ["placement.labels_on_device=false", "server.batch_devices=true", "federation.devices_per_round=4"],
    "dlora_kr": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.warmup=1", "kill_revive.interval=1",
                 "kill_revive.revive_interval=2", "kill_revive.active_fraction=0.25"],
    "hsplit_warm": ["hsplit.planner=armsc_deepest", "federation.aggregator=noise_free", "federation.noise_free_start=warm",
                    "hsplit.max_split=3", "fleet.memory_bytes=[700000,1200000,4000000,900000,2000000]"],
}
COMMON = ["federation.num_devices=5", "federation.rounds=3", "federation.local_steps=2", "data.max_length=48",
          "eval.generation=false", "eval.baseline=false", "eval.perplexity_examples=8"]


def state_of(checkpoint):
    tensors = load_file(str(checkpoint / "tensors.safetensors"))
    return tensors, json.loads((checkpoint / "state.json").read_text())


def train(tmp_path, name, workers, *extra, rounds=3, resume=False):
    config = tiny_config("tiny-llama", *COMMON, *RUNS[name], f"federation.workers={workers}", f"federation.rounds={rounds}",
                         *extra)
    out = tmp_path / f"{name}-{workers}"
    report = run_experiment(config, out, progress=False, checkpoint=tmp_path / f"{name}-{workers}.ckpt", resume=resume,
                            overwrite=resume)
    return report, state_of(tmp_path / f"{name}-{workers}.ckpt")


@pytest.mark.parametrize("name", sorted(RUNS))
def test_two_workers_train_the_adapters_of_one_process(tmp_path, name):
    """Global and per-holder adapters, merged deltas, every device's and session's AdamW moments
    (the checkpoint gathers them from the workers), the report's per-device numbers."""
    report_1, (tensors_1, state_1) = train(tmp_path, name, 1)
    report_2, (tensors_2, state_2) = train(tmp_path, name, 2)
    assert set(tensors_1) == set(tensors_2)
    for key in tensors_1:
        torch.testing.assert_close(tensors_2[key], tensors_1[key], rtol=1e-5, atol=1e-6, msg=key)
    assert state_2["devices"] == state_1["devices"] and state_2["sessions"].keys() == state_1["sessions"].keys()
    for want, got in zip(report_1["rounds"], report_2["rounds"]):
        assert got["completed"] == want["completed"] and got["dropped"] == want["dropped"]
        for device, stats in want["devices"].items():
            for key in ("tokens", "bytes_up", "bytes_down", "flops", "steps"):
                assert got["devices"][device][key] == stats[key], (device, key)
            assert got["devices"][device]["train_loss"] == pytest.approx(stats["train_loss"], rel=1e-5)
        assert got["replanned"] == want["replanned"]
        # each worker's server batches only its own devices' steps (a worker with one device of the
        # round serves it alone): smaller passes, the same adapters
        assert all(size <= max(want["server_passes"]) for size in got["server_passes"])
    if "federation.device_waves=true" in RUNS[name]:  # each worker's devices shared passes, reported back
        assert any(entry["device_waves"] for entry in report_2["rounds"])


def test_a_run_resumed_with_workers_continues_as_an_uninterrupted_one(tmp_path):
    """Two rounds with two workers, checkpointed; resumed to three (the new workers restore the
    checkpoint themselves): the same state as three rounds in one process."""
    _, (want, _) = train(tmp_path, "split_u", 1)
    train(tmp_path, "split_u", 2, rounds=2)
    _, (got, _) = train(tmp_path, "split_u", 2, resume=True)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_worker_that_dies_stops_the_run_naming_it(tmp_path):
    config = tiny_config("tiny-llama", *COMMON, "federation.workers=2")
    sim = Simulation(config)
    engine = InProcessEngine()
    engine.open(sim, None)
    try:
        engine.play_round(sim, lambda _device: None)
        assert sim.workers is not None
        victim = sim.workers.processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(timeout=30)
        with pytest.raises(WorkerError, match=rf"worker 1 \(pid {victim.pid}\) exited with code -9"):
            engine.play_round(sim, lambda _device: None)
        assert len(sim.rounds) == 1  # the failed round is not recorded
    finally:
        engine.close()
    assert sim.workers is None


def test_the_pipe_carries_json_and_flat_tensors_of_every_dtype():
    import multiprocessing

    ours, theirs = multiprocessing.Pipe()
    tensors = {"a|x.A": torch.randn(3, 4), "b|x.B": torch.randn(4, 2).to(torch.bfloat16), "c": torch.arange(5),
               "empty": torch.zeros(0, 4)}
    send(ours, {"op": "result", "n": 1}, tensors)
    header, got = receive(theirs)
    assert header == {"op": "result", "n": 1}
    assert set(got) == set(tensors)
    for key, tensor in tensors.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor)
    send(ours, {"op": "stop"})
    assert receive(theirs) == ({"op": "stop"}, {})


def test_workers_must_be_a_positive_count():
    with pytest.raises(ConfigError, match="federation.workers"):
        tiny_config("tiny-llama", "federation.workers=0")
