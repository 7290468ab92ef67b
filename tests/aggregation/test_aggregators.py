import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitpeft.aggregation.base import AdapterCopy, AggregationError
from splitpeft.aggregation.fedavg import FedAvg
from splitpeft.aggregation.noise_free import NoiseFree
from splitpeft.aggregation.registry import AGGREGATORS, make_aggregator
from splitpeft.aggregation.svd import SvdTruncate
from splitpeft.aggregation.zero_pad import ZeroPad
from splitpeft.model.adapters import LoraWeights


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


# --- heterogeneous-rank aggregators: noise_free (NAA), zero_pad (HetLoRA), svd (FlexLoRA) ---

D_OUT, D_IN = 5, 6


def _het_copies(ranks, tokens, seed=0, dtype=torch.float64, alpha=16.0):
    """Copies with scale alpha / r, as peft sets it for each holder's own rank."""
    g = torch.Generator().manual_seed(seed)
    return [
        AdapterCopy(
            f"h{i}",
            LoraWeights(
                torch.randn(r, D_IN, generator=g, dtype=dtype), torch.randn(D_OUT, r, generator=g, dtype=dtype)
            ),
            t,
            scale=alpha / r,
        )
        for i, (r, t) in enumerate(zip(ranks, tokens))
    ]


def _dense_reference(copies):
    """sum_i p_i s_i B_i A_i by an independent numpy loop."""
    tokens = np.array([c.tokens for c in copies], dtype=float)
    p = tokens / tokens.sum() if tokens.sum() > 0 else np.full(len(copies), 1 / len(copies))
    want = np.zeros((D_OUT, D_IN))
    for pi, c in zip(p, copies):
        want += pi * c.scale * (c.weights.B.numpy() @ c.weights.A.numpy())
    return want


rank_lists = st.lists(st.sampled_from([1, 2, 4, 8, 16]), min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(ranks=rank_lists, data=st.data())
def test_noise_free_base_delta_is_the_exact_dense_aggregate(ranks, data):
    tokens = data.draw(st.lists(st.integers(0, 1000), min_size=len(ranks), max_size=len(ranks)))
    copies = _het_copies(ranks, tokens, seed=len(ranks))
    result = NoiseFree().aggregate("m", copies)
    np.testing.assert_allclose(result.base_delta.numpy(), _dense_reference(copies), rtol=1e-10, atol=1e-10)
    for c in copies:
        fresh = result.adapters[c.holder]
        assert fresh.A.shape == (c.weights.rank, D_IN) and fresh.B.shape == (D_OUT, c.weights.rank)
        assert torch.equal(fresh.B, torch.zeros_like(fresh.B))
        assert fresh.A.abs().sum() > 0


def test_noise_free_fresh_a_is_seeded_per_holder_like_peft():
    copies = _het_copies([4, 4, 8], [1, 2, 3])
    first = NoiseFree(seed=7).aggregate("m", copies).adapters
    again = make_aggregator("noise_free", seed=7).aggregate("m", copies).adapters
    other_seed = NoiseFree(seed=8).aggregate("m", copies).adapters
    other_module = NoiseFree(seed=7).aggregate("m2", copies).adapters
    assert all(torch.equal(first[h].A, again[h].A) for h in first)
    assert not torch.equal(first["h0"].A, first["h1"].A)  # same rank, different holders
    assert not torch.equal(first["h0"].A, other_seed["h0"].A)
    assert not torch.equal(first["h0"].A, other_module["h0"].A)
    bound = 1 / np.sqrt(D_IN)  # kaiming_uniform_(a=sqrt(5)) on (r, d_in): U(-1/sqrt(d_in), 1/sqrt(d_in))
    assert all(float(a.A.abs().max()) <= bound for a in first.values())
    assert first["h2"].A.dtype == torch.float64


def test_zero_pad_matches_padded_weighted_average_reference():
    copies = _het_copies([2, 8, 4], [10, 30, 60])
    result = ZeroPad().aggregate("m", copies)
    assert result.base_delta is None
    r_max = 8
    pad_a = [np.pad(c.weights.A.numpy(), ((0, r_max - c.weights.rank), (0, 0))) for c in copies]
    pad_b = [np.pad(c.weights.B.numpy(), ((0, 0), (0, r_max - c.weights.rank))) for c in copies]
    weights = [c.tokens for c in copies]
    want_a = np.average(np.stack(pad_a), axis=0, weights=weights)
    want_b = np.average(np.stack(pad_b), axis=0, weights=weights)
    for c in copies:
        r = c.weights.rank
        np.testing.assert_allclose(result.adapters[c.holder].A.numpy(), want_a[:r], rtol=1e-12)
        np.testing.assert_allclose(result.adapters[c.holder].B.numpy(), want_b[:, :r], rtol=1e-12)


def test_svd_gives_each_holder_the_best_approximation_at_its_rank():
    copies = _het_copies([1, 2, 8], [5, 3, 2])  # W has rank min(d_out, d_in) = 5
    result = SvdTruncate().aggregate("m", copies)
    assert result.base_delta is None
    want = _dense_reference(copies)
    singular = np.linalg.svd(want, compute_uv=False)
    for c in copies:
        adapter = result.adapters[c.holder]
        r = c.weights.rank
        assert adapter.A.shape == (r, D_IN) and adapter.B.shape == (D_OUT, r)
        got = adapter.delta(c.scale).numpy()
        if r >= np.linalg.matrix_rank(want):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
        else:  # Eckart-Young: the error is exactly the norm of the dropped singular values
            np.testing.assert_allclose(np.linalg.norm(want - got), np.linalg.norm(singular[r:]), rtol=1e-10)
            assert np.linalg.matrix_rank(got) == r


def test_svd_float32_within_tolerance():
    copies = _het_copies([4, 16], [1, 1], dtype=torch.float32)
    result = SvdTruncate().aggregate("m", copies)
    want = _dense_reference(copies)
    np.testing.assert_allclose(result.adapters["h1"].delta(copies[1].scale).numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["noise_free", "zero_pad", "svd"])
def test_heterogeneous_aggregators_reject_poison_and_mismatched_shapes(name):
    aggregator = make_aggregator(name)
    assert aggregator.name == name
    copies = _het_copies([2, 4], [1, 1])
    copies[1].weights.A[0, 0] = float("nan")
    with pytest.raises(AggregationError, match="m from h1: A contains NaN or Inf"):
        aggregator.aggregate("m", copies)
    wide_a, wide_b = torch.randn(2, D_IN + 1, dtype=torch.float64), torch.randn(D_OUT, 2, dtype=torch.float64)
    wide = AdapterCopy("wide", LoraWeights(wide_a, wide_b), 1)
    with pytest.raises(AggregationError, match=r"m from wide: adapts a \(5, 7\) weight"):
        aggregator.aggregate("m", [*_het_copies([2], [1]), wide])
    not_a_pair = AdapterCopy("bad", LoraWeights(torch.randn(2, D_IN), torch.randn(D_OUT, 3)), 1)
    with pytest.raises(AggregationError, match="m from bad: .* is not a LoRA pair"):
        aggregator.aggregate("m", [not_a_pair])
    with pytest.raises(AggregationError, match="nothing to aggregate"):
        aggregator.aggregate("m", [])


def test_every_named_aggregator_is_made_and_unknown_lists_choices():
    assert {make_aggregator(name).name for name in AGGREGATORS} == {"noise_free", "fedavg", "zero_pad", "svd"}
    with pytest.raises(ValueError, match="choose from noise_free, fedavg, zero_pad, svd"):
        make_aggregator("flexlora")
