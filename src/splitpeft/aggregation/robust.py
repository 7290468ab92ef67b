"""Robust aggregation: no holder's update is taken at its word (DESIGN.md, "Robust aggregation").

Named policies behind the same `Aggregator` interface (`robust.*` in the config):

- `MedianClip(inner, c, trust)`: before `inner` sees them, every copy's update is scaled down to at
  most c times a reference update m of its module, and no coordinate of A or B may have moved
  further than AdamW can move it in one round (`AdamTrustRegion`). The reference is never set by
  the copies being judged alone:

  * 3 or more copies: m is the median update of the module's copies (honest while fewer than half
    of them are bad);
  * 1 or 2 copies (a small fleet, `devices_per_round` <= 2, or Kill and Revive leaving an
    attacker's upload the only copy of a module): the median would include the judged copy itself
    (with 2 copies it is the mean of the two), so m is the module's own history instead: the median
    of its accepted (clipped) update medians over the last `HISTORY_ROUNDS` rounds it was
    aggregated in; in a module's first round there is no history and the trust region alone bounds it.

  The trust region is the hard backstop whatever the count: AdamW moves a coordinate by at most
  lr f(t) per step (`adam_step_bound`), so over a round of S local steps no honest holder's A or B
  coordinate moves further than lr S max f, and a copy's dA, dB are clamped to that box. It comes
  from the run's config (lr, local steps, the optimiser's betas), never from an upload, so an
  honest copy is never clamped (`tests/aggregation/test_robust_few_copies.py` trains real AdamW steps
  against it) and a history that attackers inflate round after round stops there.

  What "update" means for the relative clip follows what `inner` combines:

  * products (`noise_free`, `svd`): U_i = s_i B_i A_i - s_i B0_i A0_i (d_out, d_in), the change of
    the copy's dense update from the adapter (A0, B0) its holder started the round with. With
    B0 = 0 (noise-free restarts every adapter at B = 0, and every first round starts there) the
    clip is exact and linear, B_i <- f B_i, so the stacked product sees f U_i, f = c m / ||U_i||.
    Otherwise A and B move back toward the start, A0 + f dA and B0 + f dB, with f solving
    ||f X + f^2 Y|| = c m (X = s (dB A0 + B0 dA), Y = s dB dA, so U = X + Y).
  * factors (`fedavg`, `zero_pad`, `trimmed_mean`, `median`): dA_i = A_i - A0_i and
    dB_i = B_i - B0_i, each clipped to c times its own median. These aggregators combine A and B
    separately, so a holder moves the result through dA and dB, not through its product: an A
    scaled by 1e3 with B = B0 = 0 has a zero product update and still multiplies the global one.

- `TrimmedMean(fraction)` and `CoordinateMedian()`: fedavg-style (equal ranks, A and B combined
  separately), per coordinate over the n copies: drop the k largest and k smallest values and
  average the rest (k = ceil(fraction n), at most (n - 1) // 2), or take the median
  (k = (n - 1) // 2: the middle value, or the mean of the middle two). Unweighted, as in
  Yin et al. (2018): a token weight would hand a heavy holder back the influence trimming removes.

Norms are computed from the factors in float64, never as a dense (d_out, d_in) matrix:
<L1 R1, L2 R2>_F = sum((L1^T L2) * (R1 R2^T)) for L (d_out, k), R (k, d_in).
Written by hand: no federated-learning library we use clips LoRA factor pairs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache, partial

import torch

from splitpeft.aggregation.base import (
    AdapterCopy,
    Aggregate,
    AggregationError,
    Aggregator,
    Clip,
    check_copies,
    per_tensor_reductions,
)
from splitpeft.aggregation.fedavg import check_homogeneous
from splitpeft.model.adapters import LoraWeights

HISTORY_ROUNDS = 3  # rounds of accepted update norms a module's history keeps


@cache  # asked for every module of every round, with the same few step counts
def adam_step_bound(steps: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """max over t <= `steps` of the largest |m_hat_t| / sqrt(v_hat_t) AdamW can take at step t,
    whatever the gradients: the step of one coordinate is lr times at most this (eps only shrinks it).

    By Cauchy-Schwarz on m_t = (1 - b1) sum_i b1^(t-i) g_i against v_t = (1 - b2) sum_i b2^(t-i) g_i^2:
    |m_t| <= (1 - b1) sqrt(sum_{k<t} (b1^2 / b2)^k) sqrt(v_t / (1 - b2)), and the bias corrections
    give f(t) = (1 - b1) sqrt(sum_{k<t} r^k / (1 - b2)) sqrt(1 - b2^t) / (1 - b1^t), r = b1^2 / b2 < 1.
    f(1) = 1 (Adam's first step is lr sign(g)); f rises to about 1.04 at t = 10, 2.2 at 100 and tends
    to (1 - b1) / sqrt((1 - b2)(1 - r)) = 7.27 for the default betas."""
    b1, b2 = betas
    r = b1 * b1 / b2
    if not r < 1:
        raise ValueError(f"betas {betas}: b1^2 / b2 must be < 1 for a bounded Adam step")
    t = torch.arange(1, max(1, min(steps, 1_000_000)) + 1, dtype=torch.float64)
    geometric = (1 - r**t) / (1 - r)
    f = (1 - b1) * torch.sqrt(geometric / (1 - b2)) * torch.sqrt(1 - b2**t) / (1 - b1**t)
    return float(f.max())


@dataclass(frozen=True)
class AdamTrustRegion:
    """How far one round of AdamW can move any coordinate of an adapter: lr S max_{t<=T} f(t)
    (`adam_step_bound`), S = local steps a round, T = the most optimiser steps a holder can have
    taken by the end of round `round_index` ((round_index + 1) S). Weight decay is 0 in every party.
    `slack` covers float rounding of the optimiser's own arithmetic."""

    lr: float
    local_steps: int
    betas: tuple[float, float] = (0.9, 0.999)
    slack: float = 1.01

    def coordinate_bound(self, round_index: int) -> float:
        most_steps = (round_index + 1) * self.local_steps
        return self.slack * self.lr * self.local_steps * adam_step_bound(most_steps, self.betas)


class FactorUpdates:
    """dA_i = A_i - A0_i and dB_i = B_i - B0_i of every copy, as the factor clips need them: the
    norm (float64) and the largest |coordinate| of each, batched (`per_tensor_reductions`); the
    deltas themselves only for the copies asked (`delta`)."""

    def __init__(self, copies: Sequence[AdapterCopy], starts: Sequence[LoraWeights]) -> None:
        self.copies, self.starts = list(copies), list(starts)
        self.norms: dict[str, list[float]] = {}
        self.largest: dict[str, list[float]] = {}
        for index, key in enumerate("AB"):
            reduced = per_tensor_reductions([c.weights[index] for c in self.copies], ("norm", "max_abs"),
                                            minus=[start[index] for start in self.starts])
            self.norms[key], self.largest[key] = reduced["norm"], reduced["max_abs"]

    def delta(self, key: str, i: int) -> torch.Tensor:
        return self.copies[i].weights["AB".index(key)] - self.starts[i]["AB".index(key)]


def clamp_to_trust_region(module: str, copies: Sequence[AdapterCopy], bound: float,
                          updates: FactorUpdates | None = None) -> tuple[list[AdapterCopy], list[Clip]]:
    """Copies whose dA or dB (from the adapter their holder was given) has a coordinate beyond
    +-`bound`, clamped into that box; one Clip ("A-box" / "B-box", factor = the largest
    coordinate's shrink) per clamped factor. `updates`: the copies' `FactorUpdates`, if known."""
    if updates is None:
        updates = FactorUpdates(copies, [start_of(copy) for copy in copies])
    out, clips = [], []
    for i, copy in enumerate(copies):
        if updates.largest["A"][i] <= bound and updates.largest["B"][i] <= bound:
            out.append(copy)
            continue
        start = updates.starts[i]
        new = {"A": copy.weights.A, "B": copy.weights.B}
        for key, old in (("A", start.A), ("B", start.B)):
            largest = updates.largest[key][i]
            if largest <= bound:
                continue
            delta = updates.delta(key, i)
            new[key] = old + delta.clamp(-bound, bound)
            clips.append(Clip(copy.holder, module, bound / largest, float(delta.double().norm()),
                              bound, f"{key}-box"))
        out.append(replace(copy, weights=LoraWeights(new["A"], new["B"]), checked=False))
    return out, clips


def start_of(copy: AdapterCopy) -> LoraWeights:
    """The adapter `copy`'s holder started from (zeros when unknown), in the copy's dtype."""
    a, b = copy.weights
    if copy.start is None:
        return LoraWeights(torch.zeros_like(a), torch.zeros_like(b))
    a0, b0 = copy.start
    if a0.shape != a.shape or b0.shape != b.shape:
        raise AggregationError(f"{copy.holder}: its start A{tuple(a0.shape)} B{tuple(b0.shape)} does not match its "
                               f"upload A{tuple(a.shape)} B{tuple(b.shape)}")
    if a0.dtype == a.dtype and b0.dtype == b.dtype:
        return copy.start
    return LoraWeights(a0.to(a.dtype), b0.to(b.dtype))


def product_update_terms(copy: AdapterCopy) -> tuple[float, float, float]:
    """(||X||^2, <X, Y>, ||Y||^2) of the dense update U = X + Y of `copy` (see the module doc):
    X = s (dB A0 + B0 dA) = s [dB | B0] [A0; dA], Y = s dB dA, both (d_out, d_in).

    With L = s [dB | B0] (d_out, 2r) and R = [A0; dA] (2r, d_in), <L1 R1, L2 R2>_F = sum((L1^T L2) *
    (R1 R2^T)), and Y = L[:, :r] R[r:]: all three terms come from the two (2r, 2r) Gram matrices
    G = L^T L and H = R R^T, in float64 (one cast of each factor, two products)."""
    a, b = (t.double() for t in copy.weights)
    a0, b0 = (t.double() for t in start_of(copy))
    da, db = a - a0, b - b0
    r = int(a.shape[0])
    left, right = copy.scale * torch.cat([db, b0], dim=1), torch.cat([a0, da], dim=0)  # (d_out, 2r), (2r, d_in)
    g, h = left.T @ left, right @ right.T  # (2r, 2r) each
    xx = float((g * h).sum())
    xy = float((g[:, :r] * h[:, r:]).sum())
    yy = float((g[:r, :r] * h[r:, r:]).sum())
    return xx, xy, yy


def product_update_norm(copy: AdapterCopy) -> float:
    """||s B A - s B0 A0||_F of `copy`, from its factors."""
    xx, xy, yy = product_update_terms(copy)
    return math.sqrt(max(0.0, xx + 2 * xy + yy))


def _interpolation_factor(xx: float, xy: float, yy: float, limit: float) -> float:
    """The largest f in [0, 1] found by bisection with ||f X + f^2 Y|| <= limit, where
    ||f X + f^2 Y||^2 = f^2 xx + 2 f^3 xy + f^4 yy (0 at f = 0, above limit^2 at f = 1)."""
    low, high = 0.0, 1.0
    for _ in range(60):
        f = (low + high) / 2
        if f * f * xx + 2 * f**3 * xy + f**4 * yy <= limit * limit:
            low = f
        else:
            high = f
    return low


Reference = Callable[[str, list[float]], float | None]  # (quantity, the copies' norms) -> m, or None: no relative clip


def median_reference(on: str, norms: list[float]) -> float:
    """The default `Reference`: the median of the copies' update norms, whatever the quantity."""
    return statistics.median(norms)


def clip_products(module: str, copies: Sequence[AdapterCopy], factor: float,
                  reference: Reference = median_reference) -> tuple[list[AdapterCopy], list[Clip], list[float]]:
    """Copies whose dense update exceeds `factor` x the reference m (by default the median one),
    scaled down to it; with the clips, and the dense update norm of each copy returned (computed
    again only for the copies scaled down)."""
    norms = [product_update_norm(c) for c in copies]
    m = reference("BA", norms)
    if m is None:
        return list(copies), [], norms
    limit = factor * m
    out, clips, kept = [], [], []
    for copy, norm in zip(copies, norms):
        if limit <= 0 or norm <= limit:  # a zero median gives no scale to clip to
            out.append(copy)
            kept.append(norm)
            continue
        a, b = copy.weights
        a0, b0 = start_of(copy)
        if not bool(b0.any()):  # exact: s (f B) A = f U
            f = limit / norm
            weights = LoraWeights(a, b * f)
        else:
            f = _interpolation_factor(*product_update_terms(copy), limit)
            weights = LoraWeights(a0 + f * (a - a0), b0 + f * (b - b0))
        out.append(replace(copy, weights=weights, checked=False))
        kept.append(product_update_norm(out[-1]))
        clips.append(Clip(copy.holder, module, f, norm, limit, "BA"))
    return out, clips, kept


def clip_factors(module: str, copies: Sequence[AdapterCopy], factor: float,
                 reference: Reference = median_reference,
                 updates: FactorUpdates | None = None) -> tuple[list[AdapterCopy], list[Clip]]:
    """Copies whose A or B update exceeds `factor` x the reference (of A, of B; by default the
    median one), scaled down to it. `updates`: the copies' `FactorUpdates`, if known."""
    if updates is None:
        updates = FactorUpdates(copies, [start_of(c) for c in copies])
    norms = updates.norms
    references = {key: reference(key, values) for key, values in norms.items()}
    limits = {key: (factor * m if m is not None else math.inf) for key, m in references.items()}
    out, clips = [], []
    for i, (copy, start) in enumerate(zip(copies, updates.starts)):
        if all(limits[key] > 0 and norms[key][i] <= limits[key] for key in "AB"):
            out.append(copy)
            continue
        new = {"A": copy.weights.A, "B": copy.weights.B}
        for key, old in (("A", start.A), ("B", start.B)):
            norm, limit = norms[key][i], limits[key]
            if limit <= 0 or norm <= limit:
                continue
            f = limit / norm
            new[key] = old + f * (new[key] - old)
            clips.append(Clip(copy.holder, module, f, norm, limit, key))
        out.append(copy if new["A"] is copy.weights.A and new["B"] is copy.weights.B
                   else replace(copy, weights=LoraWeights(new["A"], new["B"]), checked=False))
    return out, clips


class MedianClip:
    """Any aggregator, behind per-holder update clipping (module doc): each copy's dA, dB clamped to
    the AdamW trust region `trust` (None: no trust region), then its update scaled down to at most
    `factor` x the module's reference update (the median of 3 or more copies, else the module's
    history). Copies within both reach `inner` untouched, so honest rounds whose updates are all
    alike aggregate exactly as without it.

    State across rounds (`history`, `rounds`) goes into checkpoints (`state` / `load_state`), so a
    resumed run clips as the uninterrupted one would. `finish_round` closes a round."""

    def __init__(self, inner: Aggregator, factor: float = 4.0, trust: AdamTrustRegion | None = None) -> None:
        if not (math.isfinite(factor) and factor >= 1):
            raise ValueError(f"clip factor must be a finite number >= 1, not {factor!r}")
        self.inner = inner
        self.factor = factor
        self.trust = trust
        self.name = inner.name
        self.shared_adapter = inner.shared_adapter
        self.averages_factors = inner.averages_factors
        self.warm_restarts = inner.warm_restarts
        self.rounds = 0  # rounds aggregated so far (the trust region grows with the optimiser's step count)
        # module -> quantity ("BA", "A", "B") -> medians of the accepted update norms of its last rounds
        self.history: dict[str, dict[str, list[float]]] = {}
        self._this_round: dict[str, dict[str, float]] = {}

    def reference(self, module: str, on: str, norms: list[float]) -> float | None:
        """m for `module`'s quantity `on` given the copies' update `norms`: their median with 3 or
        more copies, else the median of the module's history (None: no history yet)."""
        if len(norms) >= 3:
            return statistics.median(norms)
        past = self.history.get(module, {}).get(on)
        return statistics.median(past) if past else None

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate:
        check_copies(module, copies)
        reference: Reference = partial(self.reference, module)
        boxed: list[Clip] = []
        if not self.averages_factors:
            if self.trust is not None:
                copies, boxed = clamp_to_trust_region(module, copies, self.trust.coordinate_bound(self.rounds))
            clipped, clips, accepted = clip_products(module, copies, self.factor, reference)
            norms = {"BA": accepted}
        else:
            # the factor updates' statistics, computed again only where a clamp or clip changed a copy
            updates = FactorUpdates(copies, [start_of(c) for c in copies])
            if self.trust is not None:
                copies, boxed = clamp_to_trust_region(module, copies, self.trust.coordinate_bound(self.rounds), updates)
                if boxed:
                    updates = FactorUpdates(copies, updates.starts)
            clipped, clips = clip_factors(module, copies, self.factor, reference, updates)
            if clips:
                updates = FactorUpdates(clipped, updates.starts)
            norms = updates.norms
        # this round's median accepted update of the module (after clipping), for its history
        self._this_round[module] = {on: statistics.median(values) for on, values in norms.items()}
        result = self.inner.aggregate(module, clipped)
        result.clipped = [*boxed, *clips, *result.clipped]
        return result

    def finish_round(self) -> None:
        """Close a round: its accepted medians join each module's history (the last HISTORY_ROUNDS kept)."""
        for module, medians in self._this_round.items():
            kept = self.history.setdefault(module, {})
            for on, value in medians.items():
                if value > 0:  # a module nobody moved gives no scale
                    kept[on] = [*kept.get(on, []), value][-HISTORY_ROUNDS:]
        self._this_round = {}
        self.rounds += 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The inner aggregator's tensors across rounds (centered clipping's centres), if any."""
        inner = getattr(self.inner, "state_tensors", None)
        return inner() if inner is not None else {}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        inner = getattr(self.inner, "load_state_tensors", None)
        if inner is not None:
            inner(tensors)

    def state(self) -> dict[str, object]:
        """What a checkpoint keeps of this policy (JSON)."""
        return {"rounds": self.rounds, "history": self.history}

    def load_state(self, state: Mapping[str, object]) -> None:
        """Inverse of `state`; raises ValueError on anything but what `state` writes."""
        rounds, history = state.get("rounds"), state.get("history")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0 or not isinstance(history, dict):
            raise ValueError("robust clipping state: 'rounds' must be an integer >= 0 and 'history' an object")
        loaded: dict[str, dict[str, list[float]]] = {}
        for module, quantities in history.items():
            if not isinstance(quantities, dict) or not set(quantities) <= {"BA", "A", "B"}:
                raise ValueError(f"robust clipping state: history of {module!r} is malformed")
            for on, values in quantities.items():
                if (not isinstance(values, list) or len(values) > HISTORY_ROUNDS
                        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                                   for v in values)):
                    raise ValueError(f"robust clipping state: history {module!r}/{on} must be up to "
                                     f"{HISTORY_ROUNDS} finite positive numbers")
                loaded.setdefault(module, {})[on] = [float(v) for v in values]
        self.rounds, self.history, self._this_round = rounds, loaded, {}


def coordinate_trimmed_mean(stacked: torch.Tensor, k: int) -> torch.Tensor:
    """(n, ...) -> (...): per coordinate, the mean of the values left after dropping the k
    smallest and the k largest (0 <= 2k < n)."""
    n = stacked.shape[0]
    if k == 0:
        return stacked.mean(dim=0)
    return stacked.sort(dim=0).values[k: n - k].mean(dim=0)


class TrimmedMean:
    """Coordinate-wise trimmed mean of A and of B (equal ranks): k = ceil(fraction n) values cut
    at each end of every coordinate, at most (n - 1) // 2, so at least one value is left."""

    name = "trimmed_mean"
    shared_adapter = True
    averages_factors = True
    warm_restarts = False

    def __init__(self, fraction: float = 0.2) -> None:
        if not 0 <= fraction < 0.5:
            raise ValueError(f"trim fraction must be in [0, 0.5), not {fraction!r}")
        self.fraction = fraction

    def trimmed(self, n: int) -> int:
        """Values cut at each end of a coordinate when there are n copies."""
        return min(math.ceil(self.fraction * n), (n - 1) // 2)

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate:
        check_homogeneous(module, copies, self.name)
        k = self.trimmed(len(copies))
        dtype = torch.promote_types(copies[0].weights.A.dtype, copies[0].weights.B.dtype)
        for c in copies[1:]:
            dtype = torch.promote_types(dtype, torch.promote_types(c.weights.A.dtype, c.weights.B.dtype))
        a = coordinate_trimmed_mean(torch.stack([c.weights.A.to(dtype) for c in copies]), k)  # (r, d_in)
        b = coordinate_trimmed_mean(torch.stack([c.weights.B.to(dtype) for c in copies]), k)  # (d_out, r)
        merged = LoraWeights(a, b)
        return Aggregate({c.holder: merged for c in copies})


class CenteredClip:
    """Centered clipping (Karimireddy, He and Jaggi, "Learning from History for Byzantine Robust
    Optimization", ICML 2021) of fedavg's factor updates, with the module's previous aggregate
    update as the centre (the server's momentum): robust with few copies and under collusion,
    because each copy moves the result by at most tau / n whatever it sends.

    Per module, x_i = (dA_i, dB_i) (the copy's factor updates, flattened), v_0 = the module's
    aggregate update of its last round (0 in its first), then `iterations` times
    v <- v + (1/n) sum_i clip_tau(x_i - v), clip_tau(z) = z min(1, tau / ||z||). The radius tau is
    `radius_factor` x the median ||x_i - v_0|| with 3 or more copies, else x ||v_0|| (the last
    round's aggregate); with neither (a module's first round with 1 or 2 copies) the plain mean
    (the robust clipping in front of it, `MedianClip`'s trust region, still bounds each copy).
    Unweighted, as in the paper: a token weight would hand a heavy holder back the influence the
    clipping removes. The result A0 + v_A, B0 + v_B is every holder's next adapter (equal ranks, a
    common start, as fedavg). The centres are kept across rounds (`state_tensors`, checkpointed)."""

    name = "centered_clip"
    shared_adapter = True
    averages_factors = True
    warm_restarts = False

    def __init__(self, radius_factor: float = 4.0, iterations: int = 3) -> None:
        if not (math.isfinite(radius_factor) and radius_factor > 0) or iterations < 1:
            raise ValueError(f"centered clipping needs a positive radius factor and >= 1 iteration, "
                             f"not {radius_factor!r}, {iterations!r}")
        self.radius_factor = radius_factor
        self.iterations = iterations
        self.momentum: dict[str, LoraWeights] = {}  # module -> its last aggregate update (dA, dB)

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate:
        check_homogeneous(module, copies, self.name)
        start = start_of(copies[0])
        shape_a, shape_b = copies[0].weights.A.shape, copies[0].weights.B.shape
        x = torch.stack([torch.cat([(c.weights.A - s.A).double().flatten(), (c.weights.B - s.B).double().flatten()])
                         for c, s in ((c, start_of(c)) for c in copies)])  # (n, r d_in + d_out r)
        previous = self.momentum.get(module)
        if previous is not None and previous.A.shape == shape_a and previous.B.shape == shape_b:
            v = torch.cat([previous.A.double().flatten(), previous.B.double().flatten()])
        else:
            v = torch.zeros(x.shape[1], dtype=torch.float64)
        if len(copies) >= 3:
            tau = self.radius_factor * float((x - v).norm(dim=1).median())
        elif float(v.norm()) > 0:
            tau = self.radius_factor * float(v.norm())
        else:
            tau = math.inf
        for _ in range(self.iterations):
            z = x - v  # (n, D)
            norms = z.norm(dim=1, keepdim=True)
            shrink = torch.where(norms > tau, tau / norms.clamp(min=1e-300), torch.ones_like(norms))
            v = v + (z * shrink).mean(dim=0)
        da = v[: shape_a.numel()].reshape(shape_a).float()
        db = v[shape_a.numel():].reshape(shape_b).float()
        self.momentum[module] = LoraWeights(da, db)
        merged = LoraWeights(start.A.float() + da, start.B.float() + db)
        return Aggregate({c.holder: merged for c in copies})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The centres, for a checkpoint: "<module>/A" (r, d_in) and "<module>/B" (d_out, r)."""
        return {f"{module}/{key}": tensor for module, pair in self.momentum.items()
                for key, tensor in (("A", pair.A), ("B", pair.B))}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in tensors.items():
            module, part = key.rsplit("/", 1)
            pairs.setdefault(module, {})[part] = tensor
        self.momentum = {module: LoraWeights(pair["A"].float(), pair["B"].float()) for module, pair in pairs.items()}


class CoordinateMedian(TrimmedMean):
    """Coordinate-wise median of A and of B (equal ranks): the trimmed mean that keeps only the
    middle value (odd n) or the mean of the middle two (even n)."""

    name = "median"

    def __init__(self) -> None:
        super().__init__(0.0)

    def trimmed(self, n: int) -> int:
        return (n - 1) // 2
