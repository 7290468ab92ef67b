"""Aggregators: how the copies of one module's adapter, trained by different holders in a round,
become the next round's adapters. Named policies behind one interface, chosen by config.

A copy is (holder, A_i (r_i, d_in), B_i (d_out, r_i), weight w_i); weights are the tokens each
holder trained on, normalised to p_i = w_i / sum w. An aggregator returns the adapter each holder
starts the next round with (at that holder's rank) and, where the policy merges into the frozen
weight, the dense delta to add to it.
"""

from __future__ import annotations

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


AGGREGATORS = ("fedavg",)


def make_aggregator(name: str) -> Aggregator:
    if name == "fedavg":
        return FedAvg()
    raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")


