"""Typed messages, their wire encoding, and their in-process hand-over (same sizes, same checks).

Frame layout::

    b"SPFT" | version (1 byte) | kind (1 byte) | CRC-32 of kind prefix + blob (4 bytes) | safetensors blob

The safetensors blob carries the tensors as raw little-endian bytes after an 8-byte header length
and a JSON header; the message's scalar fields (`meta`) travel as one JSON string in the header's
`__metadata__`. Nothing is ever unpickled. `decode` validates everything before a tensor is handed
to training code: size limit, magic, version, kind, checksum (so any truncated or corrupted frame
is refused, even where the damage would still parse), header, offsets (safetensors checks them),
NaN/Inf in floating tensors. Expected shapes and dtypes are checked by the receiver with
`Message.tensor(name, shape=..., dtype=...)`, since only it knows what its session expects.

In one process a message need not become bytes at all: `frame_size` computes `len(encode(m))`
from names, dtypes and shapes alone (the safetensors header is rebuilt exactly as safetensors
writes it), and `hand_over` runs the checks of `decode` that apply to tensors in memory (size
limit, NaN/Inf) and gives the receiver detached views instead of decoded copies.
"""

from __future__ import annotations

import enum
import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

MAGIC = b"SPFT"


VERSION = 3  # 3: compression metadata records each compressed tensor's original dtype


KIND_PREFIX_BYTES = len(MAGIC) + 2


PREFIX_BYTES = KIND_PREFIX_BYTES + 4  # + the checksum


DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024


MAX_HEADER_BYTES = 1024 * 1024


META_KEY = "splitpeft"


class MessageError(ValueError):
    """A message that cannot be accepted: malformed, oversized, unexpected or non-finite."""


class Kind(enum.IntEnum):
    """Every message type on the wire; the value is the kind byte."""

    ERROR = 0             # either way: {"error": text}
    OPEN_SESSION = 1      # device -> server: start a training session (device id, split, ranks)
    SESSION_READY = 2     # server -> device
    ACTIVATIONS = 3       # device -> server: hidden states at the cut (+ labels in plain split)
    CUT_GRADIENT = 4      # server -> device: dL/d(hidden at the cut) (+ the loss, plain split)
    FINAL_HIDDEN = 5      # server -> device (U-shaped split): output of the last block
    HEAD_GRADIENT = 6     # device -> server (U-shaped split): dL/d(final hidden)
    CLOSE_SESSION = 7     # device -> server: end of the local phase
    SESSION_CLOSED = 8    # server -> device: {"tokens": n}
    ADAPTERS = 9          # either way: LoRA A/B tensors of a set of modules (federation)
    BRANCH_INPUTS = 10    # server -> device (dlora): input x of a group of adapted linears
    BRANCH_OUTPUTS = 11   # device -> server (dlora): s * B A x for each module of the group
    BRANCH_GRADS = 12     # server -> device (dlora): dL/d(branch output) for each module
    BRANCH_INPUT_GRAD = 13  # device -> server (dlora): dL/dx through the group's branches
    STEP_DONE = 14        # server -> device (dlora): the server's backward is complete
    KILL = 15             # device -> server (dlora): frozen adapters the server computes from now on
    REVIVE = 16           # server -> device (dlora): adapters handed back to the device
    BASE_DELTA = 17       # server -> device (federation): weight deltas merged into its frozen modules



class Meta:
    """The keys of `Message.meta` (JSON beside the tensors), in one place."""

    ERROR = "error"                        # ERROR: what was wrong
    PLACEMENT = "placement"                # OPEN_SESSION: the device's placement name
    SPLIT_LAYER = "split_layer"            # OPEN_SESSION, SESSION_READY: k
    LABELS_ON_DEVICE = "labels_on_device"  # OPEN_SESSION: U-shaped split
    RANKS = "ranks"                        # OPEN_SESSION (dlora): {module: rank} the device runs
    ROUND_TAG = "round_tag"                # OPEN_SESSION as the server sees it: the stream's round tag (gRPC header)
    TOKENS = "tokens"                      # SESSION_CLOSED, HEAD_GRADIENT (dlora): completion tokens
    CALL = "call"                          # dlora branch messages: which remote group call
    MODULES = "modules"                    # dlora BRANCH_* and REVIVE: module names
    INPUT_GRAD = "input_grad"              # BRANCH_GRADS: whether dL/dx is wanted back
    KILLED_GRAD_NORMS = "killed_grad_norms"  # ACTIVATIONS (ask) / STEP_DONE (answer), dlora
    KILLED = "killed"                      # SESSION_READY after KILL: the killed set
    KEEP_KILLED = "keep_killed"            # REVIVE (ask): send the adapters' weights, keep them killed on the server
    ROUND = "round"                        # ADAPTERS down: the round index
    DEVICE = "device"                      # ADAPTERS up: the uploading device
    UNCHANGED = "unchanged"                # ADAPTERS up: modules still at the value the server gave (not sent)


@dataclass
class Message:
    kind: Kind
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def tensor(
        self,
        name: str,
        *,
        shape: Sequence[int | None] | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """The tensor `name`, checked against the expected shape (None = any size) and dtype, and
        moved to `device` if given (no copy where it already is: a receiver on cuda gets cuda
        tensors whichever side of the channel they came from). Always a new tensor object (its
        data shared where no move was needed): a receiver that marks it as requiring grad, or
        accumulates a .grad on it, never changes the tensor its sender still holds."""
        if name not in self.tensors:
            raise MessageError(f"{self.kind.name} message lacks tensor {name!r}")
        value = self.tensors[name]
        if dtype is not None and value.dtype != dtype:
            raise MessageError(f"{self.kind.name}.{name}: dtype {value.dtype}, expected {dtype}")
        if shape is not None:
            if value.dim() != len(shape) or any(
                want is not None and have != want for have, want in zip(value.shape, shape)
            ):
                raise MessageError(
                    f"{self.kind.name}.{name}: shape {tuple(value.shape)}, expected "
                    f"({', '.join('*' if s is None else str(s) for s in shape)})"
                )
        return value.detach() if device is None else value.to(device).detach()

    def expect(self, *kinds: Kind) -> Message:
        """Raise MessageError (carrying a peer's error text) unless this is one of `kinds`."""
        if self.kind == Kind.ERROR:
            raise MessageError(f"peer reported an error: {self.meta.get('error', '?')}")
        if self.kind not in kinds:
            names = ", ".join(k.name for k in kinds)
            raise MessageError(f"got a {self.kind.name} message, expected {names}")
        return self


def error_message(text: str) -> Message:
    return Message(Kind.ERROR, meta={Meta.ERROR: text})


def encode(message: Message) -> bytes:
    """Serialise `message` to its wire bytes."""
    tensors = {name: value.detach().contiguous().cpu() for name, value in message.tensors.items()}
    blob = save_safetensors(tensors, metadata={META_KEY: json.dumps(message.meta, allow_nan=False)})
    prefix = MAGIC + bytes([VERSION, int(message.kind)])
    return prefix + checksum(prefix, blob) + blob


def checksum(prefix: bytes, blob: bytes) -> bytes:
    """The frame's CRC-32 over its kind prefix and its blob (little-endian)."""
    return zlib.crc32(blob, zlib.crc32(prefix)).to_bytes(4, "little")


def header_bytes(frame: bytes) -> int:
    """Bytes of `frame` that are not tensor data: prefix + 8-byte length + JSON header."""
    return PREFIX_BYTES + 8 + int.from_bytes(frame[PREFIX_BYTES:PREFIX_BYTES + 8], "little")


def decode(frame: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, allow_nonfinite: bool = False) -> Message:
    """Parse and validate wire bytes; any defect raises MessageError naming it."""
    check_size(len(frame), max_bytes)
    if len(frame) < PREFIX_BYTES + 8:
        raise MessageError(f"truncated message: {len(frame)} bytes is shorter than any frame")
    if frame[:4] != MAGIC:
        raise MessageError("not a splitpeft message (bad magic bytes)")
    if frame[4] != VERSION:
        raise MessageError(f"unsupported message version {frame[4]} (this side speaks {VERSION})")
    try:
        kind = Kind(frame[5])
    except ValueError:
        raise MessageError(f"unknown message kind {frame[5]}") from None
    blob = bytes(frame[PREFIX_BYTES:])
    if bytes(frame[KIND_PREFIX_BYTES:PREFIX_BYTES]) != checksum(bytes(frame[:KIND_PREFIX_BYTES]), blob):
        raise MessageError(f"garbled {kind.name} message: checksum mismatch (truncated or corrupted)")
    header_length = int.from_bytes(blob[:8], "little")
    if header_length > MAX_HEADER_BYTES or 8 + header_length > len(blob):
        raise MessageError(f"truncated or garbled message: header of {header_length} bytes does not fit")
    try:
        header = json.loads(blob[8:8 + header_length])
        meta_text = header.get("__metadata__", {}).get(META_KEY, "{}")
        meta = json.loads(meta_text, parse_constant=_reject_constant)
        tensors = load_safetensors(blob)
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, SafetensorError) as error:
        raise MessageError(f"garbled {kind.name} message: {error}") from None
    except Exception as error:  # safetensors raises bare exceptions for some malformed inputs
        raise MessageError(f"garbled {kind.name} message: {error}") from None
    if not isinstance(meta, dict):
        raise MessageError(f"garbled {kind.name} message: metadata is not an object")
    if not allow_nonfinite:
        check_finite(kind, tensors)
    return Message(kind, tensors, meta)


def check_size(size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise MessageError(f"message of {size} bytes exceeds the limit of {max_bytes} bytes")


def check_finite(kind: Kind, tensors: Mapping[str, torch.Tensor]) -> None:
    """MessageError naming the first floating tensor that holds a NaN or an Inf."""
    for name, value in tensors.items():
        if value.is_floating_point() and not all_finite(value):
            raise MessageError(f"{kind.name}.{name} contains NaN or Inf")


_MIN_MAX_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def all_finite(value: torch.Tensor) -> bool:
    """Whether a floating tensor holds no NaN and no Inf.

    min and max propagate NaN and are +-Inf where any value is, so checking those two takes one
    reduction and no (B, T, d) bool temporary: about 20x faster than `isfinite(value).all()` on
    CPU. Other floating dtypes (float8, which neither `aminmax` nor `isfinite` takes) are checked
    in float32.
    """
    if value.numel() == 0:
        return True
    if value.dtype in _MIN_MAX_DTYPES:
        return bool(torch.isfinite(torch.stack(torch.aminmax(value))).all())
    return bool(torch.isfinite(value.to(torch.float32)).all())


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} in metadata")


def loss_tensor(value: float) -> torch.Tensor:
    """A step's loss as the CUT_GRADIENT carries it: a () float32 tensor, so the frame's size does not
    depend on the value (a JSON number's digits would: losses that differ in the last bit, as a batched
    pass over other devices' rows gives, made frames 8 bytes apart). MessageError if not finite."""
    if not math.isfinite(value):
        raise MessageError(f"non-finite loss {value}")
    return torch.tensor(value, dtype=torch.float32)


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# ------------------------------------------------------------------ in memory: sizes without bytes

# safetensors' dtype names, in the order of its `Dtype` enum (increasing alignment). It writes the
# tensors sorted by that order descending, then by name; `frame_size` must do the same. Other
# dtypes (complex, float8, unsigned beyond uint8) are left to `encode`.
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}


_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(SAFETENSORS_DTYPES)}


def safetensors_header(message: Message) -> bytes | None:
    """The JSON header `encode` writes for `message` (padded with spaces to a multiple of 8),
    built from names, dtypes and shapes without touching tensor data; None for a corner not
    reproduced here: a dtype outside `SAFETENSORS_DTYPES`, a value that is not a dense tensor, a
    name that is not a UTF-8 string or is safetensors' own "__metadata__".

    Raises what `encode` raises for metadata JSON cannot carry (ValueError for NaN/Inf,
    TypeError for other objects). Mirrors safetensors 0.8 `tensor.rs: prepare` and its serde
    JSON, which escapes exactly what `json.dumps(..., ensure_ascii=False)` escapes.
    """
    meta_text = json.dumps(message.meta, allow_nan=False)
    for name, value in message.tensors.items():
        if (not isinstance(name, str) or name == "__metadata__" or not isinstance(value, torch.Tensor)
                or value.layout != torch.strided or value.dtype not in _DTYPE_RANK):
            return None
    order = sorted(message.tensors, key=lambda name: (-_DTYPE_RANK[message.tensors[name].dtype], name))
    header: dict[str, Any] = {"__metadata__": {META_KEY: meta_text}}
    offset = 0
    for name in order:
        value = message.tensors[name]
        size = value.numel() * value.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    try:
        text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate in a name: safetensors refuses it too
        return None
    return text + b" " * (-len(text) % 8)


def frame_size(message: Message) -> int | None:
    """`len(encode(message))` without encoding: prefix + 8-byte length + header + tensor data;
    None where `safetensors_header` is (then only `encode` knows)."""
    header = safetensors_header(message)
    if header is None:
        return None
    return PREFIX_BYTES + 8 + len(header) + tensor_bytes(message.tensors)


def encoded_size(message: Message) -> int:
    """`len(encode(message))`: computed from shapes and dtypes (no tensor data copied), or by
    encoding in the corners `frame_size` leaves out."""
    size = frame_size(message)
    return len(encode(message)) if size is None else size


def hand_over(message: Message, size: int, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """What `decode(encode(message), max_bytes=...)` gives, without the bytes; `size` is
    `frame_size(message)`.

    Runs the checks of `decode` that apply to tensors in memory, with the same errors: the size
    limit, NaN/Inf in floating tensors, metadata that is a JSON object (and travels as JSON, so
    the receiver gets a fresh dict with lists for tuples, as from the wire). The frame checks
    (magic, version, checksum, offsets) have no bytes to check. Tensors are handed over as
    detached contiguous views on their own device: no data is copied (unless a tensor was not
    contiguous), they share storage with the sender's tensors but not its autograd graph, and an
    in-place change by either side bumps the shared version counter, so autograd still refuses a
    backward through a tensor changed after use instead of computing a wrong gradient. Unlike
    `encode`, tensors that share one storage are not refused (safetensors will not write them).
    """
    check_size(size, max_bytes)
    meta = json.loads(json.dumps(message.meta, allow_nan=False))
    if not isinstance(meta, dict):
        raise MessageError(f"garbled {message.kind.name} message: metadata is not an object")
    tensors = {name: value.detach().contiguous() for name, value in message.tensors.items()}
    check_finite(message.kind, tensors)
    return Message(message.kind, tensors, meta)
