"""bench/papers_claims.py's Kill-and-Revive suite (issue 25) in the hybrid, on a tiny model: every run
is the hybrid with the device's blocks asked for, and the table compares the KR run with no KR."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
E2E = REPO.parent / "shared" / "data" / "e2e" / "valid.txt"


@pytest.mark.skipif(not E2E.is_file(), reason="needs ../shared/data/e2e/valid.txt")
def test_the_kill_and_revive_suite_runs_the_hybrid(tmp_path):
    data = tmp_path / "e2e.txt"
    data.write_text("".join(E2E.read_text().splitlines(keepends=True)[:80]))
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "bench/papers_claims.py", "--suite", "dlora", "--hybrid-blocks", "1", "--seeds", "0",
         "--warmups", "0.5", "--methods", "no_kr,kr_server", "--rounds", "2", "--local-steps", "1", "--groups", "2",
         "--perplexity-examples", "4", "--data", str(data), "--out", str(out),
         "model.name=tiny-llama", "eval.max_new_tokens=4"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for folder in (out / "no_kr" / "no_kr", out / "warmup-1" / "kr_server"):
        config = json.loads((folder / "seed-0" / "report.json").read_text())["config"]
        assert config["placement"]["placement"] == "dlora" and config["placement"]["dlora_device_blocks"] == 1
    row = next(line for line in (out / "kill_and_revive.md").read_text().splitlines() if line.startswith("| kr_server"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "1 (50%)" and cells[-1] == "1", row  # one seed with both runs
    assert float(cells[2].rstrip("%")) > 0  # killed adapters' traffic saved after the warm-up
