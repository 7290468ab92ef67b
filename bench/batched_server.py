"""The server's throughput with one pass for many devices against one device at a time (issue 22).

    .venv/bin/python bench/batched_server.py [--model smollm2-135m] [--devices 16] [--batch 1]
        [--seq 128] [--split 2] [--dtypes fp32,bf16] [--placements u_shaped,plain] [--reps 3]
        [--waves 1] [--flush-denormal] [--frames random|real]
    python3 bench/batched_server.py --device cuda --model random-llama-1b --dtypes bf16 --placements u_shaped --devices 64

Builds the default preset's model with `--devices` devices, each cut at block `--split`, opens
every device's server session, and then serves the same frames (random cut activations of
`--batch` x `--seq` tokens per device; plain split also random completion labels; U-shaped a
random head gradient after the FINAL_HIDDEN reply) two ways, alternately, `--reps` times each
after one untimed warm-up of each: one message at a time (`SplitServer.handle`, as without
`server.batch_devices`) and one wave for all devices (`SplitServer.handle_wave`).
`random-llama-1b`: Llama-3.2-1B's block shapes with random weights (bench/throughput.py), the
devices' data tokenised by the tiny tokenizer (the frames are random anyway). The frames'
norm bound is off (`robust.frame_norm_factor=0`) for random frames, which are not the model's own. Prints
server tokens/s (B x T per device per step) for each way and their ratio, per dtype and placement.
`--waves W` serves the devices as W waves of equal size instead of one (the wave-size probe of
BENCHMARKS); `--flush-denormal` flushes subnormal floats to zero for the whole run (random frames
pushed through real weights make subnormal values that real activations do not).
`--frames real` sends what real devices would instead: each device's own training examples (the
preset's data), packed to `--seq` tokens per row, through blocks [0, split) of the base model, with
their own labels (plain split); U-shaped, the head gradient of those rows' loss at the base model's
final hidden states (the server's adapters start at zero, so that is what its first reply holds).
The same frames serve every repetition, as the random ones do.
`--profile N` also prints the N operators with the most self CPU time in one pass of each way
(`--shapes`: each operator per input shapes).

No equality column: each pass trains the server's adapters, so the two ways never run from the
same state here, and on a random-weight model a 2^-9 relative change of the input moved the
largest cut gradient by 75% even in fp32 (a probe on CPU, 2026-12-04). That the two ways agree
is tested from equal states, in fp32, to 1e-5 (tests/parties/test_batched_server.py).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from functools import partial

import torch
from throughput import random_llama_1b
from torch.profiler import ProfilerActivity, profile

from splitpeft.config import load_config
from splitpeft.federation.simulation import Simulation
from splitpeft.model.loading import LoadedModel, load_model
from splitpeft.model.loss import head_loss
from splitpeft.model.runtime import DTYPES
from splitpeft.transport.messages import Kind, Message


def frames(sim: Simulation, batch: int, seq: int, plain: bool, generator: torch.Generator) -> dict[str, Message]:
    dtype = sim.runtime.dtype
    hidden_size = sim.backbone.model.config.hidden_size
    vocab = min(1000, int(sim.backbone.model.config.vocab_size))
    out = {}
    for device in sim.devices:
        tensors = {"hidden": torch.randn(batch, seq, hidden_size, generator=generator).to(dtype)}
        if plain:
            tensors["labels"] = torch.randint(0, vocab, (batch, seq), generator=generator, dtype=torch.int32)
        out[device.device_id] = Message(Kind.ACTIVATIONS, tensors)
    return out


def real_frames(sim: Simulation, batch: int, seq: int, plain: bool, split: int
                ) -> tuple[dict[str, Message], dict[str, torch.Tensor]]:
    """Each device's own examples packed into `batch` rows of `seq` tokens, at the cut after block
    `split` of the base model (and their labels, plain split), and, U-shaped only, the head gradient
    of those rows' loss at the base model's final hidden states (plain split: none)."""
    backbone, dtype = sim.backbone, sim.runtime.dtype
    up, head = {}, {}
    for device, examples in zip(sim.devices, sim.device_encoded):
        ids: list[int] = []
        labels: list[int] = []
        for example in itertools.cycle(examples):
            ids += example.input_ids
            labels += example.labels
            if len(ids) >= batch * seq:
                break
        input_ids = torch.tensor(ids[:batch * seq]).view(batch, seq)
        label_rows = torch.tensor(labels[:batch * seq]).view(batch, seq)
        with torch.no_grad():
            hidden = backbone.blocks(backbone.embed(input_ids.to(sim.runtime.server_device)), 0, split).to(dtype)
        if plain:
            up[device.device_id] = Message(Kind.ACTIVATIONS, {"hidden": hidden.cpu(), "labels": label_rows.to(torch.int32)})
            continue
        up[device.device_id] = Message(Kind.ACTIVATIONS, {"hidden": hidden.cpu()})
        with torch.no_grad():
            final = backbone.blocks(hidden, split, backbone.num_blocks)
        final.requires_grad_(True)
        head_loss(backbone.head, final, label_rows.to(final.device)).backward()
        assert final.grad is not None
        head[device.device_id] = final.grad.to(dtype).cpu()
    return up, head


def one_at_a_time(sim: Simulation, up: dict[str, Message], head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    grads = {}
    for device_id, message in up.items():
        reply = sim.server.handle(device_id, message)
        if reply.kind == Kind.FINAL_HIDDEN:
            reply = sim.server.handle(device_id, Message(Kind.HEAD_GRADIENT, {"grad": head[device_id]}))
        assert reply.kind == Kind.CUT_GRADIENT, reply.meta
        grads[device_id] = reply.tensors["grad"]
    return grads


def as_waves(sim: Simulation, up: dict[str, Message], head: dict[str, torch.Tensor], waves: int = 1) -> dict[str, torch.Tensor]:
    """Every device's step served in `waves` waves of (nearly) equal size, one after another."""
    ids = list(up)
    size = -(-len(ids) // waves)
    grads = {}
    for start in range(0, len(ids), size):
        wave = ids[start:start + size]
        replies = sim.server.handle_wave([(d, up[d]) for d in wave])
        if replies[0] is not None and replies[0].kind == Kind.FINAL_HIDDEN:
            replies = sim.server.handle_wave([(d, Message(Kind.HEAD_GRADIENT, {"grad": head[d]})) for d in wave])
        for device_id, reply in zip(wave, replies):
            assert reply is not None and reply.kind == Kind.CUT_GRADIENT, reply
            grads[device_id] = reply.tensors["grad"]
    return grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--split", type=int, default=2)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--placements", default="u_shaped,plain")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0,
                        help="also profile one pass of each way (torch.profiler) and print this many operators")
    parser.add_argument("--shapes", action="store_true",
                        help="with --profile: operators grouped by their input shapes as well")
    parser.add_argument("--device", default="cpu", help="runtime.server_device and device_device")
    parser.add_argument("--waves", type=int, default=1, help="serve the devices as this many waves of equal size")
    parser.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) for the whole run")
    parser.add_argument("--frames", choices=("random", "real"), default="random",
                        help="random cut activations, or each device's own examples through the base model's first blocks")
    args = parser.parse_args()
    if args.waves < 1 or args.waves > args.devices:
        parser.error(f"--waves {args.waves}: between 1 and --devices ({args.devices})")
    if args.flush_denormal and not torch.set_flush_denormal(True):
        parser.error("--flush-denormal: this processor cannot flush denormals (no SSE3)")
    print(f"{args.model}, {args.devices} devices, B={args.batch}, T={args.seq}, cut at block {args.split}, "
          f"{torch.get_num_threads()} threads, server on {args.device}, {args.waves} wave(s) a pass, "
          f"denormals {'flushed' if args.flush_denormal else 'kept'}, {args.frames} frames", flush=True)
    waved = partial(as_waves, waves=args.waves)
    rows = []
    for dtype in args.dtypes.split(","):
        for placement in args.placements.split(","):
            plain = placement == "plain"
            name = "tiny-llama" if args.model == "random-llama-1b" else args.model
            config = load_config(preset="default", overrides=[
                f"model.name={name}", f"runtime.dtype={dtype}", f"federation.num_devices={args.devices}",
                f"federation.batch_size={args.batch}", f"data.max_length={args.seq}", "hsplit.planner=fixed",
                f"placement.split_layer={args.split}", f"placement.labels_on_device={str(not plain).lower()}",
                *(["robust.frame_norm_factor=0"] if args.frames == "random" else []), "count_flops=false",
                "fleet.memory_bytes=null", "fleet.flops_per_s=5e10", "fleet.bandwidth_bytes_per_s=1.25e7", "server.batch_devices=true",
                f"runtime.server_device={args.device}", f"runtime.device_device={args.device}"])
            loaded = None
            if args.model == "random-llama-1b":  # Llama-3.2-1B's shapes, random weights, the tiny tokenizer's data
                tokenizer = load_model("tiny-llama").tokenizer
                loaded = LoadedModel(random_llama_1b(49152, DTYPES[dtype], torch.device(args.device)), tokenizer,
                                     args.model)
            sim = Simulation(config, loaded=loaded)
            for device in sim.devices:
                device.open_session(sim.channels[device.device_id])
            if args.frames == "real":
                up, head = real_frames(sim, args.batch, args.seq, plain, args.split)
            else:
                generator = torch.Generator().manual_seed(0)
                up = frames(sim, args.batch, args.seq, plain, generator)
                head = {d: torch.randn(args.batch, args.seq, sim.backbone.model.config.hidden_size,
                                       generator=generator).to(sim.runtime.dtype) for d in up}
            times: dict[str, list[float]] = {"one at a time": [], "one pass": []}
            for rep in range(args.reps + 1):
                for way, serve in (("one at a time", one_at_a_time), ("one pass", waved)):
                    if sim.runtime.server_device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    serve(sim, up, head)
                    if sim.runtime.server_device.type == "cuda":
                        torch.cuda.synchronize()
                    if rep > 0:
                        times[way].append(time.perf_counter() - start)
            if args.profile:
                on_gpu = sim.runtime.server_device.type == "cuda"
                activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
                for way, serve in (("one at a time", one_at_a_time), ("one pass", waved)):
                    with profile(activities=activities, record_shapes=args.shapes) as prof:
                        serve(sim, up, head)
                        if on_gpu:
                            torch.cuda.synchronize()
                    averages = prof.key_averages(group_by_input_shape=args.shapes)
                    print(f"{dtype} {placement}, {way}: operators by self CPU time")
                    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.profile, max_name_column_width=40,
                                         max_shapes_column_width=80))
                    if on_gpu:  # how much of the pass the GPU was busy: its kernels' time against the wall
                        print(f"{dtype} {placement}, {way}: operators by self CUDA time")
                        print(averages.table(sort_by="self_cuda_time_total", row_limit=args.profile))
            tokens = args.devices * args.batch * args.seq
            serial, batched = (tokens / statistics.median(times[w]) for w in times)
            rows.append((dtype, placement, serial, batched, batched / serial))
            print(f"{dtype} {placement}: {serial:,.0f} -> {batched:,.0f} tokens/s ({batched / serial:.2f}x); "
                  f"timed {' '.join(f'{t:.2f}' for t in times['one at a time'])} vs {' '.join(f'{t:.2f}' for t in times['one pass'])} s",
                  flush=True)
    print()
    print("| dtype | placement | one at a time (tokens/s) | one pass (tokens/s) | ratio |")
    print("|---|---|---:|---:|---:|")
    for dtype, placement, serial, batched, ratio in rows:
        print(f"| {dtype} | {placement} | {serial:,.0f} | {batched:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
