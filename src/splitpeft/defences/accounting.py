"""(epsilon, delta) of the Gaussian release (`privacy.noise_multiplier` sigma, `privacy.clip_norm`
C; `defences/cut.py`), from Google's `dp-accounting` library rather than a bound of our own.

The mechanism: every token vector a device sends up is clipped to L2 norm C and N(0, (sigma C)^2 I)
is added. Two sequences are adjacent when one example is replaced by any other, so one vector's
L2 sensitivity is 2C and a sequence of T vectors' (all T change together) 2C sqrt(T): one release
of a sequence is the Gaussian mechanism with noise multiplier z = sigma / (2 sqrt(T)) (noise
standard deviation over sensitivity, dp-accounting's `GaussianDpEvent`). A sequence is released
once per epoch over its device's data (`releases_per_example`), and in each release once per noised
tensor: the cut activations, and the head gradient where the device sends one (U-shaped split,
dlora) under `privacy.gradient_clip_norm` > 0 (its own clip norm, the same sigma). No
amplification by subsampling is claimed: the server knows which device sent each batch.

Two figures, both from the library:

- `epsilon` (tight): n Gaussian mechanisms of multiplier z compose exactly into one of multiplier
  z / sqrt(n) (Gaussian differential privacy; Dong, Roth and Su, 2022), whose delta(epsilon) the
  library computes in closed form (`GaussianPrivacyLoss.get_delta_for_epsilon`); epsilon is the
  smallest one with delta(epsilon) <= delta, found by bisection. The library's privacy-loss-
  distribution accountant gives the same figure where its discretisation fits in memory (a test),
  and runs out of memory for the small multipliers per sequence that matter here.
- `epsilon_rdp`: the library's Renyi accountant (`RdpAccountant`), a looser upper bound, beside it.
"""

from __future__ import annotations

import math
from importlib.metadata import version

import dp_accounting
from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss
from dp_accounting.rdp import RdpAccountant


def gaussian_release_epsilon(noise_multiplier: float, releases: int, delta: float, *, vectors: int = 1,
                             tensors: int = 1) -> dict[str, float]:
    """{"epsilon", "epsilon_rdp"} of `releases` releases of `tensors` noised tensors of `vectors`
    clipped vectors each (see the module docstring), at `delta`. inf without noise, 0 without a
    release."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), not {delta!r}")
    if noise_multiplier <= 0:
        return {"epsilon": math.inf, "epsilon_rdp": math.inf}
    count = releases * tensors
    if count <= 0:
        return {"epsilon": 0.0, "epsilon_rdp": 0.0}
    z = noise_multiplier / (2 * math.sqrt(vectors))
    rdp = RdpAccountant()
    rdp.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), count))
    bound = float(rdp.get_epsilon(delta))
    loss = GaussianPrivacyLoss(z / math.sqrt(count), sensitivity=1.0)
    low, high = 0.0, max(bound, 1e-9)
    while float(loss.get_delta_for_epsilon(high)) > delta:  # the RDP bound is an upper bound; guard anyway
        low, high = high, 2 * high
    for _ in range(200):
        middle = (low + high) / 2
        if float(loss.get_delta_for_epsilon(middle)) <= delta:
            high = middle
        else:
            low = middle
        if high - low <= 1e-9 * max(1.0, high):
            break
    return {"epsilon": high, "epsilon_rdp": bound}


def accountant_name() -> str:
    return f"dp-accounting {version('dp-accounting')}: Gaussian DP in closed form (epsilon), Renyi (epsilon_rdp)"
