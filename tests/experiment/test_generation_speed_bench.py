"""bench/generation_speed.py, whose ratios BENCHMARKS quotes, runs both ways and says whether they
generated the same texts (tiny-llama, a few prompts)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_generation_bench_runs_both_ways_and_compares_the_texts():
    done = subprocess.run([sys.executable, "bench/generation_speed.py", "--model", "tiny-llama", "--dtype", "fp32",
                           "--prompts", "4", "--batch", "2", "--max-new-tokens", "4", "--rank", "2", "--reps", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[1:3]] == ["strided head input (before)", "contiguous (now)"]
    assert lines[-2].startswith("median: strided head input (before)") and lines[-1] == "same texts every time: True", lines[-2:]
