"""The in-process channel's fast path: without a tap a message is sized and handed over in memory
instead of encoded and decoded, and nothing a receiver or a report can see changes (byte counts,
tensors, dtypes, metadata, errors); the tensors are shared, not copied, and cut from autograd."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from conftest import tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from message_strategies import messages

from splitpeft.federation.simulation import Simulation
from splitpeft.transport.channel import Tap, Traffic, send_locally
from splitpeft.transport.compression import MODES
from splitpeft.transport.messages import DEFAULT_MAX_MESSAGE_BYTES, Kind, Message


@dataclass
class Wire:
    """The few attributes `send_locally` reads from a channel."""

    tap: Tap | None = None
    compression: str = "none"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    device_id: str = "device-0"
    traffic: Traffic = field(default_factory=Traffic)


def _outcome(wire: Wire, message: Message) -> tuple[object, Traffic]:
    """What the receiver gets (kind, meta, tensors) or the error raised, and what was counted."""
    try:
        received = send_locally(wire, message, "up")
    except Exception as error:
        return (type(error), str(error)), wire.traffic
    tensors = {name: (value.dtype, value.device, value.tolist()) for name, value in received.tensors.items()}
    return (received.kind, received.meta, tensors), wire.traffic


def assert_same_as_on_the_wire(message: Message, **settings_) -> None:
    frames: list[bytes] = []
    fast, fast_traffic = _outcome(Wire(**settings_), message)
    wire, wire_traffic = _outcome(Wire(tap=lambda device, direction, frame: frames.append(frame), **settings_), message)
    assert fast == wire
    assert fast_traffic == wire_traffic
    assert wire_traffic.bytes_up == sum(len(frame) for frame in frames)


@settings(max_examples=300, deadline=None)
@given(message=messages(), mode=st.sampled_from(MODES))
def test_fast_path_receives_and_counts_what_the_wire_does(message, mode):
    assert_same_as_on_the_wire(message, compression=mode)


def _with_bad_value(dtype: torch.dtype, bad: float) -> Message:
    hidden = torch.randn(2, 3, 8).to(dtype)
    hidden[1, 2, 5] = bad
    return Message(Kind.ACTIVATIONS, {"hidden": hidden, "labels": torch.zeros(2, 3, dtype=torch.int32)}, meta={"k": 1})


FAULTY = {
    "nan float32": (_with_bad_value(torch.float32, float("nan")), "none"),
    "inf bfloat16": (_with_bad_value(torch.bfloat16, float("inf")), "none"),
    "nan under bf16": (_with_bad_value(torch.float32, float("nan")), "bf16"),
    "inf under int8": (_with_bad_value(torch.float16, float("-inf")), "int8"),
    "nan in an adapter": (Message(Kind.ADAPTERS, {"q.A": torch.tensor([[float("nan")]])}), "int8"),
    "nan meta": (Message(Kind.CUT_GRADIENT, meta={"loss": float("nan")}), "none"),
    "meta JSON cannot carry": (Message(Kind.CUT_GRADIENT, meta={"ids": {1, 2}}), "none"),
    "meta not an object": (Message(Kind.CUT_GRADIENT, meta=[1, 2]), "none"),  # type: ignore[arg-type]
    "safetensors' own key": (Message(Kind.ACTIVATIONS, {"__metadata__": torch.ones(2)}), "none"),
    "complex tensor": (Message(Kind.ACTIVATIONS, {"z": torch.ones(3, dtype=torch.complex64)}), "int8"),
    "nan float8": (Message(Kind.ACTIVATIONS, {"f": torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)}), "none"),
}


@pytest.mark.parametrize("case", sorted(FAULTY))
def test_fast_path_refuses_what_the_wire_refuses_with_the_same_error(case):
    message, mode = FAULTY[case]
    assert_same_as_on_the_wire(message, compression=mode)


@pytest.mark.parametrize("mode", MODES)
def test_size_limit_is_the_frame_size_on_both_paths(mode):
    message = Message(Kind.ACTIVATIONS, {"hidden": torch.randn(4, 16, 32)})
    frames: list[bytes] = []
    send_locally(Wire(tap=lambda device, direction, frame: frames.append(frame), compression=mode), message, "up")
    for limit in (len(frames[0]), len(frames[0]) - 1):
        assert_same_as_on_the_wire(message, compression=mode, max_message_bytes=limit)
    with pytest.raises(ValueError, match=f"{len(frames[0])} bytes exceeds the limit of {len(frames[0]) - 1} bytes"):
        send_locally(Wire(compression=mode, max_message_bytes=len(frames[0]) - 1), message, "up")


def test_tensors_are_shared_not_copied_and_cut_from_the_senders_graph():
    x = torch.randn(2, 3, 8, requires_grad=True)
    cut = x.exp()  # exp saves its output for backward
    received = send_locally(Wire(), Message(Kind.ACTIVATIONS, {"hidden": cut}, meta={"m": (1, 2)}), "up")
    hidden = received.tensors["hidden"]
    assert hidden.data_ptr() == cut.data_ptr()  # no copy
    assert hidden is not cut and not hidden.requires_grad and hidden.grad_fn is None
    hidden.requires_grad_()  # the receiver makes its own leaf ...
    assert cut.grad_fn is not None and not cut.is_leaf  # ... without touching the sender's tensor
    assert received.meta == {"m": [1, 2]}  # metadata arrives as JSON, as from the wire
    with torch.no_grad():
        hidden.add_(1.0)  # an in-place change is seen by autograd, not silently used
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        cut.sum().backward()


def test_non_contiguous_tensors_arrive_contiguous():
    transposed = torch.randn(8, 3).t()
    received = send_locally(Wire(), Message(Kind.ACTIVATIONS, {"hidden": transposed}), "up").tensors["hidden"]
    assert received.is_contiguous() and torch.equal(received, transposed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("mode", MODES)
def test_gpu_tensors_stay_on_the_gpu_and_count_the_same(mode):
    hidden = torch.randn(2, 16, 32, device="cuda", dtype=torch.bfloat16)
    message = Message(Kind.ACTIVATIONS, {"hidden": hidden, "labels": torch.zeros(2, 16, dtype=torch.int32, device="cuda")})
    fast, audited = Wire(compression=mode), Wire(tap=lambda *frame: None, compression=mode)
    received = send_locally(fast, message, "up")
    on_the_wire = send_locally(audited, message, "up")
    assert fast.traffic == audited.traffic
    assert received.tensors["hidden"].is_cuda and received.tensors["hidden"].dtype == torch.bfloat16
    torch.testing.assert_close(received.tensors["hidden"].cpu(), on_the_wire.tensors["hidden"], rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_a_round_without_a_tap_equals_the_audited_round(mode):
    """Byte and message counts, losses and adapters of a round are the same with or without a tap."""
    rounds = []
    for tap in (None, lambda device, direction, frame: None):
        config = tiny_config("tiny-llama", "federation.num_devices=2", "federation.local_steps=2",
                             f"transport.compression={mode}")
        sim = Simulation(config, tap=tap)
        rounds.append((sim.run_round(), sim))
    (fast, fast_sim), (audited, audited_sim) = rounds
    for device in fast.devices:
        a, b = fast.devices[device], audited.devices[device]
        assert (a.bytes_up, a.bytes_down, a.adapter_bytes_up, a.adapter_bytes_down) == \
            (b.bytes_up, b.bytes_down, b.adapter_bytes_up, b.adapter_bytes_down)
        assert a.losses == b.losses
    assert fast_sim.channels["device-0"].traffic == audited_sim.channels["device-0"].traffic
