"""Byte counts are real encoded sizes, and the wire carries no input token ids."""

from collections import defaultdict

import pytest
import torch
from conftest import tiny_config

from splitpeft.data.batching import BatchStream
from splitpeft.federation.simulation import Simulation
from splitpeft.transport.messages import Kind, decode, header_bytes, tensor_bytes


def _captured_run(*overrides: str):
    frames = defaultdict(list)

    def tap(device_id, direction, frame):
        frames[(device_id, direction)].append(frame)

    sim = Simulation(tiny_config("tiny-llama", *overrides), tap=tap)
    sim.run_round()
    return sim, frames


@pytest.mark.parametrize("labels_on_device", [False, True])
def test_report_bytes_equal_encoded_message_sizes(labels_on_device):
    sim, frames = _captured_run(f"placement.labels_on_device={str(labels_on_device).lower()}")
    record = sim.rounds[0]
    for device_id, stats in record.devices.items():
        up, down = frames[(device_id, "up")], frames[(device_id, "down")]
        assert stats.bytes_up == sum(len(f) for f in up)
        assert stats.bytes_down == sum(len(f) for f in down)
        for frame in up + down:
            assert len(frame) == tensor_bytes(decode(frame).tensors) + header_bytes(frame)
        # per step: activations (B, T, d) float32 up; in U-shape also the head gradient
        steps = [decode(f) for f in up if decode(f).kind == Kind.ACTIVATIONS]
        assert len(steps) == sim.config.federation.local_steps
        hidden = steps[0].tensors["hidden"]
        assert hidden.shape[-1] == 32 and hidden.dtype == torch.float32
        adapters_up = [decode(f) for f in up if decode(f).kind == Kind.ADAPTERS]
        assert stats.adapter_bytes_up == sum(len(f) for f in up if decode(f).kind == Kind.ADAPTERS)
        assert tensor_bytes(adapters_up[0].tensors) == _device_adapter_bytes(blocks=2, rank=4)


def _device_adapter_bytes(blocks: int, rank: int) -> int:
    """float32 A (r, d_in) + B (d_out, r) of tiny-llama's 7 linears per block."""
    shapes = {"q": (32, 32), "k": (32, 16), "v": (32, 16), "o": (32, 32), "gate": (32, 64), "up": (32, 64), "down": (64, 32)}
    return blocks * sum(rank * (d_in + d_out) * 4 for d_in, d_out in shapes.values())


@pytest.mark.parametrize("labels_on_device", [False, True])
def test_no_input_token_ids_leave_the_device(labels_on_device):
    sim, frames = _captured_run(f"placement.labels_on_device={str(labels_on_device).lower()}")
    for (_device_id, direction), sent in frames.items():
        for frame in sent:
            message = decode(frame)
            assert "input_ids" not in message.tensors
            for name, tensor in message.tensors.items():
                if tensor.is_floating_point():
                    continue
                # The only integer tensor ever sent: plain split's labels, completion tokens only.
                assert not labels_on_device, f"{message.kind.name}.{name} sent with labels_on_device"
                assert message.kind == Kind.ACTIVATIONS and name == "labels" and direction == "up"
                assert tensor.dtype == torch.int32
    if not labels_on_device:
        # What left is exactly the device's labels: prompt and padding masked to -100, so only the
        # completion the server must score is revealed.
        device = sim.devices[0]
        replay = BatchStream(device.data.items, sim.config.federation.batch_size, sim.pad_id, sim.config.seed)
        sent = [decode(f).tensors["labels"] for f in frames[("device-0", "up")] if decode(f).kind == Kind.ACTIVATIONS]
        for labels in sent:
            batch = replay.next()
            assert torch.equal(labels.long(), batch.labels)
            prompt_positions = batch.labels == -100
            assert bool(prompt_positions.any())
            assert bool((labels[prompt_positions] == -100).all())


def test_cached_flop_counts_equal_counting_every_step():
    """FLOPs reused for a batch shape already seen equal a fresh count of every step."""
    counted = []
    for reuse in (True, False):
        sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "federation.local_steps=6",
                                     "federation.batch_size=1", "data.max_length=24"))
        device = sim.devices[0]
        if not reuse:
            original = device.meter.begin_step
            device.meter.begin_step = lambda resident, key=None, extra_bytes=0, original=original: original(resident, None, extra_bytes)
        sim.run_round()
        counted.append(sim.rounds[0].devices["device-0"].flops)
    assert counted[0] == counted[1] > 0


def test_device_flops_include_attention():
    """FlopCounterMode has no CPU formula for sdpa; ours adds it, so attention is not free."""
    import torch.nn.functional as F

    from splitpeft.model.usage import DeviceMeter

    meter = DeviceMeter()
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    meter.begin_step([])
    with meter.compute():
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    meter.end_step()
    assert meter.flops >= 2 * (2 * 16 * 16 * 8)  # QK^T and AV, forward only


def test_int8_compression_from_config_shrinks_activation_frames():
    plain, plain_frames = _captured_run()
    small, small_frames = _captured_run("transport.compression=int8")

    def size(frames):
        return sum(len(f) for f in frames[("device-0", "up")] if decode(f).kind == Kind.ACTIVATIONS)

    assert size(small_frames) < 0.4 * size(plain_frames)
    assert small.rounds[0].devices["device-0"].losses[0] == pytest.approx(plain.rounds[0].devices["device-0"].losses[0], rel=1e-2)
