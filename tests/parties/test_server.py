"""The server's dispatch (parties/server.py) and the device meter (model/usage.py): a bad message
gets a named ERROR and drops only that device's half-done step; placements are reached only
through their interface; a dropped device's partial round counts for nothing."""

import torch
from conftest import tiny_config

from splitpeft.federation.simulation import Simulation
from splitpeft.model.usage import DeviceMeter, storage_bytes, tensor_nbytes
from splitpeft.parties.server import StepLimits
from splitpeft.transport.messages import Kind, Message, Meta


def _sim(*overrides: str) -> Simulation:
    return Simulation(tiny_config("tiny-llama", "federation.num_devices=2", "federation.local_steps=1",
                                  "data.max_length=48", *overrides))


def _open(sim: Simulation, device_id: str, **meta) -> Message:
    fields = {Meta.PLACEMENT: sim.placement.name, Meta.SPLIT_LAYER: 2, Meta.LABELS_ON_DEVICE: False, **meta}
    return sim.server.handle(device_id, Message(Kind.OPEN_SESSION, meta=fields))


def test_messages_without_a_session_or_out_of_range_are_refused_by_name():
    sim = _sim()
    reply = sim.server.handle("device-0", Message(Kind.ACTIVATIONS, {"hidden": torch.zeros(1, 4, 32)}))
    assert reply.kind == Kind.ERROR and "has no open session" in reply.meta[Meta.ERROR]
    reply = _open(sim, "device-0", **{Meta.SPLIT_LAYER: 99})
    assert reply.kind == Kind.ERROR and "split_layer 99 is out of range" in reply.meta[Meta.ERROR]
    reply = _open(sim, "device-0", **{Meta.PLACEMENT: "teleport"})
    assert reply.kind == Kind.ERROR and "unknown placement 'teleport'" in reply.meta[Meta.ERROR]
    assert [device for device, _ in sim.server.rejected] == ["device-0"] * 3


def test_a_bad_step_resets_only_its_device_and_the_others_keep_training():
    """U-shaped: device-0 sends ACTIVATIONS (the server keeps its step state) and then garbage;
    its step state is dropped through the placement's `abort`, device-1's step is untouched."""
    sim = _sim("placement.labels_on_device=true")
    for device_id in ("device-0", "device-1"):
        assert _open(sim, device_id, **{Meta.LABELS_ON_DEVICE: True}).kind == Kind.SESSION_READY
        hidden = torch.randn(2, 5, 32)
        assert sim.server.handle(device_id, Message(Kind.ACTIVATIONS, {"hidden": hidden})).kind == Kind.FINAL_HIDDEN
    wrong = Message(Kind.HEAD_GRADIENT, {"grad": torch.zeros(2, 7, 32)})  # the wrong shape
    reply = sim.server.handle("device-0", wrong)
    assert reply.kind == Kind.ERROR and "grad" in reply.meta[Meta.ERROR]
    assert sim.server.sessions["device-0"].step_state is None
    assert sim.server.sessions["device-1"].step_state is not None
    reply = sim.server.handle("device-1", Message(Kind.HEAD_GRADIENT, {"grad": torch.zeros(2, 5, 32)}))
    assert reply.kind == Kind.CUT_GRADIENT and tuple(reply.tensors["grad"].shape) == (2, 5, 32)


def test_dlora_session_refuses_modules_the_model_does_not_have():
    sim = _sim("placement.placement=dlora")
    reply = _open(sim, "device-0", **{Meta.RANKS: {"model.layers.0.nonexistent": 4}})
    assert reply.kind == Kind.ERROR and "unknown adapted modules" in reply.meta[Meta.ERROR]
    reply = _open(sim, "device-0", **{Meta.RANKS: {"model.layers.0.self_attn.q_proj": 10**6}})
    assert reply.kind == Kind.ERROR and "ranks must be integers in 1..4096" in reply.meta[Meta.ERROR]


def test_session_tokens_are_counted_by_the_server_from_the_labels():
    sim = _sim()
    record = sim.run_round()
    for device_id, stats in record.devices.items():
        assert sim.server.sessions[device_id].tokens == stats.tokens > 0


def test_storage_bytes_count_shared_storage_once():
    weight = torch.zeros(4, 8)
    total, pointers = storage_bytes([weight, weight[:2], weight.T, torch.zeros(3)])
    assert total == 4 * 8 * 4 + 3 * 4 and len(pointers) == 2
    assert storage_bytes([weight, torch.ones(2)], exclude={weight.untyped_storage().data_ptr()})[0] == 8
    assert tensor_nbytes([weight, weight]) == 128


def test_meter_take_round_returns_and_resets_every_count():
    meter = DeviceMeter(count_flops=True)
    x = torch.randn(8, 16)
    meter.begin_step([x])
    with meter.compute():
        y = x @ torch.randn(16, 4)
    with meter.compute(adapters=True):
        y @ torch.randn(4, 2)
    meter.end_step()
    flops, adapter_flops, peak = meter.take_round()
    assert flops == 2 * 8 * 16 * 4 + 2 * 8 * 4 * 2 and adapter_flops == 2 * 8 * 4 * 2 and peak >= x.nbytes
    assert meter.take_round() == (0, 0, 0)


def test_step_limits_name_the_limit_a_step_exceeds_and_the_server_keeps_serving():
    """Issue 12, finding 6, at the dispatch: B, T and B T are each bounded (here T alone would
    pass a B T budget that B = 4, T = 8 already fills); a refused step resets nothing else."""
    sim = _sim()
    sim.server.limits = StepLimits(max_batch=4, max_seq_len=16, max_tokens=32)
    assert _open(sim, "device-0").kind == Kind.SESSION_READY
    cases = {(5, 4): "batch 5 exceeds the server's limit of 4 (federation.batch_size)",
             (1, 17): "sequence length 17 exceeds the server's limit of 16 (data.max_length)",
             (4, 9): "36 tokens exceed the server's limit of 32 per step"}
    for (batch, seq_len), problem in cases.items():
        message = Message(Kind.ACTIVATIONS, {"hidden": torch.randn(batch, seq_len, 32),
                                             "labels": torch.zeros(batch, seq_len, dtype=torch.int32)})
        reply = sim.server.handle("device-0", message)
        assert reply.kind == Kind.ERROR and problem in reply.meta[Meta.ERROR]
    fits = Message(Kind.ACTIVATIONS, {"hidden": torch.randn(4, 8, 32), "labels": torch.zeros(4, 8, dtype=torch.int32)})
    assert sim.server.handle("device-0", fits).kind == Kind.CUT_GRADIENT
    assert StepLimits.from_config(sim.config) == StepLimits(max_batch=4, max_seq_len=48, max_tokens=4 * 48)
