"""noise_free's warm start (`federation.noise_free_start=warm`): the aggregate stays exact, each
holder's next adapter is the best rank-r_i approximation of the copies' aggregate, and the rest is
in that holder's own frozen weight, so every holder computes base + Delta; cold stays as it was."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st

from splitpeft.aggregation.base import AdapterCopy
from splitpeft.aggregation.noise_free import NoiseFree, product_svd
from splitpeft.aggregation.registry import make_aggregator
from splitpeft.config import ConfigError
from splitpeft.federation.fleet import modules_in
from splitpeft.federation.simulation import Simulation
from splitpeft.model.adapters import ADAPTER_NAME, LoraWeights, lora_ab, lora_layers

D_OUT, D_IN = 7, 9
ALPHA = 16.0


def _copies(ranks, tokens, seed=0, started=True):
    """Copies at mixed ranks, each with the (non-zero, unless `started` is False) adapter it started from."""
    g = torch.Generator().manual_seed(seed)

    def pair(r):
        return LoraWeights(torch.randn(r, D_IN, generator=g, dtype=torch.float64),
                           torch.randn(D_OUT, r, generator=g, dtype=torch.float64))

    copies = []
    for i, (r, t) in enumerate(zip(ranks, tokens)):
        start = pair(r) if started else LoraWeights(torch.zeros(r, D_IN, dtype=torch.float64),
                                                     torch.zeros(D_OUT, r, dtype=torch.float64))
        copies.append(AdapterCopy(f"h{i}", pair(r), t, scale=ALPHA / r, start=start))
    return copies


def _weights(copies):
    tokens = np.array([c.tokens for c in copies], dtype=float)
    return tokens / tokens.sum() if tokens.sum() > 0 else np.full(len(copies), 1 / len(copies))


def _dense(weights, scale):
    return scale * (weights.B.numpy() @ weights.A.numpy())


def _aggregate_reference(copies):
    """(P, Delta) by an independent numpy loop: P = sum p_i s_i B_i A_i, Delta = P - sum p_i s_i B0_i A0_i."""
    p = _weights(copies)
    aggregate = sum(pi * _dense(c.weights, c.scale) for pi, c in zip(p, copies))
    started = sum(pi * _dense(c.start, c.scale) for pi, c in zip(p, copies))
    return aggregate, aggregate - started


rank_lists = st.lists(st.sampled_from([1, 2, 3, 4, 8, 16]), min_size=1, max_size=4)


@settings(max_examples=40, deadline=None)
@given(ranks=rank_lists, data=st.data())
def test_warm_keeps_every_holder_at_base_plus_the_exact_aggregate(ranks, data):
    tokens = data.draw(st.lists(st.integers(1, 1000), min_size=len(ranks), max_size=len(ranks)))
    copies = _copies(ranks, tokens, seed=len(ranks) + sum(ranks))
    result = NoiseFree(start="warm").aggregate("m", copies)
    aggregate, delta = _aggregate_reference(copies)
    assert result.adapters_in_base
    np.testing.assert_allclose(result.base_delta.numpy(), delta, rtol=1e-10, atol=1e-10)
    base = np.random.default_rng(0).standard_normal((D_OUT, D_IN))
    for c in copies:
        warm = result.adapters[c.holder]
        assert warm.A.shape == (c.weights.rank, D_IN) and warm.B.shape == (D_OUT, c.weights.rank)
        product = _dense(warm, c.scale)
        own_frozen = base + delta - product  # what the holder trains against (Party.load)
        np.testing.assert_allclose(own_frozen + product, base + delta, rtol=1e-12, atol=1e-12)
        # the adapter is the best rank-r approximation of P: what is left is exactly the tail
        singular = np.linalg.svd(aggregate, compute_uv=False)
        tail = np.sqrt((singular[c.weights.rank:] ** 2).sum())
        np.testing.assert_allclose(np.linalg.norm(aggregate - product), tail, rtol=1e-8, atol=1e-9)
        u, s, vh = np.linalg.svd(aggregate, full_matrices=False)
        k = min(c.weights.rank, len(s))
        np.testing.assert_allclose(product, (u[:, :k] * s[:k]) @ vh[:k], rtol=1e-8, atol=1e-9)
        assert float(warm.B.abs().max()) > 0  # training goes on from a non-zero adapter


@settings(max_examples=25, deadline=None)
@given(ranks=rank_lists, data=st.data())
def test_lora_factors_give_the_same_product_with_a_at_the_fresh_rows_norm(ranks, data):
    """noise_free_factors=lora: s B A is the balanced split's (the top-r SVD of P), A's row j is V_j at
    the norm of the fresh adapter's row j, and B carries the singular values."""
    tokens = data.draw(st.lists(st.integers(1, 1000), min_size=len(ranks), max_size=len(ranks)))
    copies = _copies(ranks, tokens, seed=7 + len(ranks) + sum(ranks))
    balanced = NoiseFree(start="warm").aggregate("m", copies)
    lora = NoiseFree(start="warm", factors="lora").aggregate("m", copies)
    np.testing.assert_array_equal(lora.base_delta.numpy(), balanced.base_delta.numpy())
    aggregate, _ = _aggregate_reference(copies)
    u, singular, vh = np.linalg.svd(aggregate, full_matrices=False)
    for c in copies:
        one, two = balanced.adapters[c.holder], lora.adapters[c.holder]
        np.testing.assert_allclose(_dense(two, c.scale), _dense(one, c.scale), rtol=1e-8, atol=1e-9)
        fresh = NoiseFree(start="cold").aggregate("m", copies).adapters[c.holder]  # the same seeded fresh A
        k = min(c.weights.rank, len(singular))
        np.testing.assert_allclose(np.linalg.norm(two.A[:k].numpy(), axis=1), np.linalg.norm(fresh.A[:k].numpy(), axis=1),
                                   rtol=1e-6)
        directions = two.A[:k].numpy() / np.linalg.norm(two.A[:k].numpy(), axis=1, keepdims=True)
        np.testing.assert_allclose(np.abs((directions * vh[:k]).sum(axis=1)), 1.0, rtol=1e-6)  # rows along V's
        np.testing.assert_allclose(np.linalg.norm(two.B[:, :k].numpy(), axis=0) * np.linalg.norm(two.A[:k].numpy(), axis=1),
                                   singular[:k] / c.scale, rtol=1e-6)


def test_own_a_keeps_each_holders_a_and_fits_b_to_the_aggregate_in_its_row_space():
    copies = _copies([2, 3, 8], [4, 1, 2], seed=11)
    result = NoiseFree(start="warm", factors="own_a").aggregate("m", copies)
    aggregate, delta = _aggregate_reference(copies)
    np.testing.assert_allclose(result.base_delta.numpy(), delta, rtol=1e-10, atol=1e-10)
    for c in copies:
        adapter = result.adapters[c.holder]
        assert torch.equal(adapter.A, c.weights.A)
        a = c.weights.A.numpy()
        projected = aggregate @ np.linalg.pinv(a) @ a  # P onto the inputs A reads
        np.testing.assert_allclose(_dense(adapter, c.scale), projected, rtol=1e-8, atol=1e-9)
        # the least-squares optimum: the residual is orthogonal to A's row space
        np.testing.assert_allclose((aggregate - _dense(adapter, c.scale)) @ a.T, 0, atol=1e-8)


def test_mean_a_fits_b_in_the_row_space_of_the_holders_averaged_a():
    """mean_a: every holder restarts from the first r_h rows of the token-weighted, zero-padded average
    of the A's (HetLoRA's A) with B the least-squares fit of the exact aggregate there; the base delta is
    the exact one, as with every warm start."""
    copies = _copies([2, 3, 8], [4, 1, 2], seed=12)
    result = NoiseFree(start="warm", factors="mean_a").aggregate("m", copies)
    aggregate, delta = _aggregate_reference(copies)
    np.testing.assert_allclose(result.base_delta.numpy(), delta, rtol=1e-10, atol=1e-10)
    p = _weights(copies)
    shared = sum(pi * np.pad(c.weights.A.numpy(), ((0, 8 - c.weights.rank), (0, 0))) for pi, c in zip(p, copies))
    for c in copies:
        adapter = result.adapters[c.holder]
        a = shared[: c.weights.rank]
        np.testing.assert_allclose(adapter.A.numpy(), a, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(_dense(adapter, c.scale), aggregate @ np.linalg.pinv(a) @ a, rtol=1e-8, atol=1e-9)


def test_mean_a_is_fedavg_where_the_holders_share_one_a():
    """Equal ranks and one A (every holder's first round starts from the same initial A, and B moves
    first): B is the token-weighted average of the B's, as FedAvg's, s B A is the aggregate exactly,
    and the frozen weight takes only what the round changed beyond the start (here, from B = 0: all of it)."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, D_IN, generator=g, dtype=torch.float64)
    tokens = [3, 1, 2]
    copies = [AdapterCopy(f"h{i}", LoraWeights(a.clone(), torch.randn(D_OUT, 4, generator=g, dtype=torch.float64)), t,
                          scale=ALPHA / 4, start=LoraWeights(a.clone(), torch.zeros(D_OUT, 4, dtype=torch.float64)))
              for i, t in enumerate(tokens)]
    result = NoiseFree(start="warm", factors="mean_a").aggregate("m", copies)
    mean_b = sum(pi * c.weights.B for pi, c in zip(_weights(copies), copies))
    aggregate, delta = _aggregate_reference(copies)
    np.testing.assert_allclose(result.base_delta.numpy(), delta, rtol=1e-10, atol=1e-10)
    for c in copies:
        torch.testing.assert_close(result.adapters[c.holder].A, a, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result.adapters[c.holder].B, mean_b, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(_dense(result.adapters[c.holder], c.scale), aggregate, rtol=1e-9, atol=1e-10)


def test_factors_need_noise_free_warm():
    with pytest.raises(ConfigError, match="noise_free_factors=lora needs federation.noise_free_start=warm"):
        tiny_config("tiny-llama", "federation.aggregator=noise_free", "federation.noise_free_factors=lora")
    with pytest.raises(ConfigError, match="noise_free_factors=own_a needs federation.noise_free_start=warm"):
        tiny_config("tiny-llama", "federation.aggregator=noise_free", "federation.noise_free_factors=own_a")
    with pytest.raises(ValueError, match="noise_free's option"):
        make_aggregator("zero_pad", noise_free_factors="lora")
    with pytest.raises(ValueError, match="noise_free factors 'tall'"):
        NoiseFree(start="warm", factors="tall")  # type: ignore[arg-type]


def test_ranks_beyond_the_aggregate_start_fresh_not_dead():
    """A holder whose rank exceeds the aggregate's (here min(d_out, d_in) = 7 < 16) gets its
    extra slots as a fresh adapter's (A random, B = 0): they add nothing and can still learn."""
    copies = _copies([16, 2], [3, 1])
    warm = NoiseFree(start="warm").aggregate("m", copies).adapters["h0"]
    assert torch.equal(warm.B[:, D_OUT:], torch.zeros(D_OUT, 16 - D_OUT, dtype=warm.B.dtype))
    assert bool((warm.A[D_OUT:].abs().sum(dim=1) > 0).all())


def test_product_svd_equals_the_svd_of_the_dense_product():
    g = torch.Generator().manual_seed(3)
    left, right = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)  # rank 6 of a (40, 30) product
    u, s, vh = product_svd(left, right)
    assert u.shape == (40, 6) and s.shape == (6,) and vh.shape == (6, 30)
    dense = (left @ right).double()
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(dense.numpy(), compute_uv=False)[:6], rtol=1e-6)
    np.testing.assert_allclose(((u * s) @ vh).numpy(), dense.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose((u.T @ u).numpy(), np.eye(6), atol=1e-10)
    np.testing.assert_allclose((vh @ vh.T).numpy(), np.eye(6), atol=1e-10)


def test_cold_is_unchanged_by_the_option():
    """Cold (the default) still merges sum p_i s_i B_i A_i and restarts every holder at B = 0;
    warm after a cold start (B0 = 0) merges the very same delta."""
    copies = _copies([2, 4, 8], [5, 1, 3], started=False)
    default = NoiseFree().aggregate("m", copies)
    cold = make_aggregator("noise_free", noise_free_start="cold").aggregate("m", copies)
    warm = make_aggregator("noise_free", noise_free_start="warm").aggregate("m", copies)
    aggregate, _ = _aggregate_reference(copies)
    assert not default.adapters_in_base and not cold.adapters_in_base
    for result in (default, cold):
        np.testing.assert_allclose(result.base_delta.numpy(), aggregate, rtol=1e-10, atol=1e-10)
        assert all(torch.equal(w.B, torch.zeros_like(w.B)) for w in result.adapters.values())
    assert all(torch.equal(default.adapters[h].A, cold.adapters[h].A) for h in default.adapters)
    np.testing.assert_allclose(warm.base_delta.numpy(), aggregate, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="noise_free's option"):
        make_aggregator("svd", noise_free_start="warm")


def test_warm_needs_noise_free_and_keep_needs_warm():
    with pytest.raises(ConfigError, match="noise_free_start=warm needs federation.aggregator=noise_free"):
        tiny_config("tiny-llama", "federation.noise_free_start=warm")
    with pytest.raises(ConfigError, match="noise_free_moments=keep needs federation.noise_free_start=warm"):
        tiny_config("tiny-llama", "federation.aggregator=noise_free", "federation.noise_free_moments=keep")
    with pytest.raises(ConfigError, match="dlora"):
        tiny_config("tiny-llama", "federation.aggregator=noise_free", "federation.noise_free_start=warm",
                    "placement.placement=dlora")


# --- in the federation: devices and server sessions at mixed ranks on the tiny model ---

BASE = ["federation.aggregator=noise_free", "federation.num_devices=2", "federation.local_steps=2",
        "data.max_length=48"]


def _mixed_rank_sim(*overrides):
    """device-0 at split 1 with rank 2, device-1 at split 3 with rank 8; the server sessions at
    lora.rank (4): block 0 has ranks 2 and 8, blocks 1-2 ranks 4 and 8, block 3 rank 4 twice."""
    sim = Simulation(tiny_config("tiny-llama", *BASE, *overrides))
    for index, (split, rank) in enumerate(((1, 2), (3, 8))):
        ranks = {name: rank for name in modules_in(sim.ranks, sim.backbone, range(split))}
        sim.devices[index] = sim.build_device(index, split, ranks)
    return sim


def _parties(sim):
    """(holder, party) of every device and every server session."""
    return [(d.device_id, d) for d in sim.devices] + [(f"server/{d}", s) for d, s in sorted(sim.server.sessions.items())]


def _load_next_round(sim):
    for holder, party in _parties(sim):
        party.load(sim.state.start_state(holder, party.ranks))


def _effective_weights(party):
    """Module -> the weight the party computes with: its frozen weight + s B A, (d_out, d_in)."""
    out = {}
    for name, layer in lora_layers(party.model).items():
        a, b = lora_ab(layer)
        out[name] = party.shell.frozen_weight(name).detach().double() + layer.scaling[ADAPTER_NAME] * (b.double() @ a.double())
    return out


def test_warm_federation_keeps_every_holder_at_the_global_model_and_trains_on():
    """Fails on the old code (no warm start: every holder restarted at B = 0). After a warm
    aggregation each device and server session holds a non-zero adapter at its own rank, and its
    frozen weight + s B A is the global model's weight (base + merged) for every module it adapts."""
    sim = _mixed_rank_sim("federation.noise_free_start=warm")
    shared = {name: sim.state.base.get_submodule(name).weight.detach().clone() for name in sim.ranks}
    first = sim.run_round()
    assert first.rejected == []
    _load_next_round(sim)
    global_model = sim.global_model()
    ranks_seen = set()
    for holder, party in _parties(sim):
        for name, weight in _effective_weights(party).items():
            want = global_model.get_submodule(name).weight.detach().double()
            torch.testing.assert_close(weight, want, rtol=0, atol=1e-6)
            adapter = sim.state.holder_state[holder][name]
            assert adapter.rank == party.ranks[name] and float(adapter.B.abs().max()) > 0, (holder, name)
            ranks_seen.add(adapter.rank)
    assert ranks_seen == {2, 4, 8}
    # the shared frozen weights moved by the exact aggregate, and the global model is them alone
    for name in sim.ranks:
        merged = sim.state.base.get_submodule(name).weight.detach()
        torch.testing.assert_close(merged, shared[name] + sim.state.merged[name])
        assert sim.state.global_delta(name) is None
    second = sim.run_round()
    losses = [loss for stats in second.devices.values() for loss in stats.losses]
    assert len(losses) == 4 and all(np.isfinite(losses))


@pytest.mark.parametrize("factors", ["balanced", "lora", "own_a", "mean_a"])
def test_warm_and_cold_compute_the_same_model_at_the_round_boundary(factors):
    """Round 1 is the same in both (every start has B = 0), so the merged model is; round 2's
    first step then sees the same function in both, whatever adapter each holder carries."""
    cold = _mixed_rank_sim()
    warm = _mixed_rank_sim("federation.noise_free_start=warm", f"federation.noise_free_factors={factors}")
    for sim in (cold, warm):
        sim.run_round()
        sim.run_round()
    for device_id in ("device-0", "device-1"):
        one, two = cold.rounds[0].devices[device_id].losses, warm.rounds[0].devices[device_id].losses
        assert one == pytest.approx(two, rel=1e-6)
        first_cold, first_warm = cold.rounds[1].devices[device_id].losses[0], warm.rounds[1].devices[device_id].losses[0]
        assert first_cold == pytest.approx(first_warm, rel=1e-5)
    # and they train differently from there
    assert cold.rounds[1].devices["device-1"].losses[1] != pytest.approx(warm.rounds[1].devices["device-1"].losses[1], rel=1e-7)


@pytest.mark.parametrize(("moments", "kept"), [("reset", False), ("keep", True)])
def test_warm_moments_are_reset_or_kept_as_configured(moments, kept):
    sim = Simulation(tiny_config("tiny-llama", *BASE, "federation.noise_free_start=warm",
                                 f"federation.noise_free_moments={moments}"))
    sim.run_round()
    device = sim.devices[0]
    assert device.optimizer is not None and device.optimizer.state
    before = {id(p): state["exp_avg"].clone() for p, state in device.optimizer.state.items()}
    device.load(sim.state.start_state(device.device_id, device.ranks))
    assert bool(device.optimizer.state) == kept
    for p, state in device.optimizer.state.items():
        assert torch.equal(state["exp_avg"], before[id(p)])
    sim.run_round()  # and training goes on


@pytest.mark.parametrize("factors", ["balanced", "mean_a"])
def test_low_rank_frozen_weights_train_as_the_copies_do_without_holding_them(factors):
    """`federation.noise_free_frozen=low_rank`: a warm holder computes W x - s B0 (A0 x) on the
    shared W instead of holding its own W - s B0 A0 per module. Over three rounds at mixed ranks
    (server sessions one at a time) the losses and the global model equal the copies' to fp32
    rounding; at the round boundary every party's layer computes the global model's function; and
    no party holds a (d_out, d_in) copy, only the factors."""
    overrides = ("federation.noise_free_start=warm", f"federation.noise_free_factors={factors}")
    copy = _mixed_rank_sim(*overrides)
    low_rank = _mixed_rank_sim(*overrides, "federation.noise_free_frozen=low_rank")
    for sim in (copy, low_rank):
        for _ in range(3):
            sim.run_round()
    for record_copy, record_low in zip(copy.rounds, low_rank.rounds):
        for device_id, stats in record_copy.devices.items():
            assert record_low.devices[device_id].losses == pytest.approx(stats.losses, rel=1e-5)
    for name in copy.ranks:
        torch.testing.assert_close(low_rank.global_model().get_submodule(name).weight,
                                   copy.global_model().get_submodule(name).weight, rtol=0, atol=1e-5)
    _load_next_round(low_rank)
    global_model = low_rank.global_model()
    for holder, party in _parties(low_rank):
        values = sum(r * sum(party.shell.shared_weights[n].shape) for n, r in party.ranks.items())
        assert sum(t.numel() for t in party.warm_copies()) == values, holder  # A0 and B0 alone (fp32)
        for name, layer in lora_layers(party.model).items():
            assert layer.get_base_layer().weight is party.shell.shared_weights[name], (holder, name)  # no copy of W
            x = torch.randn(3, 5, layer.get_base_layer().in_features)
            torch.testing.assert_close(layer(x), global_model.get_submodule(name)(x), rtol=0, atol=1e-5)
    _load_next_round(copy)
    for party in copy.devices:  # the copies: one (d_out, d_in) weight per adapted module (a server session defers its own)
        holder = party.device_id
        assert [t.shape for t in party.warm_copies()] == [w.shape for w in party.shell.shared_weights.values()], holder


def test_low_rank_frozen_needs_a_warm_start():
    with pytest.raises(ConfigError, match="noise_free_frozen=low_rank needs federation.noise_free_start=warm"):
        tiny_config("tiny-llama", *BASE, "federation.noise_free_frozen=low_rank")
