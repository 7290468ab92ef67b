"""`noise_free` (HSplitLoRA's NAA): the exact aggregate sum_i p_i s_i B_i A_i, computed as one
product of the copies stacked along the rank axis, merged into the frozen weight; every holder
restarts from a fresh adapter at its own rank (A random, B = 0)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

from splitpeft.aggregation.base import (
    AdapterCopy,
    Aggregate,
    check_copies,
    token_weights,
)
from splitpeft.model.adapters import LoraWeights


def fresh_adapter(r: int, d_in: int, d_out: int, generator: torch.Generator) -> LoraWeights:
    """A new adapter as peft initialises one: A (r, d_in) kaiming-uniform(a=sqrt(5)), B (d_out, r) = 0.

    Its dense update B A is zero, so the model function is unchanged when it replaces a merged one.
    """
    a = torch.empty(r, d_in)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return LoraWeights(a, torch.zeros(d_out, r))


def fresh_seed(seed: int, module: str, holder: str) -> int:
    """A stable per-(module, holder) seed: crc32, not hash(), which is salted per process."""
    return zlib.crc32(f"{seed}/{module}/{holder}".encode())


class NoiseFree:
    """NAA: merge the exact aggregate into the frozen weight, restart every holder fresh.

    With p_i the token weights, the aggregate of the copies is, without cross terms whatever the
    ranks,

        sum_i p_i s_i B_i A_i = [p_1 s_1 B_1 | ... | p_n s_n B_n] @ [A_1; ...; A_n]
                                 (d_out, sum r_i)                    (sum r_i, d_in)

    returned as `base_delta` (d_out, d_in). The caller adds it to every holder's frozen weight;
    each holder then starts the next round with a fresh adapter at its own rank (B = 0, A drawn
    like peft's default from a generator seeded by (seed, module, holder)), so the merged model
    computes base + aggregate exactly.
    """

    name = "noise_free"
    shared_adapter = False
    averages_factors = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate:
        d_out, d_in = check_copies(module, copies)
        p = token_weights(copies)
        dtype = torch.result_type(copies[0].weights.A, copies[0].weights.B)
        for c in copies[1:]:
            dtype = torch.promote_types(dtype, torch.result_type(c.weights.A, c.weights.B))
        left = torch.cat([pi * c.scale * c.weights.B.to(dtype) for pi, c in zip(p, copies)], dim=1)  # (d_out, R)
        right = torch.cat([c.weights.A.to(dtype) for c in copies], dim=0)  # (R, d_in)
        base_delta = left @ right  # (d_out, d_in)
        adapters = {}
        for c in copies:
            generator = torch.Generator().manual_seed(fresh_seed(self.seed, module, c.holder))
            fresh = fresh_adapter(c.weights.rank, d_in, d_out, generator)
            adapters[c.holder] = LoraWeights(
                fresh.A.to(dtype=c.weights.A.dtype, device=c.weights.A.device),
                fresh.B.to(dtype=c.weights.B.dtype, device=c.weights.B.device),
            )
        return Aggregate(adapters, base_delta)
