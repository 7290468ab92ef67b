"""bench/batched_server.py, whose ratios BENCHMARKS quotes, runs both ways, in waves too, and
reports what it says (tiny-llama, a few devices)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/batched_server.py", "--model", "tiny-llama", "--devices", "4",
                           "--reps", "1", "--dtypes", "fp32", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_the_server_bench_serves_both_ways_in_two_waves_with_denormals_flushed():
    done = _bench("--placements", "u_shaped,plain", "--waves", "2", "--flush-denormal")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert "2 wave(s) a pass, denormals flushed" in lines[0], lines[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| fp32 ")]
    assert [row[1] for row in rows] == ["u_shaped", "plain"]
    for row in rows:
        serial, batched, ratio = float(row[2].replace(",", "")), float(row[3].replace(",", "")), float(row[4].rstrip("x"))
        assert serial > 0 and batched > 0 and abs(ratio - batched / serial) < 0.01 + 0.01 * ratio, row


def test_the_server_bench_serves_real_frames():
    """--frames real: each device's own examples through the first blocks (and, U-shaped, their
    loss's head gradient), served both ways with the frame norm bound on."""
    done = _bench("--placements", "u_shaped,plain", "--frames", "real")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "real frames" in done.stdout.splitlines()[0]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| fp32 ")]
    assert len(rows) == 2 and "refused" not in done.stdout + done.stderr


def test_the_server_bench_refuses_more_waves_than_devices():
    done = _bench("--waves", "5")
    assert done.returncode != 0 and "--waves 5" in done.stderr
