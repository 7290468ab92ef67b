"""Training throughput of U-shaped `split` (in-process channel) against a plain single-process peft LoRA
loop on the same model, batches and optimiser, side by side in one run.

    .venv/bin/python bench/throughput.py [--model smollm2-135m] [--steps 12] [--batch-size 4]
    .venv/bin/python bench/throughput.py --device cuda --dtype bf16 --model random-llama-1b --batch-size 8 --seq-len 512

Prints tokens/s of each, the ratio split / plain, and achieved FLOP/s (FLOPs of one step counted
by FlopCounterMode, divided by the measured step time) against this machine's measured matrix-
product peak in the same dtype on the same device (MFU). Runs alternate (plain, split, plain,
split, ...) so drift hits both alike. `random-llama-1b` is a LLaMA model with Llama-3.2-1B's
block shapes (hidden 2048, MLP 8192, 16 blocks, 32 heads, 8 KV heads) and random weights, with
the SmolLM2 tokenizer's vocabulary size (49152; the text is the bundled tiny tokenizer's, so it
runs without the default model's weights): speed depends on shapes, not on weight values.
On CUDA the device's peak memory (allocator) is printed next to the planner's prediction.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from peft import get_peft_model
from planner_accuracy import fixed_length
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

from splitpeft.config import RuntimeConfig
from splitpeft.data.batching import Batch, BatchStream, encode
from splitpeft.data.sources import load_examples
from splitpeft.federation.fleet import modules_in
from splitpeft.federation.simulation import start_state_of
from splitpeft.federation.state import initial_adapters
from splitpeft.hsplit.memory import ModelShapes, predict_peak_bytes
from splitpeft.model.adapters import lora_config, target_module_names
from splitpeft.model.attention import ATTENTION
from splitpeft.model.backbone import backbone_of, share_frozen_copy
from splitpeft.model.loading import load_model
from splitpeft.model.loss import causal_lm_loss
from splitpeft.model.runtime import DTYPES, resolve_runtime
from splitpeft.model.usage import flop_counter
from splitpeft.parties.device import DeviceRuntime
from splitpeft.parties.party import Training
from splitpeft.parties.server import SplitServer
from splitpeft.placements.base import backward_from_cut
from splitpeft.placements.split import SplitPlacement
from splitpeft.transport.channel import InProcessChannel


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 20) -> float:
    if device.type == "cuda":
        size = 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def random_llama_1b(vocab_size: int, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=True, rope_theta=500000.0)
    config._attn_implementation = ATTENTION
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--split-layer", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--data", default=None, help="E2E file (default: built-in task)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--seq-len", type=int, default=96, help="tokens per example (examples are repeated to fill it)")
    args = parser.parse_args()

    torch.manual_seed(0)
    runtime = resolve_runtime(RuntimeConfig(server_device=args.device, device_device=args.device, dtype=args.dtype))
    device_, dtype = runtime.device_device, runtime.dtype
    if args.model == "random-llama-1b":
        tokenizer = load_model("tiny-llama").tokenizer  # bundled: travels to a GPU machine without the default model
        base = random_llama_1b(49152, dtype, device_)
    else:
        loaded = load_model(args.model, dtype=dtype, device=device_)
        base, tokenizer = loaded.model, loaded.tokenizer
    backbone = backbone_of(base)
    ranks = {n: args.rank for n in target_module_names(backbone, backbone.default_target_modules, range(backbone.num_blocks))}
    adapters = initial_adapters(base, ranks, 16.0, seed=0)
    examples = load_examples("e2e" if args.data else "builtin", args.data)
    items = fixed_length(encode(examples[:400], tokenizer, args.seq_len), args.seq_len)
    pad_id = int(tokenizer.pad_token_id)
    stream = BatchStream(items, args.batch_size, pad_id, seed=0)
    batches = [stream.next().to(device_) for _ in range(args.steps)]
    tokens = sum(b.tokens for b in batches)

    # plain single-process peft loop: get_peft_model + AdamW, loss from the model's own forward
    plain = get_peft_model(share_frozen_copy(base), lora_config(ranks, 16.0, 0.0, False))
    for parameter in plain.parameters():  # adapters in fp32, as splitpeft keeps them
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    plain.train()
    plain_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-4)

    def run_plain() -> float:
        synchronize(device_)
        start = time.perf_counter()
        for batch in batches:
            run_plain_step(plain, plain_opt, batch)
        synchronize(device_)
        return time.perf_counter() - start

    # split: device + server session through the in-process channel (encode/decode every message)
    placement = SplitPlacement()  # U-shaped: labels, head and loss stay on the device
    server = SplitServer(base, lambda blocks: modules_in(ranks, backbone, blocks), start_state_of(adapters),
                         Training(lr=1e-4, runtime=runtime), num_blocks=backbone.num_blocks)

    def make_device(count_flops: bool) -> tuple[DeviceRuntime, InProcessChannel]:
        device_ranks = {n: r for n, r in ranks.items() if any(n.startswith(backbone.block_prefix(j)) for j in range(args.split_layer))}
        device = DeviceRuntime(f"bench-{count_flops}", base, placement, args.split_layer, device_ranks, stream,
                               Training(lr=1e-4, runtime=runtime), count_flops=count_flops)
        device.load(adapters)
        channel = InProcessChannel(device.device_id, server)
        device.open_session(channel)
        return device, channel

    metered, metered_channel = make_device(True)
    bare, bare_channel = make_device(False)

    def run_split(device: DeviceRuntime, channel: InProcessChannel) -> float:
        synchronize(device_)
        start = time.perf_counter()
        for batch in batches:
            run_split_step(placement, device, channel, batch)
        synchronize(device_)
        return time.perf_counter() - start

    run_plain(), run_split(bare, bare_channel), run_split(metered, metered_channel)  # warm-up
    times: dict[str, list[float]] = {"plain peft loop": [], "split (in-process)": [], "split + meters (report)": []}
    for _ in range(args.repeats):
        times["plain peft loop"].append(run_plain())
        times["split (in-process)"].append(run_split(bare, bare_channel))
        times["split + meters (report)"].append(run_split(metered, metered_channel))

    with flop_counter() as counter:
        for batch in batches:
            plain(input_ids=batch.input_ids, labels=batch.labels).loss.backward()
    plain_opt.zero_grad(set_to_none=True)
    total_flops = counter.get_total_flops()
    peak = matmul_peak_flops(device_, dtype)

    where = torch.cuda.get_device_name(device_) if device_.type == "cuda" else "CPU"
    print(f"model {args.model} ({sum(p.numel() for p in base.parameters()) / 1e9:.2f} B parameters), {where}, {args.dtype}, "
          f"{len(batches)} steps x batch {args.batch_size} x {args.seq_len} tokens, {tokens} tokens per repetition, "
          f"split_layer {args.split_layer}, rank {args.rank}, {args.repeats} repetitions (median)")
    medians = {name: statistics.median(values) for name, values in times.items()}
    base_rate = tokens / medians["plain peft loop"]
    for name, seconds in medians.items():
        rate = tokens / seconds
        print(f"{name:24s} {rate:8.1f} tokens/s   ratio to plain {rate / base_rate:.3f}")
    for name, seconds in medians.items():
        achieved = total_flops / seconds
        print(f"{name:24s} {achieved / 1e9:8.1f} GFLOP/s achieved = MFU {achieved / peak:.0%} of the measured {args.dtype} "
              f"matmul peak {peak / 1e9:.1f} GFLOP/s ({total_flops / 1e9:.0f} GFLOP fwd+bwd per repetition)")
    shapes = ModelShapes.from_model(base)
    predicted = predict_peak_bytes(shapes, args.split_layer, bare.ranks, args.batch_size, args.seq_len,
                                   labels_on_device=placement.labels_on_device)
    measured = bare.meter.step_peak_bytes
    source = "CUDA allocator" if device_.type == "cuda" else "CPU tensor account"
    print(f"device peak memory (split at {args.split_layer}): measured {measured / 2**20:.1f} MiB ({source}), "
          f"planner predicted {predicted / 2**20:.1f} MiB, predicted/measured {predicted / measured:.3f}")
    if device_.type == "cuda":  # where each way makes the host wait for the GPU, one step each
        for name, step in (("plain peft loop", lambda: run_plain_step(plain, plain_opt, batches[0])),
                           ("split", lambda: run_split_step(placement, bare, bare_channel, batches[0]))):
            places = host_syncs(step)
            shown = ", ".join(f"{place} x{count}" for place, count in places.most_common(8))
            print(f"host syncs in one {name} step: {sum(places.values())} ({shown})")
    # The device's step alone, metered the same way, with no server work in between (on a GPU,
    # above, the server's half of each step ran on the same GPU between the device's segments).
    alone = device_step_alone(bare, batches[0])
    print(f"device peak memory, the device's step alone (no server work in between): {alone / 2**20:.1f} MiB "
          f"({source}), predicted/measured {predicted / alone:.3f}")


def run_plain_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    model(input_ids=batch.input_ids, labels=batch.labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_split_step(placement: SplitPlacement, device: DeviceRuntime, channel: InProcessChannel, batch: Batch) -> None:
    device.meter.begin_step(device.resident_tensors(), key=tuple(batch.input_ids.shape), extra_bytes=device.gradient_bytes())
    placement.device_step(device, batch, channel)
    device.meter.end_step()


def host_syncs(step: Callable[[], None]) -> Counter[str]:
    """Where `step` makes the host wait for the GPU (torch's sync debug mode): the file:line of
    the Python call that waited -> how many times."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))


def device_step_alone(device: DeviceRuntime, batch: Batch) -> int:
    """Peak bytes of one U-shaped device step with no server work in between: its forward to the
    cut; its head and loss on final states (random here, as the server would send them) and their
    backward; its backward from a random cut gradient; its optimiser step."""
    synchronize(batch.input_ids.device)
    device.meter.begin_step(device.resident_tensors(), extra_bytes=device.gradient_bytes())
    embedded, cut = device.forward_to_cut(batch.input_ids)
    final = torch.randn(cut.shape, dtype=cut.dtype, device=cut.device).requires_grad_()
    with device.meter.compute():
        device.backward(causal_lm_loss(device.backbone.head(final), batch.labels))
    grad = torch.randn(cut.shape, dtype=device.wire_grad_dtype, device=cut.device)
    backward_from_cut(device, embedded, cut, grad, batch)
    with device.meter.compute():
        device.optimizer_step()
    synchronize(batch.input_ids.device)
    return device.meter.end_step()


if __name__ == "__main__":
    main()
