"""Planner accuracy: ARMSC plans for a heterogeneous fleet, predicted against measured peak memory.

    .venv/bin/python bench/planner_accuracy.py [--model smollm2-135m] [--devices 4] [--seq-len 96]

For each device budget (spread evenly over --memory-range, in MB) the planner picks a split point
and ranks from IWI scores; a real device with that plan then trains 2 steps on batches of exactly
--seq-len tokens, and its peak is measured by the device meter (see splitpeft.model.usage).
"""

from __future__ import annotations

import argparse

import torch

from splitpeft.data.batching import BatchStream, EncodedExample, encode
from splitpeft.data.sources import load_examples
from splitpeft.federation.simulation import start_state_of
from splitpeft.federation.state import initial_adapters
from splitpeft.hsplit.armsc import plan_fleet
from splitpeft.hsplit.budget import fleet_preset
from splitpeft.hsplit.importance import normalised_scores, probe_importance
from splitpeft.hsplit.memory import ModelShapes
from splitpeft.model.backbone import backbone_of
from splitpeft.model.loading import load_model
from splitpeft.parties.device import DeviceRuntime
from splitpeft.parties.party import Training
from splitpeft.parties.server import SplitServer
from splitpeft.placements.split import SplitPlacement
from splitpeft.transport.channel import InProcessChannel


def fixed_length(items: list[EncodedExample], length: int) -> list[EncodedExample]:
    """Examples cut or repeated to exactly `length` tokens, so every batch has the planned T."""
    out = []
    for item in items:
        ids = (item.input_ids * (length // len(item.input_ids) + 1))[:length]
        labels = (item.labels * (length // len(item.labels) + 1))[:length]
        out.append(EncodedExample(ids, labels))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--memory-range", type=float, nargs=2, default=[250.0, 700.0], metavar=("MIN_MB", "MAX_MB"))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=96)
    args = parser.parse_args()

    torch.manual_seed(0)
    loaded = load_model(args.model)
    base, tokenizer = loaded.model, loaded.tokenizer
    backbone = backbone_of(base)
    shapes = ModelShapes.from_model(base)
    items = fixed_length(encode(load_examples("builtin")[:200], tokenizer, args.seq_len), args.seq_len)
    pad_id = int(tokenizer.pad_token_id)
    probe = BatchStream(items, args.batch_size, pad_id, seed=1)
    modules = sorted(shapes.modules)
    raw = probe_importance(base, backbone, [probe.next() for _ in range(2)], modules)
    scores = normalised_scores(raw, shapes.modules, 8)
    profiles = fleet_preset(args.devices, (int(args.memory_range[0] * 1e6), int(args.memory_range[1] * 1e6)), 5e10, 1.25e7)
    plans = plan_fleet(profiles, shapes, scores, batch_size=args.batch_size, seq_len=args.seq_len)

    all_ranks = {n: 8 for n in modules}
    server = SplitServer(base, lambda blocks: {n: r for n, r in all_ranks.items() if shapes.module_block[n] in blocks},
                         start_state_of(initial_adapters(base, all_ranks, 16.0, seed=0)),
                         Training(lr=1e-4), num_blocks=backbone.num_blocks)
    print(f"model {args.model}, batch {args.batch_size} x {args.seq_len} tokens, {args.devices} devices")
    print("| device | budget MB | split k | adapted modules | ranks | predicted peak MB | measured peak MB | error |")
    print("|---|---|---|---|---|---|---|---|")
    for plan in plans:
        stream = BatchStream(items, args.batch_size, pad_id, seed=0)
        device = DeviceRuntime(plan.device, base, SplitPlacement(), plan.split_layer, plan.ranks, stream,
                               Training(lr=1e-4), count_flops=False)
        channel = InProcessChannel(plan.device, server)
        device.open_session(channel)
        device.local_phase(2, channel)
        measured = device.meter.take_round()[2]
        histogram: dict[int, int] = {}
        for rank in plan.ranks.values():
            histogram[rank] = histogram.get(rank, 0) + 1
        error = (plan.predicted_peak_bytes - measured) / measured
        print(f"| {plan.device} | {plan.budget_bytes / 1e6:.0f} | {plan.split_layer} | {len(plan.ranks)} | "
              f"{dict(sorted(histogram.items()))} | {plan.predicted_peak_bytes / 1e6:.1f} | {measured / 1e6:.1f} | {error:+.2%} |")


if __name__ == "__main__":
    main()
