"""The main job's training speed per dtype, side by side in one run (issue 22: auto against fp32).

    .venv/bin/python bench/dtype_speed.py [--dtypes fp32,bf16] [--rounds 3] [--local-steps 3]

Builds the README's main job (default preset: SmolLM2-135M, 3 devices, U-shaped split; with
`--planner fixed`, the default, every device at split 4 with rank 8, the same in every dtype) once
per dtype, without FLOP counting or evaluation, and plays their rounds alternately
(fp32 round 1, bf16 round 1, fp32 round 2, ...), so machine drift hits each alike. The first round
of each is a warm-up and not timed (plans, sessions, allocator). Prints per dtype: completion tokens/s
over the timed rounds (the tokens the loss is taken on, as the server counted them, all devices), each timed round's wall
time, and the ratio to the first dtype; then each dtype's mean training loss of the last round,
so a speed-up that changes training shows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from splitpeft.config import load_config
from splitpeft.federation.simulation import Simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per dtype, the first untimed")
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--planner", default="fixed",
                        help="hsplit.planner; fixed (default) keeps every dtype on the same split and ranks, since "
                             "ARMSC plans deeper splits where bf16 halves the memory")
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    sims = {}
    for dtype in dtypes:
        config = load_config(preset=args.preset, overrides=[
            f"runtime.dtype={dtype}", f"federation.local_steps={args.local_steps}", f"federation.rounds={args.rounds}",
            "count_flops=false", "eval.every_round=false", f"hsplit.planner={args.planner}"])
        sims[dtype] = Simulation(config)
        print(f"{dtype}: {sims[dtype].runtime.dtype_reason}; {torch.get_num_threads()} threads", flush=True)
    walls: dict[str, list[float]] = {d: [] for d in dtypes}
    tokens: dict[str, int] = dict.fromkeys(dtypes, 0)
    losses: dict[str, float] = {}
    for round_index in range(args.rounds):
        for dtype, sim in sims.items():
            start = time.perf_counter()
            record = sim.run_round()
            wall = time.perf_counter() - start
            losses[dtype] = statistics.mean(loss for stats in record.devices.values() for loss in stats.losses)
            if round_index > 0:
                walls[dtype].append(wall)
                tokens[dtype] += sum(stats.tokens for stats in record.devices.values())
    base = tokens[dtypes[0]] / sum(walls[dtypes[0]])
    print()
    print("| dtype | completion tokens/s | timed rounds (s) | ratio | last round's mean loss |")
    print("|---|---:|---|---:|---:|")
    for dtype in dtypes:
        rate = tokens[dtype] / sum(walls[dtype])
        print(f"| {dtype} | {rate:.0f} | {', '.join(f'{w:.1f}' for w in walls[dtype])} | {rate / base:.2f}x | "
              f"{losses[dtype]:.4f} |")


if __name__ == "__main__":
    main()
