"""ARMSC: every device's split point and per-module ranks from its budgets, the IWI scores and
the memory and FLOP model (`hsplit/memory.py`).

- `optimise_fleet` (`hsplit.planner=armsc`): ARMSC as an optimiser. The devices' plans are chosen
  together to maximise the importance the fleet trains per second of simulated round time
  (`fleet_objective`), under each device's memory and time budget.
- `plan_device` / `plan_fleet` (`hsplit.planner=armsc_deepest`): the first ARMSC, a rule. Per
  device it takes the deepest split that fits, then raises ranks from the rank set greedily by
  score per byte (`greedy_ranks`).

Every byte is priced in the precision the device runs:
`ModelShapes` carries the runtime dtype and the base's quantization, and `checkpointing` says
whether the device blocks run under gradient checkpointing; the predicted peak includes what the
CPU meter cannot see (int8's kept inputs, the checkpoint's recompute). (The planning loop around
it: `hsplit/planning.py`.)"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from splitpeft.hsplit.budget import DeviceProfile, StepTime, round_time_s, simulated_step_s, step_time
from splitpeft.hsplit.memory import (
    BlockSaved,
    ModelShapes,
    WarmFrozen,
    activation_terms,
    adapter_bytes,
    blocks_saved,
    flops_per_step,
    predict_peak_bytes,
    roles_per_block,
    server_flops_per_step,
    split_bytes_per_step,
    warm_bytes,
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
    importance: float | None = None  # the optimiser's trained importance (`trained_importance`)
    step_s: float | None = None  # the optimiser's simulated step: device + link + server


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
                 checkpointing: bool, warm: WarmFrozen | None = None):
        self.shapes, self.k, self.b, self.t, self.checkpointing = shapes, split_layer, batch_size, seq_len, checkpointing
        self.warm = warm
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
        adapters += warm_bytes(self.shapes, {module: new_rank}, self.warm) - warm_bytes(self.shapes, {module: old_rank}, self.warm)
        return self._activations(new_saved) - self._activations(self.saved) + adapters

    def apply(self, module: str, new_rank: int) -> None:
        self.ranks[module] = new_rank
        self.roles = roles_per_block(self.shapes, self.k, self.ranks)
        self.saved = blocks_saved(self.shapes, self.roles, self.b, self.t)


def greedy_ranks(
    shapes: ModelShapes,
    scores: Mapping[str, float],
    split_layer: int,
    rank_set: Sequence[int],
    budget_bytes: int,
    *,
    batch_size: int,
    seq_len: int,
    labels_on_device: bool,
    checkpointing: bool,
    warm: WarmFrozen | None = None,
    gain: Callable[[str, int, int], float] | None = None,
    fits_time: Callable[[Mapping[str, int]], bool] | None = None,
    start: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Ranks for the modules of blocks [0, k), raised one step of `rank_set` at a time.

    From `start` (default the minimal adapter, `minimal_ranks`), repeatedly raise the module with the highest
    gain / cost to its next rank, cost = the bytes the predicted peak grows by (adapter weights,
    gradients, optimiser state, and the activations the new adapter keeps), skipping raises that
    would exceed `budget_bytes`, until none fits. `gain(module, rank, next_rank)` defaults to the
    module's score (the deepest-fit rule's key); modules with score <= 0 are never raised. A raise
    that `fits_time` refuses blocks that module. Ties break by model order, so it is deterministic.
    Returns {module: rank > 0} in model order.
    """
    ranks_q = _validated_rank_set(rank_set)
    first = dict(start) if start is not None else minimal_ranks(shapes, scores, split_layer, ranks_q[1])
    state = _GreedyState(shapes, split_layer, first, batch_size, seq_len, checkpointing, warm)
    peak = predict_peak_bytes(shapes, split_layer, state.ranks, batch_size, seq_len, labels_on_device, checkpointing, warm)
    order = {name: i for i, name in enumerate(shapes.modules_before(split_layer))}
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
            if peak + cost > budget_bytes:
                continue  # re-priced next round: another raise can make this one cheaper
            value = score if gain is None else gain(module, current, next_rank[current])
            key = (-value / max(cost, 1), position, module, next_rank[current], cost)
            if best is None or key < best:
                best = key
        if best is None:
            break
        _, _, module, rank, cost = best
        if fits_time is not None and not fits_time({**state.ranks, module: rank}):
            blocked.add(module)
            continue
        state.apply(module, rank)
        peak += cost
    return {m: r for m, r in sorted(state.ranks.items(), key=lambda item: order[item[0]]) if r > 0}


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
    warm: WarmFrozen | None = None,
    max_split: int | None = None,
    max_step_s: float | None = None,
    allowed_splits: Callable[[int], bool] | None = None,
) -> DevicePlan:
    """The deepest-fit rule for one device (`hsplit.planner=armsc_deepest`, the first ARMSC).

    Peaks are `predict_peak_bytes` in `shapes`' precision, with `checkpointing` as the run has it.

    1. Split: the deepest k in 1..max_split (default L - 1, so the server keeps a block) whose
       predicted peak with the minimal adapter (`minimal_ranks`) fits `profile.memory_bytes`
       (and, if `max_step_s` is given, whose simulated step time at that plan fits it), among
       the splits `allowed_splits` accepts (the privacy floor: `hsplit.min_split`, `hsplit.max_leakage`).
    2. Ranks: `greedy_ranks` by score per byte of predicted peak, within the budget.

    `max_step_s` defaults to the profile's own time budget (`profile.max_step_s`).

    Raises PlanError (naming the device and the bytes needed) when even k = 1 with the minimal
    adapter does not fit.
    """
    ranks_q = _validated_rank_set(rank_set)
    smallest = ranks_q[1]
    budget = profile.memory_bytes
    max_step_s = profile.max_step_s if max_step_s is None else max_step_s
    top = shapes.num_blocks - 1 if max_split is None else max_split
    top = max(1, min(top, shapes.num_blocks))

    def step_s(k: int, ranks: Mapping[str, int]) -> float:
        flops = flops_per_step(shapes, k, ranks, batch_size, seq_len, labels_on_device, checkpointing, warm=warm)
        return simulated_step_s(profile, flops, split_bytes_per_step(shapes, batch_size, seq_len, labels_on_device))

    split, needed = None, None
    for k in range(top, 0, -1):
        if allowed_splits is not None and not allowed_splits(k):
            continue
        ranks = minimal_ranks(shapes, scores, k, smallest)
        peak = predict_peak_bytes(shapes, k, ranks, batch_size, seq_len, labels_on_device, checkpointing, warm)
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

    ranks = greedy_ranks(shapes, scores, split, ranks_q, budget, batch_size=batch_size, seq_len=seq_len,
                         labels_on_device=labels_on_device, checkpointing=checkpointing, warm=warm,
                         fits_time=None if max_step_s is None else (lambda trial: step_s(split, trial) <= max_step_s))
    return DevicePlan(
        device=profile.name,
        split_layer=split,
        ranks=ranks,
        predicted_peak_bytes=predict_peak_bytes(shapes, split, ranks, batch_size, seq_len, labels_on_device, checkpointing, warm),
        flops_per_step=flops_per_step(shapes, split, ranks, batch_size, seq_len, labels_on_device, checkpointing,
                                      warm=warm),
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


# --------------------------------------------------------------------------- ARMSC, the optimiser


def rank_value(rank: int, server_rank: int) -> float:
    """phi(r) = log2(1 + r) / log2(1 + r_server): what training a module at rank r is worth,
    1 at the rank the server's sessions train at, 0 without an adapter, with diminishing returns
    (our choice: a rank-2 adapter on a module is worth more than raising another from 8 to 16)."""
    return math.log2(1 + rank) / math.log2(1 + max(server_rank, 1))


def trained_importance(scores: Mapping[str, float], split_layer: int, ranks: Mapping[str, int], shapes: ModelShapes,
                       server_rank: int) -> float:
    """The share of the model's IWI importance one device's session trains, in [0, ~1.2]:

        I = [sum_{m in blocks < k} s_m phi(r_m) + sum_{m in blocks >= k} s_m phi(r_server)] / sum_m s_m

    The device trains blocks [0, k) at its ranks, its server session the rest at the server's
    rank. Without scores (or all zero) every module weighs the same."""
    weights = {m: max(scores.get(m, 0.0), 0.0) for m in shapes.modules}
    if sum(weights.values()) <= 0:
        weights = dict.fromkeys(shapes.modules, 1.0)
    total = sum(weights.values())
    trained = 0.0
    for module, weight in weights.items():
        rank = ranks.get(module, 0) if shapes.module_block[module] < split_layer else server_rank
        trained += weight * rank_value(rank, server_rank)
    return trained / total


@dataclass(frozen=True)
class Candidate:
    """One plan a device could take, with what it trains and what it costs a step."""

    split_layer: int
    ranks: dict[str, int]
    peak_bytes: int
    importance: float
    time: StepTime
    device_flops: float  # per step, `flops_per_step`


@dataclass(frozen=True)
class FleetOptions:
    """What ARMSC's optimiser needs besides the profiles, shapes and scores."""

    batch_size: int
    seq_len: int
    rank_set: tuple[int, ...] = (0, 2, 4, 8, 16)
    server_rank: int = 8  # hsplit.server_rank (or lora.rank): the server sessions' adapters on blocks [k, L)
    server_flops_per_s: float = 5e11
    labels_on_device: bool = False
    checkpointing: bool = False
    max_split: int | None = None
    allowed_splits: Callable[[int], bool] | None = None
    warm: WarmFrozen | None = None  # noise-free's warm start: its copies or factors count (`warm_bytes`)
    # hsplit.time_tokens=data: (tokens a row, labelled positions a step) the time model prices a
    # step at, from the planner's data; None: seq_len and every position (memory always uses seq_len)
    time_tokens: tuple[int, int] | None = None

    def memory(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "labels_on_device": self.labels_on_device,
                "checkpointing": self.checkpointing, "warm": self.warm}

    def candidate(self, profile: DeviceProfile, shapes: ModelShapes, scores: Mapping[str, float], split_layer: int,
                  ranks: dict[str, int]) -> Candidate:
        length, labelled = self.time_tokens if self.time_tokens is not None else (self.seq_len, None)
        device_flops = flops_per_step(shapes, split_layer, ranks, self.batch_size, length,
                                      self.labels_on_device, self.checkpointing, labelled=labelled, warm=self.warm)
        server_flops = server_flops_per_step(shapes, split_layer, self.server_rank, self.batch_size, length,
                                             self.labels_on_device, labelled=labelled)
        link = split_bytes_per_step(shapes, self.batch_size, length, self.labels_on_device)
        return Candidate(split_layer, ranks, predict_peak_bytes(shapes, split_layer, ranks, **self.memory()),
                         trained_importance(scores, split_layer, ranks, shapes, self.server_rank),
                         step_time(profile, device_flops, link, server_flops, self.server_flops_per_s), device_flops)


def _fits(profile: DeviceProfile, candidate: Candidate) -> bool:
    return candidate.peak_bytes <= profile.memory_bytes and (
        profile.max_step_s is None or candidate.time.total_s <= profile.max_step_s)


def device_candidates(profile: DeviceProfile, shapes: ModelShapes, scores: Mapping[str, float],
                      options: FleetOptions) -> list[Candidate]:
    """Per allowed split k, the best uniform plan that fits the device's memory and time budget:
    the largest rank of the rank set on every module of blocks [0, k), or, if none fits, the
    minimal adapter (`minimal_ranks`). Uniform plans are cheap to price (one peak each), so the
    optimiser can look at every k; `optimise_fleet` refines the ranks at the chosen k."""
    ranks_q = _validated_rank_set(options.rank_set)
    top = shapes.num_blocks - 1 if options.max_split is None else options.max_split
    found = []
    for k in range(1, max(1, min(top, shapes.num_blocks)) + 1):
        if options.allowed_splits is not None and not options.allowed_splits(k):
            continue
        modules = shapes.modules_before(k)
        plans = [{m: r for m in modules} for r in reversed(ranks_q[1:])] + [minimal_ranks(shapes, scores, k, ranks_q[1])]
        for ranks in plans:
            candidate = options.candidate(profile, shapes, scores, k, ranks)
            if _fits(profile, candidate):
                found.append(candidate)
                break
    return found


def fleet_objective(chosen: Sequence[Candidate]) -> float:
    """J = sum_i I_i / T_step: the importance the fleet trains per second of a simulated step of
    the whole fleet (`round_time_s`: the slowest device, or the server's shared work)."""
    return sum(c.importance for c in chosen) / max(round_time_s([c.time for c in chosen]), 1e-12)


def _ranking(chosen: Sequence[Candidate]) -> tuple[float, float]:
    """What the search maximises: J, then (at equal J) the least work left to the shared server."""
    return fleet_objective(chosen), -sum(c.time.server_s for c in chosen)


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    if a[0] > b[0] * (1 + 1e-9):
        return True
    return a[0] >= b[0] * (1 - 1e-9) and a[1] > b[1] + 1e-12 * abs(b[1])


def best_choice(candidates: Sequence[Sequence[Candidate]], *, max_sweeps: int = 50, exact_limit: int = 50_000) -> list[int]:
    """Which candidate each device takes, maximising `_ranking`.

    Exact (every combination) while there are at most `exact_limit` of them. Beyond that, a local
    search: from several starts (each device at its most important candidate; and, for every
    candidate step time tau, each device at its most important candidate within tau, or the one
    leaving the server least work), sweep the devices in order, moving each to its best candidate
    with the others fixed, until a sweep changes nothing; the best end point wins."""
    n = len(candidates)
    if math.prod(len(c) for c in candidates) <= exact_limit:
        best: tuple[tuple[float, float], tuple[int, ...]] | None = None
        for combo in itertools.product(*(range(len(c)) for c in candidates)):
            rank = _ranking([candidates[d][j] for d, j in enumerate(combo)])
            if best is None or _better(rank, best[0]):
                best = (rank, combo)
        assert best is not None
        return list(best[1])

    def within(found: Sequence[Candidate], tau: float, key: Callable[[Candidate], tuple[float, float]]) -> int:
        fitting = [j for j, c in enumerate(found) if c.time.total_s <= tau] or [min(range(len(found)), key=lambda j: found[j].time.total_s)]
        return max(fitting, key=lambda j: key(found[j]))

    starts = [[within(found, math.inf, lambda c: (c.importance, -c.time.server_s)) for found in candidates]]
    for tau in sorted({c.time.total_s for found in candidates for c in found}):
        starts.append([within(found, tau, lambda c: (c.importance, -c.time.server_s)) for found in candidates])
        starts.append([within(found, tau, lambda c: (-c.time.server_s, c.importance)) for found in candidates])
    ranked = sorted(starts, key=lambda choice: _ranking([candidates[d][j] for d, j in enumerate(choice)]), reverse=True)
    best_end: tuple[tuple[float, float], list[int]] | None = None
    for start in ranked[:8]:
        choice = list(start)
        for _ in range(max_sweeps):
            changed = False
            for i in range(n):
                for j in range(len(candidates[i])):
                    trial = [*choice[:i], j, *choice[i + 1:]]
                    if _better(_ranking([candidates[d][t] for d, t in enumerate(trial)]),
                               _ranking([candidates[d][t] for d, t in enumerate(choice)])):
                        choice[i], changed = j, True
            if not changed:
                break
        end = _ranking([candidates[d][j] for d, j in enumerate(choice)])
        if best_end is None or _better(end, best_end[0]):
            best_end = (end, choice)
    assert best_end is not None
    return best_end[1]


def optimise_fleet(profiles: Sequence[DeviceProfile], shapes: ModelShapes, scores: Mapping[str, float],
                   options: FleetOptions, *, max_sweeps: int = 50, exact_limit: int = 50_000) -> list[DevicePlan]:
    """ARMSC as an optimiser (`hsplit.planner=armsc`): every device's split and ranks, chosen
    together to maximise `fleet_objective` under every device's memory and time budget.

    1. Candidates: `device_candidates` per device (one per allowed k).
    2. The combination that maximises J (at equal J, the one leaving the server least work):
       `best_choice`, exact for small fleets, a local search beyond. A strong device goes deeper
       where that unloads the shared server without making it the straggler; a weak one stays shallow.
    3. Ranks at the chosen k: from the chosen candidate, `greedy_ranks` raises modules by
       importance gain per byte, s_m (phi(r') - phi(r)) / cost, within the memory budget and
       without the device's step exceeding the round's step time (or its own time budget), so
       the most important modules get more rank where memory is left.

    Raises PlanError naming a device that fits no plan at all.
    """
    all_candidates = []
    for profile in profiles:
        found = device_candidates(profile, shapes, scores, options)
        if not found:
            floor = "" if options.allowed_splits is None else " that the privacy floor (hsplit.min_split, hsplit.max_leakage) allows"
            raise PlanError(f"device {profile.name!r}: no split{floor} fits a memory budget of {profile.memory_bytes} bytes"
                            + ("" if profile.max_step_s is None else f" and a step time of {profile.max_step_s} s"))
        all_candidates.append(found)
    choice = best_choice(all_candidates, max_sweeps=max_sweeps, exact_limit=exact_limit)
    chosen = [all_candidates[i][j] for i, j in enumerate(choice)]
    round_step_s = round_time_s([c.time for c in chosen])
    plans = []
    for profile, candidate in zip(profiles, chosen):
        k = candidate.split_layer
        cap = round_step_s if profile.max_step_s is None else min(round_step_s, profile.max_step_s)

        def gain(module: str, rank: int, next_rank: int) -> float:
            return scores.get(module, 0.0) * (rank_value(next_rank, options.server_rank) - rank_value(rank, options.server_rank))

        def fits_time(ranks: Mapping[str, int], profile: DeviceProfile = profile, k: int = k, cap: float = cap) -> bool:
            return options.candidate(profile, shapes, scores, k, dict(ranks)).time.total_s <= cap

        ranks = greedy_ranks(shapes, scores, k, options.rank_set, profile.memory_bytes, gain=gain, fits_time=fits_time,
                             start=candidate.ranks, **options.memory())
        refined = options.candidate(profile, shapes, scores, k, ranks)
        best = refined if refined.importance > candidate.importance and _fits(profile, refined) else candidate
        plans.append(DevicePlan(profile.name, k, dict(best.ranks), best.peak_bytes, best.device_flops, profile.memory_bytes,
                                importance=best.importance, step_s=best.time.total_s))
    return plans
