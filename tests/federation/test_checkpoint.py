"""Checkpoint after a round, resume in a fresh process-like Simulation: same result as no stop."""

import pytest
import torch
from conftest import tiny_config

from splitpeft.federation.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from splitpeft.federation.simulation import Simulation

CASES = {
    "split-fedavg": ["federation.num_devices=2"],
    "noise_free": ["federation.num_devices=2", "federation.aggregator=noise_free"],
    "sampled": ["federation.num_devices=3", "federation.devices_per_round=2"],
    "dlora-kr": ["federation.num_devices=2", "placement.placement=dlora", "kill_revive.enabled=true",
                 "kill_revive.warmup=2", "kill_revive.interval=2", "kill_revive.revive_interval=3",
                 "kill_revive.active_fraction=0.25"],
}


def _same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].A, b[name].A, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[name].B, b[name].B, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_equals_an_uninterrupted_run(tmp_path, case):
    overrides = [*CASES[case], "federation.local_steps=3", "data.max_length=48"]
    straight = Simulation(tiny_config("tiny-llama", *overrides))
    for _ in range(3):
        straight.run_round()

    first = Simulation(tiny_config("tiny-llama", *overrides))
    first.run_round()
    first.run_round()
    save_checkpoint(first, tmp_path / "ckpt")
    del first

    resumed = Simulation(tiny_config("tiny-llama", *overrides))
    assert load_checkpoint(resumed, tmp_path / "ckpt") == 2
    resumed.run_round()
    assert len(resumed.rounds) == 3
    _same(straight.state.global_adapters, resumed.state.global_adapters)
    for holder in straight.state.holder_state:
        _same(straight.state.holder_state[holder], resumed.state.holder_state[holder])
    assert straight.rounds[-1].devices["device-0"].losses == pytest.approx(resumed.rounds[-1].devices["device-0"].losses, rel=1e-5)
    for device, other in zip(straight.devices, resumed.devices):
        assert device.killed == other.killed


def test_incomplete_or_foreign_checkpoints_are_refused(tmp_path):
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "federation.local_steps=1"))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(sim, tmp_path / "missing")
    sim.run_round()
    save_checkpoint(sim, tmp_path / "ckpt")
    other = Simulation(tiny_config("tiny-gpt2", "federation.num_devices=1", "federation.local_steps=1"))
    with pytest.raises(CheckpointError, match="tiny-llama"):
        load_checkpoint(other, tmp_path / "ckpt")


@pytest.mark.slow
def test_cli_resume_after_a_killed_run_matches_an_uninterrupted_one(tmp_path):
    """The run is killed (SIGKILL) after its first checkpoint; --resume finishes it, and the
    exported adapter equals that of a run that was never stopped."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    args = ["simulate", "--preset", "tiny", "federation.rounds=3", "federation.local_steps=3", "--no-progress",
            "eval.generation=false"]
    straight = subprocess.run([sys.executable, "-m", "splitpeft.cli", *args, "--out", str(tmp_path / "straight")],
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    checkpoint = tmp_path / "ckpt"
    process = subprocess.Popen([sys.executable, "-m", "splitpeft.cli", *args, "--out", str(tmp_path / "killed"),
                                "--checkpoint", str(checkpoint)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (checkpoint / "state.json").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed").exists()  # nothing half-written looks like a run
    rounds_done = json.loads((checkpoint / "state.json").read_text())["rounds_done"]
    assert rounds_done >= 1
    resumed = subprocess.run([sys.executable, "-m", "splitpeft.cli", *args, "--out", str(tmp_path / "killed"),
                              "--checkpoint", str(checkpoint), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    report = json.loads((tmp_path / "killed" / "report.json").read_text())
    assert len(report["rounds"]) == 3
