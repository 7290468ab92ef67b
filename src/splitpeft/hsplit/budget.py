"""A device's budget (memory bytes, compute FLOP/s, link bytes/s), fleets spread over a range,
and the simulated time of a device's round from its FLOPs and bytes."""

from __future__ import annotations

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


def simulated_step_s(profile: DeviceProfile, device_flops: float, bytes_moved: float) -> float:
    """Time of one step on `profile`: device_flops / flops_per_s + bytes_moved / bandwidth."""
    return device_flops / profile.flops_per_s + bytes_moved / profile.bandwidth_bytes_per_s
