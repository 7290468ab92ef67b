"""`split` placement (HSplitLoRA / SplitLoRA), and its U-shaped variant.

One step, the batch flowing one way (B, T tokens, d hidden)::

    device                                    server
    embed, blocks [0, k) -- ACTIVATIONS ---->  blocks [k, L), norm, head, loss (labels up too)
                           hidden (B,T,d), labels (B,T)
    backward [0, k)    <-- CUT_GRADIENT -----  backward; server adapters step
                           grad (B,T,d), loss

U-shaped (`labels_on_device`, the default): no label tensor leaves the device. The hidden states
still carry most of what the tokens were, and the head gradient the labels (the privacy meter,
`privacy/meter.py`, measures both; see docs/how-to/privacy.md)::

    embed, blocks [0, k) -- ACTIVATIONS ---->  blocks [k, L)
    norm, head, loss     <-- FINAL_HIDDEN ---  (B,T,d)
                         -- HEAD_GRADIENT -->  backward; server adapters step
    backward [0, k)      <-- CUT_GRADIENT ---
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from splitpeft.config import ExperimentConfig, failed_checks
from splitpeft.data.batching import Batch
from splitpeft.model.batched import BatchedPass, Member, Wave
from splitpeft.model.loss import IGNORE_INDEX, head_loss
from splitpeft.model.parts import Part
from splitpeft.placements.base import DeviceSide, ServerSide, backward_from_cut, freeze_locally
from splitpeft.transport.channel import Channel
from splitpeft.transport.messages import Kind, Message, MessageError, loss_tensor

if TYPE_CHECKING:
    from splitpeft.hsplit.memory import ModelShapes


@dataclass
class SplitPlacement:
    """Split learning at block k; `labels_on_device` makes it U-shaped."""

    labels_on_device: bool = True
    name: str = field(default="split", init=False)
    parks_server_sessions: bool = field(default=True, init=False)
    steps_in_device_waves: bool = field(default=True, init=False)
    plans_splits: bool = field(default=True, init=False)
    server_trains_adapters: bool = field(default=True, init=False)

    def fixed_split(self, config: ExperimentConfig) -> int:
        return config.placement.split_layer

    def config_problems(self, config: ExperimentConfig) -> list[str]:
        place, fixed = config.placement, not config.hsplit.plans_per_device()
        return failed_checks([
            (place.dlora_device_blocks == 0, "placement.dlora_device_blocks is dlora's hybrid; for split use placement.split_layer"),
            (not fixed or place.split_layer >= config.hsplit.min_split, "placement.split_layer is below hsplit.min_split"),
            (config.privacy.nopeek_weight == 0 or place.split_layer > 0 or not fixed,
             "privacy.nopeek_weight trains device adapters before the cut: needs placement.split_layer >= 1 "
             "(split) or placement.dlora_device_blocks >= 1 (dlora)"),
        ])

    def block_problems(self, config: ExperimentConfig, num_blocks: int) -> list[str]:
        return failed_checks([(config.placement.split_layer <= num_blocks,
                         f"placement.split_layer {config.placement.split_layer} is out of range: "
                         f"{config.model.name} has {num_blocks} blocks (0..{num_blocks})")])

    def step_frame_width(self, shapes: ModelShapes) -> int:
        return shapes.hidden_size

    def sends_labels(self) -> bool:
        return not self.labels_on_device

    def exposure_name(self) -> str | None:
        return "split_u" if self.labels_on_device else "split"

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
        embedded, cut = device.forward_to_cut(batch.input_ids)  # (B, T, d) each; in a device wave where on
        with meter.compute():
            cut = device.defence.release(cut)
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
                loss = head_loss(backbone.head, final, batch.labels)
                device.backward(loss)
            loss_value = loss.item()
            head_grad = device.defence.release_gradient(device.outgoing_grad(final))
            reply = channel.exchange(Message(Kind.HEAD_GRADIENT, {"grad": head_grad}))
            reply.expect(Kind.CUT_GRADIENT)
        else:
            reply.expect(Kind.CUT_GRADIENT)
            loss_value = float(reply.tensor("loss", shape=(), dtype=torch.float32))
        grad = reply.tensor("grad", shape=cut.shape, dtype=device.wire_grad_dtype, device=cut.device)
        backward_from_cut(device, embedded, cut, grad, batch)
        with meter.compute():
            device.optimizer_step()
        return loss_value

    def apply_kill_revive(self, device: DeviceSide, channel: Channel, kill: list[str], revive: list[str]) -> None:
        freeze_locally(device, kill, revive)

    def collect_killed(self, device: DeviceSide, channel: Channel) -> list[str]:
        return []  # killed adapters stay on the device, frozen

    # ----------------------------------------------------------------- server side

    def open_server_session(self, session: ServerSide, meta: Mapping[str, Any], adaptable: Collection[str]) -> None:
        session.step_state = None

    def server_step(self, session: ServerSide, message: Message) -> Message:
        backbone = session.backbone
        if message.kind == Kind.ACTIVATIONS:
            self.abort(session)  # a step it left half done: its wave no longer waits for it
            hidden, labels = self._received(session, message)
            final = backbone.blocks(hidden, session.split_layer, backbone.num_blocks)  # (B, T, d)
            if labels is None:
                session.step_state = (hidden, final)  # until the device's HEAD_GRADIENT
                return Message(Kind.FINAL_HIDDEN, {"hidden": final.detach()})
            loss = head_loss(backbone.head, final, labels)
            session.backward(loss)
            loss_value = loss.item()
            session.optimizer_step(tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()), loss=loss_value)
            return Message(Kind.CUT_GRADIENT, {"grad": session.outgoing_grad(hidden), "loss": loss_tensor(loss_value)})
        if message.kind == Kind.HEAD_GRADIENT and self.labels_on_device:
            if not isinstance(session.step_state, tuple):
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
        if isinstance(session.step_state, _InWave):
            session.step_state.wave.drop(session.device_id)  # the others no longer wait for it
        session.step_state = None

    # ----------------------------------------------------------------- server side, many devices at once

    def wave_key(self, session: ServerSide, message: Message) -> Hashable | None:
        if message.kind == Kind.ACTIVATIONS:
            return (self.name, self.labels_on_device, "forward")
        if message.kind == Kind.HEAD_GRADIENT and self.labels_on_device and isinstance(session.step_state, _InWave):
            return (self.name, "backward", id(session.step_state.wave))
        return None

    def server_wave(self, batched: BatchedPass, steps: Sequence[tuple[ServerSide, Message]]) -> list[Message | Exception | None]:
        """`server_step` for many sessions at once: their ACTIVATIONS as one forward (and, plain
        split, one backward); U-shaped, their HEAD_GRADIENTs as one backward once every session of
        that forward has sent its own."""
        if steps[0][1].kind == Kind.ACTIVATIONS:
            return self._forward_wave(batched, steps)
        return self._backward_wave(steps)

    def _forward_wave(self, batched: BatchedPass, steps: Sequence[tuple[ServerSide, Message]]) -> list[Message | Exception | None]:
        results: list[Message | Exception | None] = [None] * len(steps)
        members: list[Member] = []
        owner: dict[int, tuple[int, ServerSide]] = {}  # id(member) -> its step's index, its session
        for i, (session, message) in enumerate(steps):
            self.abort(session)  # a step it left half done: its wave no longer waits for it
            try:
                hidden, labels = self._received(session, message)
            except MessageError as error:
                results[i] = error
                continue
            members.append(Member(session, hidden, labels))
            owner[id(members[-1])] = (i, session)
        if not members:
            return results
        output = batched.forward(members)
        if self.labels_on_device:
            wave = Wave(list(members))
            for member in members:
                i, session = owner[id(member)]
                assert member.final is not None
                session.step_state = _InWave(wave, member)
                results[i] = Message(Kind.FINAL_HIDDEN, {"hidden": member.final.detach()})
            return results
        losses = batched.losses(members, output)
        values = [float(loss.item()) for loss in losses]
        finite_losses = [loss for loss, value in zip(losses, values) if math.isfinite(value)]
        if finite_losses:
            torch.autograd.backward(finite_losses)  # each session's adapters get its own loss's gradient
        for member, value in zip(members, values):
            i, session = owner[id(member)]
            labels = member.labels
            assert labels is not None
            try:
                session.optimizer_step(tokens=int((labels[:, 1:] != IGNORE_INDEX).sum()), loss=value)
                results[i] = Message(Kind.CUT_GRADIENT, {"grad": session.outgoing_grad(member.hidden),
                                                         "loss": loss_tensor(value)})
            except MessageError as error:
                results[i] = error
        return results

    def _backward_wave(self, steps: Sequence[tuple[ServerSide, Message]]) -> list[Message | Exception | None]:
        results: list[Message | Exception | None] = [None] * len(steps)
        wave = steps[0][0].step_state.wave
        offered: dict[str, int] = {}
        for i, (session, message) in enumerate(steps):
            member = session.step_state.member
            try:
                wave.grads[session.device_id] = message.tensor(
                    "grad", shape=member.final.shape, dtype=session.wire_grad_dtype, device=member.final.device)
                offered[session.device_id] = i
            except MessageError as error:
                wave.drop(session.device_id)
                results[i] = error
        if set(offered) != {m.session.device_id for m in wave.members}:
            return results  # the wave's backward waits for every member's head gradient
        finals = [m.final for m in wave.members]
        torch.autograd.backward(finals, [wave.grads[m.session.device_id] for m in wave.members])
        sessions = {session.device_id: session for session, _ in steps}
        for member in wave.members:
            session = sessions[member.session.device_id]
            session.step_state = None
            assert member.final is not None
            i = offered[session.device_id]
            try:
                session.optimizer_step(tokens=int(member.final.shape[0]) * int(member.final.shape[1]))
                results[i] = Message(Kind.CUT_GRADIENT, {"grad": session.outgoing_grad(member.hidden)})
            except MessageError as error:
                results[i] = error
        return results

    def _received(self, session: ServerSide, message: Message) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The hidden states (a leaf that requires grad) and, plain split, the labels of an
        ACTIVATIONS message, checked before any compute."""
        hidden = message.tensor("hidden", shape=(None, None, session.hidden_size), dtype=session.dtype,
                                device=session.torch_device).requires_grad_()
        labels = None
        if not self.labels_on_device:
            labels = message.tensor("labels", shape=hidden.shape[:2], dtype=torch.int32, device=session.torch_device).long()
            session.check_labels(labels)
        return hidden, labels


@dataclass
class _InWave:
    """A U-shaped session's step in a shared forward pass, until its head gradient."""

    wave: Wave
    member: Member

