"""Placement equivalence: split at every k (plain and U-shaped) and centralized compute the same
loss, the same adapter gradients, and the same adapters after several optimiser steps."""

import pytest
import torch
from conftest import tiny_config

from splitpeft.federation.simulation import Simulation
from splitpeft.model.adapters import LoraWeights

MODELS = ["tiny-llama", "tiny-gpt2"]
NUM_BLOCKS = 4
RTOL = 1e-5


def _simulation(model: str, placement: str, split_layer: int = 0, labels_on_device: bool = False,
                *overrides: str) -> Simulation:
    config = tiny_config(
        model, "federation.num_devices=1", f"placement.placement={placement}",
        f"placement.split_layer={split_layer}", f"placement.labels_on_device={str(labels_on_device).lower()}",
        "federation.local_steps=4", *overrides,
    )
    sim = Simulation(config)
    # peft starts B at zero, which makes every dL/dA zero; random B makes the gradient check bite.
    generator = torch.Generator().manual_seed(1)
    for name, weights in sim.state.global_adapters.items():
        sim.state.global_adapters[name] = LoraWeights(weights.A, 0.1 * torch.randn(weights.B.shape, generator=generator))
    return sim


def _first_step(sim: Simulation) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and every adapter gradient (device and server parties) of the first training step."""
    grads: dict[str, torch.Tensor] = {}
    parties = list(sim.devices)
    device = sim.devices[0]
    channel = sim.channels[device.device_id]
    device.load(sim.state.global_adapters)
    device.open_session(channel)
    parties += list(sim.server.sessions.values())
    for party in parties:
        original = party.optimizer_step

        def capture(*args, party=party, original=original, **kwargs):
            for name, param in party.model.named_parameters():
                if param.grad is not None:
                    grads[name] = param.grad.detach().clone()
            return original(*args, **kwargs)

        party.optimizer_step = capture
    batch = device.data.next()
    loss = sim.placement.device_step(device, batch, channel)
    for party in parties:
        del party.optimizer_step
    return loss, grads


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=RTOL, atol=1e-6 * float(b.abs().max().clamp(min=1e-12)))


CASES = [(m, k, u) for m in MODELS for k in range(NUM_BLOCKS + 1) for u in (False, True)]


@pytest.mark.parametrize("model,split_layer,labels_on_device", CASES)
def test_split_matches_centralized_loss_and_gradients(model, split_layer, labels_on_device):
    ref_loss, ref_grads = _first_step(_simulation(model, "centralized"))
    loss, grads = _first_step(_simulation(model, "split", split_layer, labels_on_device))
    assert loss == pytest.approx(ref_loss, rel=RTOL)
    assert grads.keys() == ref_grads.keys()
    assert len(grads) == 2 * 4 * (7 if model == "tiny-llama" else 4)
    for name in ref_grads:
        assert _close(grads[name], ref_grads[name]), name
    assert any(float(g.abs().max()) > 0 for n, g in grads.items() if "lora_A" in n)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("split_layer,labels_on_device", [(1, False), (2, True), (3, False)])
def test_split_matches_centralized_after_several_steps(model, split_layer, labels_on_device):
    reference = _simulation(model, "centralized")
    split = _simulation(model, "split", split_layer, labels_on_device)
    reference.run_round()
    record = split.run_round()
    assert record.devices["device-0"].steps == 4
    for name, weights in reference.state.global_adapters.items():
        other = split.state.global_adapters[name]
        assert _close(other.A, weights.A), name
        assert _close(other.B, weights.B), name
    ref_losses = reference.rounds[0].devices["device-0"].losses
    assert split.rounds[0].devices["device-0"].losses == pytest.approx(ref_losses, rel=RTOL)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("hybrid", [0, 1, 3])
def test_dlora_matches_centralized_loss_gradients_and_steps(model, hybrid):
    """DLoRA as published (0), and its hybrid keeping blocks [0, k) on the device."""
    ref_loss, ref_grads = _first_step(_simulation(model, "centralized"))
    extra = f"placement.dlora_device_blocks={hybrid}"
    loss, grads = _first_step(_simulation(model, "dlora", 0, False, extra))
    assert loss == pytest.approx(ref_loss, rel=RTOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert _close(grads[name], ref_grads[name]), name
    reference, dlora = _simulation(model, "centralized"), _simulation(model, "dlora", 0, False, extra)
    assert dlora.devices[0].part.blocks == range(hybrid)
    reference.run_round()
    dlora.run_round()
    for name, weights in reference.state.global_adapters.items():
        assert _close(dlora.state.global_adapters[name].A, weights.A), name
        assert _close(dlora.state.global_adapters[name].B, weights.B), name


def test_split_layer_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="split_layer 9 is out of range"):
        _simulation("tiny-llama", "split", 9)
