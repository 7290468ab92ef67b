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
peak is used instead: the device's resident tensors plus the most `torch.cuda.max_memory_allocated`
rose above what was allocated when the step began, during the device's own compute segments,
less what the allocation grew by between those segments. In an in-process simulation on one GPU
the server's half of the step runs there in between (and holds a U-shaped step's activations
while the device computes its head): that is the server's, not the device's. Before this rule a
U-shaped device on an H200 read 7,859 MiB in-process against a predicted 2,636 MiB (BENCHMARKS.md,
"On a GPU"). A device wave's shared pass also runs between them; the device's own
share of what it saved is charged (`charge_saved`), as on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from splitpeft.model.parts import storage_bytes

# Attention formulas. torch's registry has no formula for the CPU flash-attention kernel that
# sdpa uses there, so attention would count as zero FLOPs; it is the same computation as the CUDA
# kernels'. And grouped-query attention (fewer key/value heads than query heads, as in SmolLM2 and
# Llama 3) reaches the CUDA kernels with unexpanded key/value heads, which torch before 2.13
# refuses to count (an AssertionError that would end the step): each formula here sees key and
# value widened to the query's heads, which is the work the kernel does (every query head attends
# through its group's key/value head).
_aten = torch.ops.aten
# operator -> (the argument index of the query, the axis of heads: sdpa's (B, H, T, D) or the
# raw kernels' (B, T, H, D))
_ATTENTION_OPS = {
    _aten._scaled_dot_product_efficient_attention: (0, 1),
    _aten._scaled_dot_product_flash_attention: (0, 1),
    _aten._scaled_dot_product_cudnn_attention: (0, 1),
    _aten._scaled_dot_product_efficient_attention_backward: (1, 1),
    _aten._scaled_dot_product_flash_attention_backward: (1, 1),
    _aten._scaled_dot_product_cudnn_attention_backward: (1, 1),
    _aten._flash_attention_forward: (0, 2),
    _aten._efficient_attention_forward: (0, 2),
    _aten._flash_attention_backward: (1, 2),
    _aten._efficient_attention_backward: (1, 2),
}
_CPU_KERNELS = {  # the CPU kernel -> the CUDA kernel whose formula it shares
    _aten._scaled_dot_product_flash_attention_for_cpu: _aten._scaled_dot_product_flash_attention,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _aten._scaled_dot_product_flash_attention_backward,
}


def _query_heads_for_all(formula: Callable[..., int], query_at: int, head_axis: int) -> Callable[..., int]:
    """`formula` (raw arguments) with key and value widened to the query's heads when they have fewer."""

    def count(*args: Any, **kwargs: Any) -> int:
        query, key, value = args[query_at:query_at + 3]
        if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (query, key, value)) \
                and key.shape[head_axis] != query.shape[head_axis]:
            def widened(t: torch.Tensor) -> torch.Tensor:
                shape = list(t.shape)
                shape[head_axis] = query.shape[head_axis]
                return torch.empty(shape, device="meta", dtype=t.dtype)

            args = (*args[:query_at], query, widened(key), widened(value), *args[query_at + 3:])
        return formula(*args, **kwargs)

    count._get_raw = True  # type: ignore[attr-defined]  # takes raw arguments, as the registry's own do
    return count


ATTENTION_FLOPS = {op: _query_heads_for_all(flop_registry[op], *where) for op, where in _ATTENTION_OPS.items()
                   if op in flop_registry}
ATTENTION_FLOPS.update({cpu: _query_heads_for_all(flop_registry[cuda], *_ATTENTION_OPS[cuda])
                        for cpu, cuda in _CPU_KERNELS.items()})


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention and grouped-query attention on CUDA."""
    return FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)


def tensor_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages among `tensors`."""
    return storage_bytes(tensors)[0]


def cuda_allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device)


def cuda_peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device)


def cuda_reset_peak(device: torch.device) -> None:
    torch.cuda.reset_peak_memory_stats(device)


class DeviceMeter:
    """Accumulates a device's FLOPs and tracks the peak of its step memory."""

    def __init__(self, count_flops: bool = True, device: torch.device | None = None) -> None:
        self.count_flops = count_flops
        self.cuda = device if device is not None and device.type == "cuda" else None
        self._cuda_base = 0
        self._cuda_peak = 0
        self._cuda_outside = 0  # how much the allocation grew between this step's own segments
        self._cuda_last_end = 0
        self._depth = 0  # segments inside segments are part of the outermost one
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
        self._charged_bytes = 0  # this step's share of activations a device wave saved for it

    def begin_step(self, resident: Iterable[torch.Tensor], key: Hashable = None, extra_bytes: int = 0) -> None:
        """Start a step; `resident` are tensors held across steps (not counted as activations).

        `key` identifies the step's shapes (None: always count); `extra_bytes` are held during the
        step but not allocated yet (the adapters' gradients)."""
        self._key = key
        self._counting = self.count_flops and (key is None or key not in self._flops_by_key)
        self._step_flops = 0
        self._step_adapter_flops = 0
        resident = list(resident)
        self._resident_bytes = tensor_nbytes(resident)
        self._extra_bytes = extra_bytes
        if self.cuda is not None:
            self._cuda_base = self._cuda_last_end = cuda_allocated(self.cuda)
            self._cuda_peak = self._cuda_outside = 0
        self._exclude = {t.untyped_storage().data_ptr() for t in resident}
        self._saved = {}
        self._charged_bytes = 0

    @property
    def counting(self) -> bool:
        """Whether this step's FLOPs are being counted (its key's are not known yet): its compute
        must then run where this meter sees it, not in a device wave."""
        return self._counting

    def charge_saved(self, nbytes: int) -> None:
        """Activations saved for this device's backward by a pass it shared with others (a device
        wave, `federation/lockstep.py`): its share, counted into this step's peak."""
        self._charged_bytes += nbytes

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
        if self.cuda is not None:
            peak = self._resident_bytes + self._cuda_peak + self._charged_bytes
        else:
            peak = self._resident_bytes + self._extra_bytes + sum(self._saved.values()) + self._charged_bytes
        self.step_peak_bytes = max(self.step_peak_bytes, peak)
        self._saved = {}
        self._charged_bytes = 0
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
        allocator = self.cuda if self._depth == 0 else None
        if allocator is not None:
            self._cuda_outside += cuda_allocated(allocator) - self._cuda_last_end  # others' work since the last segment
            cuda_reset_peak(allocator)
        self._depth += 1
        try:
            with counter, torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield
        finally:
            self._depth -= 1
        if allocator is not None:
            own = cuda_peak(allocator) - self._cuda_base - self._cuda_outside
            self._cuda_peak = max(self._cuda_peak, own)
            self._cuda_last_end = cuda_allocated(allocator)
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
