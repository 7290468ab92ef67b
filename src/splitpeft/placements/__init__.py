"""Placements: who runs which part of the model. The `Placement` interface and the narrow device and
server views it works on, split (plain and U-shaped) and centralized; `placements.registry` names
every placement (dlora's included).

Public API (each name imported from its module on first use):

- `base`: `Placement`, `DeviceSide`, `ServerSide`
- `split`: `SplitPlacement`
- `centralized`: `CentralizedPlacement`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.placements.base import DeviceSide as DeviceSide
    from splitpeft.placements.base import Placement as Placement
    from splitpeft.placements.base import ServerSide as ServerSide
    from splitpeft.placements.centralized import CentralizedPlacement as CentralizedPlacement
    from splitpeft.placements.split import SplitPlacement as SplitPlacement

_EXPORTS = {
    "Placement": "splitpeft.placements.base",
    "DeviceSide": "splitpeft.placements.base",
    "ServerSide": "splitpeft.placements.base",
    "SplitPlacement": "splitpeft.placements.split",
    "CentralizedPlacement": "splitpeft.placements.centralized",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
