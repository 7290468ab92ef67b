"""`noise_free` (HSplitLoRA's NAA): the exact aggregate of the copies, computed as one product of
the copies stacked along the rank axis and merged into the frozen weight. What each holder starts
the next round from is `federation.noise_free_start`:

* `cold`: a fresh adapter at its own rank (A random, B = 0), as FLoRA: the learned adapter and its
  optimiser history are gone, the model function is kept (it is in the merged weight);
* `warm`: the best rank-r_i approximation of the copies' aggregate as its adapter, the rest of the
  aggregate merged into its own frozen weight: the function is kept *and* training goes on from a
  non-zero adapter (`NoiseFree` below has the formulas).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Literal

import torch

from splitpeft.aggregation.base import (
    AdapterCopy,
    Aggregate,
    check_copies,
    token_weights,
)
from splitpeft.aggregation.robust import start_of
from splitpeft.aggregation.zero_pad import padded_average
from splitpeft.model.adapters import LoraWeights

NoiseFreeStart = Literal["cold", "warm"]
START_OPTIONS: tuple[NoiseFreeStart, ...] = ("cold", "warm")
WarmFactors = Literal["balanced", "lora", "own_a", "mean_a"]
FACTOR_OPTIONS: tuple[WarmFactors, ...] = ("balanced", "lora", "own_a", "mean_a")
# Singular values at or below this fraction of the largest count as zero: their rank slots start
# fresh (A random, B = 0) instead of as a near-zero pair that would learn almost nothing.
RANK_TOLERANCE = 1e-6


def fresh_adapter(r: int, d_in: int, d_out: int, generator: torch.Generator) -> LoraWeights:
    """A new adapter as peft initialises one: A (r, d_in) kaiming-uniform(a=sqrt(5)), B (d_out, r) = 0.

    Its dense update B A is zero, so the model function is unchanged when it replaces a merged one.
    """
    a = torch.empty(r, d_in)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return LoraWeights(a, torch.zeros(d_out, r))


def fresh_seed(seed: int, module: str, holder: str) -> int:
    """A stable per-(module, holder) seed: crc32, not hash(), which is salted per process."""
    return zlib.crc32(f"{seed}/{module}/{holder}".encode())


def product_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD U S V^T of the product L R, never forming the (m, n) product.

    L (m, R), R (R, n), R small (the stacked ranks). Reduced QR of both sides,
    L = Q_l T_l with Q_l (m, k_l), T_l (k_l, R), and R^T = Q_r T_r with Q_r (n, k_r), T_r (k_r, R), give
    L R = Q_l (T_l T_r^T) Q_r^T; the SVD of the small core T_l T_r^T (k_l, k_r) = U_c S V_c^T then gives
    U = Q_l U_c (m, k), S (k,), V^T = V_c^T Q_r^T (k, n), k = min(k_l, k_r) <= R. Cost
    O((m + n) R^2 + R^3) against O(m n min(m, n)) for the SVD of the dense product. float64 throughout.
    """
    q_left, t_left = torch.linalg.qr(left.double())  # (m, k_l), (k_l, R)
    q_right, t_right = torch.linalg.qr(right.double().T)  # (n, k_r), (k_r, R)
    u_core, singular, vh_core = torch.linalg.svd(t_left @ t_right.T, full_matrices=False)  # (k_l, k), (k,), (k, k_r)
    return q_left @ u_core, singular, vh_core @ q_right.T  # (m, k), (k,), (k, n)


def warm_adapter(u: torch.Tensor, singular: torch.Tensor, vh: torch.Tensor, rank: int, scale: float,
                 fresh: LoraWeights, factors: WarmFactors = "balanced") -> LoraWeights:
    """The rank-`rank` adapter with scale * B A = U_k S_k V_k^T, the Eckart-Young optimum.

    u (d_out, K), singular (K,), vh (K, d_in): an SVD of the aggregate. k = min(rank, number of
    singular values above RANK_TOLERANCE x the largest). `factors` = "balanced": B[:, :k] =
    U_k sqrt(S_k / s) (d_out, k) and A[:k] = sqrt(S_k / s) V_k^T (k, d_in), as `svd` (FlexLoRA)
    balances them. "lora": A[j] = n_j V_j^T with n_j = ||fresh.A[j]|| (the norm peft's init gives
    a row) and B[:, j] = U_j S_j / (s n_j), so A keeps the scale LoRA trains from and B carries the
    singular values (balanced factors of a small update make A small, and dL/dB is proportional to
    A x). Either way s B A = U_k S_k V_k^T. Slots k..rank-1
    (a rank above what the aggregate has) are `fresh`'s (A random, B = 0): they add nothing to the
    product and can still learn, where zero A rows with zero B columns would get no gradient ever.
    """
    top = float(singular[0]) if singular.numel() else 0.0
    k = min(rank, int((singular > RANK_TOLERANCE * top).sum())) if top > 0 else 0
    if factors not in ("balanced", "lora"):
        raise ValueError(f"warm factors {factors!r} from an SVD; choose balanced or lora (own_a: own_a_adapter)")
    a = fresh.A.to(torch.float64).clone()  # (rank, d_in)
    b = fresh.B.to(torch.float64).clone()  # (d_out, rank), zero
    if factors == "lora":
        norms = a[:k].norm(dim=1).clamp(min=1e-12)  # (k,)
        a[:k] = norms[:, None] * vh[:k]
        b[:, :k] = u[:, :k] * (singular[:k] / (scale * norms))
    else:
        root = (singular[:k] / scale).sqrt()  # (k,)
        a[:k] = root[:, None] * vh[:k]
        b[:, :k] = u[:, :k] * root
    return LoraWeights(a, b)


def own_a_adapter(left: torch.Tensor, right: torch.Tensor, a: torch.Tensor, scale: float) -> LoraWeights:
    """The holder's own A (r, d_in) and B = P A^+ / s (d_out, r), the least-squares fit of the
    aggregate P = left @ right in A's row space: s B A = P A^+ A, P projected onto the inputs A
    reads. Never forms P: right (R, d_in) @ A^+ (d_in, r) first. A keeps its coordinates, so its
    AdamW moments still describe it."""
    a = a.to(torch.float64)
    b = left.to(torch.float64) @ (right.to(torch.float64) @ torch.linalg.pinv(a)) / scale  # (d_out, r)
    return LoraWeights(a.clone(), b)


class NoiseFree:
    """NAA: merge the exact aggregate into the frozen weight; restart every holder cold or warm.

    With p_i the token weights, s_i = alpha / r_i, and (A0_i, B0_i) the adapter holder i started the
    round with, the change of the holders' averaged model function is, without cross terms
    whatever the ranks,

        Delta = sum_i p_i s_i (B_i A_i - B0_i A0_i)
              = [p_1 s_1 B_1 | ... | p_n s_n B_n | -p_1 s_1 B0_1 | ...] @ [A_1; ...; A_n; A0_1; ...]
                 (d_out, 2 sum r_i)                                        (2 sum r_i, d_in)

    returned as `base_delta` (d_out, d_in), which the caller adds to the shared frozen weight W
    (the global model is W + every Delta merged so far). Cold starts have B0 = 0, so the start
    columns vanish and Delta = sum_i p_i s_i B_i A_i: the cold path computes only that product.

    * cold: each holder starts the next round with a fresh adapter at its own rank (B = 0, A drawn
      like peft's default from a generator seeded by (seed, module, holder)), so it computes
      W + Delta exactly.
    * warm: the copies' aggregate P = sum_i p_i s_i B_i A_i = L R with L = [p_i s_i B_i] (d_out, R),
      R = [A_i] (R, d_in), R = sum r_i (for a round started cold, P = Delta), has the thin SVD
      U S V^T (`product_svd`: QR of L and R^T, SVD of the R x R core; nothing (d_out, d_in) is
      factorised). Holder h gets B'_h = U_r sqrt(S_r / s_h), A'_h = sqrt(S_r / s_h) V_r^T at its
      own rank r_h (`warm_adapter`), so s_h B'_h A'_h = U_r S_r V_r^T is the best rank-r_h
      approximation of P, and trains against its own frozen weight W + Delta - s_h B'_h A'_h: the
      rest of the aggregate, merged into that holder's copy only. Its function is W + Delta
      exactly, as cold, but its adapter carries on what the round learned (as FlexLoRA's does,
      without FlexLoRA's truncation error: the tail singular values are in the frozen weight, not
      lost). `factors` ("balanced", "lora", "own_a"; `federation.noise_free_factors`) says how the
      adapter is cut from P: the two SVD splits of `warm_adapter`, or `own_a_adapter`, the holder's
      own A with B = P A^+ / s (P projected onto A's row space, the rest in the frozen weight as
      before), or the same fit with the A's averaged as HetLoRA averages them (`mean_a`: one A
      per module, so the holders' A's cannot drift apart over rounds; where the holders' A's are
      one at equal ranks, B is FedAvg's average of the B's and s B A is P exactly).
      `Aggregate.adapters_in_base` says so; the holder derives its residual from the adapter it is
      given (`Party.load`), so nothing (d_out, d_in) per holder is sent or stored.
    """

    name = "noise_free"
    shared_adapter = False
    averages_factors = False
    warm_restarts = True

    def __init__(self, seed: int = 0, start: NoiseFreeStart = "cold", factors: WarmFactors = "balanced") -> None:
        if start not in START_OPTIONS:
            raise ValueError(f"noise_free start {start!r}; choose from {', '.join(START_OPTIONS)}")
        if factors not in FACTOR_OPTIONS:
            raise ValueError(f"noise_free factors {factors!r}; choose from {', '.join(FACTOR_OPTIONS)}")
        self.seed = seed
        self.start = start
        self.factors = factors

    def _fresh(self, module: str, copy: AdapterCopy, d_in: int, d_out: int) -> LoraWeights:
        generator = torch.Generator().manual_seed(fresh_seed(self.seed, module, copy.holder))
        return fresh_adapter(copy.weights.rank, d_in, d_out, generator)

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate:
        d_out, d_in = check_copies(module, copies)
        p = token_weights(copies)
        dtype = torch.result_type(copies[0].weights.A, copies[0].weights.B)
        for c in copies[1:]:
            dtype = torch.promote_types(dtype, torch.result_type(c.weights.A, c.weights.B))
        left = torch.cat([pi * c.scale * c.weights.B.to(dtype) for pi, c in zip(p, copies)], dim=1)  # (d_out, R)
        right = torch.cat([c.weights.A.to(dtype) for c in copies], dim=0)  # (R, d_in)
        if self.start == "warm":
            return self._warm(module, copies, p, left, right, d_in, d_out)
        base_delta = left @ right  # (d_out, d_in)
        adapters = {}
        for c in copies:
            fresh = self._fresh(module, c, d_in, d_out)
            adapters[c.holder] = LoraWeights(
                fresh.A.to(dtype=c.weights.A.dtype, device=c.weights.A.device),
                fresh.B.to(dtype=c.weights.B.dtype, device=c.weights.B.device),
            )
        return Aggregate(adapters, base_delta)

    def _warm(self, module: str, copies: Sequence[AdapterCopy], p: list[float], left: torch.Tensor,
              right: torch.Tensor, d_in: int, d_out: int) -> Aggregate:
        starts = [start_of(c) for c in copies]
        left0 = torch.cat([-pi * c.scale * s.B.to(left.dtype) for pi, c, s in zip(p, copies, starts)], dim=1)  # (d_out, R)
        right0 = torch.cat([s.A.to(right.dtype) for s in starts], dim=0)  # (R, d_in)
        base_delta = torch.cat([left, left0], dim=1) @ torch.cat([right, right0], dim=0)  # (d_out, d_in): P - P0
        # P = U S V^T: (d_out, K), (K,), (K, d_in); own_a and mean_a need no SVD
        svd = None if self.factors in ("own_a", "mean_a") else product_svd(left, right)
        # mean_a: the one A (r_max, d_in) every holder restarts from (holder h: its first r_h rows),
        # the A's averaged as HetLoRA averages them
        shared_a = (padded_average([c.weights.A.to(torch.float64) for c in copies], p)
                    if self.factors == "mean_a" else None)
        adapters = {}
        for c in copies:
            if shared_a is not None:
                warm = own_a_adapter(left, right, shared_a[: c.weights.rank], c.scale)
            elif svd is None:
                warm = own_a_adapter(left, right, c.weights.A, c.scale)
            else:
                warm = warm_adapter(*svd, c.weights.rank, c.scale, self._fresh(module, c, d_in, d_out), self.factors)
            adapters[c.holder] = LoraWeights(
                warm.A.to(dtype=c.weights.A.dtype, device=c.weights.A.device),
                warm.B.to(dtype=c.weights.B.dtype, device=c.weights.B.device),
            )
        return Aggregate(adapters, base_delta, adapters_in_base=True)
