"""The main job's training speed per dtype, side by side in one run (issue 22: auto against fp32).

    .venv/bin/python bench/dtype_speed.py [--dtypes fp32,bf16] [--rounds 3] [--local-steps 3] [--flush-denormal]

Builds the README's main job (default preset: SmolLM2-135M, 3 devices, U-shaped split; with
`--planner fixed`, the default, every device at split 4 with rank 8, the same in every dtype) once
per dtype, without FLOP counting or evaluation, and plays their rounds alternately
(fp32 round 1, bf16 round 1, fp32 round 2, ...), so machine drift hits each alike. The first round
of each is a warm-up and not timed (plans, sessions, allocator); torch's FLOP formulas (those of its
FlopCounterMode) count its matrix-product FLOPs (all devices and the server), which gives the FLOPs per completion token.
Prints per dtype: completion tokens/s over the timed rounds (the tokens the loss is taken on, as
the server counted them, all devices), each timed round's wall time, and the ratio to the first
dtype; then each dtype's mean training loss of the last round, so a speed-up that changes training
shows. MFU: the achieved matrix-product FLOP/s (FLOPs per completion token of the warm-up round
x completion tokens/s) over the matrix peak of a square `--peak-size` product measured here, in
the same threads, in that dtype and in bf16.
"""

from __future__ import annotations

import argparse
import time

import torch
from side_by_side import alternate_rounds
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from splitpeft.config import load_config
from splitpeft.federation.simulation import Simulation
from splitpeft.model.runtime import DTYPES


class MatrixFlops(TorchDispatchMode):
    """Counts the FLOPs of every operator torch has a FLOP formula for (matrix products, attention).

    torch's FlopCounterMode itself cannot be used: its module hooks break the autograd.grad calls
    of the server's frame-bound calibration."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def matmul_peak_flops(dtype: torch.dtype, size: int, seconds: float = 2.0) -> float:
    """FLOP/s of a (size, size) @ (size, size) product in `dtype`, best of repeated timings."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per dtype, the first untimed")
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--planner", default="fixed",
                        help="hsplit.planner; fixed (default) keeps every dtype on the same split and ranks, since "
                             "ARMSC plans deeper splits where bf16 halves the memory")
    parser.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) for the whole run")
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square product that measures the peak")
    args = parser.parse_args()
    if args.flush_denormal and not torch.set_flush_denormal(True):
        parser.error("--flush-denormal: this processor cannot flush denormals (no SSE3)")
    dtypes = args.dtypes.split(",")
    sims = {}
    for dtype in dtypes:
        config = load_config(preset=args.preset, overrides=[
            f"runtime.dtype={dtype}", f"federation.local_steps={args.local_steps}", f"federation.rounds={args.rounds}",
            "count_flops=false", "eval.every_round=false", f"hsplit.planner={args.planner}"])
        sims[dtype] = Simulation(config)
        print(f"{dtype}: {sims[dtype].runtime.dtype_reason}; {torch.get_num_threads()} threads; denormals "
              f"{'flushed' if args.flush_denormal else 'kept'}", flush=True)
    walls, tokens, losses, first = alternate_rounds(sims, args.rounds, around_first=MatrixFlops)
    flops_per_token = {dtype: counter.flops / sum(s.tokens for s in record.devices.values())
                       for dtype, (record, counter) in first.items()}
    peaks = {name: matmul_peak_flops(DTYPES[name], args.peak_size) for name in dict.fromkeys([*dtypes, "bf16"])}
    print()
    print(f"matrix peaks ({args.peak_size}^2 products, {torch.get_num_threads()} threads): "
          + ", ".join(f"{name} {flops / 1e12:.2f} TFLOP/s" for name, flops in peaks.items()))
    base = tokens[dtypes[0]] / sum(walls[dtypes[0]])
    print()
    print("| dtype | completion tokens/s | timed rounds (s) | ratio | GFLOP/s | MFU (own dtype's peak) "
          "| MFU (bf16 peak) | last round's mean loss |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for dtype in dtypes:
        rate = tokens[dtype] / sum(walls[dtype])
        achieved = flops_per_token[dtype] * rate
        print(f"| {dtype} | {rate:.0f} | {', '.join(f'{w:.1f}' for w in walls[dtype])} | {rate / base:.2f}x | "
              f"{achieved / 1e9:.0f} | {achieved / peaks[dtype]:.1%} | {achieved / peaks['bf16']:.1%} | "
              f"{losses[dtype]:.4f} |")


if __name__ == "__main__":
    main()
