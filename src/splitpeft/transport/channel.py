"""The device <-> server channel: the only way the two halves of a split model talk.

Training code calls `channel.exchange(message)` and gets the server's reply. Whether the channel
is in-process or a gRPC stream is one constructor argument; the training code is the same.

Byte counts are the real serialised sizes, `len(encode(message))` after compression, on every
channel. Over the network each message is encoded and decoded. In-process (`send_locally`) it is
encoded and decoded only when a `tap` is set, since the wire audit needs the real frames, or in
the rare corner `messages.frame_size` does not cover (then the frame alone knows its size).
Otherwise the size is computed from names, dtypes and shapes (`messages.frame_size` rebuilds the
safetensors header byte for byte, so the count is the same as the frame's length) and the tensors
are handed over in memory (`messages.hand_over`: the size limit, NaN/Inf and metadata checks of
`decode`; detached views sharing storage with the sender's tensors, on the sender's device): an
activation on a GPU is not copied to the CPU and back. Compression runs on both paths alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from splitpeft.transport.compression import check_mode, compress, decompress
from splitpeft.transport.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Message,
    MessageError,
    decode,
    encode,
    error_message,
    frame_size,
    hand_over,
)

Direction = Literal["up", "down"]


Tap = Callable[[str, Direction, bytes], None]


@dataclass
class Traffic:
    """Bytes and messages in each direction, as serialised on the wire."""

    bytes_up: int = 0
    bytes_down: int = 0
    messages_up: int = 0
    messages_down: int = 0

    def count(self, direction: Direction, size: int) -> None:
        if direction == "up":
            self.bytes_up += size
            self.messages_up += 1
        else:
            self.bytes_down += size
            self.messages_down += 1

    def reset(self) -> None:
        """Back to zero in place (whoever holds this object sees the reset)."""
        self.bytes_up = self.bytes_down = 0
        self.messages_up = self.messages_down = 0


class Endpoint(Protocol):
    """The server side of a channel: one reply per message, per device."""

    def handle(self, device_id: str, message: Message) -> Message: ...

    def reject(self, device_id: str, error: Exception) -> None:
        """A frame from `device_id` failed validation: log it and drop any half-done step."""


class Channel(Protocol):
    device_id: str
    traffic: Traffic

    def exchange(self, message: Message) -> Message: ...


class _Counted(Protocol):
    """What `send_locally` reads from a channel (read-only, so narrower attribute types fit)."""

    @property
    def device_id(self) -> str: ...
    @property
    def traffic(self) -> Traffic: ...
    @property
    def tap(self) -> Tap | None: ...
    @property
    def compression(self) -> str: ...
    @property
    def max_message_bytes(self) -> int: ...


def send_locally(channel: _Counted, message: Message, direction: Direction) -> Message:
    """One message across this process as if through the wire: compress, count its encoded
    size, validate, decompress. The in-process channel uses it for everything; a network channel
    for the adapter exchange, which travels with the federation engine rather than on its stream.

    With a `tap` the message really is encoded (the tap sees the frame) and decoded; without one
    it is sized and handed over in memory, with the same count and the same errors.
    """
    packed = compress(message, channel.compression)
    size = frame_size(packed) if channel.tap is None else None
    if size is not None:
        channel.traffic.count(direction, size)
        return decompress(hand_over(packed, size, max_bytes=channel.max_message_bytes))
    frame = encode(packed)
    channel.traffic.count(direction, len(frame))
    if channel.tap is not None:
        channel.tap(channel.device_id, direction, frame)
    return decompress(decode(frame, max_bytes=channel.max_message_bytes))


class InProcessChannel:
    """Device and server in one process; messages are counted at their encoded size and checked
    as on the wire, but cross as encoded bytes only when a `tap` is set (see `send_locally`).

    `tap`, if given, sees every frame (device id, direction, bytes): the wire audit uses it.
    `compression` ("none", "bf16", "int8"; see `compression.py`) applies to the split traffic in
    both directions, so the counted bytes are the compressed sizes and both sides see dequantised
    tensors in their original dtype, exactly as over the network.
    """

    def __init__(
        self,
        device_id: str,
        endpoint: Endpoint,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tap: Tap | None = None,
        compression: str = "none",
    ) -> None:
        self.device_id = device_id
        self.endpoint = endpoint
        self.max_message_bytes = max_message_bytes
        self.tap = tap
        self.compression = check_mode(compression)
        self.traffic = Traffic()

    def send(self, message: Message, direction: Direction) -> Message:
        """Count, check and hand over one message travelling in `direction`."""
        return send_locally(self, message, direction)

    def exchange(self, message: Message) -> Message:
        try:
            received = self.send(message, "up")
        except MessageError as error:
            # The server would reject the frame and answer with an error; so do we.
            self.endpoint.reject(self.device_id, error)
            reply = error_message(str(error))
        else:
            reply = self.endpoint.handle(self.device_id, received)
        return self.send(reply, "down")
