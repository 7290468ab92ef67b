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
import traceback
from collections import defaultdict
from typing import Any

from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from splitpeft.config import load_config
from splitpeft.federation.simulation import Simulation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--sort", default="self_cpu_time_total")
    parser.add_argument("--stacks-of", default="", help="comma-separated operators (e.g. aten::where): also run one "
                        "more round and print where in splitpeft each is called from, by calls and time (a dispatch mode: "
                        "this torch's profiler records no Python stacks)")
    parser.add_argument("--planner", default=None, help="hsplit.planner (default: the preset's, armsc; fixed: "
                        "every device at split 4, rank 8, as bench/dtype_speed.py)")
    args = parser.parse_args()
    stacks_of = [name for name in args.stacks_of.split(",") if name]
    config = load_config(preset="default", overrides=[  # warm-up, profiled, and the counted round with --stacks-of
        f"runtime.dtype={args.dtype}", f"federation.local_steps={args.local_steps}", f"federation.rounds={3 if stacks_of else 2}",
        "count_flops=false", "eval.every_round=false",
        *([f"hsplit.planner={args.planner}"] if args.planner else [])])
    sim = Simulation(config)
    sim.run_round()  # warm-up: plans, sessions, allocator
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        record = sim.run_round()
    wall = time.perf_counter() - start
    tokens = sum(stats.tokens for stats in record.devices.values())
    print(f"{args.dtype}: one round of {args.local_steps} steps x {len(record.devices)} devices in {wall:.2f} s "
          f"(profiled), {tokens / wall:.0f} completion tokens/s")
    print(prof.key_averages().table(sort_by=args.sort, row_limit=args.rows))
    if stacks_of:
        sites = CallSites(stacks_of)
        with sites:
            sim.run_round()
        sites.print()


class CallSites(TorchDispatchMode):
    """Counts and times the calls of some operators by where in splitpeft they come from (the
    innermost 4 frames under src/splitpeft; a backward's operators show the `backward` call)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = set(names)
        self.calls: dict[str, dict[str, list[float]]] = {name: defaultdict(lambda: [0, 0.0]) for name in names}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.name().split(".")[0]
        if name not in self.names:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        frames = [f"{frame.filename.split('splitpeft/')[-1]}:{frame.lineno} {frame.name}"
                  for frame in traceback.extract_stack() if "/splitpeft/" in frame.filename][-4:]
        site = self.calls[name][" <- ".join(reversed(frames)) or "(outside splitpeft)"]
        site[0] += 1
        site[1] += elapsed
        return out

    def print(self) -> None:
        for name, sites in self.calls.items():
            total = sum(int(calls) for calls, _ in sites.values())
            print(f"\n{name}: {total} calls in one more round (under the counter: times include its overhead), by call site")
            for site, (calls, seconds) in sorted(sites.items(), key=lambda item: -item[1][1])[:8]:
                print(f"  {seconds * 1e3:8.1f} ms {int(calls):6d} calls  {site}")


if __name__ == "__main__":
    main()
