"""Defences on what a device sends: the Gaussian release, its accounting, NoPeek, and that a run
with each of them sends what the mechanism says."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_config

from splitpeft.config import ConfigError, load_config
from splitpeft.defences.cut import Defence, clip_rows, distance_correlation
from splitpeft.federation.simulation import Simulation
from splitpeft.transport.messages import Kind, decode


def test_clipping_bounds_every_row_and_leaves_short_rows_alone():
    x = torch.randn(4, 7, 16) * torch.tensor([0.01, 1.0, 10.0, 100.0])[:, None, None]
    clipped = clip_rows(x, 2.0)
    assert float(clipped.norm(dim=-1).max()) <= 2.0 + 1e-5
    assert torch.equal(clipped[0], x[0])  # norms ~0.04: untouched


def test_release_is_seeded_and_its_noise_has_the_stated_scale():
    x = torch.zeros(8, 64, 256)
    a = Defence(noise_multiplier=0.5, clip_norm=3.0, seed=1).release(x)
    b = Defence(noise_multiplier=0.5, clip_norm=3.0, seed=1).release(x)
    assert torch.equal(a, b)
    assert float(a.std()) == pytest.approx(0.5 * 3.0, rel=0.02)
    assert Defence().release(x) is x  # off by default


def test_distance_correlation_against_known_cases():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=generator)
    assert float(distance_correlation(x, 3 * x + 1)) == pytest.approx(1.0, abs=1e-4)
    y = torch.randn(200, 8, generator=generator)
    independent = float(distance_correlation(x, y))
    assert float(distance_correlation(x, x**2)) > independent  # dependence that correlation misses
    # An independent reference, written from the definition with numpy loops.
    xs, ys = x[:40].double().numpy(), (x[:40] ** 2 + 0.5 * y[:40]).double().numpy()

    def centred(z):
        n = len(z)
        a = np.array([[np.linalg.norm(z[i] - z[j]) for j in range(n)] for i in range(n)])
        return a - a.mean(axis=0)[None, :] - a.mean(axis=1)[:, None] + a.mean()

    a, b = centred(xs), centred(ys)
    reference = np.sqrt((a * b).mean() / np.sqrt((a * a).mean() * (b * b).mean()))
    assert float(distance_correlation(x[:40], x[:40] ** 2 + 0.5 * y[:40])) == pytest.approx(reference, rel=1e-4)


def _frames(*overrides):
    frames = []
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "federation.local_steps=2",
                                 "placement.labels_on_device=true", *overrides))
    sim.channels["device-0"].tap = lambda _d, direction, frame: frames.append((direction, decode(frame)))
    return sim, frames


def test_a_noisy_run_sends_clipped_noised_activations_and_head_gradients():
    clean_sim, clean = _frames("placement.split_layer=2")
    clean_sim.run_round()
    sim, noisy = _frames("placement.split_layer=2", "privacy.clip_norm=0.5", "privacy.noise_multiplier=2.0",
                         "privacy.gradient_clip_norm=0.5")
    sim.run_round()
    up = [m for d, m in noisy if d == "up" and m.kind == Kind.ACTIVATIONS]
    clean_up = [m for d, m in clean if d == "up" and m.kind == Kind.ACTIVATIONS]
    hidden, clean_hidden = up[0].tensors["hidden"], clean_up[0].tensors["hidden"]
    # Clipping to 0.5, then noise of std 2 x 0.5 per coordinate.
    assert float((hidden - clip_rows(clean_hidden, 0.5)).std()) == pytest.approx(1.0, rel=0.1)
    head = [m for d, m in noisy if d == "up" and m.kind == Kind.HEAD_GRADIENT][0].tensors["grad"]
    assert float(head.std()) == pytest.approx(1.0, rel=0.1)  # the head gradient is tiny, the noise is not
    assert all(math.isfinite(loss) for loss in sim.rounds[0].devices["device-0"].losses)


def test_noise_on_the_head_gradient_only_sends_clean_states_and_a_noised_head_gradient():
    clean_sim, clean = _frames("placement.split_layer=2")
    clean_sim.run_round()
    sim, noisy = _frames("placement.split_layer=2", "privacy.noise_multiplier=2.0", "privacy.gradient_clip_norm=0.5")
    sim.run_round()
    hidden = [m for d, m in noisy if d == "up" and m.kind == Kind.ACTIVATIONS][0].tensors["hidden"]
    clean_hidden = [m for d, m in clean if d == "up" and m.kind == Kind.ACTIVATIONS][0].tensors["hidden"]
    assert torch.equal(hidden, clean_hidden)  # the states go as they are
    head = [m for d, m in noisy if d == "up" and m.kind == Kind.HEAD_GRADIENT][0].tensors["grad"]
    assert float(head.std()) == pytest.approx(1.0, rel=0.1)


def test_clipping_per_sequence_bounds_each_rows_whole_release():
    x = torch.randn(3, 20, 16) * torch.tensor([0.001, 1.0, 10.0])[:, None, None]
    released = Defence(clip_norm=2.0, clip_per="sequence").release(x)
    norms = released.reshape(3, -1).norm(dim=1)
    assert float(norms.max()) <= 2.0 + 1e-5 and torch.equal(released[0], x[0])  # the small row untouched
    # one factor per row: token vectors keep their proportions (per-token clipping would not)
    ratio = released[2].norm(dim=-1) / x[2].norm(dim=-1)
    assert float(ratio.max() - ratio.min()) < 1e-5
    noisy = Defence(noise_multiplier=0.5, clip_norm=2.0, clip_per="sequence", seed=3).release(x)
    assert float((noisy - released).std()) == pytest.approx(1.0, rel=0.1)


def test_nopeek_changes_the_device_adapters_gradients_and_trains():
    base, _ = _frames("placement.split_layer=2")
    penalised, _ = _frames("placement.split_layer=2", "privacy.nopeek_weight=1.0")
    for sim in (base, penalised):
        sim.run_round()
    name = next(n for n in base.state.global_adapters if ".layers.0." in n)
    assert not torch.allclose(base.state.global_adapters[name].A, penalised.state.global_adapters[name].A)
    assert all(math.isfinite(loss) for loss in penalised.rounds[0].devices["device-0"].losses)


@pytest.mark.parametrize("overrides,message", [
    (["privacy.noise_multiplier=1"], "needs privacy.clip_norm"),
    (["privacy.gradient_clip_norm=1"], "set privacy.noise_multiplier"),
    (["privacy.clip_per=vector"], "clip_per"),
    (["privacy.nopeek_weight=1", "placement.split_layer=0"], "nopeek_weight trains device adapters"),
    (["privacy.clip_norm=1", "placement.placement=centralized"], "centralized sends nothing"),
    (["placement.dlora_device_blocks=2"], "dlora's hybrid"),
    (["privacy.attackers=[linear,oracle]"], "privacy.attackers: choose from"),
    (["hsplit.max_leakage=0.5"], "needs hsplit.leakage_table"),
])
def test_privacy_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(preset="tiny", overrides=overrides)
