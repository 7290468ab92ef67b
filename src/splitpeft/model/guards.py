"""Guards on what enters an optimiser step, below every party: `gradient_problem` (finite and at
most `MAX_GRAD_ABS`, so AdamW's moments stay finite) and `nonfinite_state` (the net behind it).
Why these bounds: `parties/frame_bounds.py`, which applies them with the frame bounds."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

# |g| above this would make (1 - beta2) g^2, or a sum of a few of them, overflow fp32 (3.4e38).
MAX_GRAD_ABS = math.sqrt(torch.finfo(torch.float32).max) / 16


def largest_abs(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The largest |x| of each of `tensors` (non-empty, floating), as float64 on the CPU (NaN where
    one holds NaN; none given: a single 0): one multi-tensor reduction per device and dtype (one
    launch each on a GPU, not one per tensor), then one copy to the host per group."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.device, tensor.dtype), []).append(tensor.detach())
    if not groups:
        return torch.zeros(1, dtype=torch.float64)
    return torch.cat([torch.stack(torch._foreach_norm(group, math.inf)).double().cpu() for group in groups.values()])


def gradient_problem(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """None if every gradient of (name, parameter) is finite and |g| <= MAX_GRAD_ABS; else what
    is wrong with the first one that is not (parameters without a gradient are skipped)."""
    grads = [(name, p.grad) for name, p in named if p.grad is not None]
    if not grads:
        return None
    largest = largest_abs([g for _, g in grads if g.numel()])
    if bool(torch.isfinite(largest).all()) and float(largest.max()) <= MAX_GRAD_ABS:
        return None
    for name, grad in grads:
        if not bool(torch.isfinite(grad).all()):
            return f"the gradient of {name} contains NaN or Inf"
        if float(grad.abs().max()) > MAX_GRAD_ABS:
            return f"the gradient of {name} reaches {float(grad.abs().max()):.3g}, beyond {MAX_GRAD_ABS:.3g}"
    return "a gradient is not finite"


def nonfinite_state(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor of (name, tensor) that is not finite, or None.

    One vectorised pass first (the largest |x| of each tensor: finite exactly when all of it is),
    then, only if something is not finite, tensor by tensor for its name."""
    floating = [(name, tensor) for name, tensor in named if tensor.is_floating_point() and tensor.numel()]
    if not floating:
        return None
    if bool(torch.isfinite(largest_abs([tensor for _, tensor in floating])).all()):
        return None
    for name, tensor in floating:
        if not bool(torch.isfinite(tensor).all()):
            return name
    return None
