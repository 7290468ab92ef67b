"""A device: its private data, its part of the model (a `Party`), and its local training phase."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import torch
from transformers import PreTrainedModel

from splitpeft.config import KillReviveConfig
from splitpeft.data.batching import BatchStream
from splitpeft.defences.cut import NO_DEFENCE, Defence
from splitpeft.model.adapters import (
    ADAPTER_NAME,
    LoraWeights,
    lora_ab,
    read_adapters,
    to_tensors,
)
from splitpeft.model.backbone import backbone_of
from splitpeft.model.usage import DeviceMeter
from splitpeft.parties.killrevive import KillRevive
from splitpeft.parties.party import DEFAULT_TRAINING, Party, Training
from splitpeft.parties.shells import ShellPool
from splitpeft.placements.base import Placement
from splitpeft.transport.channel import Channel
from splitpeft.transport.messages import Kind, Message, Meta


class WaveRunner(Protocol):
    """What runs a device's compute together with other devices' (`federation/lockstep.py`)."""

    def device_forward(self, device: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object] | None: ...

    def device_backward(self, device: Any, wave: object, roots: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None: ...


@dataclass
class LocalPhase:
    """What one device did in one round."""

    losses: list[float] = field(default_factory=list)
    step_flops: list[int] = field(default_factory=list)
    step_bytes_up: list[int] = field(default_factory=list)      # split traffic of each step
    step_bytes_down: list[int] = field(default_factory=list)
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
        training: Training = DEFAULT_TRAINING,
        *,
        count_flops: bool = True,
        defence: Defence = NO_DEFENCE,
        pool: ShellPool | None = None,
    ) -> None:
        part = placement.device_part(backbone_of(base).num_blocks, split_layer)
        super().__init__(base, ranks, training, part=part, pool=pool)
        self.part = part
        self.device_id = device_id
        self.placement = placement
        self.split_layer = split_layer
        self.data = data
        self.defence = defence  # what it does to the tensors it sends up (defences/cut.py)
        self.meter = DeviceMeter(count_flops, device=self.torch_device)
        self.killed: set[str] = set()
        self.trained_killed: set[str] = set()  # killed adapters the server trained this phase (uploaded)
        # `kill_revive.upload_killed`: the adapters killed as this round began, as loaded; those still
        # equal at the upload travel as names (`Meta.UNCHANGED`): the server holds what it gave
        self.round_start: dict[str, LoraWeights] = {}
        self.kill_revive: KillRevive | None = None
        self.measure_killed = False
        self.grad_norms: dict[str, float] = {}
        self._before: dict[str, LoraWeights] = {}
        # The round's lockstep while it runs with device waves (`federation/lockstep.py`), and the
        # wave this device's current step is part of
        self.waves: WaveRunner | None = None
        self._wave: object | None = None

    # ------------------------------------------------------------------ its compute

    def forward_to_cut(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(embedded, cut): the embedding of `input_ids` (B, T) and blocks [0, split_layer)'s output,
        (B, T, d) each, in a device wave where the round runs them (`federation.device_waves`),
        else here, metered."""
        self._wave = None
        if self.waves is not None:
            shared = self.waves.device_forward(self, input_ids)
            if shared is not None:
                embedded, cut, self._wave = shared
                return embedded, cut
        backbone = self.backbone
        with self.meter.compute():
            embedded = backbone.embed(input_ids)
            return embedded, backbone.blocks(embedded, 0, self.split_layer)

    def backward_roots(self, roots: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Backward from every (tensor, incoming gradient, or None for a loss) of `roots`: with
        the other members of this step's device wave, else here, one after another."""
        wave, self._wave = self._wave, None
        if wave is not None:
            assert self.waves is not None
            self.waves.device_backward(self, wave, roots)
            return
        with self.meter.compute():
            for index, (tensor, grad) in enumerate(roots):
                self.backward(tensor, grad, retain_graph=index < len(roots) - 1)

    def resident_tensors(self) -> list[torch.Tensor]:
        """Tensors the device holds across steps: frozen weights (with a warm start's own copies),
        adapters, optimiser state."""
        return list(self.shell.frozen) + self.warm_copies() + self.parameters + self.optimizer_state_tensors()

    def gradient_bytes(self) -> int:
        """Bytes of the gradients a step allocates (one per trainable adapter parameter)."""
        return sum(p.numel() * p.element_size() for p in self.parameters if p.requires_grad)

    # ------------------------------------------------------------------ kill and revive

    def attach_kill_revive(self, settings: KillReviveConfig, seed: int) -> None:
        """Kill and Revive over the device's adapters, or (`spare_device_blocks`) over those of the
        blocks the server runs: the hybrid's own blocks' adapters then always train here."""
        spared = set(self.placement.killed_on_device(self, self.modules)) if settings.spare_device_blocks else set()
        self.kill_revive = KillRevive(settings, [m for m in self.modules if m not in spared], seed=seed)

    def set_trainable(self, names: Iterable[str], trainable: bool) -> None:
        layers = self.shell.layers
        for name in names:
            for parameter in lora_ab(layers[name]):
                parameter.requires_grad_(trainable)

    def optimizer_step(self) -> None:
        """Step the active adapters; on a revive step first record every adapter's gradient norm."""
        if self.kill_revive is not None and (self.measure_killed or self.kill_revive.wants_active_gradients()):
            layers = self.shell.layers
            norms = {}
            for name, layer in layers.items():
                grads = [p.grad for p in lora_ab(layer) if p.grad is not None]
                if grads:  # non-empty, so the sum is a tensor
                    norms[name] = float(torch.sqrt(cast(torch.Tensor, sum((g**2).sum() for g in grads))))
            self.grad_norms.update(norms)
            for name in self.killed:  # measured only: killed adapters stay frozen
                for p in lora_ab(layers[name]):
                    p.grad = None
        super().optimizer_step()

    def _kill_revive_step(self, channel: Channel) -> None:
        policy = self.kill_revive
        assert policy is not None
        after = read_adapters(self.shell.layers, sorted(policy.active))
        policy.observe(self._before, after)
        if policy.wants_active_gradients():
            policy.observe_gradients(self.grad_norms)
        kill, revive = policy.decide(self.grad_norms if self.measure_killed else None)
        if kill or revive:
            self.placement.apply_kill_revive(self, channel, kill, revive)

    def local_phase(self, steps: int, channel: Channel) -> LocalPhase:
        phase = LocalPhase()
        start = time.perf_counter()
        policy = self.kill_revive
        self.trained_killed = set()
        if policy is not None and self.killed:
            self.placement.apply_kill_revive(self, channel, sorted(self.killed), [])  # re-sync after aggregation
        for _ in range(steps):
            batch = self.data.next().to(self.torch_device)
            if policy is not None:
                self.measure_killed = policy.wants_killed_gradients()
                self.grad_norms = {}
                self._before = read_adapters(self.shell.layers, sorted(policy.active))
                self.set_trainable(self.placement.killed_on_device(self, self.killed), self.measure_killed)
            # a step's FLOPs are counted once per key: what changes them (shape, killed adapters, the
            # warm corrections a low-rank warm start computes, none in a cold first round)
            key = (tuple(batch.input_ids.shape), frozenset(self.killed), self.measure_killed, self.shell.corrected)
            self.meter.begin_step(self.resident_tensors(), key=key,
                                  extra_bytes=self.gradient_bytes())
            flops_before, up_before, down_before = self.meter.flops, channel.traffic.bytes_up, channel.traffic.bytes_down
            phase.losses.append(self.placement.device_step(self, batch, channel))
            self.meter.end_step()
            phase.step_flops.append(self.meter.flops - flops_before)
            phase.step_bytes_up.append(channel.traffic.bytes_up - up_before)
            phase.step_bytes_down.append(channel.traffic.bytes_down - down_before)
            phase.tokens += batch.completion_tokens
            if policy is not None:
                self.set_trainable(self.killed, False)
                self._kill_revive_step(channel)
        if policy is not None and self.killed:
            self.trained_killed = set(self.placement.collect_killed(self, channel))
        phase.wall_s = time.perf_counter() - start
        return phase

    @property
    def uploads_killed(self) -> bool:
        """Whether this device uploads its killed adapters too (`kill_revive.upload_killed`)."""
        return self.kill_revive is not None and self.kill_revive.settings.upload_killed

    def load(self, adapters: Mapping[str, LoraWeights]) -> None:
        super().load(adapters)
        self.round_start = read_adapters(self.shell.layers, sorted(self.killed)) if self.uploads_killed and self.killed else {}

    def park(self) -> None:
        self.round_start = {}  # only the round's upload reads it
        super().park()

    def upload_message(self) -> Message:
        """The round's trained adapters (killed ones stay home, unless the server trained them or
        `kill_revive.upload_killed` sends them at their frozen values: those killed before the round
        began and still as loaded are named in `Meta.UNCHANGED` instead, the server has their value)."""
        every = self.uploads_killed
        trained = {n: w for n, w in self.adapters().items() if every or n not in self.killed or n in self.trained_killed}
        unchanged = {n for n, w in self.round_start.items()
                     if n in trained and torch.equal(w.A.cpu(), trained[n].A) and torch.equal(w.B.cpu(), trained[n].B)}
        meta: dict[str, object] = {Meta.DEVICE: self.device_id}
        if unchanged:
            meta[Meta.UNCHANGED] = sorted(unchanged)
            trained = {n: w for n, w in trained.items() if n not in unchanged}
        return Message(Kind.ADAPTERS, to_tensors(trained), meta=meta)

    def open_session(self, channel: Channel) -> None:
        """Tell the server this device's split; the server builds its half for it."""
        if self.placement.uses_server():
            channel.exchange(
                Message(Kind.OPEN_SESSION, meta={
                    Meta.PLACEMENT: self.placement.name,
                    Meta.SPLIT_LAYER: self.split_layer,
                    Meta.LABELS_ON_DEVICE: self.placement.device_keeps_head(),
                    Meta.RANKS: {name: layer.r[ADAPTER_NAME] for name, layer in self.shell.layers.items()},
                })
            ).expect(Kind.SESSION_READY)


    def close_session(self, channel: Channel) -> None:
        """Tell the server the local phase is over (a stream that ends without this is a lost device)."""
        if self.placement.uses_server():
            channel.exchange(Message(Kind.CLOSE_SESSION)).expect(Kind.SESSION_CLOSED)
