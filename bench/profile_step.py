"""Where a training step's time goes: the main job's first round under torch.profiler, per dtype
(issue 22: what keeps a bf16 step from the matrix units' peak).

    .venv/bin/python bench/profile_step.py [--dtype bf16] [--local-steps 2] [--rows 25]

Builds the README's main job (default preset: SmolLM2-135M, HSplitLoRA, 3 devices) with
`federation.local_steps` steps, no FLOP counting and no evaluation, runs one untimed round to warm
up, then profiles one round. Prints the round's wall time, completion tokens/s, and the operators by
self CPU time (all devices' and the server's steps together).
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from splitpeft.config import load_config
from splitpeft.federation.simulation import Simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--sort", default="self_cpu_time_total")
    parser.add_argument("--stacks-of", default="", help="comma-separated operators (e.g. aten::where): also print "
                        "where in splitpeft each is called from, by self CPU time (records Python stacks)")
    parser.add_argument("--planner", default=None, help="hsplit.planner (default: the preset's, armsc; fixed: "
                        "every device at split 4, rank 8, as bench/dtype_speed.py)")
    args = parser.parse_args()
    config = load_config(preset="default", overrides=[
        f"runtime.dtype={args.dtype}", f"federation.local_steps={args.local_steps}", "federation.rounds=2",
        "count_flops=false", "eval.every_round=false",
        *([f"hsplit.planner={args.planner}"] if args.planner else [])])
    stacks_of = [name for name in args.stacks_of.split(",") if name]
    sim = Simulation(config)
    sim.run_round()  # warm-up: plans, sessions, allocator
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], with_stack=bool(stacks_of)) as prof:
        record = sim.run_round()
    wall = time.perf_counter() - start
    tokens = sum(stats.tokens for stats in record.devices.values())
    print(f"{args.dtype}: one round of {args.local_steps} steps x {len(record.devices)} devices in {wall:.2f} s "
          f"(profiled), {tokens / wall:.0f} completion tokens/s")
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows))
    for name in stacks_of:
        rows = [row for row in prof.key_averages(group_by_stack_n=8) if row.key == name]
        rows.sort(key=lambda row: row.self_cpu_time_total, reverse=True)
        print(f"\n{name}: {sum(row.count for row in rows)} calls, by call site")
        for row in rows[:6]:
            frames = [frame for frame in row.stack if "splitpeft" in frame][:4]
            print(f"  {row.self_cpu_time_total / 1e3:8.1f} ms {row.count:6d} calls  " + " <- ".join(frames))


if __name__ == "__main__":
    main()
