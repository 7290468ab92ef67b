"""The device <-> server channel: the only way the two halves of a split model talk.

Training code calls `channel.exchange(message)` and gets the server's reply. Every message is
encoded to its wire bytes and decoded again on the other side (also in-process), so the byte
counts are the real serialised sizes and the decoder's validation always runs. Whether the
channel is in-process or a gRPC stream is one constructor argument; the training code is the same.
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
    """One message through the wire encoding on this side only: compress, encode, count, tap,
    decode, decompress. The in-process channel uses it for everything; a network channel for
    the adapter exchange, which travels with the federation engine rather than on its stream."""
    frame = encode(compress(message, channel.compression))
    channel.traffic.count(direction, len(frame))
    if channel.tap is not None:
        channel.tap(channel.device_id, direction, frame)
    return decompress(decode(frame, max_bytes=channel.max_message_bytes))


class InProcessChannel:
    """Device and server in one process; messages still cross as encoded bytes.

    `tap`, if given, sees every frame (device id, direction, bytes): the wire audit uses it.
    `compression` ("none", "bf16", "int8"; see `compression.py`) applies to the split traffic in
    both directions, so the counted bytes are the compressed sizes and both sides see dequantised
    float32 tensors, exactly as over the network.
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
        """Encode, count and decode one message travelling in `direction`."""
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
