"""The gRPC transport and split-traffic compression.

A round over a real loopback gRPC stream must equal the in-process round exactly (losses, adapters,
byte counts); refused devices and bad frames must not disturb anyone else; compression must shrink
the frames by what its format says and stay within its error bound.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import torch
from conftest import tiny_config

from splitpeft.federation.simulation import Simulation
from splitpeft.parties.server import StepLimits
from splitpeft.transport.channel import InProcessChannel
from splitpeft.transport.compression import (
    SCALE_SUFFIX,
    compress,
    decompress,
    quantize_int8,
)
from splitpeft.transport.grpc import (
    AUTHORIZATION_HEADER,
    DEVICE_ID_HEADER,
    METHOD_PATH,
    GrpcChannel,
    GrpcSplitServer,
    TransportError,
    self_signed_certificate,
)
from splitpeft.transport.messages import (
    Kind,
    Message,
    MessageError,
    decode,
    encode,
    tensor_bytes,
)

ROUND = ("federation.num_devices=2", "federation.local_steps=2")


@contextmanager
def served(sim: Simulation, *, tls: bool = False, compression: str = "none", max_message_bytes: int | None = None,
           tap=None, connect: bool = True, **options) -> Iterator[tuple[GrpcSplitServer, str, dict[str, str], bytes | None]]:
    """`sim.server` behind a loopback GrpcSplitServer (`options`: its deadlines); with `connect`,
    every device's channel is a GrpcChannel."""
    tokens = {d: f"secret-{d}" for d in sim.device_ids}
    cert_key = self_signed_certificate() if tls else None
    limits = {} if max_message_bytes is None else {"max_message_bytes": max_message_bytes}
    server = GrpcSplitServer(sim.server, tokens=tokens, tls=cert_key, **limits, **options)  # replies follow each device's mode
    address = f"127.0.0.1:{server.start()}"
    root = cert_key[0] if cert_key else None
    channels = []
    try:
        if connect:
            for d in sim.device_ids:
                channels.append(GrpcChannel(d, address, token=tokens[d], root_cert_pem=root, deadline_s=60,
                                            compression=compression, tap=tap, **limits))
                sim.channels[d] = channels[-1]
        yield server, address, tokens, root
    finally:
        for channel in channels:
            channel.close()
        server.stop()


def _assert_same_round(reference: Simulation, networked: Simulation) -> None:
    a, b = reference.rounds[-1], networked.rounds[-1]
    assert a.devices.keys() == b.devices.keys()
    for d in a.devices:
        assert a.devices[d].losses == b.devices[d].losses
        assert (a.devices[d].bytes_up, a.devices[d].bytes_down) == (b.devices[d].bytes_up, b.devices[d].bytes_down)
    assert reference.state.global_adapters.keys() == networked.state.global_adapters.keys()
    for name, weights in reference.state.global_adapters.items():
        torch.testing.assert_close(networked.state.global_adapters[name].A, weights.A, rtol=0, atol=1e-6)
        torch.testing.assert_close(networked.state.global_adapters[name].B, weights.B, rtol=0, atol=1e-6)
    assert not b.rejected


# ------------------------------------------------------------------------ (a) (b) equivalence


KILLED_ON_SERVER = ("placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.warmup=1", "kill_revive.interval=1",
                    "kill_revive.active_fraction=0.25", "kill_revive.server_trains_killed=true")


@pytest.mark.parametrize("placement", ["split", "dlora", "dlora_server_trains_killed"])
def test_grpc_round_equals_in_process_round(placement):
    """Over a real gRPC stream, the same round as in process; with Kill and Revive whose server
    trains the killed adapters, KILL and the end-of-phase fetch (REVIVE, keep killed) travel too."""
    overrides = (*ROUND, *KILLED_ON_SERVER) if placement == "dlora_server_trains_killed" else (*ROUND, f"placement.placement={placement}")
    reference = Simulation(tiny_config("tiny-llama", *overrides))
    reference.run_round()
    networked = Simulation(tiny_config("tiny-llama", *overrides))
    with served(networked):
        networked.run_round()
    _assert_same_round(reference, networked)
    if placement == "dlora_server_trains_killed":
        assert all(device.trained_killed for device in networked.devices)  # fetched over the stream


def test_tls_round_equals_in_process_round():
    reference = Simulation(tiny_config("tiny-llama", *ROUND))
    reference.run_round()
    networked = Simulation(tiny_config("tiny-llama", *ROUND))
    with served(networked, tls=True):
        networked.run_round()
    _assert_same_round(reference, networked)


def test_tls_refuses_a_device_that_does_not_trust_the_certificate():
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1"))
    with served(sim, tls=True, connect=False) as (_, address, tokens, _root):
        other_cert, _ = self_signed_certificate()
        for root in (other_cert, None):  # a different certificate; plaintext against TLS
            with GrpcChannel("device-0", address, token=tokens["device-0"], root_cert_pem=root, deadline_s=20) as channel:
                with pytest.raises(TransportError, match="device-0.*UNAVAILABLE"):
                    sim.devices[0].open_session(channel)


# ------------------------------------------------------------------------ (c) authentication


@pytest.mark.parametrize("device_id, token", [("device-0", "wrong"), ("device-9", "secret-device-9"), ("device-0", "")])
def test_unauthenticated_devices_are_refused_and_others_keep_working(device_id, token, caplog):
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=2", "federation.local_steps=1"))
    with served(sim) as (_, address, tokens, _root):
        with GrpcChannel(device_id, address, token=token, deadline_s=20) as intruder:
            with pytest.raises(TransportError, match=f"{device_id}.*UNAUTHENTICATED"):
                intruder.exchange(Message(Kind.OPEN_SESSION, meta={"placement": "split", "split_layer": 2}))
            with pytest.raises(TransportError, match="UNAUTHENTICATED"):  # the channel stays failed
                intruder.exchange(Message(Kind.CLOSE_SESSION))
        assert any(device_id in r.getMessage() and "refused" in r.getMessage() for r in caplog.records)
        record = sim.run_round()  # both real devices, same server
    assert all(math.isfinite(loss) for stats in record.devices.values() for loss in stats.losses)
    assert not record.rejected


class _SlowEcho:
    """An Endpoint that answers every message with itself after `delay_s`."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def handle(self, device_id: str, message: Message) -> Message:
        time.sleep(self.delay_s)
        return message

    def reject(self, device_id: str, error: Exception) -> None:
        pass


def test_a_late_reply_fails_the_exchange_with_a_deadline_error():
    with GrpcSplitServer(_SlowEcho(1.0), tokens={"device-0": "t"}) as server:
        with GrpcChannel("device-0", f"127.0.0.1:{server.port}", token="t", deadline_s=0.2) as channel:
            with pytest.raises(TransportError, match="device-0: no reply .* within 0.2 s"):
                channel.exchange(Message(Kind.CLOSE_SESSION))


def test_a_server_that_goes_away_is_a_transport_error():
    server = GrpcSplitServer(_SlowEcho(0.0), tokens={"device-0": "t"})
    port = server.start()
    with GrpcChannel("device-0", f"127.0.0.1:{port}", token="t", deadline_s=20) as channel:
        assert channel.exchange(Message(Kind.CLOSE_SESSION, meta={"n": 1})).meta == {"n": 1}
        server.stop(grace_s=0)
        with pytest.raises(TransportError, match="device-0"):
            channel.exchange(Message(Kind.CLOSE_SESSION))


# ------------------------------------------------------------------------ (d) bad frames


def _nan_frame() -> bytes:
    hidden = torch.zeros(1, 4, 32)
    hidden[0, 1, 2] = float("nan")
    return encode(Message(Kind.ACTIVATIONS, {"hidden": hidden, "labels": torch.zeros(1, 4, dtype=torch.int32)}))


def _bad_scale_frame() -> bytes:
    message = compress(Message(Kind.ACTIVATIONS, {"hidden": torch.randn(1, 4, 32)}), "int8")
    message.tensors["hidden" + SCALE_SUFFIX] = torch.ones(31)
    return encode(message)


LIMIT = 256 * 1024
BAD_FRAMES = {
    "garbage": (lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "bad magic bytes"),
    "empty": (lambda: b"", "truncated message"),
    "truncated": (lambda: encode(Message(Kind.ACTIVATIONS, {"hidden": torch.randn(2, 8, 32)}))[:-100], "garbled ACTIVATIONS"),
    "oversized": (lambda: encode(Message(Kind.ACTIVATIONS, {"hidden": torch.randn(LIMIT // 4 + 16)})),
                  f"exceeds the limit of {LIMIT} bytes"),
    "nan": (_nan_frame, "ACTIVATIONS.hidden contains NaN or Inf"),
    "bad scale": (_bad_scale_frame, r"scale of dtype torch.float32 and shape \(31,\), expected float32 \(32,\)"),
    "unknown kind": (lambda: encode(Message(Kind.ACTIVATIONS))[:5] + bytes([200]) + encode(Message(Kind.ACTIVATIONS))[6:],
                     "unknown message kind 200"),
}


def test_bad_frames_get_an_error_reply_and_the_stream_keeps_serving():
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "data.max_length=64"))
    device = sim.devices[0]
    with served(sim, max_message_bytes=LIMIT):
        channel = sim.channels["device-0"]
        device.open_session(channel)
        for name, (make, problem) in BAD_FRAMES.items():
            frame = make()
            before = channel.traffic.bytes_up
            reply = decode(channel.exchange_frame(frame))
            assert reply.kind == Kind.ERROR, name
            assert re.search(problem, reply.meta["error"]), (name, reply.meta["error"])
            assert channel.traffic.bytes_up - before == len(frame)
            # ... and the same stream still trains: a whole valid step right after the bad frame
            phase = device.local_phase(1, channel)
            assert math.isfinite(phase.losses[0]), name
        assert len(sim.server.rejected) == len(BAD_FRAMES)


def test_a_frame_far_beyond_the_limit_is_refused_by_grpc_itself():
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=2", "federation.local_steps=1"))
    with served(sim, max_message_bytes=LIMIT):
        with pytest.raises(TransportError, match="device-0.*RESOURCE_EXHAUSTED"):
            sim.channels["device-0"].exchange_frame(b"x" * (LIMIT + 2 * 1024 * 1024))
        sim.devices[1].open_session(sim.channels["device-1"])
        assert math.isfinite(sim.devices[1].local_phase(1, sim.channels["device-1"]).losses[0])


# ------------------------------------------------------------------------ (d') server-side limits


@contextmanager
def silent_streams(address: str, device_id: str, token: str, count: int) -> Iterator[list[grpc.Call]]:
    """`count` authenticated streams of `device_id` that never send a frame (an attacker holding one token)."""
    connection = grpc.insecure_channel(address)
    rpc = connection.stream_stream(METHOD_PATH, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    done = threading.Event()

    def nothing() -> Iterator[bytes]:
        done.wait()
        yield from ()

    metadata = ((DEVICE_ID_HEADER, device_id), (AUTHORIZATION_HEADER, f"Bearer {token}"))
    calls = [rpc(nothing(), metadata=metadata) for _ in range(count)]
    try:
        yield calls
    finally:
        done.set()
        for call in calls:
            call.cancel()
        connection.close()


def _wait_until(condition, timeout_s: float) -> float:
    """Seconds until `condition()` held; fails after `timeout_s`."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, "timed out"
        time.sleep(0.05)
    return time.monotonic() - start


def test_one_token_cannot_hold_the_servers_workers_and_silent_streams_are_closed():
    """Issue 12, finding 5: with device-1's valid token, 40 silent streams filled the server's 32
    workers and device-0 was refused (RESOURCE_EXHAUSTED) for as long as the attacker wished.
    Now a device has one stream (a newer one replaces it), and a stream silent for
    idle_timeout_s is closed and its session reset."""
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=2", "data.max_length=48"))
    with served(sim, connect=False, idle_timeout_s=3.0) as (server, address, tokens, _root):
        with silent_streams(address, "device-1", tokens["device-1"], 40) as calls:
            _wait_until(lambda: sum(call.done() for call in calls) >= len(calls) - 1, timeout_s=20)
            survivor = next(call for call in calls if not call.done())
            start = time.monotonic()
            with GrpcChannel("device-0", address, token=tokens["device-0"], deadline_s=30) as channel:
                device = sim.devices[0]
                device.open_session(channel)
                phase = device.local_phase(2, channel)
                device.close_session(channel)
            assert time.monotonic() - start < 20
            assert all(math.isfinite(loss) for loss in phase.losses)
            _wait_until(survivor.done, timeout_s=3.0 + 10)
            assert survivor.code() == grpc.StatusCode.CANCELLED
            _wait_until(lambda: any(d == "device-1" and "no frame for 3 s (transport.idle_timeout_s)" in e
                                    for d, e in sim.server.rejected), timeout_s=5)
    assert all(d == "device-1" for d, _ in sim.server.rejected)


def _u_shaped_step_opened(sim: Simulation, channel: GrpcChannel) -> None:
    """device-0 opens its session and sends a U-shaped step's ACTIVATIONS: the server keeps the step."""
    sim.devices[0].open_session(channel)
    reply = channel.exchange(Message(Kind.ACTIVATIONS, {"hidden": torch.randn(2, 5, 32)}))
    assert reply.kind == Kind.FINAL_HIDDEN
    assert sim.server.sessions["device-0"].step_state is not None


def test_a_device_that_goes_silent_mid_step_is_closed_and_its_step_dropped():
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "placement.labels_on_device=true"))
    with served(sim, idle_timeout_s=1.0) as (_, _address, _tokens, _root):
        channel = sim.channels["device-0"]
        _u_shaped_step_opened(sim, channel)
        waited = _wait_until(lambda: sim.server.sessions["device-0"].step_state is None, timeout_s=10)
        assert waited > 0.5
        with pytest.raises(TransportError, match="device-0.*CANCELLED"):
            channel.exchange(Message(Kind.CLOSE_SESSION))
    assert [(d, "transport.idle_timeout_s" in e) for d, e in sim.server.rejected] == [("device-0", True)]


def test_a_step_that_outlasts_the_step_deadline_is_closed_though_frames_keep_coming():
    """A device that keeps its stream busy with frames but never finishes its step (it holds the
    server's half of the step) is closed after step_timeout_s."""
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "placement.labels_on_device=true"))
    with served(sim, idle_timeout_s=1.0, step_timeout_s=1.5) as (_, _address, _tokens, _root):
        channel = sim.channels["device-0"]
        _u_shaped_step_opened(sim, channel)
        start = time.monotonic()
        with pytest.raises(TransportError, match="device-0.*CANCELLED"):
            while time.monotonic() - start < 15:
                channel.exchange(Message(Kind.CLOSE_SESSION))  # not part of the step: it stays open
                time.sleep(0.2)
        assert time.monotonic() - start > 1.0
        _wait_until(lambda: sim.server.sessions["device-0"].step_state is None, timeout_s=5)
    assert [(d, "transport.step_timeout_s" in e) for d, e in sim.server.rejected] == [("device-0", True)]


def test_a_second_stream_of_a_device_replaces_the_first():
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "data.max_length=48"))
    device = sim.devices[0]
    with served(sim, connect=False) as (_, address, tokens, _root):
        with GrpcChannel("device-0", address, token=tokens["device-0"], deadline_s=30) as first:
            device.open_session(first)
            with GrpcChannel("device-0", address, token=tokens["device-0"], deadline_s=30) as second:
                device.open_session(second)
                assert math.isfinite(device.local_phase(1, second).losses[0])
                with pytest.raises(TransportError, match="device-0.*CANCELLED"):
                    first.exchange(Message(Kind.CLOSE_SESSION))
    assert [(d, "replaced" in e) for d, e in sim.server.rejected] == [("device-0", True)]


@pytest.mark.parametrize("batch, seq_len, limit", [(1, 4096, "data.max_length"), (64, 8, "federation.batch_size")])
def test_a_step_larger_than_the_run_allows_is_refused_before_any_compute(batch, seq_len, limit):
    """Issue 12, finding 6: a small valid ACTIVATIONS frame (T = 16384) cost 26 s of server time
    under the server-wide lock; B = 1024 took the server from 0.45 to 3.06 GB. Now B, T and B T
    are checked against the run's batch size and max_length before anything runs."""
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "data.max_length=48"))
    sim.server.limits = StepLimits.from_config(sim.config)
    forwards = []
    hook = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: forwards.append(module))
    try:
        with served(sim):
            channel, device = sim.channels["device-0"], sim.devices[0]
            device.open_session(channel)
            oversized = Message(Kind.ACTIVATIONS, {"hidden": torch.randn(batch, seq_len, 32),
                                                   "labels": torch.zeros(batch, seq_len, dtype=torch.int32)})
            reply = channel.exchange(oversized)
            assert reply.kind == Kind.ERROR and limit in reply.meta["error"]
            assert not forwards  # refused before the server ran any module
            assert math.isfinite(device.local_phase(1, channel).losses[0])  # the next honest step works
            assert forwards
    finally:
        hook.remove()
    assert [d for d, _ in sim.server.rejected] == ["device-0"]


# ------------------------------------------------------------------------ (e) compression


def _activation_frames(mode: str, *, grpc_transport: bool) -> tuple[Simulation, list[bytes]]:
    frames: dict[tuple[str, str], list[bytes]] = defaultdict(list)

    def tap(device_id, direction, frame):
        frames[(device_id, direction)].append(frame)

    sim = Simulation(tiny_config("tiny-llama", *ROUND))
    if grpc_transport:
        with served(sim, compression=mode, tap=tap):
            sim.run_round()
    else:
        sim.channels = {d: InProcessChannel(d, sim.server, tap=tap, compression=mode) for d in sim.device_ids}
        sim.run_round()
    up = [f for f in frames[("device-0", "up")] if decode(f).kind == Kind.ACTIVATIONS]
    return sim, up


def test_int8_activation_frames_are_about_four_times_smaller_and_training_runs():
    plain, plain_frames = _activation_frames("none", grpc_transport=True)
    small, small_frames = _activation_frames("int8", grpc_transport=True)
    assert len(plain_frames) == len(small_frames) == 2
    for big, little in zip(plain_frames, small_frames):
        hidden = decode(big).tensors["hidden"]  # (B, T, d) float32
        packed = decode(little)
        assert packed.tensors["hidden"].dtype == torch.int8
        assert packed.tensors["labels"].dtype == torch.int32  # labels are never compressed
        b, t, d = hidden.shape
        assert tensor_bytes(packed.tensors) == b * t * d + 4 * d + b * t * 4
        # hidden 4 -> 1 byte per value; the int32 labels (1/d of the values) stay as they are
        assert len(big) / len(little) > 3.4
    for d in plain.device_ids:
        a, b = plain.rounds[0].devices[d], small.rounds[0].devices[d]
        # split traffic alone (adapters are exact): the cut gradient shrinks as much as the activations
        assert (a.bytes_up - a.adapter_bytes_up) > 3.4 * (b.bytes_up - b.adapter_bytes_up)
        assert (a.bytes_down - a.adapter_bytes_down) > 3.4 * (b.bytes_down - b.adapter_bytes_down)
        assert all(math.isfinite(x) for x in b.losses)
        assert b.losses == pytest.approx(a.losses, abs=0.05)
    assert not small.rounds[0].rejected


def test_compressed_grpc_round_equals_compressed_in_process_round():
    """Both sides of both channels apply the same codec, so the results match exactly."""
    networked, frames = _activation_frames("int8", grpc_transport=True)
    local, local_frames = _activation_frames("int8", grpc_transport=False)
    assert frames == local_frames
    _assert_same_round(local, networked)


def test_the_server_replies_in_the_mode_each_device_asks_for():
    frames: dict[str, list[bytes]] = defaultdict(list)
    sim = Simulation(tiny_config("tiny-llama", *ROUND))
    with served(sim, connect=False) as (_, address, tokens, _root):
        for d, mode in zip(sim.device_ids, ("int8", "none")):
            sim.channels[d] = GrpcChannel(d, address, token=tokens[d], compression=mode,
                                          tap=lambda device, direction, frame: frames[device].append(frame))
        record = sim.run_round()
        for channel in sim.channels.values():
            channel.close()
    assert not record.rejected
    gradients = {d: [decode(f) for f in frames[d] if decode(f).kind == Kind.CUT_GRADIENT] for d in sim.device_ids}
    assert all(m.tensors["grad"].dtype == torch.int8 for m in gradients["device-0"])
    assert all(m.tensors["grad"].dtype == torch.float32 for m in gradients["device-1"])


def test_in_process_bf16_halves_the_activation_bytes():
    _, plain = _activation_frames("none", grpc_transport=False)
    _, half = _activation_frames("bf16", grpc_transport=False)
    for big, little in zip(plain, half):
        assert decode(little).tensors["hidden"].dtype == torch.bfloat16
        assert tensor_bytes(decode(little).tensors) == tensor_bytes(decode(big).tensors) - decode(big).tensors["hidden"].numel() * 2


def _activations() -> Message:
    hidden = torch.randn(3, 5, 16) * torch.logspace(-3, 2, 16)  # channels of very different ranges
    hidden[..., 4] = 0.0  # an all-zero channel
    return Message(Kind.ACTIVATIONS, {"hidden": hidden, "labels": torch.randint(0, 9, (3, 5), dtype=torch.int32)},
                   meta={"loss": 1.5})


def test_none_is_the_identity_and_frames_are_unchanged():
    message = _activations()
    assert compress(message, "none") is message
    assert decompress(message) is message
    assert encode(compress(message, "none")) == encode(message)


def test_bf16_round_trip_error():
    message = _activations()
    back = decompress(decode(encode(compress(message, "bf16"))))
    assert back.meta == {"loss": 1.5}
    assert back.tensors["hidden"].dtype == torch.float32
    x = message.tensors["hidden"]
    assert bool(((back.tensors["hidden"] - x).abs() <= 2**-8 * x.abs()).all())
    assert torch.equal(back.tensors["labels"], message.tensors["labels"])


def test_int8_round_trip_error_is_at_most_half_a_step_per_channel():
    message = _activations()
    x = message.tensors["hidden"]
    packed = compress(message, "int8")
    assert packed.meta["compression"] == {"hidden": {"mode": "int8", "dtype": "float32"}}
    scale = packed.tensors["hidden" + SCALE_SUFFIX]
    assert scale.shape == (16,) and scale.dtype == torch.float32
    torch.testing.assert_close(scale, x.abs().amax(dim=(0, 1)) / 127)
    assert scale[4] == 0
    back = decompress(decode(encode(packed)))
    assert back.meta == {"loss": 1.5} and set(back.tensors) == {"hidden", "labels"}
    error = (back.tensors["hidden"] - x).abs()  # (3, 5, 16)
    assert bool((error <= scale / 2 * (1 + 1e-5) + 1e-12).all())
    assert bool((back.tensors["hidden"][..., 4] == 0).all())
    q, _ = quantize_int8(x)
    assert int(q.abs().max()) == 127


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_int8_restores_each_tensor_to_its_own_dtype(dtype):
    """int8 works from any float dtype; the receiver gets the sender's dtype back, within half a
    step per channel plus the rounding of that dtype."""
    message = _activations()
    x = message.tensors["hidden"].to(dtype)
    message.tensors["hidden"] = x
    packed = compress(message, "int8")
    assert packed.meta["compression"] == {"hidden": {"mode": "int8", "dtype": str(dtype).removeprefix("torch.")}}
    scale = packed.tensors["hidden" + SCALE_SUFFIX]
    assert scale.dtype == torch.float32
    torch.testing.assert_close(scale, x.abs().amax(dim=(0, 1)).float() / 127)
    back = decompress(decode(encode(packed)))
    assert back.tensors["hidden"].dtype == dtype and back.tensors["labels"].dtype == torch.int32
    restored = back.tensors["hidden"].double()
    rounding = torch.finfo(dtype).eps * restored.abs()
    assert bool(((restored - x.double()).abs() <= scale.double() / 2 * (1 + 1e-5) + rounding + 1e-12).all())


def test_bf16_restores_float64_and_leaves_two_byte_floats_as_they_are():
    message = _activations()
    message.tensors["hidden"] = message.tensors["hidden"].double()
    packed = compress(message, "bf16")
    assert packed.meta["compression"] == {"hidden": {"mode": "bf16", "dtype": "float64"}}
    back = decompress(decode(encode(packed)))
    assert back.tensors["hidden"].dtype == torch.float64
    x = message.tensors["hidden"]
    assert bool(((back.tensors["hidden"] - x).abs() <= 2**-8 * x.abs()).all())
    for dtype in (torch.bfloat16, torch.float16):  # 2 bytes already: bf16 would save nothing
        two_bytes = Message(Kind.ACTIVATIONS, {"hidden": torch.randn(2, 3, 8).to(dtype)})
        assert compress(two_bytes, "bf16") is two_bytes


def test_mixed_dtypes_in_one_message_each_come_back_as_they_were():
    tensors = {"x.f32": torch.randn(2, 8), "x.bf16": torch.randn(2, 8).bfloat16(), "x.f16": torch.randn(2, 8).half()}
    message = Message(Kind.BRANCH_OUTPUTS, tensors)
    for mode in ("bf16", "int8"):
        back = decompress(decode(encode(compress(message, mode))))
        assert {name: value.dtype for name, value in back.tensors.items()} == \
            {name: value.dtype for name, value in tensors.items()}


@pytest.mark.parametrize("kind", [Kind.ADAPTERS, Kind.KILL, Kind.REVIVE, Kind.OPEN_SESSION])
def test_adapter_weights_and_control_messages_are_never_compressed(kind):
    message = Message(kind, {"layer.lora_A": torch.randn(4, 8)})
    assert compress(message, "int8") is message
    assert compress(message, "bf16") is message


def test_unknown_mode_is_refused_early():
    with pytest.raises(ValueError, match="unknown compression 'int4'"):
        compress(_activations(), "int4")
    with pytest.raises(ValueError, match="unknown compression 'gzip'"):
        InProcessChannel("device-0", None, compression="gzip")  # type: ignore[arg-type]


def _corrupt(change) -> Message:
    message = compress(_activations(), "int8")
    change(message)
    return message


def _scheme(mode: str, dtype: object = "float32") -> dict[str, object]:
    return {"mode": mode, "dtype": dtype}


MALFORMED = {
    "unknown mode": (lambda m: m.meta.update(compression={"hidden": _scheme("int4")}), "unknown compression mode 'int4'"),
    "not an object": (lambda m: m.meta.update(compression=["hidden"]), "must be a non-empty object"),
    "entry not an object": (lambda m: m.meta.update(compression={"hidden": "int8"}), "'int8' is not an object of mode"),
    "entry with a stray key": (lambda m: m.meta["compression"]["hidden"].update(scale=2), "is not an object of mode"),
    "unknown dtype": (lambda m: m.meta.update(compression={"hidden": _scheme("int8", "float128")}),
                      "unknown original dtype 'float128'"),
    "integer dtype": (lambda m: m.meta.update(compression={"hidden": _scheme("int8", "int32")}),
                      "unknown original dtype 'int32'"),
    "dtype not a name": (lambda m: m.meta.update(compression={"hidden": _scheme("int8", ["float32"])}),
                         r"unknown original dtype \['float32'\]"),
    "missing tensor": (lambda m: m.meta.update(compression={"hidden": _scheme("int8"), "grad": _scheme("int8")}), "lacks"),
    "missing scale": (lambda m: m.tensors.pop("hidden" + SCALE_SUFFIX), "without its scale tensor"),
    "scale shape": (lambda m: m.tensors.update({"hidden" + SCALE_SUFFIX: torch.ones(15)}), r"shape \(15,\)"),
    "scale dtype": (lambda m: m.tensors.update({"hidden" + SCALE_SUFFIX: torch.ones(16, dtype=torch.float64)}),
                    "dtype torch.float64"),
    "nan scale": (lambda m: m.tensors["hidden" + SCALE_SUFFIX].__setitem__(0, float("nan")), "negative, NaN or Inf"),
    "inf scale": (lambda m: m.tensors["hidden" + SCALE_SUFFIX].__setitem__(0, float("inf")), "negative, NaN or Inf"),
    "negative scale": (lambda m: m.tensors["hidden" + SCALE_SUFFIX].__setitem__(0, -1.0), "negative, NaN or Inf"),
    "payload dtype": (lambda m: m.tensors.update(hidden=m.tensors["hidden"].float()), "has dtype torch.float32"),
    "bf16 dtype": (lambda m: m.meta.update(compression={"hidden": _scheme("bf16")}),
                   "bf16-compressed tensor has dtype torch.int8"),
    "stray scale": (lambda m: m.tensors.update({"labels" + SCALE_SUFFIX: torch.ones(5)}), "belong to no int8"),
    "scale without metadata": (lambda m: m.meta.pop("compression"), "no compression metadata"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_compression_is_a_message_error(case):
    change, problem = MALFORMED[case]
    with pytest.raises(MessageError, match=problem):
        decompress(_corrupt(change))


def test_malformed_compression_from_the_network_is_rejected_by_the_in_process_channel():
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1"))
    channel = InProcessChannel("device-0", sim.server, compression="int8")
    reply = channel.exchange(_corrupt(MALFORMED["missing scale"][0]))
    assert reply.kind == Kind.ERROR and "without its scale tensor" in reply.meta["error"]
