"""Deployment with Flower: the ServerApp's engine that plays the simulation's round on SuperNodes, the
ClientApp's device round, their settings, and the keys of a real deployment.

Public API (each name imported from its module on first use):

- `server_app`: `FlowerEngine`
- `client_app`: `train_round`
- `settings`: `ServerSettings`, `NodeSettings`
- `keys`: `write_deployment_keys`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.deploy.client_app import train_round as train_round
    from splitpeft.deploy.keys import write_deployment_keys as write_deployment_keys
    from splitpeft.deploy.server_app import FlowerEngine as FlowerEngine
    from splitpeft.deploy.settings import NodeSettings as NodeSettings
    from splitpeft.deploy.settings import ServerSettings as ServerSettings

_EXPORTS = {
    "FlowerEngine": "splitpeft.deploy.server_app",
    "train_round": "splitpeft.deploy.client_app",
    "ServerSettings": "splitpeft.deploy.settings",
    "NodeSettings": "splitpeft.deploy.settings",
    "write_deployment_keys": "splitpeft.deploy.keys",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
