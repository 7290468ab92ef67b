"""The aggregators by name (`federation.aggregator`), with the robust policies of `robust.*`
around them: one constructor per policy."""

from __future__ import annotations

from collections.abc import Callable

from splitpeft.aggregation.base import Aggregator
from splitpeft.aggregation.fedavg import FedAvg
from splitpeft.aggregation.noise_free import NoiseFree, NoiseFreeStart, WarmFactors
from splitpeft.aggregation.robust import AdamTrustRegion, CenteredClip, CoordinateMedian, MedianClip, TrimmedMean
from splitpeft.aggregation.svd import SvdTruncate
from splitpeft.aggregation.zero_pad import ZeroPad
from splitpeft.config import RobustConfig

# name -> the aggregator's class: the one place the names are listed (the config's
# federation.aggregator takes its choices from here); each class states its facts (`shared_adapter`,
# `averages_factors`, `warm_restarts`)
REGISTRY: dict[str, type[Aggregator]] = {cls.name: cls for cls in (NoiseFree, FedAvg, ZeroPad, SvdTruncate)}
AGGREGATORS = tuple(REGISTRY)


def make_aggregator(name: str, seed: int = 0, robust: RobustConfig | None = None,
                    noise_free_start: NoiseFreeStart = "cold", noise_free_factors: WarmFactors = "balanced",
                    trust: AdamTrustRegion | None = None) -> Aggregator:
    """The aggregator called `name` (`seed` seeds noise_free's fresh adapters; `noise_free_start`
    is its cold or warm restart), inside the robust policies of `robust` (None: the plain aggregator).

    `robust.combine` replaces fedavg's token-weighted mean by a coordinate-wise trimmed mean or
    median; `robust.clip` = "median" clips every holder's update first (`aggregation/robust.py`),
    inside the AdamW trust region `trust` of the run's lr and local steps (None: none)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")
    policy = REGISTRY[name]
    if noise_free_start != "cold" and not policy.warm_restarts:
        raise ValueError(f"noise_free_start={noise_free_start} is noise_free's option; the aggregator is {name}")
    if noise_free_factors != "balanced" and not policy.warm_restarts:
        raise ValueError(f"noise_free_factors={noise_free_factors} is noise_free's option; the aggregator is {name}")
    # the one with warm restarts takes their options (and the seed of its fresh adapters)
    aggregator = NoiseFree(seed, noise_free_start, noise_free_factors) if policy.warm_restarts else policy()
    if robust is None:
        return aggregator
    if robust.combine != "mean":
        if not aggregator.shared_adapter:
            raise ValueError(f"robust.combine={robust.combine} combines A and B like fedavg; "
                             f"federation.aggregator is {name}")
        combiners: dict[str, Callable[[], Aggregator]] = {
            "trimmed_mean": lambda: TrimmedMean(robust.trim_fraction),
            "median": CoordinateMedian,
            "centered_clip": lambda: CenteredClip(robust.clip_factor),
        }
        aggregator = combiners[robust.combine]()
    if robust.clip == "median":
        aggregator = MedianClip(aggregator, robust.clip_factor, trust)
    return aggregator
