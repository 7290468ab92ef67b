"""The head and loss of one step on the labelled positions only (`head_loss`) against the head over
every position (`causal_lm_loss(head(hidden))`), side by side in one run (issue 22).

    .venv/bin/python bench/head_loss.py [--dtype bf16] [--batch 4] [--length 96] [--labelled 0.34]

SmolLM2-135M's head shapes (final RMSNorm, tied 576 x 49152 LM head, random weights: the time does
not depend on their values), hidden states (B, T, 576) with the last `--labelled` share of each
row's positions labelled (the main job labels about 34% of its positions). Times forward + backward
to the hidden states, alternating the two ways `--repeats` times; prints the median of each and the
ratio, and the two losses (equal to rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from splitpeft.model.loss import IGNORE_INDEX, causal_lm_loss, head_loss
from splitpeft.model.runtime import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--labelled", type=float, default=0.34)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    head = nn.Sequential(LlamaRMSNorm(args.hidden), nn.Linear(args.hidden, args.vocab, bias=False)).to(dtype)
    head.requires_grad_(False)
    hidden = torch.randn(args.batch, args.length, args.hidden, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, args.vocab, (args.batch, args.length))
    labels[:, : args.length - round(args.labelled * args.length)] = IGNORE_INDEX

    ways = {"every position": lambda: causal_lm_loss(head(hidden), labels),
            "labelled positions": lambda: head_loss(head, hidden, labels)}
    times: dict[str, list[float]] = {name: [] for name in ways}
    losses = {}
    for repeat in range(args.repeats + 1):  # the first of each is a warm-up
        for name, way in ways.items():
            start = time.perf_counter()
            loss = way()
            (grad,) = torch.autograd.grad(loss, hidden)
            if repeat:
                times[name].append(time.perf_counter() - start)
            losses[name] = float(loss.detach())
    base = statistics.median(times["every position"])
    print(f"{args.dtype}, B={args.batch}, T={args.length}, {args.labelled:.0%} labelled, V={args.vocab}: "
          f"head + loss forward and backward, median of {args.repeats}")
    for name in ways:
        median = statistics.median(times[name])
        print(f"  {name:>18}: {median * 1e3:7.1f} ms  ({base / median:.2f}x)  loss {losses[name]:.6f}")


if __name__ == "__main__":
    main()
