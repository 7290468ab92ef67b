"""HSplitLoRA's configuration loop: IWI probe -> smoothed scores -> a planner -> (k_i, ranks_i).

Planners are named policies behind one interface (`Planner`), chosen by `hsplit.planner`:

- `fixed`: every device at `placement.split_layer`, `lora.rank` on every adapted module; no
  budgets, no probe (the plain SplitLoRA set-up).
- `armsc`: ARMSC as an optimiser (`hsplit/armsc.py`, `optimise_fleet`): every device's split and
  ranks chosen together to maximise the IWI importance the fleet trains per second of simulated
  round time (the slowest device, or the server's shared compute), under each device's memory and
  time budget. Re-planned when the scores move past `hsplit.replan_threshold` (relative L1).
- `armsc_deepest`: the first ARMSC, a rule: per device the deepest split that fits, then ranks
  greedily by score per byte (kept for comparison: it leaves deep devices short of adapters and
  makes them the stragglers).
- `uniform` (SplitLoRA, fair): `placement.split_layer` and one rank for every device, the largest
  of `hsplit.rank_set` whose predicted peak fits the weakest device's budget.

Every planner honours the privacy floor (`PrivacyFloor`: `hsplit.min_split`, and
`hsplit.max_leakage` against the privacy meter's table), and each plan reports its expected leakage.
- `budget_rank` (HetLoRA): the fixed split, and per device the largest rank of `hsplit.rank_set`
  whose predicted peak fits its budget, on every adapted module.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

from transformers import PreTrainedModel

from splitpeft.aggregation.registry import REGISTRY as AGGREGATORS
from splitpeft.config import ExperimentConfig
from splitpeft.data.batching import BatchStream, EncodedExample
from splitpeft.hsplit.armsc import DevicePlan, FleetOptions, PlanError, optimise_fleet, plan_fleet
from splitpeft.hsplit.budget import DeviceProfile
from splitpeft.hsplit.importance import (
    ImportanceTracker,
    normalised_scores,
    probe_importance,
    relative_l1_change,
)
from splitpeft.hsplit.memory import ModelShapes, WarmFrozen, predict_peak_bytes
from splitpeft.model.backbone import backbone_of
from splitpeft.model.loss import labelled_positions
from splitpeft.model.runtime import resolve_runtime
from splitpeft.placements.split import SplitPlacement

Plans = dict[str, tuple[int, dict[str, int]]]  # device -> (split layer, {module: rank})


def needs_replan(old_scores: Mapping[str, float], new_scores: Mapping[str, float], threshold: float) -> bool:
    """Re-plan only when the scores moved past `threshold`: ||new - old||_1 / ||old||_1 > threshold."""
    return relative_l1_change(new_scores, old_scores) > threshold


class Planner(Protocol):
    """Chooses every device's split point and ranks from its budget and the IWI scores."""

    name: ClassVar[str]
    uses_budgets: ClassVar[bool]  # False: no fleet budgets needed, no plan table
    uses_scores: ClassVar[bool]   # True: needs IWI probes, and re-plans when they move
    one_rank: ClassVar[bool]      # True: every device gets one rank for every module (fedavg can average them)
    options: PlanOptions

    def plan(self, profiles: Sequence[DeviceProfile], shapes: ModelShapes, scores: Mapping[str, float]) -> list[DevicePlan]: ...


def warm_frozen_of(config: ExperimentConfig) -> WarmFrozen | None:
    """What a warm holder keeps for its frozen weight W - s B A (`federation.noise_free_frozen`), or
    None where holders do not restart warm (the planner prices it, `memory.warm_bytes`)."""
    fed = config.federation
    if not AGGREGATORS[fed.aggregator].warm_restarts or fed.noise_free_start != "warm":
        return None
    return fed.noise_free_frozen


def leakage_at(table: dict[str, Any], placement: str, split_layer: int) -> float | None:
    """The measured leakage (token accuracy) of `placement` at `split_layer` from a meter's output;
    at an unmeasured depth, that of the nearest shallower measured one (leakage falls with depth,
    so this errs on the side of more leakage); None if no depth <= `split_layer` was measured."""
    measured = {row["split_layer"]: row["token_accuracy"] for row in table.get("leakage", [])
                if row["placement"] == placement and row["split_layer"] <= split_layer}
    if not measured:
        return None
    return float(measured[max(measured)])


@dataclass
class PrivacyFloor:
    """Which splits a plan may use: at least `min_split` blocks on the device, and, with a leakage
    table (`splitpeft privacy`'s privacy.json for this model), a measured leakage of at most
    `max_leakage` for the run's placement (`privacy/meter.py`: the combined attack's token accuracy;
    an unmeasured depth takes the nearest shallower measured one)."""

    min_split: int = 0
    max_leakage: float | None = None
    table: dict[str, Any] | None = None
    # the table's rows for the run's placement (its `exposure_name`); the default: U-shaped split's
    placement: str = field(default_factory=lambda: SplitPlacement(labels_on_device=True).exposure_name() or "")

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> PrivacyFloor | None:
        h = config.hsplit
        if h.min_split == 0 and h.leakage_table is None:
            return None
        table = None
        if h.leakage_table is not None:
            path = Path(h.leakage_table)
            if not path.is_file():
                raise FileNotFoundError(f"hsplit.leakage_table {h.leakage_table!r} does not exist (write it with `splitpeft privacy`)")
            try:
                table = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"hsplit.leakage_table {h.leakage_table!r} is not valid JSON: {error}") from None
            if not isinstance(table, dict) or not isinstance(table.get("leakage"), list):
                raise ValueError(f"hsplit.leakage_table {h.leakage_table!r} is not a table written by `splitpeft privacy`")
        # the planners plan split points: their leakage is the split placement's, U-shaped or plain
        placement = SplitPlacement(labels_on_device=config.placement.labels_on_device).exposure_name()
        return cls(h.min_split, h.max_leakage, table, placement or "")

    def expected_leakage(self, split_layer: int) -> float | None:
        return None if self.table is None else leakage_at(self.table, self.placement, split_layer)

    def allows(self, split_layer: int) -> bool:
        if split_layer < self.min_split:
            return False
        if self.max_leakage is None:
            return True
        leakage = self.expected_leakage(split_layer)
        return leakage is not None and leakage <= self.max_leakage


@dataclass
class PlanOptions:
    """What every planner's memory model needs besides the budgets."""

    split_layer: int
    rank: int
    rank_set: tuple[int, ...]
    max_split: int | None
    batch_size: int
    seq_len: int
    labels_on_device: bool
    checkpointing: bool = False  # runtime.gradient_checkpointing
    privacy: PrivacyFloor | None = None  # hsplit.min_split, hsplit.max_leakage
    server_flops_per_s: float = 5e11  # fleet.server_flops_per_s
    warm: WarmFrozen | None = None  # federation.noise_free_start=warm: federation.noise_free_frozen (`warm_bytes`)
    server_rank: int | None = None  # hsplit.server_rank: the server sessions' rank (None: `rank`)
    time_tokens: tuple[int, int] | None = None  # hsplit.time_tokens=data: `data_step_tokens` of the planner's data

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> PlanOptions:
        return cls(config.placement.split_layer, config.lora.rank, tuple(config.hsplit.rank_set),
                   config.hsplit.max_split, config.federation.batch_size, config.data.max_length,
                   config.placement.labels_on_device, config.runtime.gradient_checkpointing,
                   PrivacyFloor.from_config(config), config.fleet.server_flops_per_s,
                   warm_frozen_of(config),
                   config.hsplit.server_rank)

    def fleet(self) -> FleetOptions:
        """The optimiser's options: the server's sessions train every module of their blocks at
        hsplit.server_rank (lora.rank unless set)."""
        return FleetOptions(self.batch_size, self.seq_len, self.rank_set, self.server_rank or self.rank,
                            self.server_flops_per_s,
                            self.labels_on_device, self.checkpointing, self.max_split,
                            self.privacy.allows if self.privacy is not None else None, self.warm, self.time_tokens)

    def memory(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "labels_on_device": self.labels_on_device,
                "checkpointing": self.checkpointing, "warm": self.warm}

    def check_fixed_split(self, split_layer: int) -> None:
        """A planner that does not choose the split: refuse one the privacy floor does not allow."""
        if self.privacy is not None and not self.privacy.allows(split_layer):
            raise PlanError(f"placement.split_layer {split_layer} is below the privacy floor (hsplit.min_split "
                            f"{self.privacy.min_split}, hsplit.max_leakage {self.privacy.max_leakage}: measured "
                            f"leakage {self.privacy.expected_leakage(split_layer)})")


@dataclass
class FixedPlanner:
    options: PlanOptions
    name: ClassVar[str] = "fixed"
    uses_budgets: ClassVar[bool] = False
    uses_scores: ClassVar[bool] = False
    one_rank: ClassVar[bool] = True

    def plan(self, profiles: Sequence[DeviceProfile], shapes: ModelShapes, scores: Mapping[str, float]) -> list[DevicePlan]:
        k = self.options.split_layer
        self.options.check_fixed_split(k)
        ranks = {name: self.options.rank for name in shapes.modules_before(k)}
        peak = predict_peak_bytes(shapes, k, ranks, **self.options.memory())
        return [DevicePlan(p.name, k, dict(ranks), peak, 0.0, p.memory_bytes) for p in profiles]


@dataclass
class ArmscPlanner:
    options: PlanOptions
    name: ClassVar[str] = "armsc"
    uses_budgets: ClassVar[bool] = True
    uses_scores: ClassVar[bool] = True
    one_rank: ClassVar[bool] = False

    def plan(self, profiles: Sequence[DeviceProfile], shapes: ModelShapes, scores: Mapping[str, float]) -> list[DevicePlan]:
        return optimise_fleet(profiles, shapes, scores, self.options.fleet())


@dataclass
class ArmscDeepestPlanner:
    options: PlanOptions
    name: ClassVar[str] = "armsc_deepest"
    uses_budgets: ClassVar[bool] = True
    uses_scores: ClassVar[bool] = True
    one_rank: ClassVar[bool] = False

    def plan(self, profiles: Sequence[DeviceProfile], shapes: ModelShapes, scores: Mapping[str, float]) -> list[DevicePlan]:
        privacy = self.options.privacy
        return plan_fleet(profiles, shapes, scores, rank_set=self.options.rank_set, max_split=self.options.max_split,
                          allowed_splits=privacy.allows if privacy is not None else None, **self.options.memory())


@dataclass
class BudgetRankPlanner:
    options: PlanOptions
    name: ClassVar[str] = "budget_rank"
    uses_budgets: ClassVar[bool] = True
    uses_scores: ClassVar[bool] = False
    one_rank: ClassVar[bool] = False

    def plan(self, profiles: Sequence[DeviceProfile], shapes: ModelShapes, scores: Mapping[str, float]) -> list[DevicePlan]:
        return [self._plan(profile, shapes) for profile in profiles]

    def _plan(self, profile: DeviceProfile, shapes: ModelShapes) -> DevicePlan:
        k = self.options.split_layer
        self.options.check_fixed_split(k)
        modules = shapes.modules_before(k)
        for rank in sorted((r for r in self.options.rank_set if r > 0), reverse=True):
            ranks = {name: rank for name in modules}
            peak = predict_peak_bytes(shapes, k, ranks, **self.options.memory())
            if peak <= profile.memory_bytes:
                return DevicePlan(profile.name, k, ranks, peak, 0.0, profile.memory_bytes)
        raise PlanError(f"{profile.name}: a budget of {profile.memory_bytes} bytes fits no rank at split {k}")


@dataclass
class UniformPlanner:
    options: PlanOptions
    name: ClassVar[str] = "uniform"
    uses_budgets: ClassVar[bool] = True
    uses_scores: ClassVar[bool] = False
    one_rank: ClassVar[bool] = True

    def plan(self, profiles: Sequence[DeviceProfile], shapes: ModelShapes, scores: Mapping[str, float]) -> list[DevicePlan]:
        weakest = min(profiles, key=lambda p: p.memory_bytes)
        plan = BudgetRankPlanner(self.options)._plan(weakest, shapes)  # HetLoRA's rank for the weakest, for all
        return [DevicePlan(p.name, plan.split_layer, dict(plan.ranks), plan.predicted_peak_bytes, 0.0, p.memory_bytes)
                for p in profiles]


PlannerType = type[FixedPlanner] | type[ArmscPlanner] | type[ArmscDeepestPlanner] | type[BudgetRankPlanner] | type[UniformPlanner]
PLANNERS: dict[str, PlannerType] = {
    cls.name: cls for cls in (FixedPlanner, ArmscPlanner, ArmscDeepestPlanner, BudgetRankPlanner, UniformPlanner)
}


def data_step_tokens(stream: BatchStream, batches: int = 64) -> tuple[int, int]:
    """(mean padded tokens a row, mean labelled positions a step) over `batches` batches of
    `stream`: what a training step on that data computes, for the time model (`hsplit.time_tokens`)."""
    lengths, labelled = [], []
    for _ in range(batches):
        batch = stream.next()
        lengths.append(batch.input_ids.shape[1])
        labelled.append(len(labelled_positions(batch.labels)[0]))
    return max(1, round(sum(lengths) / batches)), max(1, round(sum(labelled) / batches))


def make_planner(config: ExperimentConfig) -> Planner:
    name = config.hsplit.planner
    if name not in PLANNERS:
        raise ValueError(f"unknown hsplit.planner {name!r}; choose from {', '.join(PLANNERS)}")
    return PLANNERS[name](PlanOptions.from_config(config))


class Planning:
    """The loop around a planner: probe IWI scores, plan, and re-plan when they move.

    `model` is the frozen base the probe measures; `train` the examples it draws batches from
    (never the held-out ones). The memory model sees the model as the devices will run it: the
    run's `runtime.dtype` and the devices' quantization (`Runtime.device_quantization`), read from
    the model's config on the meta device, whatever precision `model` itself is held in.
    """

    def __init__(self, planner: Planner, config: ExperimentConfig, model: PreTrainedModel,
                 profiles: Sequence[DeviceProfile], train: list[EncodedExample], pad_id: int) -> None:
        self.planner = planner
        self.config = config
        self.model = model
        self.profiles = list(profiles)
        self.backbone = backbone_of(model)
        targets = config.lora.target_modules or list(self.backbone.default_target_modules)
        runtime = resolve_runtime(config.runtime)
        dtype = runtime.dtype if config.hsplit.plan_dtype == "runtime" else config.hsplit.plan_dtype
        self.shapes = ModelShapes.from_config(model.config, dtype=dtype,
                                              quantization=runtime.device_quantization(), target_modules=targets,
                                              device=runtime.device_device)
        self.tracker = ImportanceTracker()
        self.probe_stream = BatchStream(train, config.federation.batch_size, pad_id, config.seed + 10_000)
        if config.hsplit.time_tokens == "data":
            planner.options = replace(planner.options, time_tokens=data_step_tokens(
                BatchStream(train, config.federation.batch_size, pad_id, config.seed + 20_000)))
        self.plans: list[DevicePlan] = []
        self.planned_scores: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    def probe(self, round_index: int) -> dict[str, float]:
        """One IWI probe folded into the tracker; returns the resource-normalised scores."""
        batches = [self.probe_stream.next() for _ in range(self.config.hsplit.probe_batches)]
        raw = probe_importance(self.model, self.backbone, batches, sorted(self.shapes.modules))
        shapes = {name: self.shapes.modules[name] for name in raw}
        self.tracker.update(normalised_scores(raw, shapes, self.config.lora.rank))
        self.history.append({"round": round_index, "scores": dict(self.tracker.scores)})
        return dict(self.tracker.scores)

    def plan(self, round_index: int = 0) -> Plans:
        scores = self.probe(round_index) if self.planner.uses_scores else {}
        self.plans = self.planner.plan(self.profiles, self.shapes, scores)
        self.planned_scores = scores
        return {p.device: (p.split_layer, dict(p.ranks)) for p in self.plans}

    def update(self, round_index: int) -> Plans | None:
        """Re-probe; new plans when the scores moved past `hsplit.replan_threshold`, else None."""
        if not self.planner.uses_scores:
            return None
        scores = self.probe(round_index)
        if not needs_replan(self.planned_scores, scores, self.config.hsplit.replan_threshold):
            return None
        return self.plan(round_index)

    def describe(self) -> list[dict[str, Any]]:
        """One row per device's plan, with the leakage the privacy meter measured at its split
        (`expected_leakage`: None without hsplit.leakage_table)."""
        privacy = PlanOptions.from_config(self.config).privacy
        rows = []
        for plan in self.plans:
            histogram: dict[int, int] = defaultdict(int)
            for rank in plan.ranks.values():
                histogram[rank] += 1
            rows.append({
                "device": plan.device, "budget_bytes": plan.budget_bytes, "split_layer": plan.split_layer,
                "adapted_modules": len(plan.ranks), "ranks": dict(sorted(histogram.items())),
                "predicted_peak_bytes": plan.predicted_peak_bytes, "flops_per_step": plan.flops_per_step,
                "importance": plan.importance, "planned_step_s": plan.step_s,
                "expected_leakage": privacy.expected_leakage(plan.split_layer) if privacy is not None else None,
            })
        return rows
