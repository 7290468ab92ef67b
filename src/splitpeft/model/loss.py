"""The training loss, shared by every placement and the importance probe: next-token
cross-entropy on completion tokens only (prompt and padding carry IGNORE_INDEX)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    pass


IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction over labelled positions.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX on prompt and padding (not shifted).
    """
    # Shift the labels, not the logits: slicing (B, T, V) logits would copy them (and their
    # gradient) every step; padding the last label position with IGNORE_INDEX is the same loss.
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1), ignore_index=IGNORE_INDEX)
