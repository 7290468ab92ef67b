"""Placements: which part of the model runs where, and the per-batch protocol between the parts.

A placement is a named object with two verbs, one per side of the channel:

- `device_step(device, batch, channel)`: one training step on a device, talking to the server
  only through `channel.exchange`; returns the loss.
- `server_step(session, message)`: the server's reply to one message of that step.

`split` (HSplitLoRA / SplitLoRA): device = embedding + blocks [0, k); server = blocks [k, L),
final norm, head, loss. Up: hidden states at the cut (B, T, d) and the labels; down: their
gradient. With `labels_on_device` (U-shaped) the device keeps norm, head and loss too: up the cut
hidden states, down the final hidden states, up their gradient, down the cut gradient.

`centralized` (CenLoRA): the whole model on one party, no traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from .channel import Channel
from .data import Batch
from .messages import Kind, Message, MessageError, finite

if TYPE_CHECKING:
    from .devices import DeviceRuntime
    from .server import ServerSession

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of next-token prediction over labelled positions.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX on prompt and padding (not shifted).
    """
    # Shift the labels, not the logits: slicing (B, T, V) logits would copy them (and their
    # gradient) every step; padding the last label position with IGNORE_INDEX is the same loss.
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1), ignore_index=IGNORE_INDEX)


class Placement(Protocol):
    name: str

    def device_blocks(self, num_blocks: int, split_layer: int) -> range:
        """Blocks whose adapters the device owns."""

    def device_holds_blocks(self) -> bool:
        """Whether the device also holds (and runs) those blocks' frozen weights."""

    def device_keeps_head(self) -> bool: ...

    def uses_server(self) -> bool: ...

    def device_step(self, device: DeviceRuntime, batch: Batch, channel: Channel) -> float: ...

    def apply_kill_revive(self, device: DeviceRuntime, channel: Channel, kill: list[str], revive: list[str]) -> None:
        """Freeze `kill` and unfreeze `revive` on the device (and tell the server where needed)."""

    def server_step(self, session: ServerSession, message: Message) -> Message: ...


@dataclass
class SplitPlacement:
    """Split learning at block k; `labels_on_device` makes it U-shaped."""

    labels_on_device: bool = False
    name: str = field(default="split", init=False)

    def device_blocks(self, num_blocks: int, split_layer: int) -> range:
        if not 0 <= split_layer <= num_blocks:
            raise ValueError(f"split_layer {split_layer} is out of range: the model has {num_blocks} blocks (0..{num_blocks})")
        return range(0, split_layer)

    def device_holds_blocks(self) -> bool:
        return True

    def device_keeps_head(self) -> bool:
        return self.labels_on_device

    def uses_server(self) -> bool:
        return True

    # ----------------------------------------------------------------- device side

    def device_step(self, device: DeviceRuntime, batch: Batch, channel: Channel) -> float:
        backbone, meter = device.backbone, device.meter
        with meter.compute():
            cut = backbone.blocks(backbone.embed(batch.input_ids), 0, device.split_layer)  # (B, T, d)
        up = {"hidden": cut.detach()}
        if not self.labels_on_device:
            # The server computes the loss, so it needs the labels: completion tokens only
            # (prompt and padding positions are IGNORE_INDEX), never the input ids.
            up["labels"] = batch.labels.to(torch.int32)
        reply = channel.exchange(Message(Kind.ACTIVATIONS, up))
        if self.labels_on_device:
            reply.expect(Kind.FINAL_HIDDEN)
            final = reply.tensor("hidden", shape=cut.shape, dtype=cut.dtype).requires_grad_()
            with meter.compute():
                loss = causal_lm_loss(backbone.head(final), batch.labels)
                loss.backward()
            loss_value = loss.item()
            reply = channel.exchange(
                Message(Kind.HEAD_GRADIENT, {"grad": final.grad}, meta={"loss": finite(loss_value)})
            )
            reply.expect(Kind.CUT_GRADIENT)
        else:
            reply.expect(Kind.CUT_GRADIENT)
            loss_value = float(reply.meta.get("loss", float("nan")))
        grad = reply.tensor("grad", shape=cut.shape, dtype=cut.dtype)
        with meter.compute():
            if cut.requires_grad:
                cut.backward(grad)
            device.optimizer_step()
        return loss_value

    def apply_kill_revive(self, device: DeviceRuntime, channel: Channel, kill: list[str], revive: list[str]) -> None:
        freeze_locally(device, kill, revive)

    # ----------------------------------------------------------------- server side

    def server_step(self, session: ServerSession, message: Message) -> Message:
        backbone = session.backbone
        if message.kind == Kind.ACTIVATIONS:
            hidden = message.tensor("hidden", shape=(None, None, session.hidden_size), dtype=torch.float32)
            hidden = hidden.requires_grad_()
            labels = None
            if not self.labels_on_device:
                labels = message.tensor("labels", shape=hidden.shape[:2], dtype=torch.int32).long()
                session.check_labels(labels)
            final = backbone.blocks(hidden, session.split_layer, backbone.num_blocks)  # (B, T, d)
            if self.labels_on_device:
                session.pending = (hidden, final)
                return Message(Kind.FINAL_HIDDEN, {"hidden": final.detach()})
            loss = causal_lm_loss(backbone.head(final), labels)
            loss.backward()
            session.optimizer_step(tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()))
            return Message(Kind.CUT_GRADIENT, {"grad": hidden.grad}, meta={"loss": finite(loss.item())})
        if message.kind == Kind.HEAD_GRADIENT and self.labels_on_device:
            if session.pending is None:
                raise MessageError("HEAD_GRADIENT without a preceding ACTIVATIONS message")
            hidden, final = session.pending
            session.pending = None
            grad = message.tensor("grad", shape=final.shape, dtype=final.dtype)
            final.backward(grad)
            session.optimizer_step(tokens=None)
            return Message(Kind.CUT_GRADIENT, {"grad": hidden.grad})
        raise MessageError(f"unexpected {message.kind.name} message for placement {self.name}")


@dataclass
class CentralizedPlacement:
    """The whole model on one party (CenLoRA): the reference every other placement must match."""

    name: str = field(default="centralized", init=False)

    def device_blocks(self, num_blocks: int, split_layer: int) -> range:
        return range(0, num_blocks)

    def device_holds_blocks(self) -> bool:
        return True

    def device_keeps_head(self) -> bool:
        return True

    def uses_server(self) -> bool:
        return False

    def device_step(self, device: DeviceRuntime, batch: Batch, channel: Channel) -> float:
        backbone = device.backbone
        with device.meter.compute():
            hidden = backbone.blocks(backbone.embed(batch.input_ids), 0, backbone.num_blocks)
            loss = causal_lm_loss(backbone.head(hidden), batch.labels)
            loss.backward()
            device.optimizer_step()
        return loss.item()

    def apply_kill_revive(self, device: DeviceRuntime, channel: Channel, kill: list[str], revive: list[str]) -> None:
        freeze_locally(device, kill, revive)

    def server_step(self, session: ServerSession, message: Message) -> Message:
        raise MessageError("the centralized placement has no server traffic")


def freeze_locally(device: DeviceRuntime, kill: list[str], revive: list[str]) -> None:
    """Killed adapters keep computing their (frozen) branch on the device: no weight gradients,
    no optimiser update, no upload; revived ones train again. Weights are never reset."""
    device.killed |= set(kill)
    device.killed -= set(revive)
    device.set_trainable(kill, False)
    device.set_trainable(revive, True)


PLACEMENTS = ("split", "dlora", "centralized")


def make_placement(name: str, *, labels_on_device: bool = False) -> Placement:
    if name == "split":
        return SplitPlacement(labels_on_device=labels_on_device)
    if name == "centralized":
        return CentralizedPlacement()
    if name == "dlora":
        from .dlora import DLoRAPlacement  # dlora builds on this module's loss

        return DLoRAPlacement()
    raise ValueError(f"unknown placement {name!r}; choose from {', '.join(PLACEMENTS)}")
