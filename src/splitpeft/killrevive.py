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
from typing import Literal

import torch

from .adapters import LoraWeights

Selection = Literal["dynamic", "static_random", "static_score"]


def product_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """||B A||_F for A (r, d_in), B (d_out, r), via Gram matrices."""
    return float(((b.T @ b) * (a @ a.T)).sum().clamp(min=0).sqrt())


def update_norm(before: LoraWeights, after: LoraWeights) -> float:
    """||B1 A1 - B0 A0||_F without forming either product."""
    a = torch.cat([after.A, before.A], dim=0)     # (2r, d_in)
    b = torch.cat([after.B, -before.B], dim=1)    # (d_out, 2r)
    return product_norm(a, b)


@dataclass
class KillReviveSettings:
    warmup: int = 10
    interval: int = 5
    active_fraction: float = 0.125
    revive_interval: int = 10
    revive_margin: float = 0.1
    ema: float = 0.9
    selection: Selection = "dynamic"

    def __post_init__(self) -> None:
        if not 0 < self.active_fraction <= 1:
            raise ValueError("kill_revive.active_fraction must be in (0, 1]")
        if self.warmup < 0 or self.interval < 1 or self.revive_interval < 1:
            raise ValueError("kill_revive.warmup must be >= 0 and the intervals >= 1")
        if not 0 <= self.ema < 1:
            raise ValueError("kill_revive.ema must be in [0, 1)")
        if self.selection not in ("dynamic", "static_random", "static_score"):
            raise ValueError(f"kill_revive.selection {self.selection!r}: choose dynamic, static_random or static_score")


@dataclass
class KillRevive:
    """The policy's state for one holder of adapters (a device)."""

    settings: KillReviveSettings
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

    @property
    def killed(self) -> set[str]:
        return set(self.modules) - self.active

    @property
    def target_active(self) -> int:
        return max(1, round(self.settings.active_fraction * len(self.modules)))

    def wants_killed_gradients(self) -> bool:
        """Whether the coming step must also report gradient norms of killed adapters."""
        s = self.settings
        return (s.selection == "dynamic" and bool(self.killed)
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
        kill: list[str] = []
        revive: list[str] = []
        if self.step < s.warmup:
            self.active_history.append((self.step, frozenset(self.active)))
            return kill, revive
        if s.selection != "dynamic":
            if not self._frozen_choice and self.step >= max(1, s.warmup):
                self._frozen_choice = True
                kill = self._static_kills()
        else:
            if grad_norms and self.killed and self.step % s.revive_interval == 0:
                revive, kill = self._revivals(grad_norms)
            if self.step % s.interval == 0 or self.step == s.warmup:
                kill += self._lowest(len(self.active) - len(kill) + len(revive) - self.target_active, exclude=set(revive) | set(kill))
        self.active -= set(kill)
        self.active |= set(revive)
        if kill or revive:
            self.events.append({"step": self.step, "killed": sorted(kill), "revived": sorted(revive)})
        self.active_history.append((self.step, frozenset(self.active)))
        return kill, revive

    def _lowest(self, count: int, exclude: set[str]) -> list[str]:
        if count <= 0:
            return []
        candidates = sorted((n for n in self.active if n not in exclude), key=lambda n: (self.scores.get(n, 0.0), n))
        return candidates[:count]

    def _static_kills(self) -> list[str]:
        keep = self.target_active
        if self.settings.selection == "static_random":
            chosen = set(random.Random(self.seed).sample(sorted(self.modules), keep))
        else:
            ranked = sorted(self.modules, key=lambda n: (-self.scores.get(n, 0.0), n))
            chosen = set(ranked[:keep])
        return sorted(n for n in self.active if n not in chosen)

    def _revivals(self, grad_norms: Mapping[str, float]) -> tuple[list[str], list[str]]:
        """Killed adapters whose gradient norm beats the weakest active one by the margin swap in."""
        active = sorted((grad_norms.get(n, 0.0), n) for n in self.active)
        candidates = sorted(((grad_norms.get(n, 0.0), n) for n in self.killed), reverse=True)
        revive, kill = [], []
        for norm, name in candidates:
            if not active:
                break
            weakest_norm, weakest = active[0]
            if norm > (1 + self.settings.revive_margin) * weakest_norm:
                revive.append(name)
                kill.append(weakest)
                active.pop(0)
            else:
                break
        return revive, kill
