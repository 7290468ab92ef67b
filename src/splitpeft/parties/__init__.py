"""Parties: holders of adapters (devices and the server's per-device sessions), a device's local phase,
the server's dispatch and batched passes, the shells parties borrow, frame bounds, and Kill and
Revive.

Public API (each name imported from its module on first use):

- `party`: `Party`
- `device`: `DeviceRuntime`, `LocalPhase`
- `server`: `SplitServer`, `ServerSession`
- `killrevive`: `KillRevive`, `kr_summary`
- `shells`: `ShellPool`
- `frame_bounds`: `FrameBounds`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.parties.device import DeviceRuntime as DeviceRuntime
    from splitpeft.parties.device import LocalPhase as LocalPhase
    from splitpeft.parties.frame_bounds import FrameBounds as FrameBounds
    from splitpeft.parties.killrevive import KillRevive as KillRevive
    from splitpeft.parties.killrevive import kr_summary as kr_summary
    from splitpeft.parties.party import Party as Party
    from splitpeft.parties.server import ServerSession as ServerSession
    from splitpeft.parties.server import SplitServer as SplitServer
    from splitpeft.parties.shells import ShellPool as ShellPool

_EXPORTS = {
    "Party": "splitpeft.parties.party",
    "DeviceRuntime": "splitpeft.parties.device",
    "LocalPhase": "splitpeft.parties.device",
    "SplitServer": "splitpeft.parties.server",
    "ServerSession": "splitpeft.parties.server",
    "KillRevive": "splitpeft.parties.killrevive",
    "kr_summary": "splitpeft.parties.killrevive",
    "ShellPool": "splitpeft.parties.shells",
    "FrameBounds": "splitpeft.parties.frame_bounds",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
