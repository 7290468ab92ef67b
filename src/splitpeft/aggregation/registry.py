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

# name -> constructor taking the run's seed (noise_free seeds its fresh adapters with it),
# federation.noise_free_start (cold or warm) and noise_free_factors (the other policies have no such choice)
REGISTRY: dict[str, Callable[[int, NoiseFreeStart, WarmFactors], Aggregator]] = {
    "noise_free": lambda seed, start, factors: NoiseFree(seed, start, factors),
    "fedavg": lambda seed, start, factors: FedAvg(),
    "zero_pad": lambda seed, start, factors: ZeroPad(),
    "svd": lambda seed, start, factors: SvdTruncate(),
}
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
    if noise_free_start != "cold" and name != "noise_free":
        raise ValueError(f"noise_free_start={noise_free_start} is noise_free's option; the aggregator is {name}")
    if noise_free_factors != "balanced" and name != "noise_free":
        raise ValueError(f"noise_free_factors={noise_free_factors} is noise_free's option; the aggregator is {name}")
    aggregator = REGISTRY[name](seed, noise_free_start, noise_free_factors)
    if robust is None:
        return aggregator
    if robust.combine != "mean":
        if name != "fedavg":
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
