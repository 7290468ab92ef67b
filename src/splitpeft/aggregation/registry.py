"""The aggregators by name (`federation.aggregator`): one constructor per policy."""

from __future__ import annotations

from collections.abc import Callable

from splitpeft.aggregation.base import Aggregator
from splitpeft.aggregation.fedavg import FedAvg
from splitpeft.aggregation.noise_free import NoiseFree
from splitpeft.aggregation.svd import SvdTruncate
from splitpeft.aggregation.zero_pad import ZeroPad

# name -> constructor taking the run's seed (noise_free seeds its fresh adapters with it)
REGISTRY: dict[str, Callable[[int], Aggregator]] = {
    "noise_free": NoiseFree,
    "fedavg": lambda seed: FedAvg(),
    "zero_pad": lambda seed: ZeroPad(),
    "svd": lambda seed: SvdTruncate(),
}
AGGREGATORS = tuple(REGISTRY)


def make_aggregator(name: str, seed: int = 0) -> Aggregator:
    """The aggregator called `name`; `seed` seeds the fresh adapters of noise_free."""
    if name not in REGISTRY:
        raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")
    return REGISTRY[name](seed)
