"""What one hostile device can no longer do to the server or to the devices it shares a pass with
(second review of the wire, 2026-12-06): every case below was found against the code before it."""

import re
import threading
import time

import pytest
import torch
from conftest import tiny_config

from splitpeft.federation.simulation import Simulation
from splitpeft.parties.window import BatchWindow
from splitpeft.transport.compression import SCALE_SUFFIX, decompress
from splitpeft.transport.messages import Kind, Message, MessageError, decode, encode


def _u_shaped():
    sim = Simulation(tiny_config("tiny-llama", "server.batch_devices=true", "data.max_length=64",
                                 "placement.labels_on_device=true"))
    for device in sim.devices:
        device.open_session(sim.channels[device.device_id])
    return sim, sim.server, sim.server.sessions["device-0"].hidden_size


def _activations(hidden_size, rows=1, tokens=8):
    return Message(Kind.ACTIVATIONS, {"hidden": torch.randn(rows, tokens, hidden_size)})


def _head_gradient(hidden_size):
    return Message(Kind.HEAD_GRADIENT, {"grad": torch.zeros(1, 8, hidden_size)})


@pytest.mark.parametrize("shape", [(1, 0), (0, 8)])
def test_a_step_of_no_rows_or_no_tokens_is_refused_and_the_window_answers_everyone(shape):
    """Found: a (1, 0, d) ACTIVATIONS frame passed the step limits and raised IndexError inside the
    wave, which lost every other entry of the window: an honest device got the attacker's error and
    the attacker's own thread never returned."""
    _, server, h = _u_shaped()
    server.handle_wave([(d, _activations(h)) for d in ("device-0", "device-1")])  # one shared forward
    window = BatchWindow(server, 0.05)
    replies = {}

    def send(device, message):
        replies[device] = window.handle(device, message)

    waiting = threading.Thread(target=send, args=("device-0", _head_gradient(h)), daemon=True)
    waiting.start()
    time.sleep(0.02)  # device-0 waits in the window for device-1's head gradient
    bad = threading.Thread(target=send, args=("device-2", Message(Kind.ACTIVATIONS, {"hidden": torch.randn(*shape, h)})),
                           daemon=True)
    bad.start()
    bad.join(10)
    assert not bad.is_alive() and replies["device-2"].kind == Kind.ERROR
    assert "a step needs at least one row of one token" in replies["device-2"].meta["error"]
    honest = threading.Thread(target=send, args=("device-1", _head_gradient(h)), daemon=True)
    honest.start()
    honest.join(10)
    waiting.join(10)
    assert replies["device-0"].kind == replies["device-1"].kind == Kind.CUT_GRADIENT
    assert [device for device, _ in server.rejected] == ["device-2"]


@pytest.mark.parametrize("leaves_by", ["a new step", "closing", "re-opening"])
def test_a_device_that_leaves_its_shared_forward_no_longer_holds_up_the_others(leaves_by):
    """Found: a U-shaped device that sent anything but its HEAD_GRADIENT after a shared forward
    stayed in that wave, so the others' head gradients were never answered (until their step timed
    out, every step, as often as it liked)."""
    sim, server, h = _u_shaped()
    server.handle_wave([(d, _activations(h)) for d in ("device-0", "device-1")])
    if leaves_by == "a new step":
        assert server.handle_wave([("device-1", _activations(h))])[0].kind == Kind.FINAL_HIDDEN
    elif leaves_by == "closing":
        assert server.handle("device-1", Message(Kind.CLOSE_SESSION)).kind == Kind.SESSION_CLOSED
    else:
        sim.devices[1].open_session(sim.channels["device-1"])
    reply = server.handle_wave([("device-0", _head_gradient(h))])[0]
    assert reply is not None and reply.kind == Kind.CUT_GRADIENT


def test_a_failed_reopen_leaves_the_trained_session_as_it_was():
    """Found: a re-open into another placement closed the old session before the new one was
    checked; refused, it left the device a closed session whose trained adapters were gone."""
    sim = Simulation(tiny_config("tiny-llama", "server.batch_devices=false", "placement.labels_on_device=false"))
    server = sim.server
    assert server.handle("device-1", Message(Kind.OPEN_SESSION, meta={"placement": "split", "split_layer": 2})).kind == Kind.SESSION_READY
    session = server.sessions["device-1"]
    h = session.hidden_size
    step = Message(Kind.ACTIVATIONS, {"hidden": torch.randn(1, 8, h), "labels": torch.randint(0, 100, (1, 8), dtype=torch.int32)})
    assert server.handle("device-1", step).kind == Kind.CUT_GRADIENT
    trained = {name: weights.B.clone() for name, weights in session.adapters().items()}
    refused = server.handle("device-1", Message(Kind.OPEN_SESSION, meta={"placement": "dlora", "split_layer": 0,
                                                                         "ranks": {"nope": 4}}))
    assert refused.kind == Kind.ERROR and "unknown adapted modules" in refused.meta["error"]
    assert server.sessions["device-1"] is session
    assert all(torch.equal(trained[name], weights.B) for name, weights in session.adapters().items())
    assert any(bool(b.abs().sum() > 0) for b in trained.values())


@pytest.mark.parametrize("meta, tensors, error", [
    ({"placement": "split", "split_layer": True}, {}, "split_layer True is out of range"),
    ({"placement": "split", "split_layer": 2, "labels_on_device": "false"}, {}, "labels_on_device must be true or false"),
    ({"placement": "split", "split_layer": 2, "rnaks": {}}, {}, r"unknown options \['rnaks'\]"),
    ({"placement": "split", "split_layer": 2}, {"stray": torch.zeros(3)}, r"tensors \['stray'\]"),
])
def test_an_open_session_with_options_of_the_wrong_type_or_unknown_is_refused(meta, tensors, error):
    """Found: split_layer=true opened at block 1, labels_on_device="false" opened a U-shaped
    session (the opposite of what was asked), and unknown keys and tensors were ignored."""
    server = Simulation(tiny_config("tiny-llama", "server.batch_devices=false")).server
    reply = server.handle("device-0", Message(Kind.OPEN_SESSION, tensors, meta=meta))
    assert reply.kind == Kind.ERROR and re.search(error, reply.meta["error"]), reply.meta
    assert "device-0" not in server.sessions


def _dlora(batched):
    sim = Simulation(tiny_config("tiny-llama", f"server.batch_devices={str(batched).lower()}", "placement.placement=dlora",
                                 "placement.split_layer=0"))
    for device in sim.devices:
        device.open_session(sim.channels[device.device_id])
    return sim, sim.server


def test_a_kill_of_adapters_the_session_cannot_hold_is_refused_before_anything_changes():
    """Found: KILL took any names and shapes, and the step after it failed inside the server
    (in a shared dlora pass, failing the honest devices with it)."""
    sim, server = _dlora(batched=False)
    session = server.sessions["device-1"]
    name = sorted(sim.devices[1].ranks)[0]
    rank = sim.devices[1].ranks[name]
    state = session.step_state
    d_in, d_out = state.in_features[name], state.out_features[name]
    cases = {
        "which this session does not run": {"no.such.module.A": torch.zeros(rank, 8), "no.such.module.B": torch.zeros(8, rank)},
        "expected": {f"{name}.A": torch.zeros(rank, d_in + 1), f"{name}.B": torch.zeros(d_out, rank)},
        "must be floating point": {f"{name}.A": torch.zeros(rank, d_in, dtype=torch.int64),
                                   f"{name}.B": torch.zeros(d_out, rank, dtype=torch.int64)},
    }
    for error, tensors in cases.items():
        reply = server.handle("device-1", Message(Kind.KILL, tensors))
        assert reply.kind == Kind.ERROR and error in reply.meta["error"], reply.meta
        assert not state.killed and name in state.active
    good = {f"{name}.A": torch.zeros(rank, d_in), f"{name}.B": torch.zeros(d_out, rank)}
    assert server.handle("device-1", Message(Kind.KILL, good)).meta["killed"] == [name]


def test_a_revive_that_names_an_adapter_twice_is_refused_whole():
    """Found: REVIVE [x, x] raised a bare KeyError after x was active again but before the
    optimiser was rebuilt."""
    sim, server = _dlora(batched=False)
    state = server.sessions["device-1"].step_state
    name = sorted(sim.devices[1].ranks)[0]
    rank = sim.devices[1].ranks[name]
    server.handle("device-1", Message(Kind.KILL, {f"{name}.A": torch.zeros(rank, state.in_features[name]),
                                                  f"{name}.B": torch.zeros(state.out_features[name], rank)}))
    reply = server.handle("device-1", Message(Kind.REVIVE, meta={"modules": [name, name]}))
    assert reply.kind == Kind.ERROR and "names an adapter twice" in reply.meta["error"]


def test_compressed_values_that_restore_to_inf_are_refused_naming_the_tensor():
    """Found: finite wire values can restore to Inf (an int8 value times a scale of 3e38, a bf16
    value of 1e30 restored to float16), after decoding's NaN/Inf check: a dlora server computed
    with them and answered STEP_DONE."""
    int8 = Message(Kind.BRANCH_OUTPUTS, {"out": torch.full((1, 2, 4), 127, dtype=torch.int8),
                                         "out" + SCALE_SUFFIX: torch.full((4,), 3e38)},
                   meta={"compression": {"out": {"mode": "int8", "dtype": "float32"}}})
    with pytest.raises(MessageError, match="BRANCH_OUTPUTS.out: restores to NaN or Inf"):
        decompress(decode(encode(int8)))
    bf16 = Message(Kind.HEAD_GRADIENT, {"grad": torch.full((1, 2, 4), 1e30, dtype=torch.bfloat16)},
                   meta={"compression": {"grad": {"mode": "bf16", "dtype": "float16"}}})
    with pytest.raises(MessageError, match="HEAD_GRADIENT.grad: restores to NaN or Inf"):
        decompress(decode(encode(bf16)))
