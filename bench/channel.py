"""Round trips through the in-process channel: the wire path (every message encoded and decoded,
as when a tap audits the frames) against the fast path (sized and handed over in memory), side by
side in one run.

    .venv/bin/python bench/channel.py [--device cpu|cuda] [--dtype fp32|bf16] [--batch 8] [--seq-len 512] [--hidden 2048]

One round trip is what `split` sends per step: ACTIVATIONS up (hidden (B, T, d) in --dtype,
labels (B, T) int32) and CUT_GRADIENT down (grad (B, T, d), loss). Repetitions alternate (wire,
fast, wire, fast, ...) so drift hits both alike. Prints the median time of each path, their ratio
and the bytes each counted (which must be equal).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from splitpeft.transport.channel import InProcessChannel
from splitpeft.transport.messages import Kind, Message

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class GradientEndpoint:
    """A server that answers every message with the same cut gradient."""

    def __init__(self, grad: torch.Tensor) -> None:
        self.grad = grad

    def handle(self, device_id: str, message: Message) -> Message:
        return Message(Kind.CUT_GRADIENT, {"grad": self.grad}, meta={"loss": 1.0})

    def reject(self, device_id: str, error: Exception) -> None:
        raise error


def round_trip_s(channel: InProcessChannel, message: Message, device: torch.device) -> float:
    """Seconds for `message` up and the gradient down, the GPU's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    channel.exchange(message).expect(Kind.CUT_GRADIENT)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="activation and gradient dtype")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--compression", choices=("none", "bf16", "int8"), default="none")
    parser.add_argument("--repeats", type=int, default=10, help="timed round trips per path")
    args = parser.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    shape = (args.batch, args.seq_len, args.hidden)
    hidden = torch.randn(shape, device=device).to(dtype)  # (B, T, d)
    labels = torch.randint(0, 32_000, shape[:2], device=device, dtype=torch.int32)  # (B, T)
    endpoint = GradientEndpoint(torch.randn(shape, device=device).to(dtype))
    channels = {
        "wire": InProcessChannel("device-0", endpoint, tap=lambda *frame: None, compression=args.compression),
        "fast": InProcessChannel("device-0", endpoint, compression=args.compression),
    }
    message = Message(Kind.ACTIVATIONS, {"hidden": hidden, "labels": labels})
    times: dict[str, list[float]] = {name: [] for name in channels}
    for repeat in range(args.repeats + 1):  # the first round of each is warm-up
        for name, channel in channels.items():
            channel.traffic.reset()
            elapsed = round_trip_s(channel, message, device)
            if repeat:
                times[name].append(elapsed)
    counted = {name: (c.traffic.bytes_up, c.traffic.bytes_down) for name, c in channels.items()}
    if counted["wire"] != counted["fast"]:
        raise SystemExit(f"byte counts differ: {counted}")

    wire, fast = statistics.median(times["wire"]), statistics.median(times["fast"])
    print(f"device {args.device}, {args.dtype}, B={args.batch} T={args.seq_len} d={args.hidden}, "
          f"compression {args.compression}, {args.repeats} round trips each, torch threads {torch.get_num_threads()}")
    print(f"bytes per round trip: up {counted['fast'][0]:,}, down {counted['fast'][1]:,} (same on both paths)")
    print(f"wire path (encode + decode): {wire * 1e3:9.2f} ms per round trip (median)")
    print(f"fast path (in memory):       {fast * 1e3:9.2f} ms per round trip (median)")
    print(f"ratio wire / fast:           {wire / fast:9.1f}x")


if __name__ == "__main__":
    main()
