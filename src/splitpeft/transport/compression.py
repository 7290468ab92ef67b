"""Optional compression of the split traffic: the activations and gradients at the cut.

Modes (per message, recorded in the message itself so the receiver needs no configuration)::

    none   as is                                              4 bytes per value (fp32), 2 (bf16, fp16)
    bf16   x -> bfloat16 (float32's exponent range,          2 bytes, |error| <= 2^-9 |x|
           8-bit mantissa); only tensors wider than 2 bytes
    int8   symmetric per-channel over the last dimension d:   1 byte + 4 bytes per channel
           scale_c = max |x[..., c]| / 127                    (d,) float32
           q = clamp(round(x / scale_c), -127, 127)           int8, same shape as x
           x' = q * scale_c, in x's dtype                     |x - x'| <= scale_c / 2 (+ x's dtype rounding)

Only floating tensors (float64, float32, bfloat16, float16) of split-traffic kinds
(`COMPRESSIBLE_KINDS`) are compressed; integer tensors (plain split's labels) and adapter weights
(ADAPTERS, KILL, REVIVE: the federated state itself, which must arrive exact) travel unchanged.
bf16 leaves bfloat16 and float16 tensors as they are: it would save no byte (and cost float16 its
mantissa). A compressed message carries ``meta["compression"] = {tensor name: {"mode": mode,
"dtype": its dtype before compression}}`` (dtype as torch names it: "float32", "bfloat16", ...);
int8 adds a tensor ``"<name>.__scale"``. `decompress` restores each tensor to that dtype and
validates the metadata like any other field of a frame from the network: unknown modes or dtypes,
missing or stray scales, wrong dtypes or shapes and non-finite scales raise `MessageError`.

Written by hand (a few lines of torch): safetensors cannot carry torch's quantized tensor types,
and the wire format needs the plain int8 values and scales anyway.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Literal, cast, get_args

import torch

from splitpeft.transport.messages import Kind, Message, MessageError

CompressionMode = Literal["none", "bf16", "int8"]


MODES: tuple[str, ...] = get_args(CompressionMode)


META_KEY = "compression"


SCALE_SUFFIX = ".__scale"


INT8_MAX = 127


# The dtypes a tensor may be compressed from (and is restored to), by the name the metadata uses.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
}


_DTYPE_NAMES = {dtype: name for name, dtype in FLOAT_DTYPES.items()}


# Per-batch activations and their gradients; everything else (adapter weights, session control)
# is either exact state or too small to matter.
COMPRESSIBLE_KINDS = frozenset({
    Kind.ACTIVATIONS, Kind.CUT_GRADIENT, Kind.FINAL_HIDDEN, Kind.HEAD_GRADIENT,
    Kind.BRANCH_INPUTS, Kind.BRANCH_OUTPUTS, Kind.BRANCH_GRADS, Kind.BRANCH_INPUT_GRAD,
})


def check_mode(mode: str) -> CompressionMode:
    """`mode` if it is a known compression mode, else ValueError naming the choices."""
    if mode not in MODES:
        raise ValueError(f"unknown compression {mode!r}; choose from {', '.join(MODES)}")
    return cast(CompressionMode, mode)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8: x (..., d) of any float dtype -> q (..., d) int8, scale (d,) float32.

    The channel maxima are exact in x's dtype; the scales and x / scale are float32 (or wider).
    An all-zero channel gets scale 0 and q 0 (no division by zero).
    """
    d = x.shape[-1]
    scale = x.detach().abs().reshape(-1, d).amax(dim=0).to(torch.float32) / INT8_MAX  # (d,)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x.detach() / safe).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (..., d) int8, scale (d,) float32 -> q * scale (..., d), computed in float32, as `dtype`."""
    return (q.to(torch.float32) * scale).to(dtype)


def _compressible(name: str, value: torch.Tensor, mode: CompressionMode, exempt: Collection[str]) -> bool:
    if value.dtype not in _DTYPE_NAMES or value.dim() == 0 or value.numel() == 0 or name in exempt:
        return False
    return mode == "int8" or value.element_size() > 2  # bf16 of a 2-byte float saves nothing


def compress(message: Message, mode: str, *, exempt: Collection[str] = ()) -> Message:
    """`message` with its floating tensors (except `exempt`) in `mode`; "none" returns it as is,
    and so does a message with nothing to compress."""
    mode = check_mode(mode)
    if mode == "none" or message.kind not in COMPRESSIBLE_KINDS:
        return message
    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, dict[str, str]] = {}
    for name, value in message.tensors.items():
        if not _compressible(name, value, mode, exempt):
            tensors[name] = value
            continue
        if name.endswith(SCALE_SUFFIX) or name + SCALE_SUFFIX in message.tensors:
            raise ValueError(f"tensor name {name!r} collides with the int8 scale suffix {SCALE_SUFFIX!r}")
        if mode == "bf16":
            tensors[name] = value.detach().to(torch.bfloat16)
        else:
            tensors[name], tensors[name + SCALE_SUFFIX] = quantize_int8(value)
        schemes[name] = {"mode": mode, "dtype": _DTYPE_NAMES[value.dtype]}
    if not schemes:
        return message
    if META_KEY in message.meta:
        raise ValueError(f"message metadata already has the reserved key {META_KEY!r}")
    return Message(message.kind, tensors, {**message.meta, META_KEY: schemes})


def decompress(message: Message) -> Message:
    """`message` with every compressed tensor restored to its dtype before compression;
    MessageError if the compression metadata or tensors are malformed."""
    kind = message.kind.name
    scales = {name for name in message.tensors if name.endswith(SCALE_SUFFIX)}
    if META_KEY not in message.meta:
        if scales:
            raise MessageError(f"{kind} carries scale tensors {sorted(scales)[:3]} but no compression metadata")
        return message
    schemes = message.meta[META_KEY]
    if not isinstance(schemes, dict) or not schemes:
        raise MessageError(f"{kind}: compression metadata must be a non-empty object of tensor -> scheme")
    tensors = dict(message.tensors)
    for name, scheme in schemes.items():
        mode, dtype = _scheme(kind, name, scheme)
        if name not in tensors or name in scales:
            raise MessageError(f"{kind}: compression metadata names tensor {name!r}, which the message lacks")
        value = tensors[name]
        if mode == "bf16":
            if value.dtype != torch.bfloat16:
                raise MessageError(f"{kind}.{name}: bf16-compressed tensor has dtype {value.dtype}")
            tensors[name] = _finite(kind, name, value.to(dtype))
            continue
        if value.dtype != torch.int8 or value.dim() == 0:
            raise MessageError(f"{kind}.{name}: int8-compressed tensor has dtype {value.dtype} and {value.dim()} dims")
        scale = tensors.pop(name + SCALE_SUFFIX, None)
        if scale is None:
            raise MessageError(f"{kind}.{name}: int8 compression without its scale tensor {name + SCALE_SUFFIX!r}")
        scales.discard(name + SCALE_SUFFIX)
        if scale.dtype != torch.float32 or tuple(scale.shape) != (value.shape[-1],):
            raise MessageError(f"{kind}.{name}: scale of dtype {scale.dtype} and shape {tuple(scale.shape)}, "
                               f"expected float32 ({value.shape[-1]},)")
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise MessageError(f"{kind}.{name}: scale is negative, NaN or Inf")
        tensors[name] = _finite(kind, name, dequantize_int8(value, scale, dtype))
    if scales:
        raise MessageError(f"{kind}: scale tensors {sorted(scales)[:3]} belong to no int8-compressed tensor")
    meta = {key: value for key, value in message.meta.items() if key != META_KEY}
    return Message(message.kind, tensors, meta)


def _finite(kind: str, name: str, restored: torch.Tensor) -> torch.Tensor:
    """`restored`, if every value is finite: finite wire values can restore to Inf (an int8 value
    times a large scale, a bf16 value beyond float16's range), which decoding could not see."""
    if not bool(torch.isfinite(restored).all()):
        raise MessageError(f"{kind}.{name}: restores to NaN or Inf (its values or scale overflow {restored.dtype})")
    return restored


def _scheme(kind: str, name: str, scheme: object) -> tuple[CompressionMode, torch.dtype]:
    """The (mode, original dtype) of one compression metadata entry; MessageError if malformed."""
    if not isinstance(scheme, dict) or set(scheme) != {"mode", "dtype"}:
        raise MessageError(f"{kind}.{name}: compression entry {scheme!r} is not an object of mode and dtype")
    mode, dtype_name = scheme["mode"], scheme["dtype"]
    if mode not in MODES or mode == "none":
        raise MessageError(f"{kind}.{name}: unknown compression mode {mode!r}")
    if not isinstance(dtype_name, str) or dtype_name not in FLOAT_DTYPES:
        raise MessageError(f"{kind}.{name}: unknown original dtype {dtype_name!r}; expected one of "
                           f"{', '.join(FLOAT_DTYPES)}")
    return cast(CompressionMode, mode), FLOAT_DTYPES[dtype_name]
