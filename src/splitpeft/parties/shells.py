"""Parties as state, shells as compute: what lets one process hold a fleet of thousands.

A `Shell` is the compute a party trains with: a structural copy of (part of) the base model with
LoRA branches injected (peft) and an AdamW optimiser over them. Building one costs tens of
milliseconds and its Python modules tens of kilobytes, and it is the same for every party with the
same part and ranks. So parties borrow shells from a `ShellPool` while they train and give them
back (`Party.park`) between rounds, keeping only what they carry from one round to the next:
their adapters (a snapshot), AdamW moments, which adapters are frozen, and the adapters a warm
start trained against. A parked party costs those tensors and a few small Python objects.

The parked tensors of all parties of a pool are kept in memory up to `memory_bytes`; beyond it
they are written to a folder the pool creates (`SpillStore`, safetensors: no pickle) and read back
when the party next binds a shell. The pool deletes only the files and the folder it created.
"""

from __future__ import annotations

import itertools
import math
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from splitpeft.model.adapters import inject, lora_ab, lora_layers, lora_parameters
from splitpeft.model.backbone import backbone_of, share_frozen_copy
from splitpeft.model.parts import Part, frozen_tensors, storage_bytes, view_part
from splitpeft.model.runtime import Runtime


@dataclass(frozen=True)
class ShellSpec:
    """Everything a shell is built from except the base model: equal specs, interchangeable shells."""

    ranks: tuple[tuple[str, int], ...]
    alpha: float
    dropout: float
    lr: float
    weight_decay: float
    part: Part | None
    runtime: Runtime
    on_server: bool
    rslora: bool

    @property
    def torch_device(self) -> torch.device:
        return self.runtime.server_device if self.on_server else self.runtime.device_device


class Shell:
    """A party's compute: `model` (frozen tensors shared with the base, its own LoRA branches),
    `parameters` (A and B of every adapted module, in module order) and `optimizer`."""

    def __init__(self, base: PreTrainedModel, spec: ShellSpec) -> None:
        device, dtype = spec.torch_device, spec.runtime.dtype
        frozen = share_frozen_copy(base) if spec.part is None else view_part(base, spec.part, device=device, dtype=dtype)
        # peft draws every new A from torch's global generator: a shell is built when a pool first
        # needs one, so building it must not move the draws of anything that runs after it.
        with torch.random.fork_rng(devices=[]):
            self.model = inject(frozen, dict(spec.ranks), spec.alpha, spec.dropout, device=device, rslora=spec.rslora)
        if spec.runtime.gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad, so the hook transformers
            # adds to make embedding outputs require grad (for reentrant checkpointing) comes off again.
            self.model.activation_checkpointing_enable({"use_reentrant": False})
            self.model.disable_input_require_grads()
        self.backbone = backbone_of(self.model)
        self.layers = layers = lora_layers(self.model)  # found once: named_modules is slow
        self.modules = sorted(layers)
        if self.modules != sorted(name for name, rank in spec.ranks if rank > 0):
            raise ValueError("the model's adapted modules are not those of the ranks it was given")
        self.parameters = lora_parameters(self.model)
        # per parameter: its name in the model, and "module/A" or "module/B"
        names = {id(p): name for name, p in self.model.named_parameters()}
        self.parameter_names = [names[id(p)] for p in self.parameters]
        self.parameter_keys = [f"{name}/{factor}" for name in layers for factor in "AB"]
        # The shared frozen weight of each adapted module (merges reach it in place); under a warm
        # start a party sets its own copy on the layer while it holds the shell, and puts this back.
        self.shared_weights = {name: cast(torch.Tensor, layer.get_base_layer().weight) for name, layer in layers.items()}
        # module -> the hook that builds its own weight at its first forward, and that function (defer_weight)
        self._deferred: dict[str, tuple[RemovableHandle, Callable[[torch.nn.Module, tuple[Any, ...]], None]]] = {}
        # module -> the hook that subtracts s B0 (A0 x) from its output, and the factors it holds (correct_weight)
        self._corrections: dict[str, tuple[RemovableHandle, tuple[torch.Tensor, ...]]] = {}
        # bf16 / fp16 parties use the fused AdamW (one vectorised kernel for all their adapters, 6x
        # the per-tensor loop on CPU); it rounds differently by an ulp, so fp32 runs keep the loop
        # and the golden runs stay bit-for-bit.
        self.optimizer = (
            torch.optim.AdamW(self.parameters, lr=spec.lr, weight_decay=spec.weight_decay, fused=dtype != torch.float32)
            if self.parameters else None
        )
        self.frozen = frozen_tensors(self.model)
        self.model.train()

    def defer_weight(self, name: str, build: Callable[[], torch.Tensor]) -> None:
        """Module `name` computes with `build()` as its frozen weight, built at its first forward on
        this shell rather than now (`Party._train_against`: a server session's own warm copy, which
        a shared server pass never reads). Until then the module holds the shared weight."""
        self.cancel_deferred(name)
        base_layer = self.layers[name].get_base_layer()
        base_layer.weight = self.shared_weights[name]

        def build_now(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            self.cancel_deferred(name)
            module.weight = torch.nn.Parameter(build(), requires_grad=False)

        self._deferred[name] = (base_layer.register_forward_pre_hook(build_now), build_now)

    def correct_weight(self, name: str, scale: float, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Module `name` computes with the frozen weight W - s B0 A0 without holding it:

            x (..., d_in) -> W x - s B0 (A0 x)      W the shared (d_out, d_in), A0 (r, d_in), B0 (d_out, r)

        (`federation.noise_free_frozen=low_rank`). A0 and B0 are kept in fp32 and, for a bf16 / fp16
        input, once more in its dtype, cast here rather than at every step (the products accumulate
        in fp32, as the LoRA branch's do, `adapters.BranchLinear`; the server's batched pass applies
        the same correction on its rows, `model/batched.py`). Costs r (d_in + d_out) values and
        2 r (d_in + d_out) FLOPs a token forward, the same again for the input's gradient, instead
        of a (d_out, d_in) copy per module."""
        self.cancel_deferred(name)
        base_layer = self.layers[name].get_base_layer()
        base_layer.weight = self.shared_weights[name]
        dtype = self.shared_weights[name].dtype
        left, right = (a0, b0) if dtype == torch.float32 else (a0.to(dtype), b0.to(dtype))

        def subtract(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            low = torch.nn.functional.linear(x, left) * scale  # (..., r)
            return output - torch.nn.functional.linear(low, right)  # (..., d_out)

        held = (a0, b0) if left is a0 else (a0, b0, left, right)
        self._corrections[name] = (base_layer.register_forward_hook(subtract), held)

    @property
    def corrected(self) -> frozenset[str]:
        """The modules computing under a low-rank correction (`correct_weight`)."""
        return frozenset(self._corrections)

    def correction_tensors(self) -> list[torch.Tensor]:
        """The factors every low-rank correction holds (`correct_weight`)."""
        return [tensor for _, held in self._corrections.values() for tensor in held]

    def cancel_deferred(self, name: str) -> None:
        """Forget module `name`'s own weight: one still to be built (`defer_weight`) or a
        low-rank correction (`correct_weight`), if any."""
        deferred = self._deferred.pop(name, None)
        if deferred is not None:
            deferred[0].remove()
        correction = self._corrections.pop(name, None)
        if correction is not None:
            correction[0].remove()

    def frozen_weight(self, name: str) -> torch.Tensor:
        """The frozen weight module `name` holds: the shared one or the party's own copy (built now
        if it was deferred); under a low-rank correction the shared one, corrected on its output."""
        base_layer = self.layers[name].get_base_layer()
        if name in self._deferred:
            self._deferred[name][1](base_layer, ())
        return cast(torch.Tensor, base_layer.weight)

    def restore_shared_weights(self) -> None:
        """Put every adapted module back on the shared frozen weight (a warm party's own copies go,
        built or still deferred, and its low-rank corrections)."""
        for name in [*self._deferred, *self._corrections]:
            self.cancel_deferred(name)
        for name, shared in self.shared_weights.items():
            base_layer = self.layers[name].get_base_layer()
            if base_layer.weight is not shared:
                base_layer.weight = shared

    def clear(self) -> None:
        """Nothing of the last party's training stays: no gradients, no optimiser state, every
        adapter trainable, every B zero (a party starts from what it loads, and before that the
        shell computes the frozen model itself, as a fresh adapter does)."""
        with torch.no_grad():
            for name in self.layers:
                lora_ab(self.layers[name])[1].zero_()
        for parameter in self.parameters:
            parameter.grad = None
            parameter.requires_grad_(True)
        if self.optimizer is not None:
            self.optimizer.state.clear()
        self.restore_shared_weights()


Layout = tuple[tuple[str, torch.dtype, tuple[int, ...], int], ...]  # (name, dtype, shape, offset) per tensor
_LAYOUTS: dict[Layout, Layout] = {}  # one object per distinct layout: thousands of parties share a few


def pack(tensors: Mapping[str, torch.Tensor]) -> tuple[Layout, dict[torch.dtype, torch.Tensor]]:
    """Many small tensors as one flat buffer per dtype, in CPU memory, and a layout to cut them
    out again. A tensor costs about a kilobyte of bookkeeping besides its bytes, so a parked party
    keeps one or two buffers instead of hundreds of tensors (and none of an accelerator's memory)."""
    entries = []
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    offsets: dict[torch.dtype, int] = {}
    for name, tensor in tensors.items():
        offset = offsets.get(tensor.dtype, 0)
        entries.append((name, tensor.dtype, tuple(tensor.shape), offset))
        groups.setdefault(tensor.dtype, []).append(tensor.detach().reshape(-1).cpu())
        offsets[tensor.dtype] = offset + tensor.numel()
    layout = tuple(entries)
    layout = _LAYOUTS.setdefault(layout, layout)
    return layout, {dtype: torch.cat(parts) if len(parts) > 1 else parts[0].clone() for dtype, parts in groups.items()}


def unpack(layout: Layout, buffers: Mapping[torch.dtype, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `pack`, as views of its buffers."""
    tensors = {}
    for name, dtype, shape, offset in layout:
        size = math.prod(shape)
        tensors[name] = buffers[dtype][offset:offset + size].view(shape)
    return tensors


class SpillStore:
    """Tensors kept in memory up to `memory_bytes` (None: no limit), the rest in safetensors files
    under a folder this store creates in `directory` (default: the system's temporary folder) and
    removes at `close`. `put` returns a ticket, `take` gives the tensors back once."""

    def __init__(self, memory_bytes: int | None = None, directory: str | Path | None = None) -> None:
        if memory_bytes is not None and memory_bytes < 0:
            raise ValueError(f"memory_bytes must be >= 0 or None, got {memory_bytes}")
        self.memory_bytes = memory_bytes
        self.directory = Path(directory) if directory is not None else None
        self._folder: Path | None = None
        self._finalizer: weakref.finalize | None = None
        self._in_memory: dict[int, dict[torch.dtype, torch.Tensor]] = {}
        self._layouts: dict[int, Layout] = {}
        self._on_disk: dict[int, Path] = {}
        self._sizes: dict[int, int] = {}
        self.resident = 0          # bytes of tensors held in memory
        self.spilled = 0           # bytes of tensors written to disk and not yet taken back
        self._tickets = itertools.count()
        self._lock = threading.Lock()

    def put(self, tensors: Mapping[str, torch.Tensor]) -> int:
        layout, buffers = pack(tensors)
        size = sum(t.numel() * t.element_size() for t in buffers.values())
        with self._lock:
            ticket = next(self._tickets)
            self._sizes[ticket] = size
            self._layouts[ticket] = layout
            if self.memory_bytes is None or self.resident + size <= self.memory_bytes:
                self._in_memory[ticket] = buffers
                self.resident += size
                return ticket
            path = self._folder_path() / f"{ticket}.safetensors"
            self.spilled += size
        save_file({str(dtype).removeprefix("torch."): buffer for dtype, buffer in buffers.items()}, str(path))
        with self._lock:
            self._on_disk[ticket] = path
        return ticket

    def take(self, ticket: int) -> dict[str, torch.Tensor]:
        with self._lock:
            size = self._sizes.pop(ticket)
            layout = self._layouts.pop(ticket)
            if ticket in self._in_memory:
                self.resident -= size
                return unpack(layout, self._in_memory.pop(ticket))
            path = self._on_disk.pop(ticket)
            self.spilled -= size
        buffers = _read(path)
        path.unlink()
        return unpack(layout, buffers)

    def peek(self, ticket: int) -> dict[str, torch.Tensor]:
        """The tensors of `ticket`, left where they are (read from disk if spilled)."""
        with self._lock:
            layout = self._layouts[ticket]
            if ticket in self._in_memory:
                return unpack(layout, self._in_memory[ticket])
            path = self._on_disk[ticket]
        return unpack(layout, _read(path))

    def all_finite(self, ticket: int) -> bool:
        """Whether every tensor of `ticket` is finite: one pass over its flat buffers, no unpacking."""
        with self._lock:
            buffers = self._in_memory.get(ticket)
            path = self._on_disk.get(ticket) if buffers is None else None
        if buffers is None:
            assert path is not None
            buffers = _read(path)
        return all(bool(torch.isfinite(b).all()) for b in buffers.values() if b.is_floating_point())

    def drop(self, ticket: int) -> None:
        with self._lock:
            size = self._sizes.pop(ticket, 0)
            self._layouts.pop(ticket, None)
            if ticket in self._in_memory:
                del self._in_memory[ticket]
                self.resident -= size
                return
            path = self._on_disk.pop(ticket, None)
            self.spilled -= size if path is not None else 0
        if path is not None:
            path.unlink(missing_ok=True)

    def _folder_path(self) -> Path:
        if self._folder is None:
            if self.directory is not None:
                self.directory.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix="splitpeft-spill-", dir=self.directory))
            # removed when the store goes, or when the process exits, whichever is first
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        return self._folder

    def close(self) -> None:
        """Remove the folder this store created, with the files in it (nothing else): what was
        spilled is gone."""
        with self._lock:
            folder, self._folder = self._folder, None
            for ticket in self._on_disk:
                self._sizes.pop(ticket, None)
                self._layouts.pop(ticket, None)
            self._on_disk.clear()
            self.spilled = 0
        if folder is not None and self._finalizer is not None:
            self._finalizer()


def _read(path: Path) -> dict[torch.dtype, torch.Tensor]:
    return {getattr(torch, name): buffer for name, buffer in load_file(str(path)).items()}


class ShellPool:
    """Shells of one base model, lent to parties by spec and given back when they park.

    `acquire(spec)` takes a free shell of that spec or builds one; `release` returns it. At most
    `max_free` shells wait free, or as many as were ever lent at once if more (a round whose devices
    run in lockstep binds them all together, and builds none again the next round); the least
    recently returned go first, so a fleet whose every device has its own plan does not keep a
    shell per device. `store` holds the parked parties'
    tensors (`SpillStore`). Thread-safe: server sessions park and bind from the server's workers.
    """

    def __init__(self, base: PreTrainedModel, *, memory_bytes: int | None = None, spill_dir: str | Path | None = None,
                 max_free: int = 64) -> None:
        self.base = base
        self.store = SpillStore(memory_bytes, spill_dir)
        self.max_free = max_free
        self._free: dict[Hashable, list[Shell]] = {}
        self._free_order: OrderedDict[int, tuple[Hashable, Shell]] = OrderedDict()  # id(shell) -> it, oldest first
        self._lock = threading.Lock()
        self._resident: dict[ShellSpec, int] = {}
        self.built = 0      # shells built so far
        self.lent = 0       # shells lent out now
        self.most_lent = 0  # the most lent out at once so far

    def acquire(self, spec: ShellSpec) -> Shell:
        with self._lock:
            free = self._free.get(spec)
            self.lent += 1
            self.most_lent = max(self.most_lent, self.lent)
            if free:
                shell = free.pop()
                del self._free_order[id(shell)]
                return shell
            self.built += 1
        return Shell(self.base, spec)

    def release(self, spec: ShellSpec, shell: Shell) -> None:
        shell.clear()
        with self._lock:
            self.lent -= 1
            self._free.setdefault(spec, []).append(shell)
            self._free_order[id(shell)] = (spec, shell)
            while len(self._free_order) > max(self.max_free, self.most_lent):
                _, (old_spec, old) = self._free_order.popitem(last=False)
                self._free[old_spec].remove(old)

    def resident_bytes(self, spec: ShellSpec) -> int:
        """Bytes of the frozen tensors a shell of `spec` holds (found once per spec)."""
        if spec not in self._resident:
            shell = self.acquire(spec)
            try:
                self._resident[spec] = storage_bytes(shell.frozen)[0]
            finally:
                self.release(spec, shell)
        return self._resident[spec]

    def free_shells(self) -> int:
        return len(self._free_order)

    def describe(self) -> dict[str, Any]:
        """For the report: shells built, lent now, free; parked bytes in memory and spilled."""
        return {"shells_built": self.built, "shells_lent": self.lent, "shells_free": self.free_shells(),
                "parked_bytes_in_memory": self.store.resident, "parked_bytes_spilled": self.store.spilled}

    def close(self) -> None:
        self.store.close()
