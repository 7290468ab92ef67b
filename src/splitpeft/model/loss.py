"""The training loss, shared by every placement and the importance probe: next-token
cross-entropy on completion tokens only (prompt and padding carry IGNORE_INDEX)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


LOSS_CHUNK_ROWS = 128


"""Rows of low-precision logits upcast to fp32 at a time: (128, 49152) fp32 is 24 MiB."""


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction over labelled positions, in fp32.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX on prompt and padding (not shifted).
    fp32 logits go through torch's cross-entropy; bf16 / fp16 logits through
    `LowPrecisionCrossEntropy`, which upcasts only a chunk of labelled rows at a time.
    """
    # Shift the labels, not the logits: slicing (B, T, V) logits would copy them (and their
    # gradient) every step; padding the last label position with IGNORE_INDEX is the same loss.
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    rows = logits.reshape(-1, logits.shape[-1])  # (B T, V), a view
    if logits.dtype == torch.float32:
        return F.cross_entropy(rows, shifted.reshape(-1), ignore_index=IGNORE_INDEX)
    loss: torch.Tensor = LowPrecisionCrossEntropy.apply(rows, shifted.reshape(-1))
    return loss


class LowPrecisionCrossEntropy(torch.autograd.Function):
    """Mean over labelled rows of logsumexp(z_i) - z_i[y_i], computed in fp32 from bf16 / fp16 logits.

    logits z (N, V) in the model's dtype, targets y (N,) int64 (IGNORE_INDEX: not counted) -> loss ().
    torch's cross-entropy would need the (N, V) logits upcast to fp32, their fp32 log-softmax and
    its fp32 gradient (three fp32 (N, V) passes per step, a tenth of a bf16 step of the main job).
    Here only LOSS_CHUNK_ROWS labelled rows are in fp32 at a time; backward recomputes
    softmax(z_i) = exp(z_i - lse_i) from the saved logits and writes the gradient
    (softmax(z_i) - onehot(y_i)) / count in the logits' dtype. Saved for backward: the logits,
    lse (N,) fp32 (0 on unlabelled rows) and the targets. Written here because torch has no
    chunked cross-entropy for CPU (Liger's and Apple's cut cross-entropy are GPU kernels).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        labelled = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # (n,)
        lse = torch.zeros(logits.shape[0], dtype=torch.float32, device=logits.device)  # (N,)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for rows in labelled.split(LOSS_CHUNK_ROWS):
            z = logits.index_select(0, rows).float()  # (c, V)
            chunk_lse = torch.logsumexp(z, dim=1)  # (c,)
            lse[rows] = chunk_lse
            total += (chunk_lse - z.gather(1, targets[rows, None]).squeeze(1)).sum()
        ctx.save_for_backward(logits, lse, targets)
        ctx.count = labelled.numel()
        return total / ctx.count

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, lse, targets = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)  # (N, V): unlabelled rows get no gradient
        labelled = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        step = grad.float() / ctx.count
        for rows in labelled.split(LOSS_CHUNK_ROWS):
            p = torch.exp(logits.index_select(0, rows).float() - lse[rows, None])  # (c, V) softmax
            p[torch.arange(rows.numel(), device=p.device), targets[rows]] -= 1.0
            grad_logits[rows] = (p * step).to(logits.dtype)
        return grad_logits, None
