"""Model poisoning: one device of four uploads a scaled update; held-out perplexity after the
rounds, per aggregator, with and without robust aggregation (issue 12, finding 3).

    .venv/bin/python bench/poisoning.py [--model tiny-llama] [--rounds 3] [--local-steps 5]

The attacker (the last device) trains honestly, then uploads A0 + k (A - A0) and B0 + k (B - B0)
for every module, (A0, B0) being what it was given that round: its update scaled by k = 10, 100,
or sign-flipped (k = -1). Every run has the same seed, data and plan; only the attacker's k and the
aggregation differ. Columns:

- fedavg, noise_free: the aggregator alone (robust.clip=none);
- +clip: per-holder update clipping at robust.clip_factor x the module's median (the default);
- fedavg+clip+median, fedavg+clip+trimmed: clipping, then the coordinate-wise median or trimmed
  mean of A and B in place of the token-weighted mean.

A cell is the completion perplexity of the first --eval-examples held-out examples after the last
round, then, in brackets, how many (holder, module) updates were clipped over the run and, if any,
how many device uploads were refused.
"""

from __future__ import annotations

import argparse
import time

import torch

from splitpeft.config import load_config
from splitpeft.experiment.evaluation import perplexity
from splitpeft.federation.simulation import Simulation
from splitpeft.parties.device import DeviceRuntime
from splitpeft.transport.messages import Kind, Message

ATTACKS = {"honest": None, "x10": 10.0, "x100": 100.0, "sign-flipped": -1.0}
COLUMNS = {  # name -> config overrides
    "fedavg": ["federation.aggregator=fedavg", "robust.clip=none"],
    "fedavg+clip": ["federation.aggregator=fedavg"],
    "fedavg+clip+median": ["federation.aggregator=fedavg", "robust.combine=median"],
    "fedavg+clip+trimmed": ["federation.aggregator=fedavg", "robust.combine=trimmed_mean"],
    "noise_free": ["federation.aggregator=noise_free", "robust.clip=none"],
    "noise_free+clip": ["federation.aggregator=noise_free"],
}


def scale_uploads(sim: Simulation, device: DeviceRuntime, k: float) -> None:
    """`device` uploads start + k (trained - start) for every module it trained."""
    original = device.upload_message

    def upload_message() -> Message:
        message = original()
        given = sim.state.given[device.device_id]
        tensors = {}
        for key, value in message.tensors.items():
            module, matrix = key.rsplit(".", 1)
            start = getattr(given[module], matrix)
            tensors[key] = start + k * (value - start)
        return Message(Kind.ADAPTERS, tensors, meta=message.meta)

    device.upload_message = upload_message  # type: ignore[method-assign]


def run(args: argparse.Namespace, column: list[str], k: float | None) -> str:
    """One table cell: held-out perplexity after the rounds [updates clipped, uploads refused]."""
    config = load_config(preset="tiny", overrides=[
        f"model.name={args.model}", "federation.num_devices=4", f"federation.rounds={args.rounds}",
        f"federation.local_steps={args.local_steps}", f"federation.batch_size={args.batch_size}",
        f"data.max_length={args.max_length}", f"data.limit={args.examples}", "count_flops=false", *column])
    sim = Simulation(config)
    if k is not None:
        scale_uploads(sim, sim.devices[-1], k)
    clipped = refused = 0
    for _ in range(config.federation.rounds):
        record = sim.run_round()
        clipped += len(record.clipped)
        refused += len(record.dropped)
    held_out = sim.held_out_encoded[: args.eval_examples]
    value = perplexity(sim.global_model(), held_out, config.federation.batch_size, sim.pad_id)
    return f"{value:.2f} [{clipped}{f', {refused} refused' if refused else ''}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--examples", type=int, default=200, help="data.limit: builtin examples used")
    parser.add_argument("--eval-examples", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    base = load_config(preset="tiny", overrides=[f"model.name={args.model}", f"data.limit={args.examples}",
                                                 f"data.max_length={args.max_length}", "federation.num_devices=4"])
    untrained = Simulation(base)
    before = perplexity(untrained.global_model(), untrained.held_out_encoded[: args.eval_examples],
                        args.batch_size, untrained.pad_id)
    print(f"{args.model}, 4 devices (the last one attacks), {args.rounds} rounds x {args.local_steps} local steps, "
          f"batch {args.batch_size}; held-out perplexity over {args.eval_examples} examples; before training: {before:.2f}")
    print()
    print("| attack | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for attack, k in ATTACKS.items():
        cells = [run(args, overrides, k) for overrides in COLUMNS.values()]
        print(f"| {attack} | " + " | ".join(cells) + " |", flush=True)
    print()
    print(f"{len(ATTACKS) * len(COLUMNS)} runs in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
