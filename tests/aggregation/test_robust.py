"""Robust aggregation (aggregation/robust.py) against independent numpy references, and a fuzz
test of what aggregation accepts from devices (federation/state.py `GlobalState.aggregate`)."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from splitpeft.aggregation.base import AdapterCopy, Aggregate
from splitpeft.aggregation.fedavg import FedAvg
from splitpeft.aggregation.noise_free import NoiseFree
from splitpeft.aggregation.registry import make_aggregator
from splitpeft.aggregation.robust import CoordinateMedian, MedianClip, TrimmedMean, product_update_terms
from splitpeft.aggregation.svd import SvdTruncate
from splitpeft.config import ConfigError, RobustConfig, load_config
from splitpeft.federation.state import GlobalState
from splitpeft.model.adapters import LoraWeights
from splitpeft.model.loading import load_model

D_OUT, D_IN, RANK, ALPHA = 5, 6, 4, 8.0


def _copies(n, *, seed=0, start=None, rank=RANK, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        AdapterCopy(f"h{i}", LoraWeights(torch.randn(rank, D_IN, generator=g, dtype=dtype),
                                         torch.randn(D_OUT, rank, generator=g, dtype=dtype)),
                    10 + i, scale=ALPHA / rank, start=start)
        for i in range(n)
    ]


def _dense_update(c):
    """s B A - s B0 A0 by numpy, densely."""
    a0, b0 = (np.zeros(c.weights.A.shape), np.zeros(c.weights.B.shape)) if c.start is None else \
        (c.start.A.numpy(), c.start.B.numpy())
    return c.scale * (c.weights.B.numpy() @ c.weights.A.numpy() - b0 @ a0)


# ------------------------------------------------------------------------------------ trimmed mean, median


@pytest.mark.parametrize("n", [3, 4, 5, 8])
def test_trimmed_mean_and_median_match_numpy_per_coordinate(n):
    copies = _copies(n, seed=n)
    stack_a = np.stack([c.weights.A.numpy() for c in copies])
    stack_b = np.stack([c.weights.B.numpy() for c in copies])
    k = min(math.ceil(0.2 * n), (n - 1) // 2)
    trimmed = TrimmedMean(0.2).aggregate("m", copies).adapters["h0"]
    np.testing.assert_allclose(trimmed.A.numpy(), np.sort(stack_a, axis=0)[k: n - k].mean(0), rtol=1e-12)
    np.testing.assert_allclose(trimmed.B.numpy(), np.sort(stack_b, axis=0)[k: n - k].mean(0), rtol=1e-12)
    median = CoordinateMedian().aggregate("m", copies)
    np.testing.assert_allclose(median.adapters["h1"].A.numpy(), np.median(stack_a, axis=0), rtol=1e-12)
    np.testing.assert_allclose(median.adapters["h1"].B.numpy(), np.median(stack_b, axis=0), rtol=1e-12)
    assert median.base_delta is None and len({id(w) for w in median.adapters.values()}) == 1


def test_the_median_ignores_one_wild_copy_per_coordinate():
    copies = _copies(5)
    wild = copies[2]
    copies[2] = AdapterCopy(wild.holder, LoraWeights(wild.weights.A * 1e3, -wild.weights.B * 1e3), wild.tokens, wild.scale)
    honest = [c for i, c in enumerate(copies) if i != 2]
    got = CoordinateMedian().aggregate("m", copies).adapters["h0"]
    lo = np.min(np.stack([c.weights.A.numpy() for c in honest]), axis=0)
    hi = np.max(np.stack([c.weights.A.numpy() for c in honest]), axis=0)
    assert np.all((got.A.numpy() >= lo) & (got.A.numpy() <= hi))


# ------------------------------------------------------------------------------------ clipping


def test_clipping_leaves_copies_within_the_limit_untouched():
    copies = _copies(4)
    for inner in (NoiseFree(seed=3), FedAvg(), SvdTruncate()):
        plain = inner.aggregate("m", copies)
        clipped = MedianClip(inner, factor=1e6).aggregate("m", copies)
        assert clipped.clipped == []
        for holder in plain.adapters:
            assert torch.equal(plain.adapters[holder].A, clipped.adapters[holder].A)
            assert torch.equal(plain.adapters[holder].B, clipped.adapters[holder].B)
        if plain.base_delta is not None:
            assert torch.equal(plain.base_delta, clipped.base_delta)


def test_noise_free_clips_an_outlier_product_to_c_times_the_median_exactly():
    copies = _copies(4)
    big = copies[3]
    copies[3] = AdapterCopy(big.holder, LoraWeights(big.weights.A, big.weights.B * 100), big.tokens, big.scale)
    result = MedianClip(NoiseFree(), factor=2.0).aggregate("m", copies)
    norms = [np.linalg.norm(_dense_update(c)) for c in copies]
    limit = 2.0 * np.median(norms)
    [clip] = result.clipped
    assert (clip.holder, clip.module, clip.on) == ("h3", "m", "BA")
    assert clip.factor == pytest.approx(limit / norms[3], rel=1e-9) and clip.limit == pytest.approx(limit, rel=1e-9)
    p = np.array([c.tokens for c in copies], dtype=float) / sum(c.tokens for c in copies)
    scaled = [1, 1, 1, limit / norms[3]]
    want = sum(pi * f * _dense_update(c) for pi, f, c in zip(p, scaled, copies))
    np.testing.assert_allclose(result.base_delta.numpy(), want, rtol=1e-9, atol=1e-12)


def test_a_clipped_update_from_a_nonzero_start_has_exactly_the_limit_norm():
    """Products with B0 != 0 (svd's next rounds): A and B move back toward the start until the
    dense update s B A - s B0 A0 is c x the median."""
    g = torch.Generator().manual_seed(1)
    start = LoraWeights(torch.randn(RANK, D_IN, generator=g, dtype=torch.float64),
                        torch.randn(D_OUT, RANK, generator=g, dtype=torch.float64))
    copies = [AdapterCopy(f"h{i}", LoraWeights(start.A + 0.1 * torch.randn(RANK, D_IN, generator=g, dtype=torch.float64),
                                                start.B + 0.1 * torch.randn(D_OUT, RANK, generator=g, dtype=torch.float64)),
                          10, scale=ALPHA / RANK, start=start) for i in range(3)]
    wild = copies[0]
    copies[0] = AdapterCopy("h0", LoraWeights(wild.weights.A * 20, wild.weights.B * -20), 10, wild.scale, start=start)
    seen = []

    class Spy:
        name, shared_adapter, averages_factors, warm_restarts = "spy", False, False, False

        def aggregate(self, module, given):
            seen.extend(given)
            return Aggregate({c.holder: c.weights for c in given})

    result = MedianClip(Spy(), factor=1.5).aggregate("m", copies)
    limit = 1.5 * np.median([np.linalg.norm(_dense_update(c)) for c in copies])
    assert [c.holder for c in result.clipped] == ["h0"]
    assert np.linalg.norm(_dense_update(seen[0])) == pytest.approx(limit, rel=1e-6)
    assert seen[1] is copies[1] and seen[2] is copies[2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_product_update_terms_equal_the_dense_ones(dtype):
    """(||X||^2, <X, Y>, ||Y||^2) from the two Gram matrices equal numpy's dense X = s (dB A0 + B0 dA)
    and Y = s dB dA, from a nonzero start and from none."""
    g = torch.Generator().manual_seed(3)
    start = LoraWeights(torch.randn(RANK, D_IN, generator=g, dtype=dtype), torch.randn(D_OUT, RANK, generator=g, dtype=dtype))
    for copy_ in (*_copies(2, seed=4, start=start, dtype=dtype), *_copies(1, seed=5, dtype=dtype)):
        a, b = (t.double().numpy() for t in copy_.weights)
        a0, b0 = (np.zeros(a.shape), np.zeros(b.shape)) if copy_.start is None else \
            (copy_.start.A.double().numpy(), copy_.start.B.double().numpy())
        x = copy_.scale * ((b - b0) @ a0 + b0 @ (a - a0))
        y = copy_.scale * (b - b0) @ (a - a0)
        want = (float((x * x).sum()), float((x * y).sum()), float((y * y).sum()))
        assert product_update_terms(copy_) == pytest.approx(want, rel=1e-9, abs=1e-9)
        assert math.isclose(math.sqrt(sum(want) + want[1]), np.linalg.norm(_dense_update(copy_)), rel_tol=1e-6)


def test_fedavg_clips_the_factors_even_when_the_product_update_is_zero():
    """FedAvg averages A and B apart: an A x 1e3 with B = B0 = 0 has no product update of its own
    yet multiplies the global product (mean B) (mean A); its A update is what must be clipped."""
    start = LoraWeights(torch.ones(RANK, D_IN, dtype=torch.float64), torch.zeros(D_OUT, RANK, dtype=torch.float64))
    copies = [AdapterCopy(c.holder, LoraWeights(start.A + 0.01 * c.weights.A, 0.01 * c.weights.B), c.tokens, c.scale, start=start)
              for c in _copies(4)]
    copies[1] = AdapterCopy("h1", LoraWeights(start.A * 1e3, start.B.clone()), 10, ALPHA / RANK, start=start)
    result = MedianClip(FedAvg(), factor=4.0).aggregate("m", copies)
    assert [(c.holder, c.on) for c in result.clipped] == [("h1", "A")]
    a_updates = [np.linalg.norm(c.weights.A.numpy() - start.A.numpy()) for c in copies]
    limit = 4.0 * np.median(a_updates)
    merged = result.adapters["h0"]
    assert np.linalg.norm(merged.A.numpy() - start.A.numpy()) <= limit  # the mean of updates within the limit
    unclipped = FedAvg().aggregate("m", copies).adapters["h0"]
    assert np.linalg.norm(unclipped.A.numpy() - start.A.numpy()) > 100 * limit


def test_robust_settings_are_named_policies_checked_by_the_config():
    assert isinstance(make_aggregator("noise_free", robust=RobustConfig()), MedianClip)
    assert isinstance(make_aggregator("fedavg", robust=RobustConfig(clip="none", combine="median")), CoordinateMedian)
    trimmed = make_aggregator("fedavg", robust=RobustConfig(combine="trimmed_mean", trim_fraction=0.3))
    assert isinstance(trimmed, MedianClip) and isinstance(trimmed.inner, TrimmedMean) and trimmed.inner.fraction == 0.3
    assert isinstance(make_aggregator("svd"), SvdTruncate)  # no robust settings: the plain policy
    assert load_config(preset="tiny").robust == RobustConfig()  # on by default
    for bad, message in ((["robust.combine=median", "federation.aggregator=noise_free"], "needs federation.aggregator=fedavg"),
                         (["robust.clip_factor=0.5"], "robust.clip_factor"),
                         (["robust.trim_fraction=0.5"], "robust.trim_fraction"),
                         (["robust.clip=mean"], "robust.clip must be one of")):
        with pytest.raises(ConfigError, match=message):
            load_config(preset="tiny", overrides=bad)


# ------------------------------------------------------------------------------------ fuzz


MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]  # (32, 32) and (32, 64)
HONEST = ["device-0", "device-1", "server/device-0"]
POLICIES = {
    "fedavg": RobustConfig(), "noise_free": RobustConfig(), "zero_pad": RobustConfig(), "svd": RobustConfig(),
    "fedavg/trimmed_mean": RobustConfig(combine="trimmed_mean"), "fedavg/median": RobustConfig(combine="median"),
    "noise_free/unclipped": RobustConfig(clip="none"), "svd/unclipped": RobustConfig(clip="none"),
}


@pytest.fixture(scope="module")
def tiny_base():
    return load_model("tiny-llama", seed=0).model


# Weighted toward uploads that pass the checks, so that clipping and weighting are exercised too.
upload = st.fixed_dictionaries({
    "dtype": st.sampled_from([torch.float32] * 4 + [torch.float16, torch.float64, torch.bfloat16, torch.int32, torch.bool]),
    "rank": st.sampled_from(["given"] * 4 + ["other", 0]),
    "d_in": st.sampled_from([0] * 5 + [1, -1]),
    "d_out": st.sampled_from([0] * 5 + [1]),
    "scale": st.sampled_from([0.0, 1e-3, 1.0, 3.0, 30.0, -100.0, 1e3, 1e6, 1e30, math.nan, math.inf, -math.inf]),
    "tokens": st.sampled_from([100] * 4 + [0, -5, 1, 10**12, 10**30, math.nan, math.inf, 1.5, True]),
})


def _attacker_copy(holder, module, rank, d_out, d_in, spec, generator):
    r = {"given": rank, "other": rank + 1, 0: 0}[spec["rank"]]
    a = torch.randn(r, d_in + spec["d_in"], generator=generator) * spec["scale"]
    b = torch.randn(d_out + spec["d_out"], r, generator=generator) * spec["scale"]
    a, b = a.to(spec["dtype"]), b.to(spec["dtype"])
    return AdapterCopy(holder, LoraWeights(a, b), spec["tokens"], scale=ALPHA / r if r else math.nan)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy=st.sampled_from(sorted(POLICIES)), attackers=st.lists(st.lists(upload, min_size=1, max_size=2), min_size=1, max_size=3),
       seed=st.integers(0, 2**16))
def test_fuzz_no_upload_crashes_aggregation_or_drops_an_honest_device(tiny_base, policy, attackers, seed):
    """Whatever devices upload (dtypes, shapes, ranks, norms from 0 to 1e30, NaN, Inf, token
    counts 0, negative, huge, NaN): aggregation never raises, the global state stays finite, and
    the honest devices are never dropped and always counted."""
    base = copy.deepcopy(tiny_base)
    name = policy.split("/")[0]
    heterogeneous = name in ("noise_free", "zero_pad", "svd")
    state = GlobalState(base, MODULES, rank=RANK, alpha=ALPHA, seed=0,
                        aggregator=make_aggregator(name, seed=0, robust=POLICIES[policy]))
    generator = torch.Generator().manual_seed(seed)
    holders = HONEST + [f"device-{9 + i}" for i in range(len(attackers))]
    ranks = {h: (2 + 2 * (i % 3) if heterogeneous else RANK) for i, h in enumerate(holders)}
    given = {h: state.start_state(h, {m: ranks[h] for m in MODULES}) for h in holders}
    copies = {m: [] for m in MODULES}
    for holder in HONEST:  # a small trained step from what it was given
        for m in MODULES:
            a, b = given[holder][m]
            trained = LoraWeights(a + 1e-3 * torch.randn(a.shape, generator=generator),
                                  b + 1e-3 * torch.randn(b.shape, generator=generator))
            copies[m].append(AdapterCopy(holder, trained, 100 + len(holder), scale=ALPHA / ranks[holder]))
    for holder, specs in zip(holders[len(HONEST):], attackers):
        for m, spec in zip(MODULES, specs):
            d_out, d_in = state.global_adapters[m].B.shape[0], state.global_adapters[m].A.shape[1]
            copies[m].append(_attacker_copy(holder, m, ranks[holder], d_out, d_in, spec, generator))
    report = state.aggregate(copies)
    event(f"attackers dropped: {len(report.dropped)} of {len(attackers)}")
    event(f"updates clipped: {bool(report.clipped)}")
    assert not {"device-0", "device-1"} & set(report.dropped)
    for m in MODULES:
        assert {"device-0", "device-1", "server/device-0"} <= set(state.last_weights[m])
        assert all(math.isfinite(p) and p >= 0 for p in state.last_weights[m].values())
        tensors = [*state.global_adapters[m], *(t for h in state.holder_state.values() if m in h for t in h[m])]
        tensors += [state.merged[m]] if m in state.merged else []
        tensors.append(base.get_submodule(m).weight)
        assert all(bool(torch.isfinite(t).all()) for t in tensors), m
        assert all(t.dtype == torch.float32 for t in state.global_adapters[m])
    assert all(0 < clip.factor < 1 and math.isfinite(clip.norm) for clip in report.clipped)
