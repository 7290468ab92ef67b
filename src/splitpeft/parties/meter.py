"""What a device's work costs: FLOPs (counted by torch's FlopCounterMode) and memory.

FLOPs depend only on the shapes a step runs with, so a step whose key (its batch shape) was
already counted adds the recorded count instead of counting again: counting costs ~10% of a
step on CPU, and the first step of every shape is still counted for real.

Only the device's own compute is measured: placements wrap each device-side segment of a step in
`meter.compute()`, never the channel exchange, so the server's work (in-process or remote) is not
charged to the device.

Memory on CPU has no allocator statistics in torch, so the peak is a tensor account:
resident state (frozen weights the device holds, adapters, their gradients, optimiser state) plus
every distinct tensor autograd saved for backward during the step (recorded through
`torch.autograd.graph.saved_tensors_hooks`, de-duplicated by storage). On CUDA the allocator's own
peak (`torch.cuda.max_memory_allocated`) is used instead.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

# torch's registry has no formula for the CPU flash-attention kernel that sdpa uses here, so
# attention would count as zero FLOPs; it is the same computation as the CUDA kernels'.
_aten = torch.ops.aten


CPU_ATTENTION_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: flop_registry[_aten._scaled_dot_product_flash_attention],
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        flop_registry[_aten._scaled_dot_product_flash_attention_backward],
}


for _formula in CPU_ATTENTION_FLOPS.values():
    _formula._get_raw = True  # already shape-wrapped by torch's registry


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention."""
    return FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: set[int] | None = None) -> tuple[int, set[int]]:
    """(bytes, data pointers) of the distinct storages among `tensors`, skipping those in `exclude`:
    tensors sharing a storage (views, tied weights) count once, as memory does."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        if exclude is None or storage.data_ptr() not in exclude:
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()), set(seen)


def tensor_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages among `tensors`."""
    return storage_bytes(tensors)[0]


class DeviceMeter:
    """Accumulates a device's FLOPs and tracks the peak of its step memory."""

    def __init__(self, count_flops: bool = True) -> None:
        self.count_flops = count_flops
        self.flops = 0
        self.adapter_flops = 0  # the part spent in "adapter" blocks (dlora's branches)
        self._saved: dict[int, int] = {}
        self._exclude: set[int] = set()
        self.step_peak_bytes = 0
        self._flops_by_key: dict[Hashable, int] = {}
        self._key: Hashable = None
        self._counting = count_flops
        self._step_flops = 0
        self._step_adapter_flops = 0
        self._adapter_flops_by_key: dict[Hashable, int] = {}

    def begin_step(self, resident: Iterable[torch.Tensor], key: Hashable = None, extra_bytes: int = 0) -> None:
        """Start a step; `resident` are tensors held across steps (not counted as activations).

        `key` identifies the step's shapes (None: always count); `extra_bytes` are held during the
        step but not allocated yet (the adapters' gradients)."""
        self._key = key
        self._counting = self.count_flops and (key is None or key not in self._flops_by_key)
        self._step_flops = 0
        self._step_adapter_flops = 0
        resident = list(resident)
        self._resident_bytes = tensor_nbytes(resident) + extra_bytes
        self._exclude = {t.untyped_storage().data_ptr() for t in resident}
        self._saved = {}

    def end_step(self) -> int:
        """Finish a step and return its peak bytes (resident + saved activations)."""
        if self.count_flops:
            if self._counting:
                if self._key is not None:
                    self._flops_by_key[self._key] = self._step_flops
                    self._adapter_flops_by_key[self._key] = self._step_adapter_flops
                self.flops += self._step_flops
                self.adapter_flops += self._step_adapter_flops
            else:
                self.flops += self._flops_by_key[self._key]
                self.adapter_flops += self._adapter_flops_by_key[self._key]
        peak = self._resident_bytes + sum(self._saved.values())
        self.step_peak_bytes = max(self.step_peak_bytes, peak)
        self._saved = {}
        return peak

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer not in self._exclude:
            self._saved[pointer] = storage.nbytes()
        return tensor

    @contextmanager
    def compute(self, adapters: bool = False) -> Iterator[None]:
        """Charge the work inside this block to the device."""
        counter = flop_counter() if self._counting else nullcontext()
        with counter, torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield
        if isinstance(counter, FlopCounterMode):
            self._step_flops += counter.get_total_flops()
            if adapters:
                self._step_adapter_flops += counter.get_total_flops()

    def take_round(self) -> tuple[int, int, int]:
        """(flops, adapter flops, peak bytes) since the last call; resets all three."""
        result = (self.flops, self.adapter_flops, self.step_peak_bytes)
        self.reset_round()
        return result

    def reset_round(self) -> None:
        """Forget the round's counts (a dropped device's partial round counts for nothing)."""
        self.flops = 0
        self.adapter_flops = 0  # the part spent in "adapter" blocks (dlora's branches)
        self.step_peak_bytes = 0
