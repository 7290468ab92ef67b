"""The privacy meter: an honest-but-curious server's attackers against exactly what crosses the cut,
their scores, and the audits (a run's own traffic; the table per split depth).

Public API (each name imported from its module on first use):

- `attackers`: `Attacker`, `make_attacker`
- `meter`: `measure`, `Exposure`, `MeterSettings`, `exposure_of`
- `audit`: `audit_simulation`, `leakage_table`
- `scoring`: `Score`, `token_accuracy`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.privacy.attackers import Attacker as Attacker
    from splitpeft.privacy.attackers import make_attacker as make_attacker
    from splitpeft.privacy.audit import audit_simulation as audit_simulation
    from splitpeft.privacy.audit import leakage_table as leakage_table
    from splitpeft.privacy.meter import Exposure as Exposure
    from splitpeft.privacy.meter import MeterSettings as MeterSettings
    from splitpeft.privacy.meter import exposure_of as exposure_of
    from splitpeft.privacy.meter import measure as measure
    from splitpeft.privacy.scoring import Score as Score
    from splitpeft.privacy.scoring import token_accuracy as token_accuracy

_EXPORTS = {
    "Attacker": "splitpeft.privacy.attackers",
    "make_attacker": "splitpeft.privacy.attackers",
    "measure": "splitpeft.privacy.meter",
    "Exposure": "splitpeft.privacy.meter",
    "MeterSettings": "splitpeft.privacy.meter",
    "exposure_of": "splitpeft.privacy.meter",
    "audit_simulation": "splitpeft.privacy.audit",
    "leakage_table": "splitpeft.privacy.audit",
    "Score": "splitpeft.privacy.scoring",
    "token_accuracy": "splitpeft.privacy.scoring",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
