"""Wire encoding: exact sizes, round trips, and a clear rejection of every malformed frame."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitpeft.messages import (
    PREFIX_BYTES, Kind, Message, MessageError, decode, encode, header_bytes, tensor_bytes,
)


def _message() -> Message:
    return Message(
        Kind.ACTIVATIONS,
        {"hidden": torch.randn(2, 5, 8), "labels": torch.tensor([[1, -100, 3, 4, 5]] * 2, dtype=torch.int32)},
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


def test_non_finite_scalars_cannot_be_sent():
    with pytest.raises(ValueError):
        encode(Message(Kind.CUT_GRADIENT, meta={"loss": float("nan")}))


def test_malformed_frames_each_get_a_named_error():
    frame = encode(_message())
    cases = {
        "truncated": frame[:-7],
        "shorter than any frame": frame[:9],
        "bad magic": b"XXXX" + frame[4:],
        "unsupported message version": frame[:4] + bytes([99]) + frame[5:],
        "unknown message kind": frame[:5] + bytes([200]) + frame[6:],
    }
    for expected, data in cases.items():
        with pytest.raises(MessageError, match=expected if expected != "truncated" else "garbled|truncated"):
            decode(data)
    with pytest.raises(MessageError, match="exceeds the limit of 100 bytes"):
        decode(frame, max_bytes=100)


def test_error_reply_surfaces_the_peer_text():
    reply = decode(encode(Message(Kind.ERROR, meta={"error": "split_layer out of range"})))
    with pytest.raises(MessageError, match="peer reported an error: split_layer out of range"):
        reply.expect(Kind.CUT_GRADIENT)


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 400), st.binary(max_size=8))
def test_fuzz_decoder_never_crashes(noise, cut, patch):
    """Random bytes, and valid frames cut and patched anywhere: decoded cleanly or rejected."""
    frame = encode(_message())
    mutated = frame[:cut] + patch + frame[cut + len(patch):]
    for data in (noise, b"SPFT\x01\x03" + noise, mutated, frame[:cut]):
        try:
            message = decode(data)
        except MessageError:
            continue
        assert isinstance(message, Message)
