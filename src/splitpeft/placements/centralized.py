"""`centralized` placement (CenLoRA): the whole model on one party, no traffic; the reference
every other placement must match step for step."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from splitpeft.config import ExperimentConfig, failed_checks
from splitpeft.data.batching import Batch
from splitpeft.model.loss import head_loss
from splitpeft.model.parts import Part
from splitpeft.placements.base import DeviceSide, ServerSide, freeze_locally
from splitpeft.transport.channel import Channel
from splitpeft.transport.messages import Message, MessageError

if TYPE_CHECKING:
    from splitpeft.hsplit.memory import ModelShapes
    from splitpeft.model.batched import BatchedPass


@dataclass
class CentralizedPlacement:
    name: str = field(default="centralized", init=False)
    parks_server_sessions: bool = field(default=True, init=False)
    steps_in_device_waves: bool = field(default=False, init=False)
    plans_splits: bool = field(default=False, init=False)
    server_trains_adapters: bool = field(default=False, init=False)

    def fixed_split(self, config: ExperimentConfig) -> int:
        return config.placement.split_layer

    def config_problems(self, config: ExperimentConfig) -> list[str]:
        pv = config.privacy
        return failed_checks([
            (config.placement.dlora_device_blocks == 0,
             "placement.dlora_device_blocks is dlora's hybrid; for split use placement.split_layer"),
            (pv.noise_multiplier == 0 and pv.clip_norm == 0 and pv.nopeek_weight == 0,
             "privacy defences protect what crosses the cut; placement centralized sends nothing"),
        ])

    def block_problems(self, config: ExperimentConfig, num_blocks: int) -> list[str]:
        return []

    def step_frame_width(self, shapes: ModelShapes) -> int:
        return shapes.hidden_size

    def sends_labels(self) -> bool:
        return False

    def exposure_name(self) -> str | None:
        return None  # nothing crosses a cut

    def device_blocks(self, num_blocks: int, split_layer: int) -> range:
        return range(0, num_blocks)

    def server_blocks(self, num_blocks: int, split_layer: int) -> range:
        return range(0)

    def server_part(self, num_blocks: int, split_layer: int) -> Part:
        return Part(range(0), embedding=False, head=False)

    def device_part(self, num_blocks: int, split_layer: int) -> Part:
        return Part(range(num_blocks), embedding=True, head=True)

    def killed_on_device(self, device: DeviceSide, names: Collection[str]) -> list[str]:
        return sorted(names)

    def device_keeps_head(self) -> bool:
        return True

    def uses_server(self) -> bool:
        return False

    def device_step(self, device: DeviceSide, batch: Batch, channel: Channel) -> float:
        backbone = device.backbone
        with device.meter.compute():
            hidden = backbone.blocks(backbone.embed(batch.input_ids), 0, backbone.num_blocks)  # (B, T, d)
            loss = head_loss(backbone.head, hidden, batch.labels)
            device.backward(loss)
            device.optimizer_step()
        return loss.item()

    def apply_kill_revive(self, device: DeviceSide, channel: Channel, kill: list[str], revive: list[str]) -> None:
        freeze_locally(device, kill, revive)

    def collect_killed(self, device: DeviceSide, channel: Channel) -> list[str]:
        return []  # killed adapters stay on the device, frozen

    def open_server_session(self, session: ServerSide, meta: Mapping[str, Any], adaptable: Collection[str]) -> None:
        raise MessageError("the centralized placement has no server traffic")

    def server_step(self, session: ServerSide, message: Message) -> Message:
        raise MessageError("the centralized placement has no server traffic")

    def abort(self, session: ServerSide) -> None:
        pass

    def wave_key(self, session: ServerSide, message: Message) -> Hashable | None:
        return None

    def server_wave(self, batched: BatchedPass, steps: Sequence[tuple[ServerSide, Message]]) -> list[Message | Exception | None]:
        raise MessageError("the centralized placement has no server traffic")
