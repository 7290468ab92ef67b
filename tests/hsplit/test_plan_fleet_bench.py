"""bench/plan_fleet.py --round-time (issue 25): the three planners' plans for LLaMA-2-7B's shapes in
the paper's fleet, priced in the simulated time model; the ratios it prints follow from its rows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_round_time_comparison_prices_each_planners_plan():
    out = subprocess.run([sys.executable, str(REPO / "bench" / "plan_fleet.py"), "--model", "llama-2-7b",
                          "--quantization", "nf4", "--round-time"], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^\| \w+ \((\w+)\) \| .* \| ([\d.]+) \| ([\d.]+) \| [\d.]+ \|$", out, re.M)}
    assert set(rows) == {"HSplitLoRA", "HetLoRA", "SplitLoRA"}
    ratio = float(re.search(r"HSplitLoRA: step time ([\d.]+)x HetLoRA's", out).group(1))
    assert abs(ratio - rows["HSplitLoRA"][0] / rows["HetLoRA"][0]) < 0.01
    assert ratio < 1.0  # heterogeneous splits unload the weakest link: its plan is the faster one
    # HetLoRA and SplitLoRA share the fixed split; every device here fits the top rank at k = 4
    assert "k=4" in out and rows["HetLoRA"] == rows["SplitLoRA"]
