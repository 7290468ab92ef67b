"""Issue 22: updates written into a bf16 / fp16 frozen weight (noise-free merges, a warm start's
own W - s B A) are rounded stochastically, so a small update is kept in expectation instead of
dropped wherever it is below half a unit of the weight (nearest rounding)."""

import numpy as np
import pytest
import torch
from conftest import tiny_config

from splitpeft.federation.simulation import Simulation
from splitpeft.federation.state import add_to_weight
from splitpeft.model.adapters import LoraWeights
from splitpeft.model.runtime import _stochastic_bf16, stochastic_round, uniform_16_bits


def _kept(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor) -> float:
    """The share of `delta` that the change of the weight carries: <after - before, delta> / |delta|^2."""
    change = after.double() - before.double()
    return float((change * delta.double()).sum() / delta.double().pow(2).sum())


def test_stochastic_rounding_is_unbiased_deterministic_and_nearest_in_fp32():
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(128, 128, generator=generator) * 0.05).bfloat16().float()
    delta = torch.randn(128, 128, generator=generator) * 1e-5  # far below half a bf16 unit of weight
    nearest = (weight + delta).bfloat16().float()
    assert abs(_kept(weight, nearest, delta)) < 0.3  # nearest rounding drops most of the update
    draws = torch.stack([stochastic_round(weight + delta, torch.bfloat16, f"draw {i}").float() for i in range(64)])
    assert _kept(weight, draws.mean(dim=0), delta) == pytest.approx(1.0, abs=0.1)
    exact = weight + delta
    nearest_bf16 = exact.bfloat16()
    up, down = (torch.nextafter(nearest_bf16, torch.full_like(nearest_bf16, limit)).float() for limit in (torch.inf, -torch.inf))
    below = torch.where(nearest_bf16.float() <= exact, nearest_bf16.float(), down)
    above = torch.where(nearest_bf16.float() >= exact, nearest_bf16.float(), up)
    assert bool(((draws == below) | (draws == above)).all())  # each element lands on one of its two neighbours
    again = stochastic_round(weight + delta, torch.bfloat16, "draw 0")
    assert torch.equal(again.float(), draws[0])  # the same key and value: the same draws
    assert stochastic_round(weight + delta, torch.float16, "x").dtype == torch.float16
    assert torch.equal(stochastic_round(exact, torch.float32, "x"), exact)
    wide = exact.double() + delta.double() * 1e-3  # a float64 sum (an fp32 warm copy's W - s B A)
    assert torch.equal(stochastic_round(wide, torch.float32, "x"), wide.float())  # fp32: nearest, as before


def test_stochastic_bf16_rounding_of_negative_tiny_huge_and_non_finite_values():
    """The fp32 -> bf16 path rounds on the bits: negative values as unbiased as positive ones,
    subnormals too, infinities and NaN kept, and a finite value past the largest bf16 never
    rounded up to inf."""
    generator = torch.Generator().manual_seed(2)
    for scale in (-0.05, 1e-39):  # negative normals; subnormals (bf16 keeps fp32's exponent range)
        base = (torch.rand(64, 64, generator=generator) * scale).bfloat16()
        away = torch.nextafter(base, torch.full_like(base, torch.inf if scale > 0 else -torch.inf)).float()
        x = base.float() + torch.rand(64, 64, generator=generator) * (away - base.float())  # between two bf16s
        draws = torch.stack([stochastic_round(x, torch.bfloat16, f"d{i}").float() for i in range(256)])
        nearest = x.bfloat16().float()
        assert float((draws.mean(dim=0) - x).abs().mean()) < 0.25 * float((nearest - x).abs().mean())
    largest = torch.finfo(torch.bfloat16).max
    special = torch.tensor([torch.inf, -torch.inf, torch.nan, 0.0, -0.0, largest * 1.003, -largest * 1.003])
    for i in range(32):
        out = stochastic_round(special, torch.bfloat16, f"s{i}").float()
        assert out[0] == torch.inf and out[1] == -torch.inf and bool(out[2].isnan())
        assert out[3] == 0.0 and out[4] == 0.0
        assert out[5] == largest and out[6] == -largest


def test_the_16_bit_draws_are_uniform_deterministic_and_read_little_endian():
    draws = uniform_16_bits(200_001, seed=5)
    assert draws.dtype == torch.int32 and draws.shape == (200_001,)
    assert torch.equal(draws, uniform_16_bits(200_001, seed=5)) and not torch.equal(draws, uniform_16_bits(200_001, seed=6))
    assert int(draws.min()) >= 0 and int(draws.max()) < 1 << 16
    counts = torch.bincount(draws >> 12, minlength=16).double()  # 16 bins of 4096 values
    assert float((counts / counts.mean() - 1).abs().max()) < 0.03
    raw = np.random.PCG64(5).random_raw(1)
    first = int(raw[0])
    assert draws[:4].tolist() == [(first >> shift) & 0xFFFF for shift in (0, 16, 32, 48)]  # the low half first


def test_the_bf16_fast_path_rounds_as_the_guarded_one():
    """Where every |x| is at most the largest bf16 the selects for NaN and overflow are skipped;
    a NaN anywhere takes the guarded path, which rounds every other element the same way."""
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(4)) * 0.05
    fast = _stochastic_bf16(x, seed=9)
    guarded_input = x.clone()
    guarded_input[-1, -1] = torch.nan
    guarded = _stochastic_bf16(guarded_input, seed=9)
    assert torch.equal(fast.flatten()[:-1], guarded.flatten()[:-1]) and bool(guarded[-1, -1].isnan())
    assert _stochastic_bf16(torch.empty(0), seed=1).shape == (0,)


def test_three_small_merges_into_a_bf16_weight_keep_the_update():
    """The main job's case: one update merged a third at a time over three rounds. Nearest
    rounding loses it (on SmolLM2 the merged model's loss moved the wrong way: bench/bf16_merge.py);
    stochastic rounding keeps it in expectation."""
    generator = torch.Generator().manual_seed(1)
    original = (torch.randn(256, 256, generator=generator) * 0.05).bfloat16()
    delta = torch.randn(256, 1, generator=generator) @ torch.randn(1, 256, generator=generator) * 3e-5  # rank one
    weight, nearest = original.clone(), original.clone()
    for round_index in range(3):
        add_to_weight(weight, delta / 3, f"layers.0.q_proj round {round_index}")
        nearest.copy_((nearest.float() + delta / 3).bfloat16())
    assert _kept(original, nearest, delta) < 0.3
    assert _kept(original, weight, delta) == pytest.approx(1.0, abs=0.15)
    fp32 = original.float()
    add_to_weight(fp32, delta, "q")
    assert torch.equal(fp32, original.float() + delta)  # fp32 weights: plain addition, as before


def test_a_bf16_warm_start_trains_against_w_minus_its_own_adapter_not_w():
    """Noise-free's warm start gives each holder W - s B A as its frozen weight. With s B A below
    half a bf16 unit, nearest rounding gave back W, so the holder trained against W + s B A; now
    the holder's weight plus its adapter is W in expectation."""
    sim = Simulation(tiny_config("tiny-llama", "runtime.dtype=bf16", "federation.aggregator=noise_free",
                                 "federation.noise_free_start=warm", "federation.rounds=2"))
    sim.run_round()
    device = sim.devices[0]
    generator = torch.Generator().manual_seed(2)
    start = sim.state.start_state(device.device_id, device.ranks)
    small = {name: LoraWeights(torch.randn(w.A.shape, generator=generator) * 1e-2,
                               torch.randn(w.B.shape, generator=generator) * 1e-4) for name, w in start.items()}
    device.load(small)
    layers = device.shell.layers
    kept = []
    for name, weights in small.items():
        layer = layers[name]
        own, shared = layer.get_base_layer().weight, device._shared_weights[name]
        assert own is not shared and own.dtype == torch.bfloat16
        product = float(layer.scaling["default"]) * (weights.B @ weights.A)
        kept.append(_kept(shared, own, -product))
    assert sum(kept) / len(kept) == pytest.approx(1.0, abs=0.1)
