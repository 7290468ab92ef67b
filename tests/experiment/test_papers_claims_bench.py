"""bench/papers_claims.py's Kill-and-Revive suite (issue 25) in the hybrid, on a tiny model: every run
is the hybrid with the device's blocks asked for, and the table compares the KR run with no KR."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
E2E = REPO.parent / "shared" / "data" / "e2e" / "valid.txt"


def _hybrid_suite(data: Path, out: Path, methods: str) -> subprocess.CompletedProcess:
    """The hybrid KR suite on tiny-llama, 2 rounds of 1 step, seed 0, a warm-up of half the steps."""
    return subprocess.run(
        [sys.executable, "bench/papers_claims.py", "--suite", "dlora", "--hybrid-blocks", "1", "--seeds", "0",
         "--warmups", "0.5", "--methods", methods, "--rounds", "2", "--local-steps", "1", "--groups", "2",
         "--perplexity-examples", "4", "--data", str(data), "--out", str(out),
         "model.name=tiny-llama", "eval.max_new_tokens=4"],
        cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not E2E.is_file(), reason="needs ../shared/data/e2e/valid.txt")
def test_the_kill_and_revive_suite_runs_the_hybrid(tmp_path):
    data = tmp_path / "e2e.txt"
    data.write_text("".join(E2E.read_text().splitlines(keepends=True)[:80]))
    out = tmp_path / "out"
    done = _hybrid_suite(data, out, "no_kr,kr_server")
    assert done.returncode == 0, done.stderr[-2000:]
    for folder in (out / "no_kr" / "no_kr", out / "warmup-1" / "kr_server"):
        config = json.loads((folder / "seed-0" / "report.json").read_text())["config"]
        assert config["placement"]["placement"] == "dlora" and config["placement"]["dlora_device_blocks"] == 1
    row = next(line for line in (out / "kill_and_revive.md").read_text().splitlines() if line.startswith("| kr_server"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1 (50%)" and cells[-1] == "1", row  # one seed with both runs
    assert float(cells[2].rstrip("%")) > 0  # killed adapters' traffic saved after the warm-up
    # without no_kr in --methods only the selections named run, against the no-KR run already there
    baseline = out / "no_kr" / "no_kr" / "seed-0" / "report.json"
    before = baseline.stat().st_mtime_ns
    alone = _hybrid_suite(data, out, "kr_scheduled")
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert baseline.stat().st_mtime_ns == before and "no_kr seed" not in alone.stdout
    row = next(line for line in alone.stdout.splitlines() if line.startswith("| kr_scheduled"))
    assert [c.strip() for c in row.strip("|").split("|")][-1] == "1", row
    # a run stopped while it was being evaluated ("status": "trained", no scores) counts as absent
    path = out / "warmup-1" / "kr_server" / "seed-0" / "report.json"
    report = json.loads(path.read_text())
    report["status"] = "trained"
    del report["eval"]
    path.write_text(json.dumps(report))
    table = subprocess.run(
        [sys.executable, "bench/papers_claims.py", "--suite", "dlora", "--hybrid-blocks", "1", "--seeds", "0",
         "--warmups", "0.5", "--methods", "no_kr,kr_server", "--rounds", "2", "--local-steps", "1", "--data", str(data),
         "--out", str(out), "--table-only"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert table.returncode == 0, table.stderr[-2000:]
    row = next(line for line in table.stdout.splitlines() if line.startswith("| kr_server"))
    assert [c.strip() for c in row.strip("|").split("|")][-1] == "0", row


@pytest.mark.skipif(not E2E.is_file(), reason="needs ../shared/data/e2e/valid.txt")
def test_plans_only_prints_each_methods_plans_without_training(tmp_path):
    """--plans-only: per method and device the planner's split, ranks and predicted peak within
    the budget, and no run written."""
    data = tmp_path / "e2e.txt"
    data.write_text("".join(E2E.read_text().splitlines(keepends=True)[:80]))
    done = subprocess.run(
        [sys.executable, "bench/papers_claims.py", "--plans-only", "--methods", "hsplitlora_mean_a,hsplitlora_low_rank",
         "--data", str(data), "model.name=tiny-llama", "fleet.memory_bytes=[2000000,3000000,4000000,5000000,6000000]"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines()
            if line.startswith("| hsplitlora")]
    assert [r[:2] for r in rows] == [[m, f"device-{i}"] for m in ("hsplitlora_mean_a", "hsplitlora_low_rank") for i in range(5)]
    for row in rows:
        peak, budget = (float(x) for x in row[4].split(" / "))
        assert 0 < peak <= budget
    assert not any(tmp_path.glob("*/report.json"))
