"""bench/adapter_drift.py (issue 25): under noise-free warm restarts with `own_a` each holder keeps
its own A, so the holders' A's of a module drift apart; under `mean_a` they restart from one A.
The script reads that from a run's kept state."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from splitpeft.federation.checkpoint import save_checkpoint
from splitpeft.federation.simulation import Simulation

REPO = Path(__file__).resolve().parents[2]
BASE = ["federation.aggregator=noise_free", "federation.num_devices=3", "federation.local_steps=4", "federation.lr=0.02",
        "federation.noise_free_start=warm", "federation.noise_free_moments=keep", "data.max_length=48"]


@pytest.mark.parametrize(("factors", "shared"), [("own_a", False), ("mean_a", True)])
def test_drift_reads_how_far_apart_the_holders_a_are(tmp_path, factors, shared):
    sim = Simulation(tiny_config("tiny-llama", *BASE, f"federation.noise_free_factors={factors}"))
    sim.run_round()
    sim.run_round()
    save_checkpoint(sim, tmp_path / "state")
    done = _drift(tmp_path / "state")
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip()
    assert "after round 2" in line and f"{len(sim.ranks)} modules" in line
    overlap = float(line.split("overlap ")[1].split()[0])
    assert (overlap == 1.0) if shared else (0.0 < overlap < 0.99), line


def _drift(folder):
    return subprocess.run([sys.executable, str(REPO / "bench" / "adapter_drift.py"), str(folder)],
                          capture_output=True, text=True, timeout=300)


def test_drift_refuses_a_folder_that_is_not_a_kept_state(tmp_path):
    (tmp_path / "state.json").write_text('{"rounds_done": 1}')
    done = _drift(tmp_path)
    assert done.returncode != 0 and "no tensors.safetensors" in done.stderr
    (tmp_path / "tensors.safetensors").write_bytes(b"")
    (tmp_path / "state.json").unlink()
    done = _drift(tmp_path)
    assert done.returncode != 0 and "no readable state.json" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "state.json").write_text('{"rounds_done": 1}')
    done = _drift(tmp_path)  # a truncated tensors file
    assert done.returncode != 0 and "not a readable safetensors file" in done.stderr and "Traceback" not in done.stderr
