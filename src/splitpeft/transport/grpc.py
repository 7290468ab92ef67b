"""Split traffic over the network: one gRPC bidirectional stream per device.

Each request and each response is one encoded frame (`messages.encode` bytes, compressed as the
sender chose); there is no protobuf schema and no code generation: the method
``/splitpeft.Split/Exchange`` is registered with a generic handler whose (de)serialisers pass the
bytes through, and `messages.decode` validates them like every other frame.

    device (GrpcChannel)                                   server (GrpcSplitServer)
    metadata x-device-id, authorization: Bearer <token> -> authenticate once per stream
    frame ------------------------------------------------> decode, decompress, endpoint.handle
          <------------------------------------------------ compress, encode the reply
    ... one reply per frame, in order, until close()

A frame that fails validation gets an ERROR frame naming the defect (and `endpoint.reject` drops
the device's half-done step); the stream stays open, so the device's next step works. A stream that
fails authentication is aborted with UNAUTHENTICATED; every other device is served as before.

No device can hold the server's workers (each open stream holds one thread): a device has at most
one stream, and a new stream of the same device replaces the old one (the old one is cancelled and
the device's half-done step dropped), so a device that lost its link reconnects at once and one
stolen token holds one worker, not all of them. A stream that sends no frame for `idle_timeout_s`
(or does not read its reply), or whose training step (ACTIVATIONS to its last reply) lasts longer
than `step_timeout_s`, is cancelled and the device's session reset; the device sees CANCELLED, the
server logs the reason and records it with `endpoint.reject`.

Training code sees a `Channel` like the in-process one (`exchange`, `traffic`), with the same
byte counts: a frame's size on the wire is its encoded size (gRPC adds a few bytes of framing per
message and HTTP/2 headers per stream, which we do not count).
"""

from __future__ import annotations

import datetime
import hmac
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from typing import Any

import grpc

from splitpeft.transport.channel import Direction, Endpoint, Tap, Traffic, send_locally
from splitpeft.transport.compression import check_mode, compress, decompress
from splitpeft.transport.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Kind,
    Message,
    MessageError,
    Meta,
    decode,
    encode,
    error_message,
)

log = logging.getLogger(__name__)


SERVICE = "splitpeft.Split"


METHOD = "Exchange"


METHOD_PATH = f"/{SERVICE}/{METHOD}"


DEVICE_ID_HEADER = "x-device-id"


AUTHORIZATION_HEADER = "authorization"


COMPRESSION_HEADER = "x-split-compression"  # the mode the device wants its replies in


ROUND_TAG_HEADER = "x-split-round-tag"  # the round job a deployed device's stream belongs to


# gRPC refuses anything this far over the frame limit before buffering it (and ends the stream);
# frames between the two limits reach `decode`, which answers with an ERROR frame naming the size.
TRANSPORT_SLACK_BYTES = 1024 * 1024


GRPC_MAX_MESSAGE_BYTES = 2**31 - 1


DEFAULT_DEADLINE_S = 600.0  # one exchange; a dlora step's server half waits as long (dlora.STEP_TIMEOUT_S)


# The server's deadlines (config: transport.idle_timeout_s, transport.step_timeout_s).
DEFAULT_IDLE_TIMEOUT_S = 300.0
DEFAULT_STEP_TIMEOUT_S = 600.0


# A training step opens with the device's ACTIVATIONS and ends with the server's last reply of it:
# CUT_GRADIENT (split, U-shaped), STEP_DONE (dlora) or an ERROR that dropped it.
STEP_OPENS = frozenset({Kind.ACTIVATIONS})
STEP_ENDS = frozenset({Kind.CUT_GRADIENT, Kind.STEP_DONE, Kind.ERROR})


REPLACED = "the device opened a newer stream"


class TransportError(ConnectionError):
    """The stream to the server failed (refused, unreachable, reset or timed out)."""


def _identity(frame: bytes) -> bytes:
    return frame


def _grpc_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    limit = min(max_message_bytes + TRANSPORT_SLACK_BYTES, GRPC_MAX_MESSAGE_BYTES)
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        # Long local phases leave the stream idle between rounds: ping so that NATs and proxies
        # keep it, and so that a dead peer is noticed within keepalive_time + keepalive_timeout.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ]


# ------------------------------------------------------------------------------------ server


class _Stream:
    """One authenticated stream, as the watchdog sees it: since when it waits for the device (its
    next frame, or the device reading the last reply) and since when its current step runs."""

    def __init__(self, device_id: str, context: grpc.ServicerContext) -> None:
        self.device_id = device_id
        self.context = context
        self.peer = context.peer()  # for the logs: a finished RPC may no longer say
        self.waiting_since: float | None = time.monotonic()  # None while the server works on a frame
        self.step_since: float | None = None
        self.closed_because: str | None = None  # set by whoever cancels it (watchdog, a newer stream)
        self.session_open = False
        self.released = False
        self.finished = threading.Event()

    def overdue(self, now: float, idle_timeout_s: float, step_timeout_s: float) -> str | None:
        waiting, step = self.waiting_since, self.step_since
        if waiting is not None and now - waiting > idle_timeout_s:
            return f"no frame for {idle_timeout_s:g} s (transport.idle_timeout_s)"
        if step is not None and now - step > step_timeout_s:
            return f"step not finished within {step_timeout_s:g} s (transport.step_timeout_s)"
        return None


class GrpcSplitServer:
    """Serves `endpoint` (a `SplitServer`) to authenticated devices over gRPC.

    `tokens`: device id -> its secret bearer token. `tls`: (certificate PEM, private key PEM), or
    None for plaintext (loopback and tests only: tokens then cross in the clear).
    Requests say their own compression (in each frame). Replies use `compression` if given, else
    the mode each device asks for when it opens its stream (it knows its link). With `serialize` (default) one
    lock around `endpoint.handle` makes the server's work happen in one order whatever the thread
    scheduling, so results are deterministic; frames of one device are always handled in order.
    Each open stream holds one of `max_workers` threads (default: one per device plus 16 for
    streams being refused or replaced, at least 32); streams beyond that are refused with
    RESOURCE_EXHAUSTED rather than queued. One stream per device, `idle_timeout_s` and
    `step_timeout_s`: see the module docstring.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        address: str = "127.0.0.1:0",
        *,
        tokens: Mapping[str, str],
        tls: tuple[bytes, bytes] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        compression: str | None = None,
        serialize: bool = True,
        max_workers: int | None = None,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S,
    ) -> None:
        if any(not token for token in tokens.values()):
            raise ValueError("every device needs a non-empty token")
        if not (0 < idle_timeout_s < float("inf") and 0 < step_timeout_s < float("inf")):
            raise ValueError("idle_timeout_s and step_timeout_s must be finite and > 0")
        self.endpoint = endpoint
        self.address = address
        self.tokens = dict(tokens)
        self.tls = tls
        self.max_message_bytes = max_message_bytes
        self.compression = None if compression is None else check_mode(compression)
        self.max_workers = max_workers if max_workers is not None else max(32, len(self.tokens) + 16)
        self.idle_timeout_s = idle_timeout_s
        self.step_timeout_s = step_timeout_s
        self._handle_lock: threading.Lock | None = threading.Lock() if serialize else None
        self._device_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._streams: dict[str, _Stream] = {}  # device id -> its one open stream
        self._streams_guard = threading.Lock()
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._server: grpc.Server | None = None
        self.port: int | None = None
        # Called with the device id when a device's stream ends without the device closing it
        # (process killed, link cut, deadline): the federation drops it from the round at once.
        self.on_lost: Callable[[str], None] | None = None

    def start(self) -> int:
        """Start serving; returns the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("server already started")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="splitpeft-grpc"),
            options=_grpc_options(self.max_message_bytes),
            maximum_concurrent_rpcs=self.max_workers,
        )
        handler = grpc.stream_stream_rpc_method_handler(
            self._stream, request_deserializer=_identity, response_serializer=_identity)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
        if self.tls is None:
            port = server.add_insecure_port(self.address)
        else:
            cert_pem, key_pem = self.tls
            port = server.add_secure_port(self.address, grpc.ssl_server_credentials([(key_pem, cert_pem)]))
        if port == 0:
            raise TransportError(f"cannot bind {self.address}")
        server.start()
        self._server, self.port = server, port
        self._stopping.clear()
        self._watchdog = threading.Thread(target=self._watch, name="splitpeft-grpc-watchdog", daemon=True)
        self._watchdog.start()
        log.info("split traffic server on port %d (%s)", port, "TLS" if self.tls else "plaintext")
        return port

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop serving; open streams get `grace_s` to finish their current frame."""
        if self._server is not None:
            self._server.stop(grace_s).wait()
            self._server = None
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None

    def __enter__(self) -> GrpcSplitServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ per stream

    def _stream(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        device_id = self._authenticate(context)
        compression = self.compression or self._requested_compression(context)
        round_tag = self._admit(device_id, context)
        log.info("device %s connected from %s (replies: %s)", device_id, context.peer(), compression)
        stream, previous = self._register(device_id, context)
        # gRPC drops a response iterator whose RPC was cancelled during a send without closing it,
        # so the `finally` below may never run: the end of the RPC releases the stream as well
        # (in a thread of its own: callbacks run on gRPC's polling thread, which must not wait).
        def on_end() -> None:
            if not stream.released:
                threading.Thread(target=self._release, args=(stream, False), daemon=True).start()

        if not context.add_callback(on_end):
            self._release(stream, ended=False)
            return
        ended = False
        try:
            if previous is not None:
                self._take_over(previous)
            for frame in frames:
                arrived, stream.waiting_since = time.monotonic(), None
                reply, kind, reply_kind = self._reply(device_id, frame, compression, round_tag)
                if kind == Kind.OPEN_SESSION and reply_kind == Kind.SESSION_READY:
                    stream.session_open = True  # a refused open (a stale job's) opened nothing to lose
                elif kind == Kind.CLOSE_SESSION:
                    stream.session_open = False
                if reply_kind in STEP_ENDS:
                    stream.step_since = None
                elif kind in STEP_OPENS and stream.step_since is None:
                    stream.step_since = arrived
                stream.waiting_since = time.monotonic()  # sending the reply counts: a device must read it
                yield reply
            # A dying device can end its request stream as if it closed it; a device that is
            # done closes its session first (CLOSE_SESSION), and its call is still active here.
            ended = not stream.session_open and context.is_active()
        except grpc.RpcError:  # cancelled: by the device, the watchdog or a newer stream
            pass
        finally:
            self._release(stream, ended)

    def _register(self, device_id: str, context: grpc.ServicerContext) -> tuple[_Stream, _Stream | None]:
        """The new stream of `device_id`, now its only one, and the stream it replaces (if any)."""
        stream = _Stream(device_id, context)
        with self._streams_guard:
            previous = self._streams.get(device_id)
            self._streams[device_id] = stream
        return stream, previous

    def _admit(self, device_id: str, context: grpc.ServicerContext) -> str | None:
        """The round tag the stream names in its headers (its round job's; None if none), once the
        endpoint admits it: a stream whose round job a deployment's fenced split server refuses (a
        job left over from an earlier round or server start) is aborted (FAILED_PRECONDITION)
        before it can replace the device's stream of the round in progress."""
        header = dict(context.invocation_metadata()).get(ROUND_TAG_HEADER)
        tag = None if header is None else str(header)
        refuses = getattr(self.endpoint, "refuses_stream", None)
        refusal = refuses(device_id, tag) if refuses is not None else None
        if refusal is not None:
            log.warning("refused a stream from device %s at %s: %s", device_id, context.peer(), refusal)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, refusal)
        return tag

    def _take_over(self, previous: _Stream) -> None:
        """Cancel the stream a device's new stream replaces (the newer wins, so a device that lost
        its link reconnects at once) and, once it has finished (within the step deadline, as its
        current frame may be computing), drop the device's half-done step if it had a session open."""
        device_id = previous.device_id
        log.warning("device %s opened another stream: it replaces the one from %s", device_id, previous.peer)
        self._cancel(previous, REPLACED)
        previous.finished.wait(timeout=self.step_timeout_s)
        if not previous.session_open:  # e.g. a stale job's, whose open was refused: nothing of this round's to drop
            return
        with self._device_lock(device_id):
            self._locked(self.endpoint.reject, device_id, TransportError(f"split stream replaced: {REPLACED}"))

    def _release(self, stream: _Stream, ended: bool) -> None:
        """A stream is over (called once, by whichever comes first of its handler's end and the
        RPC's): unregister it, and reset the device's session unless it closed cleanly or a newer
        stream of the device took over (which resets it itself)."""
        device_id = stream.device_id
        with self._streams_guard:
            if stream.released:
                return
            stream.released = True
            if self._streams.get(device_id) is stream:
                del self._streams[device_id]
            reason = stream.closed_because
        try:
            if reason == REPLACED:
                log.info("the replaced stream of device %s ended", device_id)
            elif ended and reason is None:  # a stream cancelled here can end as if closed
                log.info("device %s closed its stream", device_id)
            else:
                log.warning("lost the stream of device %s (%s)%s%s", device_id, stream.peer,
                            " with its session open" if stream.session_open else "", f": {reason}" if reason else "")
                if reason is not None:
                    with self._device_lock(device_id):
                        self._locked(self.endpoint.reject, device_id, TransportError(f"split stream closed: {reason}"))
                if self.on_lost is not None:
                    self.on_lost(device_id)
        finally:
            stream.finished.set()

    def _cancel(self, stream: _Stream, reason: str) -> None:
        with self._streams_guard:
            if stream.closed_because is not None:
                return
            stream.closed_because = reason
        log.warning("closing the stream of device %s: %s", stream.device_id, reason)
        stream.context.cancel()

    def _watch(self) -> None:
        """Cancel streams past a deadline, until the server stops."""
        tick_s = min(1.0, max(0.01, min(self.idle_timeout_s, self.step_timeout_s) / 10))
        while not self._stopping.wait(tick_s):
            now = time.monotonic()
            with self._streams_guard:
                streams = list(self._streams.values())
            for stream in streams:
                reason = stream.overdue(now, self.idle_timeout_s, self.step_timeout_s)
                if reason is not None:
                    self._cancel(stream, reason)

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        """The stream's device id if its bearer token matches; otherwise abort UNAUTHENTICATED."""
        metadata = {key: value for key, value in context.invocation_metadata()}
        device_id = str(metadata.get(DEVICE_ID_HEADER, ""))
        presented = str(metadata.get(AUTHORIZATION_HEADER, "")).encode()
        expected = self.tokens.get(device_id)
        # Compare even for an unknown device, so the reply time does not tell which ids exist.
        wanted = f"Bearer {expected if expected is not None else ''}".encode()
        matches = hmac.compare_digest(presented, wanted)
        if expected is None or not matches:
            reason = "unknown device" if expected is None else "bad token"
            log.warning("refused a stream from device %r at %s: %s", device_id, context.peer(), reason)
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"device {device_id!r} is not authorised")
        return device_id

    @staticmethod
    def _requested_compression(context: grpc.ServicerContext) -> str:
        requested = str(dict(context.invocation_metadata()).get(COMPRESSION_HEADER, "none"))
        try:
            return check_mode(requested)
        except ValueError as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            raise  # abort raises; this keeps type checkers informed

    def _device_lock(self, device_id: str) -> threading.Lock:
        with self._locks_guard:
            return self._device_locks.setdefault(device_id, threading.Lock())

    def _reply(self, device_id: str, frame: bytes, compression: str, round_tag: str | None) -> tuple[bytes, Kind | None, Kind]:
        """The encoded reply to one frame, the frame's kind (None if it was not readable) and the
        reply's; a bad frame gets an ERROR frame, never a dead stream. An OPEN_SESSION carries the
        stream's round tag (its headers', never one of the frame's own) to the endpoint."""
        kind = None
        with self._device_lock(device_id):
            try:
                message = decompress(decode(frame, max_bytes=self.max_message_bytes))
            except MessageError as error:
                log.warning("bad frame from device %s: %s", device_id, error)
                self._locked(self.endpoint.reject, device_id, error)
                reply = error_message(str(error))
            else:
                kind = message.kind
                if kind == Kind.OPEN_SESSION:
                    message.meta.pop(Meta.ROUND_TAG, None)
                    if round_tag is not None:
                        message.meta[Meta.ROUND_TAG] = round_tag
                try:
                    reply = self._locked(self.endpoint.handle, device_id, message)
                except Exception as error:  # keep serving: a crash in one step is that step's error
                    log.exception("%s message from device %s failed", message.kind.name, device_id)
                    self._locked(self.endpoint.reject, device_id, error)
                    reply = error_message(f"server failed on {message.kind.name}: {error}")
            return encode(compress(reply, compression)), kind, reply.kind

    def _locked(self, function: Any, *args: Any) -> Any:
        if self._handle_lock is None:
            return function(*args)
        with self._handle_lock:
            return function(*args)


# ------------------------------------------------------------------------------------ device


_CLOSED = object()


class GrpcChannel:
    """A device's `Channel` to a `GrpcSplitServer`: one bidirectional stream, one reply per frame.

    `root_cert_pem` (the server's certificate or its CA) turns on TLS. `deadline_s` bounds each
    exchange; on expiry the stream is cancelled (a late reply would answer the wrong request) and
    the channel is unusable. `compression` applies to the device's frames and is asked of the
    server for its replies, as `InProcessChannel` applies it both ways. `send(message, direction)` encodes, counts and decodes locally, like
    `InProcessChannel.send`: federation uses it for adapter messages, which travel on Flower in
    deployment, not on this stream. `round_tag` (a deployed device's round job) travels in the
    stream's headers: a deployment's split server refuses the stream of another round's job.
    """

    def __init__(
        self,
        device_id: str,
        address: str,
        *,
        token: str,
        root_cert_pem: bytes | None = None,
        deadline_s: float = DEFAULT_DEADLINE_S,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        compression: str = "none",
        tap: Tap | None = None,
        server_name: str | None = None,
        round_tag: str | None = None,
    ) -> None:
        self.device_id = device_id
        self.address = address
        self.deadline_s = deadline_s
        self.max_message_bytes = max_message_bytes
        self.compression = check_mode(compression)
        self.tap = tap
        self.traffic = Traffic()
        options = _grpc_options(max_message_bytes)
        if root_cert_pem is None:
            self._grpc = grpc.insecure_channel(address, options=options)
        else:
            if server_name is not None:  # the certificate's name when dialling an IP or alias
                options.append(("grpc.ssl_target_name_override", server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=root_cert_pem)
            self._grpc = grpc.secure_channel(address, credentials, options=options)
        self._requests: queue.Queue[Any] = queue.Queue()
        self._replies: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._failure: TransportError | None = None
        rpc = self._grpc.stream_stream(METHOD_PATH, request_serializer=_identity, response_deserializer=_identity)
        metadata = [(DEVICE_ID_HEADER, device_id), (AUTHORIZATION_HEADER, f"Bearer {token}"), (COMPRESSION_HEADER, self.compression)]
        if round_tag is not None:  # a deployed device's round job: a fenced server admits only the round in progress's
            metadata.append((ROUND_TAG_HEADER, round_tag))
        self._call = rpc(iter(self._requests.get, _CLOSED), metadata=tuple(metadata))
        self._reader = threading.Thread(target=self._read, name=f"splitpeft-grpc-{device_id}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        """Move replies (or the stream's end or error) from gRPC to `exchange`, which waits with a deadline."""
        try:
            for frame in self._call:
                self._replies.put(frame)
        except grpc.RpcError as error:
            self._replies.put(self._error(error))
        else:
            self._replies.put(TransportError(f"device {self.device_id}: the server closed the stream"))

    def _error(self, error: grpc.RpcError) -> TransportError:
        code = error.code() if isinstance(error, grpc.Call) else None
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        name = code.name if code is not None else "UNKNOWN"
        if code == grpc.StatusCode.CANCELLED:  # this side cancels only after raising its own error
            details = (f"{details} (the server closes a stream silent for transport.idle_timeout_s, one whose step "
                       "outlasts transport.step_timeout_s, and one that a newer stream of the same device replaced)")
        return TransportError(f"device {self.device_id}: split stream to {self.address} failed with {name}: {details}")

    def exchange_frame(self, frame: bytes) -> bytes:
        """Send one encoded frame and return the server's reply frame (counted and tapped)."""
        with self._lock:
            if self._failure is not None:
                raise self._failure
            self.traffic.count("up", len(frame))
            if self.tap is not None:
                self.tap(self.device_id, "up", frame)
            self._requests.put(frame)
            try:
                reply = self._replies.get(timeout=self.deadline_s)
            except queue.Empty:
                self._call.cancel()
                reply = TransportError(f"device {self.device_id}: no reply from {self.address} within "
                                       f"{self.deadline_s:g} s (DEADLINE_EXCEEDED)")
            if isinstance(reply, TransportError):
                self._failure = reply
                raise reply
            self.traffic.count("down", len(reply))
            if self.tap is not None:
                self.tap(self.device_id, "down", reply)
            return reply

    def exchange(self, message: Message) -> Message:
        reply = self.exchange_frame(encode(compress(message, self.compression)))
        return decompress(decode(reply, max_bytes=self.max_message_bytes))

    def send(self, message: Message, direction: Direction) -> Message:
        """Encode, count and decode one message locally (adapter transfers; see the class docstring)."""
        return send_locally(self, message, direction)

    def close(self) -> None:
        """End the stream (the server sees its end) and release the connection."""
        self._requests.put(_CLOSED)
        self._reader.join(timeout=5.0)
        if self._reader.is_alive():
            self._call.cancel()
        self._grpc.close()

    def __enter__(self) -> GrpcChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------ TLS


def self_signed_certificate(
    hostnames: tuple[str, ...] = ("localhost", "127.0.0.1"), *, valid_days: int = 30,
) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM): a self-signed P-256 certificate for `hostnames`.

    For tests and trying TLS on one machine; the certificate is its own root, so a device passes
    it as `root_cert_pem`. Deployment uses certificates from the operator's CA.
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=valid_days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert_pem, key_pem
