"""Aggregators: how the copies of one module's adapter, trained by different holders in a round,
become the next round's adapters. Named policies behind one interface, chosen by config.

A copy is (holder, A_i (r_i, d_in), B_i (d_out, r_i), weight w_i, scale s_i = alpha / r_i); its
dense update is s_i B_i A_i (d_out, d_in). Weights are the tokens each holder trained on,
normalised to p_i = w_i / sum w. An aggregator returns the adapter each holder starts the next
round with (at that holder's rank) and, where the policy merges into the frozen weight, the dense
delta to add to it.

Policies (DESIGN.md, "NAA"): `noise_free` (exact stacked aggregate merged into the frozen weight,
fresh adapters), and the baselines `fedavg`, `zero_pad` (HetLoRA) and `svd` (FlexLoRA).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .adapters import LoraWeights

MAX_ADAPTER_NORM = 1e4


class AggregationError(ValueError):
    """Copies that cannot be aggregated (rank or shape mismatch, NaN/Inf, absurd norm)."""


@dataclass(frozen=True)
class AdapterCopy:
    holder: str
    weights: LoraWeights
    tokens: int
    scale: float = 1.0  # alpha / r of this copy: its dense update is scale * B @ A


@dataclass
class Aggregate:
    adapters: dict[str, LoraWeights]           # holder -> adapter for the next round
    base_delta: torch.Tensor | None = None      # (d_out, d_in) merged into the frozen weight


class Aggregator(Protocol):
    name: str

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate: ...


def check_copy(module: str, copy: AdapterCopy) -> None:
    """Reject a copy that is not a finite, sane LoRA pair (a poisoned or broken upload)."""
    a, b = copy.weights
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise AggregationError(f"{module} from {copy.holder}: A{tuple(a.shape)} B{tuple(b.shape)} is not a LoRA pair")
    for name, value in (("A", a), ("B", b)):
        if not bool(torch.isfinite(value).all()):
            raise AggregationError(f"{module} from {copy.holder}: {name} contains NaN or Inf")
        norm = float(value.norm())
        if norm > MAX_ADAPTER_NORM:
            raise AggregationError(f"{module} from {copy.holder}: |{name}| = {norm:.3g} exceeds {MAX_ADAPTER_NORM:g}")
    if copy.tokens < 0:
        raise AggregationError(f"{module} from {copy.holder}: negative token count {copy.tokens}")
    if not (math.isfinite(copy.scale) and copy.scale > 0):
        raise AggregationError(f"{module} from {copy.holder}: scale {copy.scale!r} is not a positive number")


def check_copies(module: str, copies: Sequence[AdapterCopy]) -> tuple[int, int]:
    """Validate every copy and that all adapt the same (d_out, d_in) weight; return (d_out, d_in).

    Ranks may differ. Each holder may appear once: the result is keyed by holder.
    """
    if not copies:
        raise AggregationError(f"{module}: nothing to aggregate")
    for copy in copies:
        check_copy(module, copy)
    first = copies[0]
    d_out, d_in = first.weights.B.shape[0], first.weights.A.shape[1]
    seen: set[str] = set()
    for copy in copies:
        a, b = copy.weights
        if (b.shape[0], a.shape[1]) != (d_out, d_in):
            raise AggregationError(
                f"{module} from {copy.holder}: adapts a ({b.shape[0]}, {a.shape[1]}) weight but "
                f"{first.holder} adapts ({d_out}, {d_in}) (d_out, d_in)"
            )
        if copy.holder in seen:
            raise AggregationError(f"{module}: {copy.holder} sent more than one copy")
        seen.add(copy.holder)
    return d_out, d_in


def token_weights(copies: Sequence[AdapterCopy]) -> list[float]:
    """p_i = tokens_i / sum tokens (uniform when no copy trained on any token)."""
    total = sum(c.tokens for c in copies)
    if total == 0:
        return [1.0 / len(copies)] * len(copies)
    return [c.tokens / total for c in copies]


class FedAvg:
    """FedAvg of A and B separately: A = sum p_i A_i, B = sum p_i B_i (homogeneous ranks)."""

    name = "fedavg"

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate:
        if not copies:
            raise AggregationError(f"{module}: nothing to aggregate")
        for copy in copies:
            check_copy(module, copy)
        shape = (copies[0].weights.A.shape, copies[0].weights.B.shape)
        for copy in copies[1:]:
            if (copy.weights.A.shape, copy.weights.B.shape) != shape:
                raise AggregationError(
                    f"{module}: fedavg needs equal ranks and shapes; {copy.holder} has "
                    f"A{tuple(copy.weights.A.shape)} vs A{tuple(shape[0])} (use noise_free, zero_pad or svd)"
                )
        p = token_weights(copies)
        a = sum(pi * c.weights.A for pi, c in zip(p, copies))
        b = sum(pi * c.weights.B for pi, c in zip(p, copies))
        merged = LoraWeights(a, b)  # type: ignore[arg-type]
        return Aggregate({c.holder: merged for c in copies})


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


class ZeroPad:
    """HetLoRA: zero-pad to the largest rank, average A and B separately, truncate per holder.

    A_i (r_i, d_in) -> (r_max, d_in) and B_i (d_out, r_i) -> (d_out, r_max) with zeros;
    A = sum p_i pad(A_i), B = sum p_i pad(B_i); holder h gets A[:r_h], B[:, :r_h]. Scales are
    ignored, as in HetLoRA; the result carries cross terms (B_i A_j), which is what NAA avoids.
    """

    name = "zero_pad"

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate:
        check_copies(module, copies)
        p = token_weights(copies)
        r_max = max(c.weights.rank for c in copies)
        a = torch.stack([pi * _pad_rows(c.weights.A, r_max) for pi, c in zip(p, copies)]).sum(0)  # (r_max, d_in)
        b = torch.stack([pi * _pad_rows(c.weights.B.T, r_max).T for pi, c in zip(p, copies)]).sum(0)  # (d_out, r_max)
        adapters = {
            c.holder: LoraWeights(a[: c.weights.rank].clone(), b[:, : c.weights.rank].clone()) for c in copies
        }
        return Aggregate(adapters)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(r, n) -> (rows, n), zeros below."""
    return torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])], dim=0)


class SvdTruncate:
    """FlexLoRA: average the dense updates, give each holder the best approximation at its rank.

    W = sum_i p_i s_i B_i A_i (d_out, d_in) = U S V^T. Holder h (rank r_h, scale s_h) gets
    B_h = U_r sqrt(S_r) / sqrt(s_h) (d_out, r_h) and A_h = sqrt(S_r) V_r^T / sqrt(s_h) (r_h, d_in),
    so s_h B_h A_h = U_r S_r V_r^T, the Eckart-Young optimum at rank r_h. Where r_h exceeds
    min(d_out, d_in) the extra rank slots are zero.
    """

    name = "svd"

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate:
        check_copies(module, copies)
        p = token_weights(copies)
        dense = torch.stack([pi * c.weights.delta(c.scale) for pi, c in zip(p, copies)]).sum(0)  # (d_out, d_in)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
        adapters = {}
        for c in copies:
            r = c.weights.rank
            k = min(r, s.shape[0])
            root = s[:k].sqrt() / math.sqrt(c.scale)  # (k,)
            b = dense.new_zeros(dense.shape[0], r)
            a = dense.new_zeros(r, dense.shape[1])
            b[:, :k] = u[:, :k] * root  # (d_out, k)
            a[:k] = root[:, None] * vh[:k]  # (k, d_in)
            adapters[c.holder] = LoraWeights(a, b)
        return Aggregate(adapters)


AGGREGATORS = ("noise_free", "fedavg", "zero_pad", "svd")


def make_aggregator(name: str, seed: int = 0) -> Aggregator:
    """The aggregator called `name`; `seed` seeds the fresh adapters of noise_free."""
    if name == "noise_free":
        return NoiseFree(seed)
    if name == "fedavg":
        return FedAvg()
    if name == "zero_pad":
        return ZeroPad()
    if name == "svd":
        return SvdTruncate()
    raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")


