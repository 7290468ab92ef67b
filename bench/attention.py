"""Causal attention forward + backward in bf16 against the same inputs computed in fp32 on this CPU
(issue 22: torch's CPU attention kernel is slower in bf16 than in fp32 for short sequences).

    .venv/bin/python bench/attention.py [--shapes 16x64,16x128,8x160,8x192,8x256,4x384] [--reps 8]

SmolLM2-135M's heads (9 query, 3 key/value, dim 64), transformers' SDPA forward
(`sdpa_attention_forward`, grouped-query heads repeated as there) and backward, for B x T batches;
"fp32" casts q, k, v to fp32 first and the output back to bf16. Both
ways alternate in one process; median ms of `--reps`. Also prints the mean absolute error of each
way's output and input gradients against float64 (one B=4, T=96 batch).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

HEADS, KV_HEADS, DIM = 9, 3, 64


class _Heads(torch.nn.Module):
    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fp32: bool) -> torch.Tensor:
    if fp32:
        out, _ = sdpa_attention_forward(_Heads(), q.float(), k.float(), v.float(), None, scaling=DIM ** -0.5)
        return out.to(q.dtype)
    out, _ = sdpa_attention_forward(_Heads(), q, k, v, None, scaling=DIM ** -0.5)
    return out


def inputs(batch: int, length: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, HEADS, length, DIM), (batch, KV_HEADS, length, DIM), (batch, KV_HEADS, length, DIM)]
    return [torch.randn(*shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]


def step_ms(tensors: list[torch.Tensor], grad: torch.Tensor, fp32: bool) -> float:
    start = time.perf_counter()
    attention(*tensors, fp32=fp32).backward(grad)
    return (time.perf_counter() - start) * 1000


def errors() -> None:
    reference = inputs(4, 96, torch.float64, seed=1)
    grad = torch.randn(4, 96, HEADS, DIM, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    attention(*reference, fp32=False).backward(grad)
    want = [attention(*[t.detach() for t in reference], fp32=False)] + [t.grad for t in reference]
    for fp32 in (False, True):
        low = [t.detach().bfloat16().requires_grad_() for t in reference]
        out = attention(*low, fp32=fp32)
        out.backward(grad.bfloat16())
        got = [out.detach()] + [t.grad for t in low]
        cells = ", ".join(f"{name} {float((g.double() - w).abs().mean()):.2e}"
                          for name, g, w in zip(("out", "dq", "dk", "dv"), got, want))
        print(f"{'fp32' if fp32 else 'bf16'} mean |error| against float64: {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="16x64,16x128,8x160,8x192,8x256,4x384", help="BxT,...")
    parser.add_argument("--reps", type=int, default=8)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads; SmolLM2 heads {HEADS}/{KV_HEADS}, dim {DIM}; forward + backward")
    print("| B | T | bf16 (ms) | fp32 (ms) | bf16 / fp32 |")
    print("|---:|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        batch, length = (int(n) for n in shape.split("x"))
        tensors = inputs(batch, length, torch.bfloat16)
        grad = torch.randn(batch, length, HEADS, DIM).bfloat16()
        times: dict[bool, list[float]] = {False: [], True: []}
        for fp32 in (False, True):
            step_ms(tensors, grad, fp32)  # warm-up
        for _ in range(args.reps):
            for fp32 in (False, True):
                times[fp32].append(step_ms(tensors, grad, fp32))
        low, high = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {batch} | {length} | {low:.2f} | {high:.2f} | {low / high:.2f}x |")
    errors()


if __name__ == "__main__":
    main()
