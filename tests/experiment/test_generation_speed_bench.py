"""bench/generation_speed.py, whose ratio BENCHMARKS quotes, runs both ways and says whether they
generated the same texts (tiny-llama, a few prompts)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_generation_bench_runs_both_ways_and_compares_the_texts():
    done = subprocess.run([sys.executable, "bench/generation_speed.py", "--model", "tiny-llama", "--dtype", "fp32",
                           "--prompts", "4", "--batch", "2", "--max-new-tokens", "4", "--reps", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[1].startswith("strided head input (before):") and lines[2].startswith("contiguous (now):")
    assert lines[-1].startswith("median:") and lines[-1].endswith("same texts every time: True"), lines[-1]
