"""`zero_pad` (HetLoRA): pad every copy's A and B with zeros to the largest rank, average A and B,
and give each holder the first r_i rank components back."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitpeft.aggregation.base import (
    AdapterCopy,
    Aggregate,
    check_copies,
    token_weights,
)
from splitpeft.model.adapters import LoraWeights


class ZeroPad:
    """HetLoRA: zero-pad to the largest rank, average A and B separately, truncate per holder.

    A_i (r_i, d_in) -> (r_max, d_in) and B_i (d_out, r_i) -> (d_out, r_max) with zeros;
    A = sum p_i pad(A_i), B = sum p_i pad(B_i); holder h gets A[:r_h], B[:, :r_h]. Scales are
    ignored, as in HetLoRA; the result carries cross terms (B_i A_j), which is what NAA avoids.
    """

    name = "zero_pad"
    shared_adapter = False
    averages_factors = True
    warm_restarts = False

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate:
        check_copies(module, copies)
        p = token_weights(copies)
        a = padded_average([c.weights.A for c in copies], p)  # (r_max, d_in)
        b = padded_average([c.weights.B.T for c in copies], p).T  # (d_out, r_max)
        adapters = {
            c.holder: LoraWeights(a[: c.weights.rank].clone(), b[:, : c.weights.rank].clone()) for c in copies
        }
        return Aggregate(adapters)


def padded_average(factors: Sequence[torch.Tensor], p: Sequence[float]) -> torch.Tensor:
    """sum_i p_i pad(F_i): the (r_i, n) factors zero-padded below to the largest r_i and averaged
    with weights p (HetLoRA's average of A, and of B transposed)."""
    r_max = max(f.shape[0] for f in factors)
    return torch.stack([pi * pad_rows(f, r_max) for pi, f in zip(p, factors)]).sum(0)


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(r, n) -> (rows, n), zeros below."""
    return torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])], dim=0)
