"""The training loss, shared by every placement and the importance probe: next-token
cross-entropy on completion tokens only (prompt and padding carry IGNORE_INDEX).

`head_loss` runs the head (final norm + LM head) on the labelled positions alone: the others
carry no loss, so their logits would be computed, kept for backward and given a zero gradient for
nothing (in the main job two positions in three are prompt or padding; the head is a fifth of
SmolLM2's forward FLOPs per position). `causal_lm_loss` is the same loss from logits someone already
has over every position."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


LOSS_CHUNK_ROWS = 128


"""Rows of low-precision logits upcast to fp32 at a time: (128, 49152) fp32 is 24 MiB."""


def labelled_positions(labels: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (n,), targets (n,)) of the next-token loss: position b W + t predicts labels[b, t + 1]
    wherever that is not IGNORE_INDEX. labels (B, T) unshifted; W (default T) is the row stride of
    the hidden states the positions index (T_max for rows padded to a longer pass)."""
    batch, length = labels.shape
    width = length if width is None else width
    shifted = labels[:, 1:]  # (B, T - 1): the label each of positions 0 .. T - 2 predicts
    b, t = (shifted != IGNORE_INDEX).nonzero(as_tuple=True)
    return b * width + t, shifted[b, t].long()


def head_loss(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`causal_lm_loss(head(hidden), labels)`, with the head run on the labelled positions only.

    hidden (B, T, d) final hidden states (before the final norm), labels (B, T) as for
    `causal_lm_loss`. The gradient reaching `hidden` is zero on the other positions, as it is there."""
    _check_labels(labels, hidden)
    positions, targets = labelled_positions(labels)
    picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)  # (n, d)
    return token_loss(head(picked), targets)


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of rows of logits (n, V) against targets (n,) (every row counts), in fp32:
    torch's for fp32 logits, `LowPrecisionCrossEntropy` for bf16 / fp16 ones."""
    if logits.dtype == torch.float32:
        return F.cross_entropy(logits, targets)
    loss: torch.Tensor = LowPrecisionCrossEntropy.apply(logits, targets)
    return loss


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction over labelled positions, in fp32.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX on prompt and padding (not shifted). Training
    uses `head_loss`, which never computes the unlabelled positions' logits."""
    _check_labels(labels, logits)
    positions, targets = labelled_positions(labels)
    return token_loss(logits.reshape(-1, logits.shape[-1]).index_select(0, positions), targets)


def _check_labels(labels: torch.Tensor, rows: torch.Tensor) -> None:
    """labels (B, T) must match rows (B, T, *): positions are flattened with T as the stride, so a
    mismatch would pick other rows' states rather than fail."""
    if labels.dim() != 2 or tuple(labels.shape) != tuple(rows.shape[:2]):
        raise ValueError(f"labels of shape {tuple(labels.shape)} do not match the (B, T) = {tuple(rows.shape[:2])} "
                         "positions they label")


class LowPrecisionCrossEntropy(torch.autograd.Function):
    """Mean over rows of logsumexp(z_i) - z_i[y_i], computed in fp32 from bf16 / fp16 logits.

    logits z (n, V) in the model's dtype, targets y (n,) int64 (every row counts) -> loss ().
    torch's cross-entropy would need the (n, V) logits upcast to fp32, their fp32 log-softmax and
    its fp32 gradient (three fp32 (n, V) passes per step, a tenth of a bf16 step of the main job).
    Here only LOSS_CHUNK_ROWS rows are in fp32 at a time; backward recomputes
    softmax(z_i) = exp(z_i - lse_i) from the saved logits and writes the gradient
    (softmax(z_i) - onehot(y_i)) / n in the logits' dtype. Saved for backward: the logits,
    lse (n,) fp32 and the targets. Written here because torch has no chunked cross-entropy for CPU
    (Liger's and Apple's cut cross-entropy are GPU kernels).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)  # (n,)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], LOSS_CHUNK_ROWS):
            chunk = slice(start, start + LOSS_CHUNK_ROWS)
            z = logits[chunk].float()  # (c, V)
            chunk_lse = torch.logsumexp(z, dim=1)  # (c,)
            lse[chunk] = chunk_lse
            total += (chunk_lse - z.gather(1, targets[chunk, None]).squeeze(1)).sum()
        ctx.save_for_backward(logits, lse, targets)
        return total / logits.shape[0]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, lse, targets = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)  # (n, V)
        step = grad.float() / logits.shape[0]
        for start in range(0, logits.shape[0], LOSS_CHUNK_ROWS):
            chunk = slice(start, start + LOSS_CHUNK_ROWS)
            p = torch.exp(logits[chunk].float() - lse[chunk, None])  # (c, V) softmax
            p[torch.arange(p.shape[0], device=p.device), targets[chunk]] -= 1.0
            grad_logits[chunk] = (p * step).to(logits.dtype)
        return grad_logits, None
