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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from splitpeft.model.adapters import LoraWeights

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
    # True: every holder gets the same adapter back (the global model is base + that adapter);
    # False: holders' adapters differ, or updates are merged into the frozen weights.
    shared_adapter: bool

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
