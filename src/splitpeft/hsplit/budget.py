"""A device's budget (memory bytes, compute FLOP/s, link bytes/s, optionally a step-time limit),
fleets spread over a range, and the simulated time of a step or a round: each device's compute
and link, and the server's compute, which every device's session shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------- devices


@dataclass(frozen=True)
class DeviceProfile:
    """A device's budget: memory for training, compute speed and link speed."""

    name: str
    memory_bytes: int
    flops_per_s: float
    bandwidth_bytes_per_s: float
    max_step_s: float | None = None  # time budget: a plan's simulated step may take at most this
    up_bytes_per_s: float | None = None  # its uplink, where it differs from bandwidth_bytes_per_s (its downlink)
    availability: float = 1.0  # the probability that it is online in a round


def fleet_preset(
    n: int, memory_range: tuple[int, int], flops_per_s: float, bandwidth: float
) -> list[DeviceProfile]:
    """`n` devices "device-0".. with memory spread evenly from memory_range[0] to memory_range[1]."""
    if n < 1:
        raise ValueError(f"a fleet needs at least one device, got n={n}")
    low, high = memory_range
    if not 0 < low <= high:
        raise ValueError(f"memory_range must satisfy 0 < low <= high, got {memory_range}")
    memories = np.linspace(low, high, n)
    return [DeviceProfile(f"device-{i}", int(round(m)), flops_per_s, bandwidth) for i, m in enumerate(memories)]


def simulated_round_s(profile: DeviceProfile, device_flops: float, bytes_up: float, bytes_down: float) -> float:
    """A device's compute and link time for its round: device_flops / flops_per_s + bytes_up / its
    uplink + bytes_down / its downlink (the same link both ways unless the profile's differ)."""
    up = profile.up_bytes_per_s or profile.bandwidth_bytes_per_s
    return device_flops / profile.flops_per_s + bytes_up / up + bytes_down / profile.bandwidth_bytes_per_s


def simulated_step_s(profile: DeviceProfile, device_flops: float, bytes_moved: float) -> float:
    """Time of one step on `profile`: device_flops / flops_per_s + bytes_moved / bandwidth."""
    return device_flops / profile.flops_per_s + bytes_moved / profile.bandwidth_bytes_per_s


@dataclass(frozen=True)
class StepTime:
    """One device's simulated step (or round: the same sums over its steps), in seconds."""

    device_s: float  # its own compute: device FLOPs / its FLOP/s
    link_s: float    # its traffic: bytes both ways / its link's bytes/s
    server_s: float  # the server's compute for its session: server FLOPs / the server's FLOP/s

    @property
    def total_s(self) -> float:
        """What the device waits for: its compute, its link and the server's work on its step."""
        return self.device_s + self.link_s + self.server_s


def step_time(profile: DeviceProfile, device_flops: float, bytes_moved: float, server_flops: float,
              server_flops_per_s: float) -> StepTime:
    return StepTime(device_flops / profile.flops_per_s, bytes_moved / profile.bandwidth_bytes_per_s,
                    server_flops / server_flops_per_s)


def round_time_s(times: Sequence[StepTime]) -> float:
    """The simulated wall time of a round (or of one step of every device) over devices i:

        T = max( max_i (device_i + link_i + server_i),  sum_i server_i )

    Each device waits for its own compute, its link and the server's part of its step (the split
    is sequential within a step); the server is one machine serving every session, so it needs at
    least the sum of their work. The slowest device, or the server's queue, sets the round. (A
    model, ours: it ignores the overlap a pipelined server could get and any queueing beyond the sum.)
    """
    if not times:
        return 0.0
    return max(max(t.total_s for t in times), sum(t.server_s for t in times))
