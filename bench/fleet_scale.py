"""How big a fleet one process holds, and what a device-round costs beyond its own compute (issue 23).

    .venv/bin/python bench/fleet_scale.py                       # the issue's cases, one process each
    .venv/bin/python bench/fleet_scale.py --case 10000:10000    # registered:per-round, one case
    .venv/bin/python bench/fleet_scale.py --profile 2000:2000   # where one case's round goes (cProfile)
    .venv/bin/python bench/fleet_scale.py --workers 1000:1000@2 # one process against federation.workers=2
    .venv/bin/python bench/fleet_scale.py --waves 300:300@2     # device waves and the batched server pass, off and on

Each case runs in a fresh process (so its resident memory is its own): the tiny preset
(tiny-llama, plain split at block 2, rank 4, batch 4) with `federation.num_devices` registered
devices, `federation.devices_per_round` of them sampled per round, 1 local step each, FLOP counting
off, `data.partition=whole` (every device trains on the same encoded examples: the builtin task has
fewer examples than 10,000 devices, and a shared list keeps the data out of the per-device cost).
It builds the simulation, plays `--rounds` rounds (the first is untimed unless there is one round)
and prints, per timed round:

- round s: the round's wall time (download, session, local step, upload, aggregation, repair);
- compute s: the sum over its devices of their local phase's wall time (the device's step and the
  server's step it waits for, through the in-process channel): the devices' own compute;
- overhead ms per device-round: (round s - compute s) / devices in the round;
- RSS: resident memory after building and at the end (ru_maxrss for the peak);
- per idle device: (RSS after building - RSS of the same process before building) / registered, an
  upper bound on what an idle device costs (it includes the shared model and data once).

`--workers CASE` runs CASE twice, side by side in one invocation, each with the machine's
`--threads` (default: every CPU): in one process (`federation.workers=1`, on all threads), then with
`federation.workers=N` (`--count`, default 2) processes on an equal share of them, and prints the
device-rounds per second of the timed round of each and their ratio (the round's compute cannot be
separated from its overhead when devices train in parallel). `--repeat` (default 3) alternates the
two that many times and prints the median, lowest and highest ratio.

`--waves CASE` runs CASE in one process, alternating (`--repeat` times): each device alone,
`federation.device_waves=true`, and device waves with the batched server pass
(`server.batch_devices=true`), and prints the device-rounds per second of each and its ratio to
the first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CASES = ["100:100", "1000:1000", "10000:10000", "1000:1000@2", "100000:1000@2"]


def parse(case: str) -> tuple[int, int, int]:
    """'registered:per_round[@rounds]'."""
    sizes, _, rounds = case.partition("@")
    registered, per_round = (int(v) for v in sizes.split(":"))
    return registered, per_round, int(rounds or 1)


def one_case(case: str, extra: list[str], profile: bool, workers: int = 1) -> dict[str, Any]:
    import torch

    from splitpeft.config import load_config
    from splitpeft.federation.simulation import Simulation
    from splitpeft.federation.workers import WorkerPool
    from splitpeft.model.runtime import resident_bytes

    if workers == 1:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    registered, per_round, rounds = parse(case)
    config = load_config(preset="tiny", overrides=[
        f"federation.num_devices={registered}", f"federation.devices_per_round={per_round}",
        "federation.local_steps=1", "count_flops=false", "data.partition=whole", f"federation.rounds={rounds}",
        "federation.min_devices=1", *extra])
    before = resident_bytes()
    start = time.perf_counter()
    sim = Simulation(config)
    if workers > 1:
        sim.workers = WorkerPool(config, workers)
    built_s = time.perf_counter() - start
    built_rss = resident_bytes()
    profiler = None
    if profile:
        import cProfile
        profiler = cProfile.Profile()
    timed = []
    for index in range(rounds):
        if profiler is not None and (index == rounds - 1):
            profiler.enable()
        start = time.perf_counter()
        record = sim.run_round()
        wall = time.perf_counter() - start
        if profiler is not None and index == rounds - 1:
            profiler.disable()
        compute = sum(stats.wall_s for stats in record.devices.values())
        if rounds == 1 or index > 0:
            timed.append({"round_s": wall, "compute_s": compute, "devices": len(record.devices),
                          "device_rounds_per_s": len(record.devices) / wall,
                          "overhead_ms_per_device_round": 1000 * (wall - compute) / max(1, len(record.devices)),
                          "dropped": len(record.dropped), "largest_wave": max(record.device_waves, default=0)})
    if sim.workers is not None:
        sim.workers.close()
    if profiler is not None:
        import pstats
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    return {
        "case": case, "registered": registered, "per_round": per_round, "build_s": built_s,
        "rounds": timed, "rss_built_bytes": built_rss, "rss_end_bytes": resident_bytes(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "per_idle_device_bytes": (built_rss - before) / registered,
        "pools": {"devices": sim.device_pool.describe(), "sessions": sim.session_pool.describe()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="append", help="registered:per_round[@rounds]; repeatable (default: the issue's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every case")
    parser.add_argument("--profile", help="one case under cProfile (printed to stderr)")
    parser.add_argument("--workers", help="one case in one process against federation.workers=--count processes")
    parser.add_argument("--waves", help="one case alone, with device waves, and with device waves + the server pass")
    parser.add_argument("--count", type=int, default=2, help="worker processes for --workers")
    parser.add_argument("--repeat", type=int, default=3, help="tries of --workers, alternating the two")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads for --workers, in all")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-workers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_case(args.child, args.set, profile=False, workers=args.child_workers)))
        return
    if args.workers:
        compare_workers(args)
        return
    if args.waves:
        compare_waves(args)
        return
    if args.profile:
        print(json.dumps(one_case(args.profile, args.set, profile=True), indent=1))
        return
    print("| registered | per round | build s | round s | compute s | overhead ms / device-round | RSS built MB "
          "| peak RSS MB | per idle device KB | shells built (devices, sessions) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for case in args.case or CASES:
        command = [sys.executable, __file__, "--child", case, *(f"--set={s}" for s in args.set)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        if done.returncode != 0:
            print(f"| {case}: failed ({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}) |")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        last = r["rounds"][-1]
        print(f"| {r['registered']} | {r['per_round']} | {r['build_s']:.1f} | {last['round_s']:.1f} | {last['compute_s']:.1f} "
              f"| {last['overhead_ms_per_device_round']:.1f} | {r['rss_built_bytes'] / 2**20:.0f} | {r['peak_rss_bytes'] / 2**20:.0f} "
              f"| {r['per_idle_device_bytes'] / 1024:.1f} | {r['pools']['devices']['shells_built']}, "
              f"{r['pools']['sessions']['shells_built']} |", flush=True)


def child_round(args: argparse.Namespace, case: str, settings: list[str], workers: int = 1) -> dict[str, Any] | str:
    """The last timed round of `case` run in a fresh process with `settings` (and `workers`
    processes), on `args.threads` threads; or why it failed."""
    command = [sys.executable, __file__, "--child", case, f"--child-workers={workers}",
               *(f"--set={s}" for s in [*args.set, *settings])]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
    return dict(json.loads(done.stdout.strip().splitlines()[-1])["rounds"][-1])


WAVE_VARIANTS = {"alone": [], "device waves": ["federation.device_waves=true"],
                 "device waves + server pass": ["federation.device_waves=true", "server.batch_devices=true"]}


def compare_waves(args: argparse.Namespace) -> None:
    """`--waves CASE`: the WAVE_VARIANTS of one case, alternating, `--repeat` times."""
    print(f"{args.waves} (registered:per round@rounds), tiny preset, one process on {args.threads} CPU threads")
    print("| try | variant | round s | device-rounds / s | largest wave | ratio to alone |")
    print("|---:|---|---:|---:|---:|---:|")
    ratios: dict[str, list[float]] = {name: [] for name in WAVE_VARIANTS}
    for attempt in range(1, args.repeat + 1):
        alone = None
        for name, settings in WAVE_VARIANTS.items():
            last = child_round(args, args.waves, settings)
            if isinstance(last, str):
                print(f"| {attempt} | {name}: failed ({last}) |")
                return
            rate = last["device_rounds_per_s"]
            alone = alone or rate
            ratios[name].append(rate / alone)
            print(f"| {attempt} | {name} | {last['round_s']:.1f} | {rate:.1f} | {last['largest_wave']} | {rate / alone:.2f}x |",
                  flush=True)
    for name, values in ratios.items():
        print(f"{name}: median {statistics.median(values):.2f}x (lowest {min(values):.2f}x, highest {max(values):.2f}x)")


def compare_workers(args: argparse.Namespace) -> None:
    """`--workers CASE`: one process, then `--count` worker processes, on the same threads;
    `--repeat` times, alternating, so that a slow spell of a shared machine falls on both."""
    print(f"{args.workers} (registered:per round@rounds), tiny preset, {args.threads} CPU threads in all")
    print("| try | federation.workers | threads each | round s | device-rounds / s | ratio to the try's workers=1 |")
    print("|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for attempt in range(1, args.repeat + 1):
        serial = None
        for count in (1, args.count):
            threads = max(1, args.threads // count)
            last = child_round(args, args.workers, [], workers=count)
            if isinstance(last, str):
                print(f"| {attempt} | {count}: failed ({last}) |")
                return
            rate = last["device_rounds_per_s"]
            serial = serial or rate
            print(f"| {attempt} | {count} | {threads} | {last['round_s']:.1f} | {rate:.1f} | {rate / serial:.2f}x |", flush=True)
        ratios.append(rate / serial)
    print(f"ratio over {len(ratios)} tries: median {statistics.median(ratios):.2f}x, lowest {min(ratios):.2f}x, "
          f"highest {max(ratios):.2f}x")


if __name__ == "__main__":
    main()
