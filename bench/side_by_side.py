"""The main job's training speed under several settings, side by side in one run.

    .venv/bin/python bench/side_by_side.py --variant "one at a time:server.batch_devices=false" \
        --variant "one pass:server.batch_devices=true" [--rounds 3] [--local-steps 3] [--set KEY=VALUE ...]

Builds the README's main job (default preset) once per variant (its overrides after the common
`--set` ones), without FLOP counting or evaluation, and plays their rounds alternately (variant 1
round 1, variant 2 round 1, ..., variant 1 round 2, ...), so machine drift hits each alike. The first
round of each is a warm-up and not timed. Prints per variant: completion tokens/s over the timed
rounds (as the server counted them, all devices), each timed round's wall time, the ratio to the
first variant, and the mean training loss of the last round (a change that moves training shows).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from splitpeft.config import load_config
from splitpeft.federation.records import RoundRecord
from splitpeft.federation.simulation import Simulation


def alternate_rounds(sims: dict[str, Simulation], rounds: int,
                     around_first: Callable[[], AbstractContextManager[Any]] = nullcontext,
                     ) -> tuple[dict[str, list[float]], dict[str, int], dict[str, float], dict[str, tuple[RoundRecord, Any]]]:
    """Play `rounds` rounds of every simulation, alternating (each one's round 1, then each one's
    round 2, ...). Returns per name: the wall times of the timed rounds (all but the first), the
    completion tokens of those rounds, the mean training loss of the last round, and the first
    round's record with the context it ran in (`around_first()`, e.g. a FLOP counter)."""
    walls: dict[str, list[float]] = {name: [] for name in sims}
    tokens = dict.fromkeys(sims, 0)
    losses: dict[str, float] = {}
    first: dict[str, tuple[RoundRecord, Any]] = {}
    for round_index in range(rounds):
        for name, sim in sims.items():
            context = around_first() if round_index == 0 else nullcontext()
            start = time.perf_counter()
            with context:
                record = sim.run_round()
            wall = time.perf_counter() - start
            losses[name] = statistics.mean(loss for stats in record.devices.values() for loss in stats.losses)
            if round_index == 0:
                first[name] = (record, context)
            else:
                walls[name].append(wall)
                tokens[name] += sum(stats.tokens for stats in record.devices.values())
    return walls, tokens, losses, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", action="append", required=True,
                        help="NAME:key=value,key=value (repeat; the first is the reference)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every variant (repeat)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per variant, the first untimed")
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--preset", default="default")
    args = parser.parse_args()
    sims: dict[str, Simulation] = {}
    for spec in args.variant:
        name, _, overrides = spec.partition(":")
        config = load_config(preset=args.preset, overrides=[
            f"federation.local_steps={args.local_steps}", f"federation.rounds={args.rounds}", "count_flops=false",
            "eval.every_round=false", *args.set, *(o for o in overrides.split(",") if o)])
        sims[name] = Simulation(config)
        print(f"{name}: {overrides or '(preset)'}; {sims[name].runtime.dtype_name}; {torch.get_num_threads()} threads",
              flush=True)
    walls, tokens, losses, _ = alternate_rounds(sims, args.rounds)
    first = next(iter(sims))
    reference = tokens[first] / sum(walls[first])
    print()
    print("| variant | completion tokens/s | timed rounds (s) | ratio | last round's mean loss |")
    print("|---|---:|---|---:|---:|")
    for name in sims:
        speed = tokens[name] / sum(walls[name])
        print(f"| {name} | {speed:.1f} | {', '.join(f'{w:.1f}' for w in walls[name])} | {speed / reference:.2f}x "
              f"| {losses[name]:.4f} |")


if __name__ == "__main__":
    main()
