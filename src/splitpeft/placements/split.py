"""`split` placement (HSplitLoRA / SplitLoRA), and its U-shaped variant.

One step, the batch flowing one way (B, T tokens, d hidden)::

    device                                    server
    embed, blocks [0, k) -- ACTIVATIONS ---->  blocks [k, L), norm, head, loss (labels up too)
                           hidden (B,T,d), labels (B,T)
    backward [0, k)    <-- CUT_GRADIENT -----  backward; server adapters step
                           grad (B,T,d), loss

U-shaped (`labels_on_device`, the default): no label tensor leaves the device. The hidden states
still carry most of what the tokens were, and the head gradient the labels (the privacy meter,
`privacy/meter.py`, measures both; see the README's "What the server can learn")::

    embed, blocks [0, k) -- ACTIVATIONS ---->  blocks [k, L)
    norm, head, loss     <-- FINAL_HIDDEN ---  (B,T,d)
                         -- HEAD_GRADIENT -->  backward; server adapters step
    backward [0, k)      <-- CUT_GRADIENT ---
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from splitpeft.data.batching import Batch
from splitpeft.model.loss import IGNORE_INDEX, causal_lm_loss
from splitpeft.model.parts import Part
from splitpeft.placements.base import DeviceSide, ServerSide, backward_from_cut, freeze_locally
from splitpeft.transport.channel import Channel
from splitpeft.transport.messages import Kind, Message, MessageError, Meta, finite


@dataclass
class SplitPlacement:
    """Split learning at block k; `labels_on_device` makes it U-shaped."""

    labels_on_device: bool = True
    name: str = field(default="split", init=False)

    def device_blocks(self, num_blocks: int, split_layer: int) -> range:
        if not 0 <= split_layer <= num_blocks:
            raise ValueError(f"split_layer {split_layer} is out of range: the model has {num_blocks} blocks (0..{num_blocks})")
        return range(0, split_layer)

    def server_blocks(self, num_blocks: int, split_layer: int) -> range:
        return range(split_layer, num_blocks)

    def server_part(self, num_blocks: int, split_layer: int) -> Part:
        return Part(range(split_layer, num_blocks), embedding=False, head=not self.labels_on_device)

    def device_part(self, num_blocks: int, split_layer: int) -> Part:
        return Part(self.device_blocks(num_blocks, split_layer), embedding=True, head=self.labels_on_device)

    def killed_on_device(self, device: DeviceSide, names: Collection[str]) -> list[str]:
        return sorted(names)

    def device_keeps_head(self) -> bool:
        return self.labels_on_device

    def uses_server(self) -> bool:
        return True

    # ----------------------------------------------------------------- device side

    def device_step(self, device: DeviceSide, batch: Batch, channel: Channel) -> float:
        backbone, meter = device.backbone, device.meter
        with meter.compute():
            embedded = backbone.embed(batch.input_ids)  # (B, T, d)
            cut = device.defence.release(backbone.blocks(embedded, 0, device.split_layer))  # (B, T, d)
        up = {"hidden": cut.detach()}
        if not self.labels_on_device:
            # The server computes the loss, so it needs the labels: completion tokens only
            # (prompt and padding positions are IGNORE_INDEX), never the input ids.
            up["labels"] = batch.labels.to(torch.int32)
        reply = channel.exchange(Message(Kind.ACTIVATIONS, up))
        if self.labels_on_device:
            reply.expect(Kind.FINAL_HIDDEN)
            final = reply.tensor("hidden", shape=cut.shape, dtype=cut.dtype, device=cut.device).requires_grad_()
            with meter.compute():
                loss = causal_lm_loss(backbone.head(final), batch.labels)
                device.backward(loss)
            loss_value = loss.item()
            head_grad = device.defence.release_gradient(device.outgoing_grad(final))
            reply = channel.exchange(Message(Kind.HEAD_GRADIENT, {"grad": head_grad},
                                             meta={Meta.LOSS: finite(loss_value)}))
            reply.expect(Kind.CUT_GRADIENT)
        else:
            reply.expect(Kind.CUT_GRADIENT)
            loss_value = float(reply.meta.get(Meta.LOSS, float("nan")))
        grad = reply.tensor("grad", shape=cut.shape, dtype=device.wire_grad_dtype, device=cut.device)
        with meter.compute():
            backward_from_cut(device, embedded, cut, grad, batch)
            device.optimizer_step()
        return loss_value

    def apply_kill_revive(self, device: DeviceSide, channel: Channel, kill: list[str], revive: list[str]) -> None:
        freeze_locally(device, kill, revive)

    # ----------------------------------------------------------------- server side

    def open_server_session(self, session: ServerSide, meta: Mapping[str, Any], adaptable: Collection[str]) -> None:
        session.step_state = None

    def server_step(self, session: ServerSide, message: Message) -> Message:
        backbone = session.backbone
        if message.kind == Kind.ACTIVATIONS:
            hidden = message.tensor("hidden", shape=(None, None, session.hidden_size), dtype=session.dtype, device=session.torch_device)
            hidden = hidden.requires_grad_()
            labels = None
            if not self.labels_on_device:  # checked before any compute
                labels = message.tensor("labels", shape=hidden.shape[:2], dtype=torch.int32, device=session.torch_device).long()
                session.check_labels(labels)
            final = backbone.blocks(hidden, session.split_layer, backbone.num_blocks)  # (B, T, d)
            if labels is None:
                session.step_state = (hidden, final)  # until the device's HEAD_GRADIENT
                return Message(Kind.FINAL_HIDDEN, {"hidden": final.detach()})
            loss = causal_lm_loss(backbone.head(final), labels)
            session.backward(loss)
            loss_value = loss.item()
            session.optimizer_step(tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()), loss=loss_value)
            return Message(Kind.CUT_GRADIENT, {"grad": session.outgoing_grad(hidden)}, meta={Meta.LOSS: finite(loss_value)})
        if message.kind == Kind.HEAD_GRADIENT and self.labels_on_device:
            if session.step_state is None:
                raise MessageError("HEAD_GRADIENT without a preceding ACTIVATIONS message")
            hidden, final = session.step_state
            session.step_state = None
            grad = message.tensor("grad", shape=final.shape, dtype=session.wire_grad_dtype, device=final.device)
            session.backward(final, grad)
            # The server never sees the labels here: it counts the B x T positions it trained on,
            # which bounds the device's claim (`Simulation.counted_tokens`).
            session.optimizer_step(tokens=int(final.shape[0]) * int(final.shape[1]))
            return Message(Kind.CUT_GRADIENT, {"grad": session.outgoing_grad(hidden)})
        raise MessageError(f"unexpected {message.kind.name} message for placement {self.name}")

    def abort(self, session: ServerSide) -> None:
        session.step_state = None

