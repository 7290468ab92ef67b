"""Wire encoding: exact sizes, round trips, and a clear rejection of every malformed frame."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from message_strategies import DTYPES, messages, random_tensor

from splitpeft.transport.compression import MODES, compress
from splitpeft.transport.messages import (
    KIND_PREFIX_BYTES,
    MAGIC,
    PREFIX_BYTES,
    VERSION,
    Kind,
    Message,
    MessageError,
    all_finite,
    checksum,
    decode,
    encode,
    encoded_size,
    frame_size,
    header_bytes,
    loss_tensor,
    safetensors_header,
    tensor_bytes,
)


def _message() -> Message:
    return Message(
        Kind.ACTIVATIONS,
        {"hidden": torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)), "labels": torch.tensor([[1, -100, 3, 4, 5]] * 2, dtype=torch.int32)},
        meta={"step": 3, "loss": 1.5},
    )


def test_round_trip_keeps_tensors_and_meta():
    message = _message()
    back = decode(encode(message))
    assert back.kind == Kind.ACTIVATIONS
    assert back.meta == {"step": 3, "loss": 1.5}
    for name, value in message.tensors.items():
        assert torch.equal(back.tensors[name], value)
        assert back.tensors[name].dtype == value.dtype


def test_size_is_tensor_bytes_plus_header():
    message = _message()
    frame = encode(message)
    assert tensor_bytes(message.tensors) == 2 * 5 * 8 * 4 + 2 * 5 * 4
    assert len(frame) == tensor_bytes(message.tensors) + header_bytes(frame)
    header = json.loads(frame[PREFIX_BYTES + 8:header_bytes(frame)])
    assert header["hidden"]["shape"] == [2, 5, 8]


def test_expected_shape_and_dtype_are_enforced():
    back = decode(encode(_message()))
    assert back.tensor("hidden", shape=(None, None, 8), dtype=torch.float32).shape == (2, 5, 8)
    with pytest.raises(MessageError, match=r"shape \(2, 5, 8\), expected \(\*, \*, 16\)"):
        back.tensor("hidden", shape=(None, None, 16))
    with pytest.raises(MessageError, match="dtype torch.int32, expected torch.int64"):
        back.tensor("labels", dtype=torch.int64)
    with pytest.raises(MessageError, match="lacks tensor 'grad'"):
        back.tensor("grad")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensors_are_rejected(bad):
    hidden = torch.zeros(1, 2, 3)
    hidden[0, 1, 2] = bad
    with pytest.raises(MessageError, match="ACTIVATIONS.hidden contains NaN or Inf"):
        decode(encode(Message(Kind.ACTIVATIONS, {"hidden": hidden})))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_every_nan_and_inf_is_found_wherever_it_is(dtype):
    """The min/max shortcut of `all_finite` against an independent elementwise reference."""
    assert all_finite(torch.randn(4, 5).to(dtype)) and all_finite(torch.empty(0, 3, dtype=dtype))
    assert all_finite(torch.tensor(2.0).to(dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        if dtype == torch.float8_e4m3fn and math.isinf(bad):
            continue  # e4m3fn has no Inf (it saturates to NaN)
        for position in range(20):
            value = torch.randn(4, 5)
            value.view(-1)[position] = bad
            value = value.to(dtype)
            assert not bool(torch.isfinite(value.float()).all())
            assert not all_finite(value), (bad, position)
        assert not all_finite(torch.tensor(bad).to(dtype))


def test_non_finite_scalars_cannot_be_sent():
    with pytest.raises(ValueError):
        encode(Message(Kind.CUT_GRADIENT, meta={"loss": float("nan")}))


def test_a_losss_frame_is_as_long_whatever_its_value():
    """The loss rides as a () float32 tensor: frames of losses that differ in the last bit (a batched
    pass over other devices' rows gives such) have one length, so byte counts are reproducible."""
    grad = torch.zeros(2, 3, 4)
    sizes = {len(encode(Message(Kind.CUT_GRADIENT, {"grad": grad, "loss": loss_tensor(value)})))
             for value in (0.0, 2.5, 3.4567891234, 10.000001, 1e-30, 123456.7)}
    assert len(sizes) == 1
    back = decode(encode(Message(Kind.CUT_GRADIENT, {"grad": grad, "loss": loss_tensor(3.25)})))
    assert float(back.tensor("loss", shape=(), dtype=torch.float32)) == 3.25
    for bad in (float("nan"), float("inf")):
        with pytest.raises(MessageError, match="non-finite loss"):
            loss_tensor(bad)


def test_malformed_frames_each_get_a_named_error():
    frame = encode(_message())
    cases = {
        "truncated": frame[:-7],
        "shorter than any frame": frame[:9],
        "bad magic": b"XXXX" + frame[4:],
        "unsupported message version": frame[:4] + bytes([99]) + frame[5:],
        "unknown message kind": frame[:5] + bytes([200]) + frame[6:],
        "checksum mismatch": frame[:-3] + bytes([frame[-3] ^ 1]) + frame[-2:],  # one bit of tensor data
    }
    for expected, data in cases.items():
        with pytest.raises(MessageError, match=expected if expected != "truncated" else "garbled|truncated"):
            decode(data)
    with pytest.raises(MessageError, match="exceeds the limit of 100 bytes"):
        decode(frame, max_bytes=100)


def test_tensor_moves_to_the_asked_device_without_a_copy_where_it_is():
    message = _message()
    hidden = message.tensors["hidden"]
    for device in ("cpu", torch.device("cpu")):
        same = message.tensor("hidden", device=device)
        assert same.data_ptr() == hidden.data_ptr() and same is not hidden  # shared data, its own object
    moved = message.tensor("hidden", shape=(2, 5, 8), dtype=torch.float32, device="meta")
    assert moved.device.type == "meta" and moved.shape == hidden.shape
    with pytest.raises(MessageError, match="expected torch.int64"):
        message.tensor("labels", dtype=torch.int64, device="meta")  # checked before it moves


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tensor_moves_to_cuda():
    moved = _message().tensor("hidden", device="cuda")
    assert moved.is_cuda
    assert _message().tensor("hidden", device="cuda") is not moved
    assert Message(Kind.ACTIVATIONS, {"hidden": moved}).tensor("hidden", device="cuda") is moved


def test_error_reply_surfaces_the_peer_text():
    reply = decode(encode(Message(Kind.ERROR, meta={"error": "split_layer out of range"})))
    with pytest.raises(MessageError, match="peer reported an error: split_layer out of range"):
        reply.expect(Kind.CUT_GRADIENT)


FRAME = encode(_message())
SAMPLES = {"noise": st.binary(max_size=600), "cut": st.integers(0, len(FRAME) + 8), "patch": st.binary(max_size=8)}


def reseal(data: bytes) -> bytes:
    """``data`` with its checksum recomputed: damage a sender made on purpose."""
    prefix, blob = data[:KIND_PREFIX_BYTES], data[PREFIX_BYTES:]
    return prefix + checksum(prefix, blob) + blob


@settings(max_examples=1500, deadline=None)
@given(**SAMPLES)
def test_fuzz_every_damaged_frame_is_rejected(noise, cut, patch):
    """Random bytes, random bytes behind a valid prefix, and a valid frame overwritten or cut
    anywhere: all but the intact frame are rejected with a MessageError."""
    mutated = FRAME[:cut] + patch + FRAME[cut + len(patch):]
    for data in (noise, MAGIC + bytes([VERSION, Kind.ACTIVATIONS]) + noise, mutated, FRAME[:cut]):
        if data == FRAME:
            assert decode(data).tensors.keys() == {"hidden", "labels"}
            continue
        with pytest.raises(MessageError):
            decode(data)


@settings(max_examples=1500, deadline=None)
@given(**SAMPLES)
def test_fuzz_crafted_frames_with_valid_checksums_are_rejected_or_sound(noise, cut, patch):
    """A sender that checksums garbage still meets the header, offset and value checks: every
    frame is either refused with a MessageError or a sound message (finite tensors, dict meta)."""
    mutated = FRAME[:cut] + patch + FRAME[cut + len(patch):]
    prefix = MAGIC + bytes([VERSION, Kind.ACTIVATIONS])
    for data in (reseal(prefix + bytes(4) + noise), reseal(mutated), reseal(FRAME[:cut])):
        try:
            message = decode(data)
        except MessageError:
            continue
        assert isinstance(message.meta, dict)
        assert all(torch.isfinite(t).all() for t in message.tensors.values() if t.is_floating_point())


# ------------------------------------------------------------------ sizes without encoding

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", list(Kind), ids=lambda kind: kind.name)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_encoded_size_is_the_frame_length(kind, mode, data):
    """For every kind and compression mode, the header rebuilt from names, dtypes and shapes is
    byte for byte the one safetensors writes, so the computed size is the frame's length."""
    packed = compress(data.draw(messages(kind)), mode)
    frame = encode(packed)
    assert safetensors_header(packed) == frame[PREFIX_BYTES + 8:header_bytes(frame)]
    assert frame_size(packed) == encoded_size(packed) == len(frame)


def test_encoded_size_of_many_tensors_with_names_of_every_length():
    named = {"é\"\\\n\x01" * (i % 7) + f"t{i}" * (i % 13): random_tensor((i % 5, 3), DTYPES[i % len(DTYPES)], i)
             for i in range(300)}
    message = compress(Message(Kind.BRANCH_OUTPUTS, named, meta={"modules": list(named), "ünï": "\u2028"}), "int8")
    assert frame_size(message) == len(encode(message))
    assert frame_size(Message(Kind.STEP_DONE)) == len(encode(Message(Kind.STEP_DONE)))


def test_encoded_size_does_not_read_tensor_data():
    """Sizes come from shapes alone: a tensor with no data (device "meta") is sized like its twin."""
    real = Message(Kind.ACTIVATIONS, {"hidden": torch.randn(2, 3, 4, dtype=torch.bfloat16)}, meta={"loss": 1.0})
    ghost = Message(Kind.ACTIVATIONS, {"hidden": torch.empty(2, 3, 4, dtype=torch.bfloat16, device="meta")},
                    meta={"loss": 1.0})
    assert encoded_size(ghost) == len(encode(real))


CORNERS = {
    "complex": {"z": torch.ones(3, dtype=torch.complex64), "x": torch.ones(2)},
    "uint16": {"u": torch.ones(3, dtype=torch.uint16)},
    "float8": {"f": torch.ones(4).to(torch.float8_e4m3fn)},
    "safetensors' own key": {"__metadata__": torch.ones(2), "x": torch.ones(3)},
}


@pytest.mark.parametrize("corner", sorted(CORNERS))
def test_corners_outside_the_formula_are_sized_by_encoding(corner):
    message = Message(Kind.ACTIVATIONS, CORNERS[corner], meta={"step": 1})
    assert frame_size(message) is None
    assert encoded_size(message) == len(encode(message))


def test_what_encode_refuses_encoded_size_refuses_alike():
    for meta, error in (({"loss": float("nan")}, ValueError), ({"ids": {1, 2}}, TypeError)):
        with pytest.raises(error):
            encode(Message(Kind.CUT_GRADIENT, meta=meta))
        with pytest.raises(error):
            encoded_size(Message(Kind.CUT_GRADIENT, meta=meta))
    surrogate = Message(Kind.ACTIVATIONS, {"\ud800": torch.ones(2)})  # a name with no UTF-8
    assert frame_size(surrogate) is None
    with pytest.raises(UnicodeEncodeError):
        encode(surrogate)
    with pytest.raises(UnicodeEncodeError):
        encoded_size(surrogate)


def test_a_receiver_never_changes_the_tensor_its_sender_holds():
    # The server marks received hidden states as requiring grad and accumulates their gradient; a
    # sender that keeps (or re-sends) the same tensor object must not see either.
    sent = torch.randn(2, 3, 4)
    message = Message(Kind.ACTIVATIONS, {"hidden": sent})
    received = message.tensor("hidden", shape=(None, None, 4), dtype=torch.float32, device="cpu").requires_grad_()
    (received * 2).sum().backward()
    assert received.grad is not None
    assert not sent.requires_grad and sent.grad is None
    assert received.data_ptr() == sent.data_ptr()  # no copy where none was needed


def test_a_server_step_leaves_the_senders_activations_as_they_were():
    from conftest import tiny_config

    from splitpeft.federation.simulation import Simulation

    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "placement.labels_on_device=false",
                                 "server.batch_devices=false"))
    device = sim.devices[0]
    device.open_session(sim.channels[device.device_id])
    hidden = torch.randn(1, 8, sim.backbone.model.config.hidden_size)
    message = Message(Kind.ACTIVATIONS, {"hidden": hidden, "labels": torch.ones(1, 8, dtype=torch.int32)})
    first = sim.server.handle(device.device_id, message).tensors["grad"].clone()
    assert not hidden.requires_grad and hidden.grad is None
    again = sim.server.handle(device.device_id, message).tensors["grad"]  # the same frame re-sent
    assert torch.isfinite(again).all() and again.shape == first.shape
