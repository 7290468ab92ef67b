"""`svd` (FlexLoRA): the average of the dense updates sum_i p_i s_i B_i A_i, truncated by SVD to
each holder's rank."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from splitpeft.aggregation.base import (
    AdapterCopy,
    Aggregate,
    check_copies,
    token_weights,
)
from splitpeft.model.adapters import LoraWeights


class SvdTruncate:
    """FlexLoRA: average the dense updates, give each holder the best approximation at its rank.

    W = sum_i p_i s_i B_i A_i (d_out, d_in) = U S V^T. Holder h (rank r_h, scale s_h) gets
    B_h = U_r sqrt(S_r) / sqrt(s_h) (d_out, r_h) and A_h = sqrt(S_r) V_r^T / sqrt(s_h) (r_h, d_in),
    so s_h B_h A_h = U_r S_r V_r^T, the Eckart-Young optimum at rank r_h. Where r_h exceeds
    min(d_out, d_in) the extra rank slots are zero.
    """

    name = "svd"
    shared_adapter = False
    averages_factors = False
    warm_restarts = False

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate:
        check_copies(module, copies)
        p = token_weights(copies)
        dense = torch.stack([pi * c.weights.delta(c.scale) for pi, c in zip(p, copies)]).sum(0)  # (d_out, d_in)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)  # (d_out, k), (k,), (k, d_in)
        adapters = {}
        for c in copies:
            r = c.weights.rank
            k = min(r, s.shape[0])
            root = s[:k].sqrt() / math.sqrt(c.scale)  # (k,)
            b = dense.new_zeros(dense.shape[0], r)
            a = dense.new_zeros(r, dense.shape[1])
            b[:, :k] = u[:, :k] * root  # (d_out, k)
            a[:k] = root[:, None] * vh[:k]  # (k, d_in)
            adapters[c.holder] = LoraWeights(a, b)
        return Aggregate(adapters)
