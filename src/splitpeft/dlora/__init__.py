"""DLoRA: the placement whose server runs the frozen backbone while the device computes its adapter
branches, the server's remote branches, and one server pass for many dlora devices.

Public API (each name imported from its module on first use):

- `placement`: `DLoRAPlacement`
- `remote`: `DLoRASession`
- `wave`: `DLoRAWave`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.dlora.placement import DLoRAPlacement as DLoRAPlacement
    from splitpeft.dlora.remote import DLoRASession as DLoRASession
    from splitpeft.dlora.wave import DLoRAWave as DLoRAWave

_EXPORTS = {
    "DLoRAPlacement": "splitpeft.dlora.placement",
    "DLoRASession": "splitpeft.dlora.remote",
    "DLoRAWave": "splitpeft.dlora.wave",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
