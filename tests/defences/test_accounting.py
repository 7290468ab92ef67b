"""(epsilon, delta) of the Gaussian release from dp-accounting: the tight figure is the one the
closed form of Gaussian differential privacy gives and the library's PLD accountant agrees with,
the Renyi bound lies above it, and every run's report carries it."""

import math

import dp_accounting
import pytest
from conftest import tiny_config
from dp_accounting.pld import PLDAccountant

from splitpeft.config import load_config
from splitpeft.defences.accounting import gaussian_release_epsilon
from splitpeft.experiment.run import run_experiment
from splitpeft.privacy.audit import accounting


def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of mu-Gaussian DP (Dong, Roth and Su 2022, Corollary 2.13), written out
    here: Phi(-epsilon / mu + mu / 2) - e^epsilon Phi(-epsilon / mu - mu / 2)."""
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    return phi(-epsilon / mu + mu / 2) - math.exp(epsilon) * phi(-epsilon / mu - mu / 2)


@pytest.mark.parametrize("sigma, releases, vectors, tensors", [(2.0, 1, 1, 1), (4.0, 10, 1, 2), (20.0, 3, 16, 1)])
def test_the_tight_epsilon_is_gaussian_dps_and_below_the_renyi_bound(sigma, releases, vectors, tensors):
    got = gaussian_release_epsilon(sigma, releases, 1e-5, vectors=vectors, tensors=tensors)
    # sensitivity 2C sqrt(vectors), noise sigma C, composed releases x tensors times
    mu = 2 * math.sqrt(vectors) / sigma * math.sqrt(releases * tensors)
    assert gdp_delta(got["epsilon"], mu) == pytest.approx(1e-5, rel=1e-3)
    assert got["epsilon"] < got["epsilon_rdp"]


def test_the_tight_epsilon_is_what_the_librarys_pld_accountant_says_where_it_runs():
    accountant = PLDAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.5), 12))
    # multiplier 1.5 = sigma / 2 for one vector: sigma = 3
    assert gaussian_release_epsilon(3.0, 12, 1e-5)["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-3)


def test_no_noise_is_no_guarantee_and_no_release_costs_nothing():
    assert gaussian_release_epsilon(0.0, 5, 1e-5) == {"epsilon": math.inf, "epsilon_rdp": math.inf}
    assert gaussian_release_epsilon(1.0, 0, 1e-5) == {"epsilon": 0.0, "epsilon_rdp": 0.0}
    more, fewer = gaussian_release_epsilon(4.0, 10, 1e-5), gaussian_release_epsilon(4.0, 1, 1e-5)
    assert more["epsilon"] > fewer["epsilon"] > gaussian_release_epsilon(8.0, 1, 1e-5)["epsilon"]
    with pytest.raises(ValueError, match="delta"):
        gaussian_release_epsilon(1.0, 1, 0.0)


def test_every_runs_report_carries_the_accounting(tmp_path):
    """A noisy U-shaped run with a noised head gradient: two tensors per release, over every
    epoch of its data; a run without noise says None."""
    noisy = run_experiment(tiny_config("tiny-llama", "privacy.noise_multiplier=0.5", "privacy.clip_norm=4",
                                       "privacy.gradient_clip_norm=1", "placement.labels_on_device=true",
                                       "privacy.estimate=false", "eval.generation=false"),
                           tmp_path / "noisy", progress=False)
    accounting = noisy["privacy_accounting"]
    assert accounting["noised_tensors_per_release"] == 2 and accounting["releases_per_example"] >= 1
    assert accounting["accountant"].startswith("dp-accounting")
    want = gaussian_release_epsilon(0.5, accounting["releases_per_example"], 1e-5, vectors=160, tensors=2)
    assert accounting["epsilon_per_sequence"] == pytest.approx(want["epsilon"])
    assert accounting["epsilon_per_token_vector"] < accounting["epsilon_per_sequence"]
    assert accounting["noised"] == ["states at the cut", "head gradient"] and accounting["in_the_clear"] == []
    clean = run_experiment(tiny_config("tiny-llama", "privacy.estimate=false", "eval.generation=false"), tmp_path / "clean",
                           progress=False)
    assert clean["privacy_accounting"] is None


def test_the_accounting_names_what_it_covers_and_what_crosses_in_the_clear():
    """Noise on the head gradient only covers the labels, not the states; plain split sends the
    labels in the clear; clipped per sequence, a sequence's sensitivity is 2C (no sqrt(T))."""
    config = load_config(preset="tiny", overrides=["privacy.noise_multiplier=0.5", "privacy.gradient_clip_norm=1"])
    head_only = accounting(config, 3, sends_head_gradient=True)
    assert head_only["noised"] == ["head gradient"] and head_only["in_the_clear"] == ["states at the cut"]
    plain = accounting(load_config(preset="tiny", overrides=["privacy.noise_multiplier=0.5", "privacy.clip_norm=2"]), 3,
                       sends_head_gradient=False)
    assert plain["noised"] == ["states at the cut"] and plain["in_the_clear"] == ["labels"]
    per_sequence = accounting(load_config(preset="tiny", overrides=["privacy.noise_multiplier=0.5", "privacy.clip_norm=2",
                                                                    "privacy.clip_per=sequence"]), 3, sends_head_gradient=False)
    assert per_sequence["epsilon_per_sequence"] == pytest.approx(gaussian_release_epsilon(0.5, 3, 1e-5)["epsilon"])
    assert per_sequence["epsilon_per_sequence"] < plain["epsilon_per_sequence"]
