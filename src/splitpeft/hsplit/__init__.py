"""HSplitLoRA's planning: device budgets and simulated time, important-weight identification (IWI), the
memory and FLOP model, ARMSC and the other planners.

Public API (each name imported from its module on first use):

- `planning`: `PlanOptions`, `PrivacyFloor`, `leakage_at`
- `armsc`: `optimise_fleet`, `plan_fleet`, `DevicePlan`, `FleetOptions`, `PlanError`
- `budget`: `DeviceProfile`, `round_time_s`
- `importance`: `probe_importance`, `ImportanceTracker`
- `memory`: `ModelShapes`, `predict_peak_bytes`, `flops_per_step`, `server_flops_per_step`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.hsplit.armsc import DevicePlan as DevicePlan
    from splitpeft.hsplit.armsc import FleetOptions as FleetOptions
    from splitpeft.hsplit.armsc import PlanError as PlanError
    from splitpeft.hsplit.armsc import optimise_fleet as optimise_fleet
    from splitpeft.hsplit.armsc import plan_fleet as plan_fleet
    from splitpeft.hsplit.budget import DeviceProfile as DeviceProfile
    from splitpeft.hsplit.budget import round_time_s as round_time_s
    from splitpeft.hsplit.importance import ImportanceTracker as ImportanceTracker
    from splitpeft.hsplit.importance import probe_importance as probe_importance
    from splitpeft.hsplit.memory import ModelShapes as ModelShapes
    from splitpeft.hsplit.memory import flops_per_step as flops_per_step
    from splitpeft.hsplit.memory import predict_peak_bytes as predict_peak_bytes
    from splitpeft.hsplit.memory import server_flops_per_step as server_flops_per_step
    from splitpeft.hsplit.planning import PlanOptions as PlanOptions
    from splitpeft.hsplit.planning import PrivacyFloor as PrivacyFloor
    from splitpeft.hsplit.planning import leakage_at as leakage_at

_EXPORTS = {
    "PlanOptions": "splitpeft.hsplit.planning",
    "PrivacyFloor": "splitpeft.hsplit.planning",
    "leakage_at": "splitpeft.hsplit.planning",
    "optimise_fleet": "splitpeft.hsplit.armsc",
    "plan_fleet": "splitpeft.hsplit.armsc",
    "DevicePlan": "splitpeft.hsplit.armsc",
    "FleetOptions": "splitpeft.hsplit.armsc",
    "PlanError": "splitpeft.hsplit.armsc",
    "DeviceProfile": "splitpeft.hsplit.budget",
    "round_time_s": "splitpeft.hsplit.budget",
    "probe_importance": "splitpeft.hsplit.importance",
    "ImportanceTracker": "splitpeft.hsplit.importance",
    "ModelShapes": "splitpeft.hsplit.memory",
    "predict_peak_bytes": "splitpeft.hsplit.memory",
    "flops_per_step": "splitpeft.hsplit.memory",
    "server_flops_per_step": "splitpeft.hsplit.memory",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
