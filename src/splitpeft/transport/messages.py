"""Typed messages and their wire encoding (the same bytes in-process and over the network).

Frame layout::

    b"SPFT" | version (1 byte) | kind (1 byte) | CRC-32 of kind prefix + blob (4 bytes) | safetensors blob

The safetensors blob carries the tensors as raw little-endian bytes after an 8-byte header length
and a JSON header; the message's scalar fields (`meta`) travel as one JSON string in the header's
`__metadata__`. Nothing is ever unpickled. `decode` validates everything before a tensor is handed
to training code: size limit, magic, version, kind, checksum (so any truncated or corrupted frame
is refused, even where the damage would still parse), header, offsets (safetensors checks them),
NaN/Inf in floating tensors. Expected shapes and dtypes are checked by the receiver with
`Message.tensor(name, shape=..., dtype=...)`, since only it knows what its session expects.
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


VERSION = 2


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
    CUT_GRADIENT = 4      # server -> device: dL/d(hidden at the cut) (+ loss)
    FINAL_HIDDEN = 5      # server -> device (U-shaped split): output of the last block
    HEAD_GRADIENT = 6     # device -> server (U-shaped split): dL/d(final hidden) (+ loss)
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
    LOSS = "loss"                          # CUT_GRADIENT / HEAD_GRADIENT: the step's loss
    TOKENS = "tokens"                      # SESSION_CLOSED, HEAD_GRADIENT (dlora): completion tokens
    CALL = "call"                          # dlora branch messages: which remote group call
    MODULES = "modules"                    # dlora BRANCH_* and REVIVE: module names
    INPUT_GRAD = "input_grad"              # BRANCH_GRADS: whether dL/dx is wanted back
    KILLED_GRAD_NORMS = "killed_grad_norms"  # ACTIVATIONS (ask) / STEP_DONE (answer), dlora
    KILLED = "killed"                      # SESSION_READY after KILL: the killed set
    ROUND = "round"                        # ADAPTERS down: the round index
    DEVICE = "device"                      # ADAPTERS up: the uploading device


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
    ) -> torch.Tensor:
        """The tensor `name`, checked against the expected shape (None = any size) and dtype."""
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
        return value

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
    if len(frame) > max_bytes:
        raise MessageError(f"message of {len(frame)} bytes exceeds the limit of {max_bytes} bytes")
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
        for name, value in tensors.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise MessageError(f"{kind.name}.{name} contains NaN or Inf")
    return Message(kind, tensors, meta)


def _reject_constant(name: str) -> float:
    raise ValueError(f"non-finite number {name} in metadata")


def finite(value: float) -> float:
    """Guard for scalars we put into metadata (JSON has no NaN)."""
    if not math.isfinite(value):
        raise MessageError(f"non-finite scalar {value}")
    return value


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
