"""Measuring what a real split device keeps, to check the memory model (hsplit/memory.py) against.

- `measured_peak`: the device meter's CPU account over two local steps (what the meter reports).
- `kept_out_of_sight`: what the meter's saved-tensor hooks cannot see in one forward and backward:
  tensors autograd nodes hold as plain attributes (bitsandbytes int8 keeps its input as `ctx.A`)
  and, per checkpointed block, what backward recomputes (read through torch's own recompute hook,
  the one place it is visible on CPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint as checkpoint

from splitpeft.data.batching import BatchStream, EncodedExample
from splitpeft.federation.simulation import start_state_of
from splitpeft.hsplit.memory import ModelShapes
from splitpeft.model.backbone import backbone_of
from splitpeft.model.loading import load_model
from splitpeft.model.parts import Part, quantize_blocks, view_part
from splitpeft.model.runtime import CPU_FP32, DTYPES, Runtime
from splitpeft.parties.device import DeviceRuntime
from splitpeft.parties.party import Training
from splitpeft.parties.server import SplitServer
from splitpeft.placements.split import SplitPlacement
from splitpeft.transport.channel import InProcessChannel

CASES = [  # (split_layer, rank pattern, batch, seq_len, labels_on_device); every case adapts block 0
    (1, (8,), 2, 16, False),
    (2, (0, 4, 16), 4, 24, False),
    (3, (0, 0, 0, 2), 2, 32, False),
    (3, (16, 0, 8), 1, 48, False),
    (2, (4,), 2, 16, True),
]


def runtime_for(dtype: str = "fp32", quantization: str = "none", checkpointing: bool = False) -> Runtime:
    """A CPU runtime in `dtype` with devices and server on a `quantization` base."""
    quantized = quantization != "none"
    return dataclasses.replace(CPU_FP32, dtype=DTYPES[dtype], quantization=quantization, quantize_devices=quantized,
                               quantize_server=quantized, gradient_checkpointing=checkpointing)


_BASES: dict = {}


def base_in(name: str, dtype: str = "fp32", quantization: str = "none"):
    """(base, shapes): the tiny model in `dtype`, its block linears quantized as the simulation
    does it (on a copy), and the shapes `ModelShapes.from_model` reads from it.

    Built afresh but for fp32: after its first forward a bitsandbytes int8 linear moves its scales
    from the weight (`weight.SCB`) into its own state, where `frozen_tensors`, and so the meter of a
    device built later on that base, no longer finds them."""
    if name not in _BASES:
        base = load_model(name).model
        _BASES[name] = (base, ModelShapes.from_model(base))
    if dtype == "fp32" and quantization == "none":
        return _BASES[name]
    base = _BASES[name][0]
    num_blocks = backbone_of(base).num_blocks
    converted = view_part(base, Part.whole(num_blocks), dtype=DTYPES[dtype])
    quantize_blocks(converted, range(num_blocks), quantization, DTYPES[dtype])
    return converted, ModelShapes.from_model(converted)


def spread_ranks(shapes: ModelShapes, split_layer: int, pattern: tuple[int, ...]) -> dict[str, int]:
    """Ranks cycling through `pattern` over the device's modules; rank-0 modules left out."""
    modules = shapes.modules_before(split_layer)
    ranks = {m: pattern[i % len(pattern)] for i, m in enumerate(modules)}
    return {m: r for m, r in ranks.items() if r > 0}


def _device(base, split_layer: int, ranks: dict[str, int], batch_size: int, seq_len: int, labels_on_device: bool,
            runtime: Runtime) -> tuple[DeviceRuntime, InProcessChannel]:
    # fixed-length items: every batch is exactly (batch_size, seq_len)
    items = [
        EncodedExample(list(range(5 + i, 5 + i + seq_len)),
                       [-100] * (seq_len // 2) + list(range(5 + i + seq_len // 2, 5 + i + seq_len)))
        for i in range(2 * batch_size)
    ]
    stream = BatchStream(items, batch_size, pad_id=1, seed=0)
    num_blocks = backbone_of(base).num_blocks
    server = SplitServer(base, lambda blocks: {}, start_state_of({}), Training(lr=1e-3, runtime=runtime),
                         num_blocks=num_blocks)
    device = DeviceRuntime("probe", base, SplitPlacement(labels_on_device=labels_on_device), split_layer, ranks, stream,
                           Training(lr=1e-3, runtime=runtime), count_flops=False)
    channel = InProcessChannel(device.device_id, server)
    device.open_session(channel)
    return device, channel


def probe_labelled(batch_size: int, seq_len: int) -> int:
    """The positions the probe's loss counts per step: its items label the second half of each
    sequence, so T - T // 2 positions per row predict a label (`loss.labelled_positions`)."""
    return batch_size * (seq_len - seq_len // 2)


def measured_peak(base, split_layer: int, ranks: dict[str, int], batch_size: int, seq_len: int,
                  labels_on_device: bool = False, runtime: Runtime = CPU_FP32) -> int:
    """The device meter's peak over 2 local steps of a real split device with exactly `ranks`
    (the peak is reached on step 2, once AdamW's moments exist)."""
    device, channel = _device(base, split_layer, ranks, batch_size, seq_len, labels_on_device, runtime)
    device.local_phase(2, channel)
    return device.meter.take_round()[2]


@dataclass
class OutOfSight:
    """What one forward + backward of the device blocks keeps beyond the meter's view."""

    saved: int = 0  # distinct storages the saved-tensor hooks see (the meter's activations)
    node_attributes: int = 0  # storages autograd nodes hold as attributes, not saved through the hooks
    recomputed: list[int] = field(default_factory=list)  # per checkpointed block, in block order


def kept_out_of_sight(base, split_layer: int, ranks: dict[str, int], batch_size: int, seq_len: int,
                      runtime: Runtime) -> OutOfSight:
    """Run blocks [0, k) of a real device forward and backward and account, by storage, for what
    the saved-tensor hooks see, what autograd nodes keep as attributes, and what each checkpointed
    block recomputes. Storages the device holds, and those saved in forward or made by the rotary
    embedding, stay referenced here so that no later tensor can reuse their address."""
    device, _ = _device(base, split_layer, ranks, batch_size, seq_len, False, runtime)
    resident = {t.untyped_storage().data_ptr() for t in device.resident_tensors()}
    seen: dict[int, int] = {}
    alive: list[torch.Tensor] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            seen[storage.data_ptr()] = storage.nbytes()
            alive.append(tensor)
        return tensor

    rotary = getattr(getattr(device.model, "model", None), "rotary_emb", None)
    if rotary is not None:  # cos and sin: shared by every block, counted once apart from any block
        rotary.register_forward_hook(lambda module, args, output: alive.extend(output) and None)
    ids = torch.arange(5, 5 + seq_len).repeat(batch_size, 1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        cut = device.backbone.blocks(device.backbone.embed(ids), 0, split_layer)  # (B, T, d)
    known = resident | set(seen) | {t.untyped_storage().data_ptr() for t in alive}
    result = OutOfSight(saved=sum(seen.values()))

    attributes: dict[int, int] = {}
    for node in _graph(cut.grad_fn):
        for value in vars(node).values() if hasattr(node, "__dict__") else ():
            for tensor in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in known:
                    attributes[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    result.node_attributes = sum(attributes.values())

    frames: dict[int, dict[int, int]] = {}
    original_init = checkpoint._recomputation_hook.__init__

    def init(hook, frame_ref, gid):  # torch's recompute hook, with its pack wrapped to record
        original_init(hook, frame_ref, gid)
        inner = hook.pack_hook

        def recording_pack(tensor: torch.Tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in known:
                frames.setdefault(id(frame_ref()), {})[storage.data_ptr()] = storage.nbytes()
            return inner(tensor)

        hook.pack_hook = recording_pack

    checkpoint._recomputation_hook.__init__ = init
    try:
        if cut.requires_grad:
            cut.backward(torch.ones_like(cut))
    finally:
        checkpoint._recomputation_hook.__init__ = original_init
    result.recomputed = [sum(frame.values()) for frame in reversed(list(frames.values()))]  # backward runs last block first
    return result


def _graph(root):
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        yield node
        stack.extend(next_node for next_node, _ in node.next_functions)
