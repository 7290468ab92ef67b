"""A device: its private data, its part of the model (a `Party`), and its local training phase."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from .channel import Channel
from .data import BatchStream
from .messages import Kind, Message
from .meter import DeviceMeter
from .adapters import ADAPTER_NAME, lora_layers
from .party import Party
from .placement import Placement


@dataclass
class LocalPhase:
    """What one device did in one round."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    wall_s: float = 0.0


class DeviceRuntime(Party):
    """Device `device_id` running `placement` with blocks [0, split_layer) (or all, centralized)."""

    def __init__(
        self,
        device_id: str,
        base: PreTrainedModel,
        placement: Placement,
        split_layer: int,
        ranks: Mapping[str, int],
        data: BatchStream,
        *,
        alpha: float,
        dropout: float,
        lr: float,
        count_flops: bool = True,
    ) -> None:
        super().__init__(base, ranks, alpha=alpha, dropout=dropout, lr=lr)
        self.device_id = device_id
        self.placement = placement
        self.split_layer = split_layer
        self.data = data
        self.meter = DeviceMeter(count_flops)
        blocks = placement.device_blocks(self.backbone.num_blocks, split_layer)
        self._held = self._held_weights(blocks if placement.device_holds_blocks() else range(0))
        self.killed: set[str] = set()
        self.last_step_meta: dict[str, object] = {}

    def _held_weights(self, blocks: range) -> list[torch.Tensor]:
        """Frozen tensors this device must hold: embedding, its blocks, and the head if it keeps it."""
        backbone = self.backbone
        held = [p for p in backbone.model.get_input_embeddings().parameters()]
        for name, parameter in backbone.model.named_parameters():
            if any(name.startswith(backbone.block_prefix(j)) for j in blocks) and ".lora_" not in name:
                held.append(parameter)
        if self.placement.device_keeps_head():
            held += [p for module in backbone.head_modules() for p in module.parameters()]
        for name, parameter in backbone.model.named_parameters():
            if "wpe" in name:  # GPT-2 position embeddings live with the token embedding
                held.append(parameter)
        return held

    def resident_tensors(self) -> list[torch.Tensor]:
        grads = [p.grad for p in self.parameters if p.grad is not None]
        return self._held + self.parameters + grads + self.optimizer_state_tensors()

    def open_session(self, channel: Channel) -> None:
        """Tell the server this device's split; the server builds its half for it."""
        if self.placement.uses_server():
            channel.exchange(
                Message(Kind.OPEN_SESSION, meta={
                    "placement": self.placement.name,
                    "split_layer": self.split_layer,
                    "labels_on_device": self.placement.device_keeps_head(),
                    "ranks": {name: layer.r[ADAPTER_NAME] for name, layer in lora_layers(self.model).items()},
                })
            ).expect(Kind.SESSION_READY)

    def local_phase(self, steps: int, channel: Channel) -> LocalPhase:
        phase = LocalPhase()
        start = time.perf_counter()
        for _ in range(steps):
            batch = self.data.next()
            self.meter.begin_step(self.resident_tensors(), key=tuple(batch.input_ids.shape))
            phase.losses.append(self.placement.device_step(self, batch, channel))
            # Gradients are freed after the optimiser step; count them at their peak size.
            self.meter.end_step()
            phase.tokens += batch.completion_tokens
        phase.wall_s = time.perf_counter() - start
        return phase
