"""`fedavg`: FedAvg of A and B separately (homogeneous ranks only). It is not the average of
the products (sum p_i B_i A_i != (sum p_i B_i)(sum p_i A_i)): the noise noise-free aggregation removes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from splitpeft.aggregation.base import (
    AdapterCopy,
    Aggregate,
    AggregationError,
    check_copy,
    token_weights,
)
from splitpeft.model.adapters import LoraWeights


class FedAvg:
    """FedAvg of A and B separately: A = sum p_i A_i, B = sum p_i B_i (homogeneous ranks)."""

    name = "fedavg"
    shared_adapter = True
    averages_factors = True
    warm_restarts = False

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate:
        check_homogeneous(module, copies, self.name)
        p = token_weights(copies)
        merged = LoraWeights(weighted_sum([c.weights.A for c in copies], p), weighted_sum([c.weights.B for c in copies], p))
        return Aggregate({c.holder: merged for c in copies})


def weighted_sum(values: Sequence[torch.Tensor], p: Sequence[float]) -> torch.Tensor:
    """sum_i p_i values_i for tensors of one shape: one contraction over the stacked copies, not a
    Python-level product and sum per copy (a fleet's thousand copies a module)."""
    stacked = torch.stack(list(values))
    return torch.tensordot(torch.tensor(list(p), dtype=stacked.dtype, device=stacked.device), stacked, dims=1)


def check_homogeneous(module: str, copies: Sequence[AdapterCopy], policy: str) -> None:
    """Every copy sane (`check_copy`) and of one rank and shape, as averaging A and B needs."""
    if not copies:
        raise AggregationError(f"{module}: nothing to aggregate")
    for copy in copies:
        check_copy(module, copy)
    shape = (copies[0].weights.A.shape, copies[0].weights.B.shape)
    for copy in copies[1:]:
        if (copy.weights.A.shape, copy.weights.B.shape) != shape:
            raise AggregationError(
                f"{module}: {policy} needs equal ranks and shapes; {copy.holder} has "
                f"A{tuple(copy.weights.A.shape)} vs A{tuple(shape[0])} (use noise_free, zero_pad or svd)"
            )
