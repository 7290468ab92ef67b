"""The five reference runs whose results must not change when the code is reorganised.

Each runs the real CLI on the `tiny` preset (generation off, perplexity on) and yields the
exported PEFT adapter tensors and the report's integer totals. `python tests/golden_runs.py
record` writes them to tests/golden/; tests/test_golden.py compares a fresh run against them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GOLDEN = Path(__file__).parent / "golden"
COMMON = ["eval.generation=false", "eval.baseline=false", "eval.perplexity_examples=8", "data.max_length=48",
          "placement.labels_on_device=false"]  # recorded before U-shaped became the default
RUNS: dict[str, list[str]] = {
    "split": [],
    "split_u": ["placement.labels_on_device=true"],
    "dlora_kr": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.warmup=1",
                 "kill_revive.interval=1", "kill_revive.revive_interval=2", "kill_revive.active_fraction=0.25"],
    "centralized": ["placement.placement=centralized"],
    "hsplit": ["hsplit.planner=armsc_deepest", "federation.aggregator=noise_free", "hsplit.max_split=3",
               "fleet.memory_bytes=[700000,1200000,4000000]"],
}
COUNTS = ("bytes_up", "bytes_down", "flops", "tokens")


# The same kernels on every x86 machine: one thread, and ATen, MKL and oneDNN held to their AVX2
# code paths. Without this an AVX-512 machine rounds differently from an AVX2 one, which moved the
# adapters by ~2e-6, a float's printed length in a message header by bytes, and a Kill-and-Revive
# decision that rounding broke.
KERNELS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2",
           "ONEDNN_MAX_CPU_ISA": "AVX2"}


def run(name: str, out: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Run `name` into `out` (the real CLI, in a process of its own with `KERNELS`); returns
    (adapter tensors, {totals and per-device counts})."""
    command = [sys.executable, "-m", "splitpeft.cli", "simulate", "--preset", "tiny", *COMMON, *RUNS[name],
               "--out", str(out), "--no-progress"]
    done = subprocess.run(command, env={**os.environ, **KERNELS}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"golden run {name} exited {done.returncode}: {done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    totals = report["totals"]
    summary = {
        "bytes_up": totals["bytes_up"], "bytes_down": totals["bytes_down"],
        "device_flops": totals["device_flops"], "tokens": totals["tokens"],
        "per_device": {d: {k: v[k] for k in COUNTS} for d, v in sorted(totals["per_device"].items())},
        "train_loss": [[r["devices"][d]["train_loss"] for d in sorted(r["devices"])] for r in report["rounds"]],
        "plans": [{k: row[k] for k in ("device", "split_layer", "adapted_modules", "ranks")}
                  for row in (report["info"]["plans"] or [])],
    }
    return tensors, summary


def record(folder: Path = GOLDEN) -> None:
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    for name in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            tensors, summary = run(name, Path(tmp) / name)
        save_file(tensors, folder / f"{name}.safetensors")
        (folder / f"{name}.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
        print(name, summary["bytes_up"], summary["bytes_down"], summary["plans"])


if __name__ == "__main__":
    if sys.argv[1:] != ["record"]:
        sys.exit("usage: python tests/golden_runs.py record")
    record()
