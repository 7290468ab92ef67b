"""Kill and Revive (DLoRA's KR): keep only the adapters that matter active on the device.

Every `interval` steps after `warmup`, each active adapter is scored by the size of its recent
update relative to its weight, an EMA of

    u_t = ||B_t A_t - B_{t-1} A_{t-1}||_F / ||B_t A_t||_F

and the lowest are killed until at most `active_fraction` of the modules stay active. A killed
adapter is frozen (its weights kept: killing never resets them); in `dlora` it is handed to the
server, which computes it from then on. Every `revive_interval` steps the killed adapters are scored
by their gradient norm on that step's batch and those beating the weakest active adapter by
`revive_margin` (relative) come back, each replacing the weakest active one.

Norms of B A are computed from r x r Gram matrices, never the dense (d_out, d_in) product:
||[B1 | -B0] [A1; A0]||_F^2 = sum((Bc^T Bc) * (Ac Ac^T)).

`selection` = "static_random" / "static_score" are the baselines: the same number of active
adapters, chosen once when warm-up ends (at random, or by the score at that moment), never changed.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from splitpeft.config import KillReviveConfig
from splitpeft.model.adapters import LoraWeights


def product_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """||B A||_F for A (r, d_in), B (d_out, r), via Gram matrices."""
    return float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt())


def update_norm(before: LoraWeights, after: LoraWeights) -> float:
    """||B1 A1 - B0 A0||_F without forming either product."""
    a = torch.cat([after.A, before.A], dim=0)     # (2r, d_in)
    b = torch.cat([after.B, -before.B], dim=1)    # (d_out, 2r)
    return product_norm(a, b)


def block_of(module: str) -> str:
    """The transformer block a module sits in: its name up to the first all-digit part
    (`model.layers.3.mlp.up_proj` -> `model.layers.3`); the whole name if there is none."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return module


def block_counts(modules: Iterable[str]) -> dict[str, int]:
    """Number of the given modules in each block."""
    counts: dict[str, int] = {}
    for name in modules:
        counts[block_of(name)] = counts.get(block_of(name), 0) + 1
    return counts


def jaccard(a: Collection[str], b: Collection[str]) -> float:
    """|a & b| / |a | b| (1 for two empty sets)."""
    union = len(set(a) | set(b))
    return len(set(a) & set(b)) / union if union else 1.0


def kr_summary(modules: Sequence[str], active_per_step: Sequence[Collection[str]],
               events: Sequence[Mapping[str, Any]], warmup: int, margin: float) -> dict[str, Any]:
    """How much the active set moved and how fast killed adapters' gradients came back.

    From a policy's `active_history` (or a report's `kill_revive.<device>.active_per_step`, as
    names) and `events`. After warm-up (the first cut excluded):

    * `kills`, `revives`: counts; `swaps_per_check`: revives per revive step that measured;
    * `jaccard_mean` / `jaccard_min`: overlap of the active sets before and after each decision;
    * `ever_active`: modules active on any post-warm-up step; `active_share`: per module, the
      share of post-warm-up steps it was active (`share_quantiles`: min, median, max of it over
      the ever-active ones);
    * `grad_ratio_by_age`: on each revive step, killed adapters' gradient norm / the weakest
      active one's, grouped by steps since their kill: count, median, max, share above 1 and
      above 1 + margin (would revive).
    """
    after = list(active_per_step[max(warmup, 1) - 1:])  # entry i: the set after step i + 1's decision
    counts = dict.fromkeys(modules, 0)
    for members in after:
        for name in members:
            counts[name] += 1
    share = {n: c / len(after) for n, c in counts.items()} if after else {}
    ever = sorted(n for n, c in counts.items() if c)
    shares = sorted(share[n] for n in ever)
    late = [e for e in events if int(e["step"]) > max(warmup, 1)]  # the warm-up cut excluded
    measured = [e for e in late if "killed_grad_ratio" in e]
    killed_at: dict[str, int] = {}
    by_age: dict[int, list[float]] = {}
    for event in events:
        step = int(event["step"])
        for name, ratio in dict(event.get("killed_grad_ratio", {})).items():
            by_age.setdefault(step - killed_at.get(name, max(warmup, 1)), []).append(float(ratio))
        for name in event["killed"]:
            killed_at[name] = step
    growth = {}
    for age, ratios in sorted(by_age.items()):
        ratios.sort()
        growth[age] = {"count": len(ratios), "median": ratios[len(ratios) // 2], "max": ratios[-1],
                       "above_1": sum(r > 1 for r in ratios) / len(ratios),
                       "above_margin": sum(r > 1 + margin for r in ratios) / len(ratios)}
    overlaps = [float(e["jaccard"]) for e in late if "jaccard" in e]
    return {
        "post_warmup_steps": len(after),
        "kills": sum(len(e["killed"]) for e in late),
        "revives": sum(len(e["revived"]) for e in late),
        "swaps_per_check": sum(len(e["revived"]) for e in measured) / len(measured) if measured else 0.0,
        "jaccard_mean": sum(overlaps) / len(overlaps) if overlaps else 1.0,
        "jaccard_min": min(overlaps, default=1.0),
        "ever_active": len(ever),
        "share_quantiles": [shares[0], shares[len(shares) // 2], shares[-1]] if shares else [],
        "active_share": share,
        "grad_ratio_by_age": growth,
    }


@dataclass
class KillRevive:
    """The policy's state for one holder of adapters (a device)."""

    settings: KillReviveConfig
    modules: Sequence[str]
    seed: int = 0
    active: set[str] = field(init=False)
    scores: dict[str, float] = field(default_factory=dict)
    grad_scores: dict[str, float] = field(default_factory=dict)  # `gradient`: EMA of each active adapter's gradient norm
    events: list[dict[str, object]] = field(default_factory=list)
    active_history: list[tuple[int, frozenset[str]]] = field(default_factory=list)
    step: int = 0
    _frozen_choice: bool = False
    # the median update score over the adapters when warm-up ended (`converged` with kill_threshold_relative)
    reference_score: float | None = None

    def __post_init__(self) -> None:
        self.active = set(self.modules)
        if self.settings.selection not in SELECTIONS:
            raise ValueError(f"kill_revive.selection {self.settings.selection!r}: choose from {', '.join(SELECTIONS)}")
        self.selection = SELECTIONS[self.settings.selection]()

    @property
    def killed(self) -> set[str]:
        return set(self.modules) - self.active

    @property
    def target_active(self) -> int:
        return max(1, round(self.settings.active_fraction * len(self.modules)))

    def wants_killed_gradients(self) -> bool:
        """Whether the coming step must also report gradient norms of killed adapters."""
        s = self.settings
        return (self.selection.revives and bool(self.killed)
                and self.step + 1 > s.warmup and (self.step + 1) % s.revive_interval == 0)

    def observe(self, before: Mapping[str, LoraWeights], after: Mapping[str, LoraWeights]) -> None:
        """Fold one step's updates of the active adapters into their scores."""
        for name in self.active:
            if name not in before or name not in after:
                continue
            size = product_norm(after[name].A, after[name].B)
            if size <= 0:
                ratio = 0.0
            elif not bool(before[name].B.any()):
                # From B = 0 the whole product is the update: exactly 1. Computed, it is 1 up to
                # rounding, and the first kill would rank every adapter by that noise (a CPU with
                # other kernels kills others); equal scores break by model order instead.
                ratio = 1.0
            else:
                ratio = update_norm(before[name], after[name]) / size
            previous = self.scores.get(name)
            self.scores[name] = ratio if previous is None else self.settings.ema * previous + (1 - self.settings.ema) * ratio

    def wants_active_gradients(self) -> bool:
        """Whether every step must report the active adapters' gradient norms (`gradient`)."""
        return self.selection.ranks_by_gradient

    def observe_gradients(self, grad_norms: Mapping[str, float]) -> None:
        """Fold one step's gradient norms of the active adapters into `grad_scores` (EMA, `ema`)."""
        for name in self.active:
            if name in grad_norms:
                previous = self.grad_scores.get(name)
                norm = float(grad_norms[name])
                self.grad_scores[name] = norm if previous is None else self.settings.ema * previous + (1 - self.settings.ema) * norm

    def decide(self, grad_norms: Mapping[str, float] | None = None) -> tuple[list[str], list[str]]:
        """After a step: (modules to kill, modules to revive) now. Advances the step counter."""
        self.step += 1
        s = self.settings
        if self.step < s.warmup:
            self.active_history.append((self.step, frozenset(self.active)))
            return [], []
        if self.reference_score is None:
            ranked = sorted(self.scores.get(n, 0.0) for n in self.modules)
            self.reference_score = ranked[len(ranked) // 2] if ranked else 0.0
        kill, revive = self.selection.choose(self, grad_norms)
        before = frozenset(self.active)
        self.active -= set(kill)
        self.active |= set(revive)
        if kill or revive or grad_norms:
            self.events.append(self._event(kill, revive, before, grad_norms))
        self.active_history.append((self.step, frozenset(self.active)))
        return kill, revive

    def _event(self, kill: list[str], revive: list[str], before: frozenset[str],
               grad_norms: Mapping[str, float] | None) -> dict[str, object]:
        """What one decision did and, on a revive step, what it saw (report data, `kr_summary`).

        `jaccard` = |before & after| / |before | after| of the active sets; `killed_grad_ratio`
        = each killed adapter's gradient norm / the weakest active one's, measured on this step
        (before the swap), so > 1 + revive_margin means it was worth reviving; `active_score_quantiles`
        = min, median, max update score over the active set before the decision; `killed_scores` = the
        update score of each adapter killed now (what `converged`'s bound compares)."""
        event: dict[str, object] = {"step": self.step, "killed": sorted(kill), "revived": sorted(revive),
                                    "active": len(self.active), "jaccard": jaccard(before, self.active)}
        scores = sorted(self.scores.get(n, 0.0) for n in before)
        if scores:  # the update scores the kill saw: min, median, max over the active set
            event["active_score_quantiles"] = [scores[0], scores[len(scores) // 2], scores[-1]]
        if kill:
            event["killed_scores"] = {n: self.scores.get(n, 0.0) for n in sorted(kill)}
        if self.selection.name == ConvergedSelection.name:
            event["kill_threshold"] = self.kill_threshold()
        if grad_norms:
            weakest = min((grad_norms.get(n, 0.0) for n in before), default=0.0)
            event["weakest_active_grad"] = weakest
            event["killed_grad_ratio"] = {n: (grad_norms.get(n, 0.0) / weakest if weakest > 0 else 0.0)
                                          for n in sorted(set(self.modules) - before)}
        return event

    def kill_threshold(self) -> float:
        """`converged`'s bound on the update score of an adapter it kills: `kill_threshold`, or with
        `kill_threshold_relative` that share of `reference_score`."""
        s = self.settings
        return s.kill_threshold * (self.reference_score or 0.0) if s.kill_threshold_relative else s.kill_threshold

    def summary(self) -> dict[str, Any]:
        """`kr_summary` of this policy's history so far."""
        return kr_summary(self.modules, [active for _, active in self.active_history], self.events,
                          self.settings.warmup, self.settings.revive_margin)

    def lowest(self, count: int, exclude: set[str], below: float | None = None,
               scores: Mapping[str, float] | None = None) -> list[str]:
        """Up to `count` active adapters (not in `exclude`) with the lowest `scores` (default the
        update scores), only scores < `below` if given, skipping any whose kill would leave its
        block fewer than `block_floor` active adapters (`exclude`'s members count as gone)."""
        if count <= 0:
            return []
        ranking = self.scores if scores is None else scores
        candidates = sorted((n for n in self.active if n not in exclude), key=lambda n: (ranking.get(n, 0.0), n))
        if below is not None:
            candidates = [n for n in candidates if ranking.get(n, 0.0) < below]
        floor = self.settings.block_floor
        if floor == 0:
            return candidates[:count]
        left = block_counts(n for n in self.active if n not in exclude)
        chosen: list[str] = []
        for name in candidates:
            if len(chosen) == count:
                break
            if left[block_of(name)] > floor:
                chosen.append(name)
                left[block_of(name)] -= 1
        return chosen


class Selection(Protocol):
    """How Kill and Revive picks the active set once warm-up is over (`kill_revive.selection`)."""

    name: ClassVar[str]
    revives: ClassVar[bool]  # asks for killed adapters' gradient norms every revive_interval
    ranks_by_gradient: ClassVar[bool]  # asks for the active adapters' gradient norms every step
    chooses_once: ClassVar[bool]  # picks the active set once, by count, when warm-up ends (the static baselines)

    def choose(self, policy: KillRevive, grad_norms: Mapping[str, float] | None) -> tuple[list[str], list[str]]:
        """(kill, revive) after `policy.step`."""
        ...


class DynamicSelection:
    """KR: every `interval` steps kill the lowest update scores down to the target; every
    `revive_interval` steps killed adapters whose gradient norm beats the weakest active one by
    `revive_margin` swap in."""

    name: ClassVar[str] = "dynamic"
    revives: ClassVar[bool] = True
    chooses_once: ClassVar[bool] = False
    ranks_by_gradient: ClassVar[bool] = False

    def choose(self, policy: KillRevive, grad_norms: Mapping[str, float] | None) -> tuple[list[str], list[str]]:
        s = policy.settings
        kill: list[str] = []
        revive: list[str] = []
        if grad_norms and policy.killed and policy.step % s.revive_interval == 0:
            revive, kill = self._revivals(policy, grad_norms)
        if policy.step % s.interval == 0 or policy.step == s.warmup:
            kill += self.kills(policy, len(policy.active) - len(kill) + len(revive), exclude=set(revive) | set(kill))
        return kill, revive

    def kills(self, policy: KillRevive, active: int, exclude: set[str]) -> list[str]:
        """On a kill step with `active` adapters after the revivals: the lowest scores down to the target."""
        return policy.lowest(active - policy.target_active, exclude=exclude)

    @staticmethod
    def _revivals(policy: KillRevive, grad_norms: Mapping[str, float]) -> tuple[list[str], list[str]]:
        """Killed adapters whose gradient norm beats the weakest active one by the margin swap in
        (the weakest whose kill keeps its block at `block_floor`; the revived count toward it)."""
        active = sorted((grad_norms.get(n, 0.0), n) for n in policy.active)
        candidates = sorted(((grad_norms.get(n, 0.0), n) for n in policy.killed), reverse=True)
        floor = policy.settings.block_floor
        left = block_counts(policy.active)
        revive, kill = [], []
        for norm, name in candidates:
            if floor:
                left[block_of(name)] = left.get(block_of(name), 0) + 1
                active = [(g, n) for g, n in active if left[block_of(n)] > floor]
            if not active:
                break
            weakest_norm, weakest = active[0]
            if norm > (1 + policy.settings.revive_margin) * weakest_norm:
                revive.append(name)
                kill.append(weakest)
                active.pop(0)
                left[block_of(weakest)] -= 1
            else:
                break
        return revive, kill


class ScheduledSelection(DynamicSelection):
    """KR with a shrinking target: at the j-th kill step after warm-up (j = (step - warmup) //
    interval, j = 0 when warm-up ends) at most

        f_j = f_end + (fraction_start - f_end) * max(0, 1 - j / decay_intervals)

    of the adapters stay active (f_end = active_fraction; decay_intervals = 0: f_end at once),
    i.e. round(f_j * n) of n, at least 1; the lowest scores go first. Revivals as `dynamic`."""

    name: ClassVar[str] = "scheduled"

    def kills(self, policy: KillRevive, active: int, exclude: set[str]) -> list[str]:
        return policy.lowest(active - scheduled_target(policy.settings, len(policy.modules), policy.step), exclude=exclude)


def scheduled_target(settings: KillReviveConfig, modules: int, step: int) -> int:
    """`scheduled`'s active count after the kill step `step` (>= warmup), out of `modules`."""
    j = max(0, step - settings.warmup) // settings.interval
    left = max(0.0, 1 - j / settings.decay_intervals) if settings.decay_intervals else 0.0
    fraction = settings.active_fraction + (settings.fraction_start - settings.active_fraction) * left
    return max(1, round(fraction * modules))


class ConvergedSelection(DynamicSelection):
    """KR by a convergence test: on a kill step only active adapters whose update score (EMA of
    ||delta(B A)|| / ||B A|| per step) is below `kill_threshold` are killed, lowest first, and never
    below the target (active_fraction): an adapter still moving keeps training, so the active set
    shrinks only as fast as the adapters converge. With `kill_threshold_relative` the bound is that
    share of the median score over the device's adapters when warm-up ended (`policy.kill_threshold`).
    Revivals as `dynamic`."""

    name: ClassVar[str] = "converged"

    def kills(self, policy: KillRevive, active: int, exclude: set[str]) -> list[str]:
        return policy.lowest(active - policy.target_active, exclude=exclude, below=policy.kill_threshold())


class GradientSelection(DynamicSelection):
    """KR that kills by what revives: on a kill step the active adapters with the lowest EMA of
    their gradient norm (`grad_scores`, folded every step with `ema`) are killed down to the
    target, and killed adapters whose gradient norm on a revive step beats the weakest active
    one's (this step's norm) by `revive_margin` swap in, as `dynamic`. Measured on SmolLM2,
    `dynamic`'s update score kills adapters whose gradients are still larger than the survivors'
    (BENCHMARKS.md), so its revivals undo its kills; here both rules rank by one quantity."""

    name: ClassVar[str] = "gradient"
    ranks_by_gradient: ClassVar[bool] = True

    def kills(self, policy: KillRevive, active: int, exclude: set[str]) -> list[str]:
        return policy.lowest(active - policy.target_active, exclude=exclude, scores=policy.grad_scores)


class _StaticSelection:
    """Baseline: the target number of active adapters, chosen once when warm-up ends, never changed."""

    name: ClassVar[str]
    revives: ClassVar[bool] = False
    ranks_by_gradient: ClassVar[bool] = False
    chooses_once: ClassVar[bool] = True

    def choose(self, policy: KillRevive, grad_norms: Mapping[str, float] | None) -> tuple[list[str], list[str]]:
        if policy._frozen_choice or policy.step < max(1, policy.settings.warmup):
            return [], []
        policy._frozen_choice = True
        chosen = self.keep(policy, policy.target_active)
        return sorted(n for n in policy.active if n not in chosen), []

    def keep(self, policy: KillRevive, count: int) -> set[str]:
        raise NotImplementedError


class StaticRandomSelection(_StaticSelection):
    name: ClassVar[str] = "static_random"

    def keep(self, policy: KillRevive, count: int) -> set[str]:
        return set(random.Random(policy.seed).sample(sorted(policy.modules), count))


class StaticScoreSelection(_StaticSelection):
    name: ClassVar[str] = "static_score"

    def keep(self, policy: KillRevive, count: int) -> set[str]:
        return set(sorted(policy.modules, key=lambda n: (-policy.scores.get(n, 0.0), n))[:count])


SELECTIONS: dict[str, type[Selection]] = {
    cls.name: cls for cls in (DynamicSelection, ScheduledSelection, ConvergedSelection, GradientSelection,
                              StaticRandomSelection, StaticScoreSelection)
}
