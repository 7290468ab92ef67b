"""The federation: building a fleet from a config, the round loop, the global state and its merges,
what a round records, pre-flight checks and verified checkpoints.

Public API (each name imported from its module on first use):

- `simulation`: `Simulation`, `RoundError`
- `state`: `GlobalState`
- `records`: `RoundRecord`, `DeviceRound`
- `engine`: `Engine`, `InProcessEngine`
- `checkpoint`: `save_checkpoint`, `load_checkpoint`, `verify_checkpoint`, `CheckpointError`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.federation.checkpoint import CheckpointError as CheckpointError
    from splitpeft.federation.checkpoint import load_checkpoint as load_checkpoint
    from splitpeft.federation.checkpoint import save_checkpoint as save_checkpoint
    from splitpeft.federation.checkpoint import verify_checkpoint as verify_checkpoint
    from splitpeft.federation.engine import Engine as Engine
    from splitpeft.federation.engine import InProcessEngine as InProcessEngine
    from splitpeft.federation.records import DeviceRound as DeviceRound
    from splitpeft.federation.records import RoundRecord as RoundRecord
    from splitpeft.federation.simulation import RoundError as RoundError
    from splitpeft.federation.simulation import Simulation as Simulation
    from splitpeft.federation.state import GlobalState as GlobalState

_EXPORTS = {
    "Simulation": "splitpeft.federation.simulation",
    "RoundError": "splitpeft.federation.simulation",
    "GlobalState": "splitpeft.federation.state",
    "RoundRecord": "splitpeft.federation.records",
    "DeviceRound": "splitpeft.federation.records",
    "Engine": "splitpeft.federation.engine",
    "InProcessEngine": "splitpeft.federation.engine",
    "save_checkpoint": "splitpeft.federation.checkpoint",
    "load_checkpoint": "splitpeft.federation.checkpoint",
    "verify_checkpoint": "splitpeft.federation.checkpoint",
    "CheckpointError": "splitpeft.federation.checkpoint",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
