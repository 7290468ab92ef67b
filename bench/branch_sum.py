"""Three ways to add a wave's stacked LoRA branches to a frozen linear's output, forward and
backward, side by side in one process (issue 22: what `model/batched.py`'s `_stacked_branches`
should write).

    .venv/bin/python bench/branch_sum.py [--devices 16] [--tokens 128] [--d-in 576] [--d-out 1536] [--rank 8]

`add`: the branch as its own (N, M, d_out) tensor (`bmm`), added to the output; `in place`: the
second product accumulated into a view of the output (`baddbmm_`), which makes autograd's backward
clone and copy the output's whole gradient (`CopySlices`); `out of place`: `baddbmm` with the
output as its first operand. Each: W x, A in fp32 cast to the input's dtype as the pass does, then
backward from a fixed gradient. Median ms of the rounds (the three alternate within each round),
and the copies and clones one call makes (torch.profiler).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import profile

from splitpeft.model.runtime import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--d-in", type=int, default=576)
    parser.add_argument("--d-out", type=int, default=1536, help="SmolLM2-135M's MLP width (its gate and up projections)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--calls", type=int, default=20, help="calls timed per way and round")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    n, m, d_in, d_out, r = args.devices, args.tokens, args.d_in, args.d_out, args.rank
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(d_out, d_in, generator=generator) * 0.02).to(dtype)
    a = (torch.randn(n, r, d_in, generator=generator) * 0.02).requires_grad_()
    b = (torch.randn(n, d_out, r, generator=generator) * 0.02).requires_grad_()
    x_data = torch.randn(n, m, d_in, generator=generator).to(dtype)
    grad = torch.randn(n, m, d_out, generator=generator).to(dtype)

    def add(x: torch.Tensor) -> torch.Tensor:
        output = F.linear(x, weight)
        return output + torch.bmm(torch.bmm(x, a.to(dtype).transpose(1, 2)), b.to(dtype).transpose(1, 2))

    def in_place(x: torch.Tensor) -> torch.Tensor:
        output = F.linear(x, weight)
        output.view(n, -1, d_out).baddbmm_(torch.bmm(x, a.to(dtype).transpose(1, 2)), b.to(dtype).transpose(1, 2))
        return output

    def out_of_place(x: torch.Tensor) -> torch.Tensor:
        output = F.linear(x, weight)
        return torch.baddbmm(output.view(n, -1, d_out), torch.bmm(x, a.to(dtype).transpose(1, 2)),
                             b.to(dtype).transpose(1, 2)).view(output.shape)

    ways: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"add": add, "in place": in_place, "out of place": out_of_place}

    def step(way: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, ...]:
        a.grad = b.grad = None
        x = x_data.clone().requires_grad_()
        output = way(x)
        output.backward(grad)
        assert x.grad is not None and a.grad is not None and b.grad is not None
        return output.detach(), x.grad, a.grad, b.grad

    results = {name: step(way) for name, way in ways.items()}
    for name, got in results.items():  # the three compute the same sums, to the dtype's rounding
        error = max(float((u.float() - v.float()).abs().max()) for u, v in zip(got, results["add"]))
        print(f"{name}: largest difference from `add` over output and gradients {error:.3g}")
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            for _ in range(args.calls):
                step(way)
            times[name].append((time.perf_counter() - start) / args.calls * 1000)
    print(f"{torch.get_num_threads()} threads, {args.dtype}, {n} devices x {m} tokens, {d_in} -> {d_out}, rank {r}")
    print("| way | forward + backward (ms, median) | copies | clones |")
    print("|---|---:|---:|---:|")
    for name, way in ways.items():
        with profile() as prof:
            step(way)
        counts = {event.key: event.count for event in prof.key_averages()}
        x_copies = 1  # x_data.clone() in `step`, the same for every way
        print(f"| {name} | {statistics.median(times[name]):.2f} | {counts.get('aten::copy_', 0) - x_copies} | "
              f"{counts.get('aten::clone', 0) - x_copies} |")


if __name__ == "__main__":
    main()
