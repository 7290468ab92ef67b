"""Transport: the validated wire frame (kinds, meta, tensors as safetensors; never pickled),
compression, the in-process channel that counts bytes, and the split stream over gRPC.

Public API (each name imported from its module on first use):

- `messages`: `Message`, `Kind`, `Meta`, `MessageError`, `encode`, `decode`
- `channel`: `Channel`, `InProcessChannel`, `Traffic`
- `compression`: `compress`, `decompress`
- `grpc`: `GrpcChannel`, `GrpcSplitServer`, `TransportError`
"""

from typing import TYPE_CHECKING

from splitpeft import lazy_exports

if TYPE_CHECKING:
    from splitpeft.transport.channel import Channel as Channel
    from splitpeft.transport.channel import InProcessChannel as InProcessChannel
    from splitpeft.transport.channel import Traffic as Traffic
    from splitpeft.transport.compression import compress as compress
    from splitpeft.transport.compression import decompress as decompress
    from splitpeft.transport.grpc import GrpcChannel as GrpcChannel
    from splitpeft.transport.grpc import GrpcSplitServer as GrpcSplitServer
    from splitpeft.transport.grpc import TransportError as TransportError
    from splitpeft.transport.messages import Kind as Kind
    from splitpeft.transport.messages import Message as Message
    from splitpeft.transport.messages import MessageError as MessageError
    from splitpeft.transport.messages import Meta as Meta
    from splitpeft.transport.messages import decode as decode
    from splitpeft.transport.messages import encode as encode

_EXPORTS = {
    "Message": "splitpeft.transport.messages",
    "Kind": "splitpeft.transport.messages",
    "Meta": "splitpeft.transport.messages",
    "MessageError": "splitpeft.transport.messages",
    "encode": "splitpeft.transport.messages",
    "decode": "splitpeft.transport.messages",
    "Channel": "splitpeft.transport.channel",
    "InProcessChannel": "splitpeft.transport.channel",
    "Traffic": "splitpeft.transport.channel",
    "compress": "splitpeft.transport.compression",
    "decompress": "splitpeft.transport.compression",
    "GrpcChannel": "splitpeft.transport.grpc",
    "GrpcSplitServer": "splitpeft.transport.grpc",
    "TransportError": "splitpeft.transport.grpc",
}
__all__ = list(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
