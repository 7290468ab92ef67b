import numpy as np
import pytest
import torch

from splitpeft.adapters import LoraWeights
from splitpeft.aggregation import AdapterCopy, AggregationError, FedAvg, make_aggregator


def _copies(ranks, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        AdapterCopy(f"h{i}", LoraWeights(torch.randn(r, 6, generator=g), torch.randn(5, r, generator=g)), t)
        for i, (r, t) in enumerate(zip(ranks, tokens))
    ]


def test_fedavg_matches_weighted_average_reference():
    copies = _copies([4, 4, 4], [10, 30, 60])
    result = FedAvg().aggregate("m", copies)
    weights = [c.tokens for c in copies]
    want_a = np.average(np.stack([c.weights.A.numpy() for c in copies]), axis=0, weights=weights)
    want_b = np.average(np.stack([c.weights.B.numpy() for c in copies]), axis=0, weights=weights)
    for holder in ("h0", "h1", "h2"):
        np.testing.assert_allclose(result.adapters[holder].A.numpy(), want_a, rtol=1e-6)
        np.testing.assert_allclose(result.adapters[holder].B.numpy(), want_b, rtol=1e-6)


def test_fedavg_rejects_mismatched_ranks_and_poison():
    with pytest.raises(AggregationError, match="fedavg needs equal ranks"):
        FedAvg().aggregate("m", _copies([4, 2], [1, 1]))
    poisoned = _copies([4], [1])[0]
    poisoned.weights.B[0, 0] = float("nan")
    with pytest.raises(AggregationError, match="B contains NaN or Inf"):
        FedAvg().aggregate("m", [poisoned])
    huge = AdapterCopy("big", LoraWeights(torch.full((4, 6), 1e6), torch.zeros(5, 4)), 1)
    with pytest.raises(AggregationError, match="exceeds"):
        FedAvg().aggregate("m", [huge])


def test_unknown_aggregator_is_named():
    with pytest.raises(ValueError, match="unknown aggregator 'avg'"):
        make_aggregator("avg")
