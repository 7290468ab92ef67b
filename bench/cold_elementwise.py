"""One elementwise product on a one-pass-sized tensor read from cache against the same product on
tensors last touched long ago (issue 22: why the shared server pass gains less than its matrix
products do on a CPU).

    .venv/bin/python bench/cold_elementwise.py [--shape 16,128,1536] [--dtype bf16] [--tensors 40]

`hot`: the same two tensors multiplied `--tensors` times (in cache after the first); `cold`: each
product on a fresh pair of the `--tensors` pairs made beforehand (their total, 2 x tensors x the
shape, far above the caches, as the activations a pass saves for backward are); `one device's
rows`: the same number of elements as `--shape`'s, in slices of its first axis, each hot. Also
prints the copy bandwidth at sizes from L2 to memory. Median ms of 5 sweeps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from splitpeft.model.runtime import DTYPES


def sweep_ms(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    start = time.perf_counter()
    for x, y in pairs:
        torch.mul(x, y)
    return (time.perf_counter() - start) / len(pairs) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="16,128,1536", help="the wave's MLP activations: 16 devices x 128 tokens")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--tensors", type=int, default=40)
    args = parser.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    dtype = DTYPES[args.dtype]
    print(f"{torch.get_num_threads()} threads, {args.dtype}, shape {shape}")
    for megabytes in (1, 4, 16, 64, 256):
        source = torch.empty(megabytes * 2**20, dtype=torch.uint8).random_()
        target = torch.empty_like(source)
        times = []
        for _ in range(7):
            start = time.perf_counter()
            target.copy_(source)
            times.append(time.perf_counter() - start)
        print(f"copy {megabytes:>3} MB: {2 * megabytes * 2**20 / statistics.median(times[2:]) / 1e9:6.1f} GB/s (read + write)")
    pairs = [(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)) for _ in range(args.tensors)]
    x, y = pairs[0]
    rows = [(x[i:i + 1], y[i:i + 1]) for i in range(shape[0])]
    hot, cold, sliced = [], [], []
    for _ in range(5):
        hot.append(sweep_ms([pairs[0]] * args.tensors))
        cold.append(sweep_ms(pairs))
        sliced.append(sweep_ms(rows * 4) * len(rows))
    megabytes = torch.Size(shape).numel() * pairs[0][0].element_size() / 2**20
    print(f"x * y, {megabytes:.1f} MB each: hot {statistics.median(hot):.2f} ms, cold {statistics.median(cold):.2f} ms "
          f"({statistics.median(cold) / statistics.median(hot):.1f}x), one device's rows at a time (hot) "
          f"{statistics.median(sliced):.2f} ms")


if __name__ == "__main__":
    main()
