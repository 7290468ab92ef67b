"""What the server lets into arithmetic: a magnitude bound on every frame, and a guard on every step.

A frame can be finite and still wreck a session: activations of +-3e38 pass the NaN/Inf check of
`transport/messages.py`, overflow in the first norm, and leave NaN in the AdamW moments, where they
stay. Two checks close that, both on the server, both before anything is committed:

1. `FrameBounds`: before any compute, each position's vector x_t (the last axis) of a floating
   tensor that a device sends into a server step (the cut activations and the head gradient) must
   have ||x_t|| <= factor x m, where m is the largest per-position norm the frozen model itself
   produces at that point for random token ids (`calibrate`; computed once per split point and
   cached). For the cut activations m is the largest ||h_t|| after blocks [0, k); for the head
   gradient it is the largest per-token gradient of the summed cross-entropy with respect to the
   final hidden states (random labels give near the largest (p - y), and an honest step's gradient
   of the mean loss over N >= 1 tokens is that divided by N). A defence's clipping and Gaussian
   noise (`privacy.*`) can send more than the model produces; the bound then also allows
   C (1 + sigma (sqrt(d) + 6)), a clipped row plus noise whose norm is that large with probability
   below 1e-8. The bound comes from the public model, never from what a device sent, so no device
   can raise it, and a session of one device is bounded as well as a fleet.

2. `gradient_problem` (`model/guards.py`, below every party that steps): before an optimiser
   step, every gradient must be finite and at most `MAX_GRAD_ABS` in magnitude, so that AdamW's
   (1 - beta2) g^2 and its moments stay finite (each moment is a convex combination of the
   previous one and g or g^2). A step that fails is not
   taken: its gradients are dropped, nothing is stored, the session keeps the state it had before
   the step, and the device is told why. `nonfinite_state` is the net behind it: a round boundary
   or a checkpoint that still finds a non-finite adapter or moment resets that session from the
   global state instead of keeping it or banning its device.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from splitpeft.model.backbone import backbone_of
from splitpeft.transport.messages import Kind, Message, MessageError

if TYPE_CHECKING:
    from splitpeft.config import ExperimentConfig


# The frames a device sends into a server step, and the tensor of each that the bound applies to.
BOUNDED = {(Kind.ACTIVATIONS, "hidden"), (Kind.HEAD_GRADIENT, "grad")}

CALIBRATION_BATCH, CALIBRATION_SEQ_LEN, CALIBRATION_SEED = 2, 64, 20_211


def _largest_row_norm(tensor: torch.Tensor) -> float:
    """max_t ||x_t|| over the last axis of (..., d), in float64 (an fp32 square of 3e38 overflows)."""
    if tensor.numel() == 0:
        return 0.0
    return float(torch.linalg.vector_norm(tensor, dim=-1, dtype=torch.float64).max())


def calibrate(base: PreTrainedModel, kind: Kind, split_layer: int, max_seq_len: int) -> float:
    """The largest per-position norm the frozen `base` produces for `kind`'s tensor at
    `split_layer`, on CALIBRATION_BATCH sequences of random token ids (seeded; the global RNG is
    left as it was).

    ACTIVATIONS: ||h_t|| of the hidden states after blocks [0, split_layer) (B, T, d).
    HEAD_GRADIENT: ||d l_t / d f_t|| of the summed per-token cross-entropy l_t with random labels
    with respect to the final hidden states f (B, T, d): the largest gradient one token puts there."""
    backbone = backbone_of(base)
    parameter = next(iter(base.parameters()))
    device = parameter.device if parameter.device.type != "meta" else torch.device("cpu")
    generator = torch.Generator().manual_seed(CALIBRATION_SEED + split_layer)
    vocab = int(base.config.vocab_size)
    seq_len = max(1, min(CALIBRATION_SEQ_LEN, max_seq_len))
    ids = torch.randint(0, vocab, (CALIBRATION_BATCH, seq_len), generator=generator).to(device)
    # The model stays in its mode (bitsandbytes' 4-bit CPU kernel fails in eval mode); dropout, if
    # the family has any, draws from a seeded fork of the global generator, left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(CALIBRATION_SEED + split_layer)
        if kind == Kind.ACTIVATIONS:
            with torch.no_grad():
                return _largest_row_norm(backbone.blocks(backbone.embed(ids), 0, split_layer))
        with torch.no_grad():
            final = backbone.blocks(backbone.embed(ids), 0, backbone.num_blocks)
        final = final.detach().requires_grad_()
        with torch.enable_grad():
            logits = backbone.head(final).float()  # (B, T, V)
            labels = torch.randint(0, vocab, ids.shape, generator=generator).to(device)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, final)
        return _largest_row_norm(grad)


@dataclass
class FrameBounds:
    """The per-position norm bound of the frames in `BOUNDED` (module doc, check 1).

    `factor` (robust.frame_norm_factor): how far above the frozen model's own largest norm a frame
    may go (0: no bound). `activation_floor` / `gradient_floor`: what a defence may add (a clipped
    row plus noise), allowed whatever the model produces."""

    base: PreTrainedModel
    factor: float
    max_seq_len: int
    activation_floor: float = 0.0
    gradient_floor: float = 0.0
    _reference: dict[tuple[Kind, int], float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_config(cls, config: ExperimentConfig, base: PreTrainedModel) -> FrameBounds:
        privacy = config.privacy
        width = float(base.config.hidden_size if hasattr(base.config, "hidden_size") else base.config.n_embd)

        def released(clip_norm: float) -> float:
            """The largest norm a row clipped to `clip_norm` plus N(0, (sigma C)^2 I_d) noise has
            outside a 1e-8 tail (||noise|| <= sigma C (sqrt(d) + 6))."""
            if clip_norm <= 0:
                return 0.0
            return clip_norm * (1 + privacy.noise_multiplier * (math.sqrt(width) + 6))

        return cls(base, config.robust.frame_norm_factor, config.data.max_length,
                   activation_floor=released(privacy.clip_norm), gradient_floor=released(privacy.gradient_clip_norm))

    def reference(self, kind: Kind, split_layer: int) -> float:
        """m of `kind` at `split_layer`: calibrated once, then cached (the head gradient does not
        depend on the split)."""
        key = (kind, split_layer if kind == Kind.ACTIVATIONS else -1)
        with self._lock:
            if key not in self._reference:
                self._reference[key] = calibrate(self.base, kind, split_layer, self.max_seq_len)
            return self._reference[key]

    def bound(self, kind: Kind, split_layer: int) -> float:
        floor = self.activation_floor if kind == Kind.ACTIVATIONS else self.gradient_floor
        return self.factor * max(self.reference(kind, split_layer), floor)

    def check(self, message: Message, split_layer: int) -> None:
        """Raise MessageError naming the tensor, the norm and the bound if a position of a bounded
        tensor of `message` is beyond it. Nothing but the norm is computed on the frame."""
        if self.factor <= 0:
            return
        for name, tensor in message.tensors.items():
            if (message.kind, name) not in BOUNDED or not tensor.is_floating_point():
                continue
            largest = _largest_row_norm(tensor)
            bound = self.bound(message.kind, split_layer)
            if not largest <= bound:
                what = "hidden states at the cut" if message.kind == Kind.ACTIVATIONS else "head gradient"
                raise MessageError(
                    f"{message.kind.name}.{name}: a position's norm {largest:.3g} exceeds the server's bound "
                    f"{bound:.3g} ({self.factor:g} x the largest {what} the frozen model produces, "
                    "robust.frame_norm_factor); refused before any compute")
