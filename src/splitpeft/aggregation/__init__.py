"""Aggregation of adapter copies of different ranks: the `Aggregator` interface and its policies
(fedavg, noise_free, zero_pad, svd) and robust combiners, chosen by name.

Public API (each name imported from its module on first use):

- `base`: `Aggregator`, `AdapterCopy`, `Aggregate`, `AggregationError`
- `registry`: `make_aggregator`
- `fedavg`: `FedAvg`
- `noise_free`: `NoiseFree`
- `zero_pad`: `ZeroPad`
- `svd`: `SvdTruncate`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.aggregation.base import AdapterCopy as AdapterCopy
    from splitpeft.aggregation.base import Aggregate as Aggregate
    from splitpeft.aggregation.base import AggregationError as AggregationError
    from splitpeft.aggregation.base import Aggregator as Aggregator
    from splitpeft.aggregation.fedavg import FedAvg as FedAvg
    from splitpeft.aggregation.noise_free import NoiseFree as NoiseFree
    from splitpeft.aggregation.registry import make_aggregator as make_aggregator
    from splitpeft.aggregation.svd import SvdTruncate as SvdTruncate
    from splitpeft.aggregation.zero_pad import ZeroPad as ZeroPad

_EXPORTS = {
    "Aggregator": "splitpeft.aggregation.base",
    "AdapterCopy": "splitpeft.aggregation.base",
    "Aggregate": "splitpeft.aggregation.base",
    "AggregationError": "splitpeft.aggregation.base",
    "make_aggregator": "splitpeft.aggregation.registry",
    "FedAvg": "splitpeft.aggregation.fedavg",
    "NoiseFree": "splitpeft.aggregation.noise_free",
    "ZeroPad": "splitpeft.aggregation.zero_pad",
    "SvdTruncate": "splitpeft.aggregation.svd",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
