"""Split training over a real network stack: loopback gRPC (plaintext and TLS) against the
in-process channel, and what activation compression saves and costs; side by side in one run.

    .venv/bin/python bench/network.py [--model smollm2-135m] [--steps 8] [--repeats 3] [--quality]
        [--preset e2e --set data.path=../shared/data/e2e/valid.txt] [--no-throughput]

Table 1: tokens/s of `split` training steps on the same model and batches through each transport
(and gRPC with bf16 / int8 compression), the ratio to in-process, and bytes per step each way as
counted by the channel (encoded frame sizes). Runs alternate (in-process, gRPC, gRPC+TLS, ...)
so drift hits all alike; medians over `--repeats`.

Table 2 (`--quality`): a short federated run (`--rounds` rounds of the preset) per compression
mode over loopback gRPC, then held-out perplexity and BLEU of the global model.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from splitpeft.config import load_config
from splitpeft.data.batching import BatchStream, encode
from splitpeft.data.sources import load_examples
from splitpeft.experiment.run import evaluate_model
from splitpeft.federation.simulation import Simulation, start_state_of
from splitpeft.federation.state import initial_adapters
from splitpeft.model.adapters import target_module_names
from splitpeft.model.backbone import backbone_of
from splitpeft.model.loading import load_model
from splitpeft.parties.device import DeviceRuntime
from splitpeft.parties.party import Training
from splitpeft.parties.server import SplitServer
from splitpeft.placements.split import SplitPlacement
from splitpeft.transport.channel import Channel, InProcessChannel
from splitpeft.transport.grpc import (
    GrpcChannel,
    GrpcSplitServer,
    self_signed_certificate,
)

MODES = ("none", "bf16", "int8")


def throughput(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    loaded = load_model(args.model)
    base, tokenizer = loaded.model, loaded.tokenizer
    backbone = backbone_of(base)
    ranks = {n: args.rank for n in target_module_names(backbone, backbone.default_target_modules, range(backbone.num_blocks))}
    adapters = initial_adapters(base, ranks, 16.0, seed=0)
    stream = BatchStream(encode(load_examples("builtin")[:400], tokenizer, args.max_length), args.batch_size,
                         int(tokenizer.pad_token_id), seed=0)
    batches = [stream.next() for _ in range(args.steps)]
    tokens = sum(b.tokens for b in batches)

    def in_blocks(name: str, blocks: range) -> bool:
        return any(name.startswith(backbone.block_prefix(j)) for j in blocks)

    split_layer = min(args.split_layer, backbone.num_blocks)
    placement = SplitPlacement()
    server = SplitServer(base, lambda blocks: {n: r for n, r in ranks.items() if in_blocks(n, blocks)},
                         start_state_of(adapters), Training(lr=1e-4), num_blocks=backbone.num_blocks)

    names = ["in-process", "gRPC", "gRPC + TLS", "gRPC bf16", "gRPC int8"]
    tokens_of = {name: f"token-{i}" for i, name in enumerate(names)}
    cert, key = self_signed_certificate()
    plain_server = GrpcSplitServer(server, tokens=tokens_of)
    tls_server = GrpcSplitServer(server, tokens=tokens_of, tls=(cert, key))
    plain_address, tls_address = f"127.0.0.1:{plain_server.start()}", f"127.0.0.1:{tls_server.start()}"

    def channel_for(name: str) -> Channel:
        if name == "in-process":
            return InProcessChannel(name, server)
        if name == "gRPC + TLS":
            return GrpcChannel(name, tls_address, token=tokens_of[name], root_cert_pem=cert)
        mode = name.split()[-1] if name.split()[-1] in MODES else "none"
        return GrpcChannel(name, plain_address, token=tokens_of[name], compression=mode)

    runs: dict[str, tuple[DeviceRuntime, Any]] = {}
    for name in names:
        device = DeviceRuntime(name, base, placement, split_layer, {n: r for n, r in ranks.items() if in_blocks(n, range(split_layer))},
                               stream, Training(lr=1e-4), count_flops=False)
        device.load(adapters)
        channel = channel_for(name)
        device.open_session(channel)
        runs[name] = (device, channel)

    def run(name: str) -> tuple[float, int, int]:
        device, channel = runs[name]
        up, down = channel.traffic.bytes_up, channel.traffic.bytes_down
        start = time.perf_counter()
        for batch in batches:
            placement.device_step(device, batch, channel)
        return time.perf_counter() - start, channel.traffic.bytes_up - up, channel.traffic.bytes_down - down

    for name in names:  # warm-up (allocator, gRPC connection, TLS handshake)
        run(name)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    traffic: dict[str, tuple[int, int]] = {}
    for _ in range(args.repeats):
        for name in names:
            elapsed, up, down = run(name)
            seconds[name].append(elapsed)
            traffic[name] = (up, down)
    for _, channel in runs.values():
        if isinstance(channel, GrpcChannel):
            channel.close()
    plain_server.stop()
    tls_server.stop()

    print(f"model {args.model}, split_layer {split_layer}, {len(batches)} steps x batch {args.batch_size} "
          f"({tokens} tokens) per repetition, rank {args.rank}, {args.repeats} repetitions (median), "
          f"torch threads {torch.get_num_threads()}")
    print()
    print("| transport | tokens/s | ratio to in-process | ms/step | bytes up/step | bytes down/step | up vs none |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reference = statistics.median(seconds["in-process"])
    none_up = traffic["gRPC"][0]
    for name in names:
        median = statistics.median(seconds[name])
        up, down = traffic[name]
        print(f"| {name} | {tokens / median:.1f} | {reference / median:.3f} | {1000 * median / len(batches):.1f} | "
              f"{up // len(batches):,} | {down // len(batches):,} | {none_up / up:.2f}x |")


def quality(args: argparse.Namespace) -> None:
    preset = args.preset or ("tiny" if args.model.startswith("tiny-") else "default")
    overrides = [f"model.name={args.model}", f"federation.rounds={args.rounds}", "eval.meteor=false",
                 "eval.baseline=false", *args.set]
    print()
    print(f"quality: preset {preset}, {args.rounds} rounds over loopback gRPC per compression mode")
    print()
    print("| compression | split bytes/round | final train loss | held-out perplexity | BLEU |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES:
        config = load_config(preset=preset, overrides=overrides)
        sim = Simulation(config)
        tokens = {d: f"token-{d}" for d in sim.device_ids}
        with GrpcSplitServer(sim.server, tokens=tokens) as server:  # replies in the mode each device asks for
            channels = {d: GrpcChannel(d, f"127.0.0.1:{server.port}", token=tokens[d], compression=mode) for d in sim.device_ids}
            sim.channels.update(channels)
            for _ in range(config.federation.rounds):
                sim.run_round()
            for channel in channels.values():
                channel.close()
        split_bytes = statistics.mean(
            sum(s.bytes_up + s.bytes_down - s.adapter_bytes_up - s.adapter_bytes_down for s in r.devices.values())
            for r in sim.rounds)
        loss = statistics.mean(s.train_loss for s in sim.rounds[-1].devices.values())
        scores = evaluate_model(sim.global_model(), sim.loaded.tokenizer, config, sim.held_out, sim.held_out_encoded)
        bleu = scores.get("bleu")
        print(f"| {mode} | {split_bytes:,.0f} | {loss:.5f} | {scores.get('perplexity', float('nan')):.4f} | "
              f"{'-' if bleu is None else f'{bleu:.2f}'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--split-layer", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--quality", action="store_true", help="also train per compression mode and evaluate")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the quality runs")
    parser.add_argument("--preset", help="preset of the quality runs (default: default, tiny for tiny models)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override of the quality runs, e.g. data.path=../shared/data/e2e/valid.txt")
    parser.add_argument("--no-throughput", action="store_true", help="skip table 1")
    args = parser.parse_args()
    if not args.no_throughput:
        throughput(args)
    if args.quality:
        quality(args)


if __name__ == "__main__":
    main()
