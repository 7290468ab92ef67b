"""What a round records: per device (bytes, FLOPs, peak memory, tokens, losses, wall and
simulated time, Kill-and-Revive events) and per round (who trained, who was dropped or rejected,
whose update was clipped)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitpeft.model.adapters import AdapterSet
from splitpeft.parties.device import DeviceRuntime, LocalPhase


@dataclass
class DeviceRound:
    bytes_up: int = 0
    bytes_down: int = 0
    adapter_bytes_up: int = 0
    adapter_bytes_down: int = 0
    flops: int = 0
    adapter_flops: int = 0  # dlora: FLOPs of the adapter branches alone (part of `flops`)
    peak_memory_bytes: int = 0
    tokens: int = 0
    steps: int = 0
    train_loss: float = float("nan")
    losses: list[float] = field(default_factory=list)
    step_flops: list[int] = field(default_factory=list)
    step_bytes_up: list[int] = field(default_factory=list)
    step_bytes_down: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    kr_events: list[dict[str, Any]] = field(default_factory=list)
    active_adapters: int | None = None
    simulated_s: float | None = None  # flops / device compute + bytes / device link
    simulated_server_s: float | None = None  # the server's estimated FLOPs for its steps / the server's compute


@dataclass
class RoundRecord:
    round: int
    devices: dict[str, DeviceRound]
    eval_perplexity: float | None = None
    rejected: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    replanned: list[str] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)  # devices lost mid-round or whose upload was refused, and why
    # updates a robust policy scaled down: holder, module, factor (< 1), on ("BA", "A" or "B"), norm, limit
    clipped: list[dict[str, Any]] = field(default_factory=list)
    selected: list[str] = field(default_factory=list)  # devices asked to train this round
    completed: list[str] = field(default_factory=list)  # selected devices that trained and whose upload was accepted
    # parties (server sessions "server/<device>", devices) whose adapters or moments went non-finite
    # and were reset from the global state at the round's end: "holder: tensor"
    repaired: list[str] = field(default_factory=list)
    # max(max_i (simulated_s_i + simulated_server_s_i), sum_i simulated_server_s_i): hsplit/budget.round_time_s
    simulated_round_s: float | None = None
    # server.batch_devices: how many devices' steps each shared pass of the server served (empty: none shared)
    server_passes: list[int] = field(default_factory=list)
    # federation.device_waves: how many devices each shared pass of the devices' part served (empty: none shared)
    device_waves: list[int] = field(default_factory=list)
    # devices online this round where availability is drawn (fleet.availability, a trace); None: all were
    online: int | None = None
    # the run's process: resident memory at the round's end, before runtime.release_memory_each_round (Linux)
    resident_bytes: int | None = None


@dataclass
class DeviceResult:
    """A device's finished round as the server receives it."""

    uploaded: AdapterSet
    tokens: int  # the device's own claim; aggregation weighs what the server counted (`Simulation.counted_tokens`)
    stats: DeviceRound


def fill_round_stats(stats: DeviceRound, device: DeviceRuntime, phase: LocalPhase, events_before: int) -> None:
    """Copy a finished local phase and the device's meters into `stats` (resets the meters)."""
    if device.kill_revive is not None:
        stats.kr_events = device.kill_revive.events[events_before:]
        stats.active_adapters = len(device.modules) - len(device.killed)  # spared ones included
    stats.flops, stats.adapter_flops, stats.peak_memory_bytes = device.meter.take_round()
    stats.tokens, stats.steps, stats.losses = phase.tokens, len(phase.losses), phase.losses
    stats.step_flops, stats.step_bytes_up, stats.step_bytes_down = phase.step_flops, phase.step_bytes_up, phase.step_bytes_down
    stats.train_loss = float(np.mean(phase.losses))
    stats.wall_s = phase.wall_s
