"""What aggregating one round of a fleet costs the coordinator (issue 23, item 2): the upload
checks and the robust fedavg of every module's copies, on synthetic copies.

    .venv/bin/python bench/aggregate_fleet.py [--devices 1000] [--modules 28] [--rank 4] [--threads 1]

Copies shaped as tiny-llama's adapted linears (hidden 32, MLP 64; 7 modules a block), each a
holder's start plus a small update, checked as uploads (`checked_upload`) and aggregated by the
default robust policy (`MedianClip(FedAvg)` with the AdamW trust region). It uses only
interfaces older than this script, so it runs on earlier commits too (before/after: check out a
commit, run it there). Prints the seconds of each part.
"""

from __future__ import annotations

import argparse
import time

import torch

from splitpeft.aggregation.base import AdapterCopy, checked_upload
from splitpeft.aggregation.fedavg import FedAvg
from splitpeft.aggregation.robust import AdamTrustRegion, MedianClip
from splitpeft.model.adapters import LoraWeights

SHAPES = [(32, 32)] * 4 + [(64, 32), (64, 32), (32, 64)]  # (d_out, d_in): q, k, v, o, gate, up, down


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--modules", type=int, default=28)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    r = args.rank
    uploads = {}
    for m in range(args.modules):
        d_out, d_in = SHAPES[m % len(SHAPES)]
        start = LoraWeights(torch.randn(r, d_in) * 0.1, torch.randn(d_out, r) * 0.01)
        uploads[m] = (d_in, d_out, start, [
            AdapterCopy(f"device-{i}", LoraWeights(start.A + 1e-4 * torch.randn(r, d_in), start.B + 1e-4 * torch.randn(d_out, r)),
                        100 + i, 2.0) for i in range(args.devices)])
    began = time.perf_counter()
    checked = {}
    for m, (d_in, d_out, start, copies) in uploads.items():
        checked[m] = [AdapterCopy(c.holder, c.weights, c.tokens, c.scale, start, True)
                      for c in (checked_upload(f"m{m}", copy, rank=r, d_in=d_in, d_out=d_out) for copy in copies)]
    checks_s = time.perf_counter() - began
    aggregator = MedianClip(FedAvg(), 4.0, AdamTrustRegion(0.001, 1))
    began = time.perf_counter()
    clips = sum(len(aggregator.aggregate(f"m{m}", copies).clipped) for m, copies in checked.items())
    aggregate_s = time.perf_counter() - began
    print(f"{args.devices} devices x {args.modules} modules, rank {r}, {args.threads} thread(s): "
          f"upload checks {checks_s:.2f} s, robust fedavg {aggregate_s:.2f} s ({clips} clips)")


if __name__ == "__main__":
    main()
