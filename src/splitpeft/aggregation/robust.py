"""Robust aggregation: no holder's update is taken at its word (DESIGN.md, "Robust aggregation").

Named policies behind the same `Aggregator` interface (`robust.*` in the config):

- `MedianClip(inner, c)`: before `inner` sees them, every copy's update is scaled down to at most
  c times the median update of that module's copies (the median stays honest while fewer than half
  of the copies are bad). What "update" means follows what `inner` combines:

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
from collections.abc import Sequence
from dataclasses import replace

import torch

from splitpeft.aggregation.base import (
    AdapterCopy,
    Aggregate,
    AggregationError,
    Aggregator,
    Clip,
    check_copies,
)
from splitpeft.aggregation.fedavg import check_homogeneous
from splitpeft.model.adapters import LoraWeights


def _inner(l1: torch.Tensor, r1: torch.Tensor, l2: torch.Tensor, r2: torch.Tensor) -> float:
    """<L1 R1, L2 R2>_F = sum((L1^T L2) * (R1 R2^T)) in float64; L (d_out, k), R (k, d_in)."""
    return float(((l1.double().T @ l2.double()) * (r1.double() @ r2.double().T)).sum())


def start_of(copy: AdapterCopy) -> LoraWeights:
    """The adapter `copy`'s holder started from (zeros when unknown), in the copy's dtype."""
    a, b = copy.weights
    if copy.start is None:
        return LoraWeights(torch.zeros_like(a), torch.zeros_like(b))
    a0, b0 = copy.start
    if a0.shape != a.shape or b0.shape != b.shape:
        raise AggregationError(f"{copy.holder}: its start A{tuple(a0.shape)} B{tuple(b0.shape)} does not match its "
                               f"upload A{tuple(a.shape)} B{tuple(b.shape)}")
    return LoraWeights(a0.to(a.dtype), b0.to(b.dtype))


def product_update_terms(copy: AdapterCopy) -> tuple[float, float, float]:
    """(||X||^2, <X, Y>, ||Y||^2) of the dense update U = X + Y of `copy` (see the module doc):
    X = s (dB A0 + B0 dA) = s [dB | B0] [A0; dA], Y = s dB dA, both (d_out, d_in)."""
    a, b = copy.weights
    a0, b0 = start_of(copy)
    da, db = a - a0, b - b0
    s = copy.scale
    lx, rx = s * torch.cat([db, b0], dim=1), torch.cat([a0, da], dim=0)  # (d_out, 2r), (2r, d_in)
    ly, ry = s * db, da  # (d_out, r), (r, d_in)
    return _inner(lx, rx, lx, rx), _inner(lx, rx, ly, ry), _inner(ly, ry, ly, ry)


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


def clip_products(module: str, copies: Sequence[AdapterCopy], factor: float) -> tuple[list[AdapterCopy], list[Clip]]:
    """Copies whose dense update exceeds `factor` x the median one, scaled down to it."""
    norms = [product_update_norm(c) for c in copies]
    limit = factor * statistics.median(norms)
    out, clips = [], []
    for copy, norm in zip(copies, norms):
        if limit <= 0 or norm <= limit:  # a zero median gives no scale to clip to
            out.append(copy)
            continue
        a, b = copy.weights
        a0, b0 = start_of(copy)
        if not bool(b0.any()):  # exact: s (f B) A = f U
            f = limit / norm
            weights = LoraWeights(a, b * f)
        else:
            f = _interpolation_factor(*product_update_terms(copy), limit)
            weights = LoraWeights(a0 + f * (a - a0), b0 + f * (b - b0))
        out.append(replace(copy, weights=weights))
        clips.append(Clip(copy.holder, module, f, norm, limit, "BA"))
    return out, clips


def clip_factors(module: str, copies: Sequence[AdapterCopy], factor: float) -> tuple[list[AdapterCopy], list[Clip]]:
    """Copies whose A or B update exceeds `factor` x the median one (of A, of B), scaled down to it."""
    starts = [start_of(c) for c in copies]
    norms = {
        "A": [float((c.weights.A - s.A).double().norm()) for c, s in zip(copies, starts)],
        "B": [float((c.weights.B - s.B).double().norm()) for c, s in zip(copies, starts)],
    }
    limits = {key: factor * statistics.median(values) for key, values in norms.items()}
    out, clips = [], []
    for i, (copy, start) in enumerate(zip(copies, starts)):
        new = {"A": copy.weights.A, "B": copy.weights.B}
        for key, old in (("A", start.A), ("B", start.B)):
            norm, limit = norms[key][i], limits[key]
            if limit <= 0 or norm <= limit:
                continue
            f = limit / norm
            new[key] = old + f * (new[key] - old)
            clips.append(Clip(copy.holder, module, f, norm, limit, key))
        out.append(copy if new["A"] is copy.weights.A and new["B"] is copy.weights.B
                   else replace(copy, weights=LoraWeights(new["A"], new["B"])))
    return out, clips


class MedianClip:
    """Any aggregator, behind per-holder update clipping at `factor` x the module's median update
    (module doc). Copies within the limit reach `inner` untouched, so honest rounds whose updates
    are all alike aggregate exactly as without it."""

    def __init__(self, inner: Aggregator, factor: float = 4.0) -> None:
        if not (math.isfinite(factor) and factor >= 1):
            raise ValueError(f"clip factor must be a finite number >= 1, not {factor!r}")
        self.inner = inner
        self.factor = factor
        self.name = inner.name
        self.shared_adapter = inner.shared_adapter
        self.averages_factors = inner.averages_factors

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate:
        check_copies(module, copies)
        clip = clip_factors if self.averages_factors else clip_products
        clipped, clips = clip(module, copies, self.factor)
        result = self.inner.aggregate(module, clipped)
        result.clipped = [*clips, *result.clipped]
        return result


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


class CoordinateMedian(TrimmedMean):
    """Coordinate-wise median of A and of B (equal ranks): the trimmed mean that keeps only the
    middle value (odd n) or the mean of the middle two (even n)."""

    name = "median"

    def __init__(self) -> None:
        super().__init__(0.0)

    def trimmed(self, n: int) -> int:
        return (n - 1) // 2
