"""Wire encoding: exact sizes, round trips, and a clear rejection of every malformed frame."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitpeft.transport.messages import (
    KIND_PREFIX_BYTES,
    MAGIC,
    PREFIX_BYTES,
    VERSION,
    Kind,
    Message,
    MessageError,
    checksum,
    decode,
    encode,
    header_bytes,
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
        "checksum mismatch": frame[:-3] + bytes([frame[-3] ^ 1]) + frame[-2:],  # one bit of tensor data
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
