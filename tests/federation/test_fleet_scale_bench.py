"""bench/fleet_scale.py, whose numbers BENCHMARKS quotes, runs and reports what it says."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_fleet_bench_runs_a_small_case_and_reports_one_shell_per_side():
    done = subprocess.run([sys.executable, "bench/fleet_scale.py", "--case", "30:10@2"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    row = done.stdout.strip().splitlines()[-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "30" and cells[1] == "10", row
    assert float(cells[4]) > 0 and float(cells[3]) >= float(cells[4])  # the round holds its devices' compute
    assert cells[-1] == "1, 1", row  # one device shell and one session shell served every device-round
