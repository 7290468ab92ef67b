"""splitpeft frames inside Flower records: a frame travels as one uint8 Array (the same bytes
and the same validation as every other channel); a device's round statistics as JSON."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord

from splitpeft.federation.records import (
    DeviceRound,
)
from splitpeft.transport.messages import Message, MessageError, decode

FRAME = "frame"


# ------------------------------------------------------------------------------------ frames in Flower records


def frame_array(frame: bytes) -> Array:
    return Array(np.frombuffer(frame, dtype=np.uint8))


def frame_of(record: ArrayRecord, max_bytes: int) -> Message:
    """The splitpeft message inside a Flower array record, validated like any frame."""
    if FRAME not in record:
        raise MessageError("the record carries no frame")
    array = record[FRAME]
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise MessageError(f"a frame must be a flat uint8 array, not {array.dtype}{list(array.shape)}")
    return decode(array.numpy().tobytes(), max_bytes=max_bytes)


_ROUND_FIELDS = {f.name: f for f in dataclasses.fields(DeviceRound)}


def round_stats_from_json(text: str) -> DeviceRound:
    """A device's reported round statistics, checked field by field (they come from the wire)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise MessageError(f"round statistics are not JSON: {error}") from None
    if not isinstance(raw, dict):
        raise MessageError("round statistics must be a JSON object")
    unknown = sorted(set(raw) - set(_ROUND_FIELDS))
    if unknown:
        raise MessageError(f"unknown round statistics {unknown}")
    numbers = ("bytes_up", "bytes_down", "adapter_bytes_up", "adapter_bytes_down", "flops", "adapter_flops",
               "peak_memory_bytes", "tokens", "steps", "train_loss", "wall_s")
    for name in numbers:
        if name in raw and (isinstance(raw[name], bool) or not isinstance(raw[name], (int, float))):
            raise MessageError(f"round statistic {name!r} must be a number")
        # JSON's NaN and Infinity parse to floats; train_loss may be NaN (a round without steps)
        if name in raw and name != "train_loss" and not math.isfinite(raw[name]):
            raise MessageError(f"round statistic {name!r} must be finite, not {raw[name]}")
    # The device's word: aggregation weighs the tokens the server counted, bounded by this claim.
    if "tokens" in raw and (not isinstance(raw["tokens"], int) or raw["tokens"] < 0):
        raise MessageError(f"round statistic 'tokens' must be a non-negative integer, not {raw['tokens']!r}")
    return DeviceRound(**raw)
