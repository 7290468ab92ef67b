"""Placements: which part of the model runs where, and the per-batch protocol between the parts.

A placement is a named object (`Placement`) with one verb per side of the channel:

- `device_step(device, batch, channel)`: one training step on a device, talking to the server
  only through `channel.exchange`; returns the loss.
- `server_step(session, message)`: the server's reply to one message of that step.

and two hooks the server calls so that it knows nothing of any placement's internals:
`open_server_session` (after it builds a device's session) and `abort` (a device sent garbage
mid-step: drop the half-done step).

Both verbs are typed against the narrow `DeviceSide` / `ServerSide` protocols below, not the
concrete parties, so placements and parties do not import each other.

The placements: `split` and its U-shaped variant (`placements/split.py`), `centralized`
(`placements/centralized.py`), `dlora` (`dlora/placement.py`); by name in `placements/registry.py`.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import PreTrainedModel

from splitpeft.config import ExperimentConfig
from splitpeft.data.batching import Batch
from splitpeft.defences.cut import Defence
from splitpeft.model.backbone import Backbone
from splitpeft.model.parts import Part
from splitpeft.model.usage import DeviceMeter
from splitpeft.transport.channel import Channel
from splitpeft.transport.messages import Message

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

    from splitpeft.hsplit.memory import ModelShapes
    from splitpeft.model.batched import BatchedPass
    from splitpeft.parties.party import Training


class DeviceSide(Protocol):
    """What a placement uses of a device: its model part, meter, and adapter switches."""

    device_id: str

    @property
    def model(self) -> PreTrainedModel: ...

    @property
    def backbone(self) -> Backbone: ...

    torch_device: torch.device    # where its part of the model runs
    meter: DeviceMeter
    split_layer: int
    defence: Defence              # what it does to the tensors it sends up (defences/cut.py)
    killed: set[str]
    measure_killed: bool          # this step also measures killed adapters' gradient norms
    training: Training            # how the run trains (`train_killed`: the dlora server trains killed adapters)
    grad_norms: dict[str, float]  # measured gradient norms of this step (Kill and Revive)

    def optimizer_step(self) -> None: ...

    def backward(self, tensor: torch.Tensor, grad: torch.Tensor | None = None, *, retain_graph: bool = False) -> None: ...

    def outgoing_grad(self, tensor: torch.Tensor) -> torch.Tensor: ...

    @property
    def wire_grad_dtype(self) -> torch.dtype: ...

    def set_trainable(self, names: Iterable[str], trainable: bool) -> None: ...

    def forward_to_cut(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedded, cut) of `input_ids` (B, T): the embedding and blocks [0, split_layer)'s output."""
        ...

    def backward_roots(self, roots: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Backward from every (tensor, incoming gradient or None for a loss) of `roots`."""
        ...


class ServerSide(Protocol):
    """What a placement uses of the server's session for one device."""

    device_id: str

    @property
    def model(self) -> PreTrainedModel: ...

    @property
    def adapter_layers(self) -> Mapping[str, LoraLayer]: ...  # its model's LoRA layers, found once

    @property
    def backbone(self) -> Backbone: ...

    split_layer: int
    hidden_size: int
    torch_device: torch.device  # where the session's part runs
    dtype: torch.dtype          # of the frozen base and of the activations at the cut
    alpha: float          # LoRA alpha of the run (branch scale alpha / r)
    rslora: bool          # ... or alpha / sqrt(r) (rsLoRA)
    tokens: int           # tokens this session trained on, counted by the server (labelled positions, else B x T)
    step_state: Any       # the placement's own state between messages of one step
    warm_factors: dict[str, tuple[float, torch.Tensor, torch.Tensor]]  # (s, A0, B0) of a warm start's own W - s B0 A0
    training: Training    # how the run trains its adapters (lr, weight decay, ...): the server's own setting

    def check_labels(self, labels: torch.Tensor) -> None: ...

    def backward(self, tensor: torch.Tensor, grad: torch.Tensor | None = None) -> None: ...

    def outgoing_grad(self, tensor: torch.Tensor) -> torch.Tensor: ...

    @property
    def wire_grad_dtype(self) -> torch.dtype: ...

    def optimizer_step(self, tokens: int | None = None, loss: float | None = None) -> None:
        """Step the session's adapters, or raise MessageError and take no step if `loss` or a
        gradient is not finite (the session keeps its state)."""
        ...


class Placement(Protocol):
    name: str
    # A server session's shell may go back to the server's pool between rounds (`Party.park`):
    # False where the placement hooks the session's model for good when the session opens.
    parks_server_sessions: bool
    # The devices' steps can run in device waves (`federation.device_waves`): the device computes
    # its part through `DeviceSide.forward_to_cut` and `backward_roots`.
    steps_in_device_waves: bool
    # hsplit's planners choose each device's split point (and the privacy floor applies to it)
    plans_splits: bool
    # the server's per-device sessions train adapters of their own (dlora's server runs frozen blocks)
    server_trains_adapters: bool

    def fixed_split(self, config: ExperimentConfig) -> int:
        """The split every device takes without a planner (the config key this placement reads)."""
        ...

    def config_problems(self, config: ExperimentConfig) -> list[str]:
        """What this placement cannot run with in `config` (checked with the config's own rules),
        and, given the model's `num_blocks` (`block_problems`), a split out of range."""
        ...

    def block_problems(self, config: ExperimentConfig, num_blocks: int) -> list[str]: ...

    def step_frame_width(self, shapes: ModelShapes) -> int:
        """The widest (B, T, width) tensor of one step's messages (without labels)."""
        ...

    def sends_labels(self) -> bool:
        """The device sends the completion's token ids as labels (plain split)."""
        ...

    def exposure_name(self) -> str | None:
        """The privacy meter's name for what this placement's devices expose (None: nothing crosses a
        cut); placements that expose the same things share it."""
        ...

    def device_blocks(self, num_blocks: int, split_layer: int) -> range:
        """Blocks whose adapters the device owns."""
        ...

    def server_blocks(self, num_blocks: int, split_layer: int) -> range:
        """Blocks whose adapters the server's session for that device trains."""
        ...

    def device_part(self, num_blocks: int, split_layer: int) -> Part:
        """The frozen tensors a device at `split_layer` holds (and runs)."""
        ...

    def killed_on_device(self, device: DeviceSide, names: Collection[str]) -> list[str]:
        """Which of the killed adapters `names` the device still computes (so their gradients can
        be measured there); the others the server computes (dlora)."""
        ...

    def device_keeps_head(self) -> bool: ...

    def server_part(self, num_blocks: int, split_layer: int) -> Part:
        """The frozen tensors the server's session for a device at `split_layer` runs."""
        ...

    def uses_server(self) -> bool: ...

    def device_step(self, device: DeviceSide, batch: Batch, channel: Channel) -> float: ...

    def apply_kill_revive(self, device: DeviceSide, channel: Channel, kill: list[str], revive: list[str]) -> None:
        """Freeze `kill` and unfreeze `revive` on the device (and tell the server where needed)."""
        ...

    def collect_killed(self, device: DeviceSide, channel: Channel) -> list[str]:
        """At the end of a local phase: the killed adapters someone trained while killed (a dlora
        server with `kill_revive.server_trains_killed`), now written into the device's model so
        that it uploads them; [] where killed adapters stay frozen."""
        ...

    def open_server_session(self, session: ServerSide, meta: Mapping[str, Any], adaptable: Collection[str]) -> None:
        """The server built `session` from an OPEN_SESSION with `meta`; `adaptable` are the
        model's adaptable linears. Raises MessageError on a bad request."""
        ...

    def server_step(self, session: ServerSide, message: Message) -> Message: ...

    def abort(self, session: ServerSide) -> None:
        """Drop any half-done step of `session` so its next step starts clean."""
        ...

    def wave_key(self, session: ServerSide, message: Message) -> Hashable | None:
        """Messages of several sessions with the same key can be answered by one `server_wave`
        (one pass of the frozen model for all of them); None: this one is answered alone."""
        ...

    def server_wave(self, batched: BatchedPass, steps: Sequence[tuple[ServerSide, Message]]) -> list[Message | Exception | None]:
        """The replies to `steps` (messages with one `wave_key`, one per session), run as one pass
        of `batched`: an Exception refuses that step alone; None: no reply yet (offer it again)."""
        ...


def freeze_locally(device: DeviceSide, kill: list[str], revive: list[str]) -> None:
    """Killed adapters keep computing their (frozen) branch on the device: no weight gradients,
    no optimiser update, no upload; revived ones train again. Weights are never reset."""
    device.killed |= set(kill)
    device.killed -= set(revive)
    device.set_trainable(kill, False)
    device.set_trainable(revive, True)


def backward_from_cut(device: DeviceSide, embedded: torch.Tensor, cut: torch.Tensor, grad: torch.Tensor, batch: Batch) -> None:
    """The device's backward from the gradient `grad` (B, T, d) the server sent for the cut
    activations `cut` it released, plus its own defence penalty (NoPeek) on (`embedded`, `cut`).
    Nothing before the cut trains when `cut` needs no gradient (k = 0, or every adapter killed)."""
    roots: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    if cut.requires_grad:
        with device.meter.compute():
            penalty = device.defence.penalty(embedded, cut, batch.token_mask())
        roots = ([(penalty, None)] if penalty is not None else []) + [(cut, grad)]
    device.backward_roots(roots)
