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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

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


@dataclass
class KillRevive:
    """The policy's state for one holder of adapters (a device)."""

    settings: KillReviveConfig
    modules: Sequence[str]
    seed: int = 0
    active: set[str] = field(init=False)
    scores: dict[str, float] = field(default_factory=dict)
    events: list[dict[str, object]] = field(default_factory=list)
    active_history: list[tuple[int, frozenset[str]]] = field(default_factory=list)
    step: int = 0
    _frozen_choice: bool = False

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
            ratio = update_norm(before[name], after[name]) / size if size > 0 else 0.0
            previous = self.scores.get(name)
            self.scores[name] = ratio if previous is None else self.settings.ema * previous + (1 - self.settings.ema) * ratio

    def decide(self, grad_norms: Mapping[str, float] | None = None) -> tuple[list[str], list[str]]:
        """After a step: (modules to kill, modules to revive) now. Advances the step counter."""
        self.step += 1
        s = self.settings
        if self.step < s.warmup:
            self.active_history.append((self.step, frozenset(self.active)))
            return [], []
        kill, revive = self.selection.choose(self, grad_norms)
        self.active -= set(kill)
        self.active |= set(revive)
        if kill or revive:
            self.events.append({"step": self.step, "killed": sorted(kill), "revived": sorted(revive)})
        self.active_history.append((self.step, frozenset(self.active)))
        return kill, revive

    def lowest(self, count: int, exclude: set[str]) -> list[str]:
        if count <= 0:
            return []
        candidates = sorted((n for n in self.active if n not in exclude), key=lambda n: (self.scores.get(n, 0.0), n))
        return candidates[:count]


class Selection(Protocol):
    """How Kill and Revive picks the active set once warm-up is over (`kill_revive.selection`)."""

    name: ClassVar[str]
    revives: ClassVar[bool]  # asks for killed adapters' gradient norms every revive_interval

    def choose(self, policy: KillRevive, grad_norms: Mapping[str, float] | None) -> tuple[list[str], list[str]]:
        """(kill, revive) after `policy.step`."""
        ...


class DynamicSelection:
    """KR: every `interval` steps kill the lowest update scores down to the target; every
    `revive_interval` steps killed adapters whose gradient norm beats the weakest active one by
    `revive_margin` swap in."""

    name: ClassVar[str] = "dynamic"
    revives: ClassVar[bool] = True

    def choose(self, policy: KillRevive, grad_norms: Mapping[str, float] | None) -> tuple[list[str], list[str]]:
        s = policy.settings
        kill: list[str] = []
        revive: list[str] = []
        if grad_norms and policy.killed and policy.step % s.revive_interval == 0:
            revive, kill = self._revivals(policy, grad_norms)
        if policy.step % s.interval == 0 or policy.step == s.warmup:
            excess = len(policy.active) - len(kill) + len(revive) - policy.target_active
            kill += policy.lowest(excess, exclude=set(revive) | set(kill))
        return kill, revive

    @staticmethod
    def _revivals(policy: KillRevive, grad_norms: Mapping[str, float]) -> tuple[list[str], list[str]]:
        """Killed adapters whose gradient norm beats the weakest active one by the margin swap in."""
        active = sorted((grad_norms.get(n, 0.0), n) for n in policy.active)
        candidates = sorted(((grad_norms.get(n, 0.0), n) for n in policy.killed), reverse=True)
        revive, kill = [], []
        for norm, name in candidates:
            if not active:
                break
            weakest_norm, weakest = active[0]
            if norm > (1 + policy.settings.revive_margin) * weakest_norm:
                revive.append(name)
                kill.append(weakest)
                active.pop(0)
            else:
                break
        return revive, kill


class _StaticSelection:
    """Baseline: the target number of active adapters, chosen once when warm-up ends, never changed."""

    name: ClassVar[str]
    revives: ClassVar[bool] = False

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
    cls.name: cls for cls in (DynamicSelection, StaticRandomSelection, StaticScoreSelection)
}
