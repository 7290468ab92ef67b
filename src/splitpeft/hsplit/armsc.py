"""ARMSC: a device's split point and per-module ranks from its memory budget, the IWI scores
and the memory model (`hsplit/memory.py`): the deepest split that fits, then ranks from the rank
set raised greedily by score per byte. Every byte is priced in the precision the device runs:
`ModelShapes` carries the runtime dtype and the base's quantization, and `checkpointing` says
whether the device blocks run under gradient checkpointing; the predicted peak includes what the
CPU meter cannot see (int8's kept inputs, the checkpoint's recompute). (The planning loop around
it: `hsplit/planning.py`.)"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from splitpeft.hsplit.budget import DeviceProfile, simulated_step_s
from splitpeft.hsplit.memory import (
    BlockSaved,
    ModelShapes,
    activation_terms,
    adapter_bytes,
    blocks_saved,
    flops_per_step,
    predict_peak_bytes,
    roles_per_block,
    split_bytes_per_step,
)


class PlanError(ValueError):
    """A device budget that cannot hold even the smallest plan."""


# --------------------------------------------------------------------------- ARMSC


@dataclass(frozen=True)
class DevicePlan:
    """A device's configuration: split layer k and the ranks of its adapted modules (rank > 0 only)."""

    device: str
    split_layer: int
    ranks: dict[str, int]
    predicted_peak_bytes: int
    flops_per_step: float
    budget_bytes: int


def _validated_rank_set(rank_set: Sequence[int]) -> list[int]:
    ranks = sorted(set(int(r) for r in rank_set) | {0})
    if ranks[0] < 0 or len(ranks) < 2:
        raise ValueError(f"rank_set must hold non-negative ranks and at least one above 0, got {tuple(rank_set)}")
    return ranks


def minimal_ranks(shapes: ModelShapes, scores: Mapping[str, float], split_layer: int, rank: int) -> dict[str, int]:
    """The smallest plan with an adapter at all: `rank` on the top-scoring module of blocks [0, k)
    (ties: the earliest in model order)."""
    candidates = shapes.modules_before(split_layer)
    if not candidates:
        return {}
    order = {name: i for i, name in enumerate(candidates)}
    top = min(candidates, key=lambda m: (-scores.get(m, 0.0), order[m]))
    return {top: rank}


class _GreedyState:
    """Per-block saved bytes and liveness of a plan, to price raising one module incrementally."""

    def __init__(self, shapes: ModelShapes, split_layer: int, ranks: dict[str, int], batch_size: int, seq_len: int,
                 checkpointing: bool):
        self.shapes, self.k, self.b, self.t, self.checkpointing = shapes, split_layer, batch_size, seq_len, checkpointing
        self.ranks = dict(ranks)
        self.roles = roles_per_block(shapes, split_layer, ranks)
        self.saved = blocks_saved(shapes, self.roles, batch_size, seq_len)

    def _activations(self, saved: list[BlockSaved]) -> int:
        return sum(activation_terms(self.shapes, saved, self.t, self.checkpointing))

    def raise_cost(self, module: str, new_rank: int) -> int:
        """Bytes the prediction grows by when `module` goes to `new_rank`."""
        j = self.shapes.module_block[module]
        old_rank = self.ranks.get(module, 0)
        roles = list(self.roles)
        roles[j] = {**roles[j], self.shapes.module_role[module]: new_rank}
        live = self.saved[j - 1].live_out if j > 0 else False
        # Liveness only flows forward, so blocks before j keep their saved bytes.
        new_saved = self.saved[:j] + blocks_saved(self.shapes, roles, self.b, self.t, start=j, live=live)
        adapters = adapter_bytes(self.shapes, {module: new_rank}) - adapter_bytes(self.shapes, {module: old_rank})
        return self._activations(new_saved) - self._activations(self.saved) + adapters

    def apply(self, module: str, new_rank: int) -> None:
        self.ranks[module] = new_rank
        self.roles = roles_per_block(self.shapes, self.k, self.ranks)
        self.saved = blocks_saved(self.shapes, self.roles, self.b, self.t)


def plan_device(
    profile: DeviceProfile,
    shapes: ModelShapes,
    scores: Mapping[str, float],
    *,
    batch_size: int,
    seq_len: int,
    rank_set: Sequence[int] = (0, 2, 4, 8, 16),
    labels_on_device: bool = False,
    checkpointing: bool = False,
    max_split: int | None = None,
    max_step_s: float | None = None,
    allowed_splits: Callable[[int], bool] | None = None,
) -> DevicePlan:
    """ARMSC for one device.

    Peaks are `predict_peak_bytes` in `shapes`' precision, with `checkpointing` as the run has it.

    1. Split: the deepest k in 1..max_split (default L - 1, so the server keeps a block) whose
       predicted peak with the minimal adapter (`minimal_ranks`) fits `profile.memory_bytes`
       (and, if `max_step_s` is given, whose simulated step time at that plan fits it), among
       the splits `allowed_splits` accepts (the privacy floor: `hsplit.min_split`, `hsplit.max_leakage`).
    2. Ranks: starting from the minimal adapter, repeatedly raise the module with the highest
       score / cost to its next rank in `rank_set`, cost = the bytes the predicted peak grows by
       (adapter weights, gradients, optimiser state, and the activations the new adapter keeps),
       skipping raises that would exceed the budget, until none fits; modules with score <= 0 are never raised.
       Ties break by model order, so the plan is deterministic.

    Raises PlanError (naming the device and the bytes needed) when even k = 1 with the minimal
    adapter does not fit.
    """
    ranks_q = _validated_rank_set(rank_set)
    smallest = ranks_q[1]
    budget = profile.memory_bytes
    top = shapes.num_blocks - 1 if max_split is None else max_split
    top = max(1, min(top, shapes.num_blocks))

    def step_s(k: int, ranks: Mapping[str, int]) -> float:
        flops = flops_per_step(shapes, k, ranks, batch_size, seq_len, labels_on_device, checkpointing)
        return simulated_step_s(profile, flops, split_bytes_per_step(shapes, batch_size, seq_len, labels_on_device))

    split, needed = None, None
    for k in range(top, 0, -1):
        if allowed_splits is not None and not allowed_splits(k):
            continue
        ranks = minimal_ranks(shapes, scores, k, smallest)
        peak = predict_peak_bytes(shapes, k, ranks, batch_size, seq_len, labels_on_device, checkpointing)
        needed = peak
        if peak <= budget and (max_step_s is None or step_s(k, ranks) <= max_step_s):
            split = k
            break
    if split is None and allowed_splits is not None:
        raise PlanError(
            f"device {profile.name!r}: no split the privacy floor allows (hsplit.min_split, hsplit.max_leakage) fits "
            f"a memory budget of {budget} bytes" + ("" if needed is None else f" (the shallowest allowed needs {needed} bytes)")
            + ("" if max_step_s is None else f" within max_step_s={max_step_s}")
        )
    if split is None:
        raise PlanError(
            f"device {profile.name!r}: a memory budget of {budget} bytes cannot hold even one block "
            f"(embedding + block 0 + a rank-{smallest} adapter + activations at batch {batch_size} x "
            f"{seq_len} tokens need {needed} bytes)"
            + ("" if max_step_s is None else f", or no split meets max_step_s={max_step_s}")
        )

    state = _GreedyState(shapes, split, minimal_ranks(shapes, scores, split, smallest), batch_size, seq_len, checkpointing)
    peak = predict_peak_bytes(shapes, split, state.ranks, batch_size, seq_len, labels_on_device, checkpointing)
    order = {name: i for i, name in enumerate(shapes.modules_before(split))}
    next_rank = {r: ranks_q[i + 1] for i, r in enumerate(ranks_q[:-1])}
    blocked: set[str] = set()
    while True:
        best: tuple[float, int, str, int, int] | None = None
        for module, position in order.items():
            score = scores.get(module, 0.0)
            current = state.ranks.get(module, 0)
            if module in blocked or score <= 0.0 or current not in next_rank:
                continue
            cost = state.raise_cost(module, next_rank[current])
            if peak + cost > budget:
                continue  # re-priced next round: another raise can make this one cheaper
            key = (-score / max(cost, 1), position, module, next_rank[current], cost)
            if best is None or key < best:
                best = key
        if best is None:
            break
        _, _, module, rank, cost = best
        if max_step_s is not None:
            trial = {**state.ranks, module: rank}
            if step_s(split, trial) > max_step_s:
                blocked.add(module)
                continue
        state.apply(module, rank)
        peak += cost

    ranks = {m: r for m, r in sorted(state.ranks.items(), key=lambda item: order[item[0]]) if r > 0}
    return DevicePlan(
        device=profile.name,
        split_layer=split,
        ranks=ranks,
        predicted_peak_bytes=predict_peak_bytes(shapes, split, ranks, batch_size, seq_len, labels_on_device, checkpointing),
        flops_per_step=flops_per_step(shapes, split, ranks, batch_size, seq_len, labels_on_device, checkpointing),
        budget_bytes=budget,
    )


def plan_fleet(
    profiles: Sequence[DeviceProfile],
    shapes: ModelShapes,
    scores: Mapping[str, float],
    **options: object,
) -> list[DevicePlan]:
    """`plan_device` for every profile (same options for all), in the profiles' order."""
    return [plan_device(profile, shapes, scores, **options) for profile in profiles]  # type: ignore[arg-type]
