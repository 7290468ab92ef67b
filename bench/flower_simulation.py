"""The same job in the in-process simulation and on Flower's simulation engine (Ray): wall times
side by side, and whether the adapters agree. Issue 23, item 5.

    .venv/bin/python bench/flower_simulation.py [--devices 20] [--rounds 2] [--steps 1] [--cpus-per-client 1]
        [--preset tiny] [--out runs/flower_simulation]

In-process: `run_experiment` in this process, one device after another. Simulation engine: a
SuperLink with `--simulation` on loopback, `flwr run deploy/flower` with one virtual SuperNode per
device (`--federation-config "num-supernodes=N client-resources-num-cpus=C"`): each device's
ClientApp runs in a Ray actor and talks to the ServerApp's split server over splitpeft's gRPC
stream, as a deployment's would. The simulation engine's time is from `flwr run` to its exit,
so it includes starting Ray and the ServerApp; both write their report and checkpoint (the
in-process run evaluates the same way). Prints one table and the largest difference between
the two runs' adapters (global and per holder, from their checkpoints).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "tests"))
from flower_deployment import Deployment  # noqa: E402  (the tests' real SuperLink driver)

from splitpeft.config import load_config  # noqa: E402
from splitpeft.experiment.run import run_experiment  # noqa: E402


def adapters(checkpoint: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(checkpoint / "tensors.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith(("global/", "holder/"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--out", default="runs/flower_simulation")
    args = parser.parse_args()
    root = Path(args.out).resolve()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    overrides = [f"federation.num_devices={args.devices}", f"federation.rounds={args.rounds}",
                 f"federation.local_steps={args.steps}", "eval.generation=false", "eval.baseline=false"]

    start = time.perf_counter()
    run_experiment(load_config(overrides=overrides, preset=args.preset), root / "in-process", progress=False,
                   checkpoint=root / "in-process.ckpt")
    in_process_s = time.perf_counter() - start

    flower = Deployment(root, args.devices, simulation=True, cpus_per_client=args.cpus_per_client)
    try:
        flower.start_superlink()
        start = time.perf_counter()
        run = flower.submit(root / "engine", overrides, preset=args.preset,
                            **{"device-state-dir": str(root / "device-state")})
        run.wait(timeout=3600)
        engine_s = time.perf_counter() - start
    finally:
        flower.stop()
    if run.returncode != 0 or not (root / "engine.checkpoint").is_dir():
        raise SystemExit(f"flwr run failed (exit {run.returncode}):\n{flower.log('flwr-run-1')}")
    want, got = adapters(root / "in-process.ckpt"), adapters(root / "engine.checkpoint")
    if set(want) != set(got):
        raise SystemExit(f"the runs hold different adapters: {sorted(set(want) ^ set(got))[:5]}")
    largest = max(float((want[k] - got[k]).abs().max()) for k in want)
    device_rounds = args.devices * args.rounds
    print(f"{args.preset}, {args.devices} devices x {args.rounds} rounds x {args.steps} local steps "
          f"({args.cpus_per_client} CPU per virtual SuperNode)")
    print("| engine | wall s | s per device-round |")
    print("|---|---|---|")
    print(f"| in-process simulation | {in_process_s:.1f} | {in_process_s / device_rounds:.3f} |")
    print(f"| Flower simulation engine (Ray) | {engine_s:.1f} | {engine_s / device_rounds:.3f} |")
    print(f"largest |difference| of the adapters: {largest:.2e} ({len(want)} tensors)")


if __name__ == "__main__":
    main()
