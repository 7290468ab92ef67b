"""rsLoRA scaling (`lora.rslora`): every party's branch, every aggregated copy, the server's dlora
branches and the exported adapter use s = alpha / sqrt(r) instead of alpha / r."""

import math

import pytest
import torch
from conftest import assert_export_reproduces_global_model, tiny_config
from peft.tuners.lora import LoraLayer

from splitpeft.federation.simulation import Simulation
from splitpeft.model import adapters as lora
from splitpeft.model.adapters import ADAPTER_NAME, LoraWeights

HSPLIT = ["hsplit.planner=budget_rank", "federation.aggregator=noise_free", "federation.num_devices=3",
          "placement.split_layer=2", "federation.local_steps=2", "data.max_length=48", "hsplit.rank_set=[2,4,8,16]"]


def test_scale_is_alpha_over_r_or_over_its_square_root():
    assert lora.scale(16.0, 4) == 4.0
    assert lora.scale(16.0, 4, rslora=True) == 8.0
    assert lora.scale(6.0, 9, rslora=True) == pytest.approx(2.0)


def _budgets(fractions=(0.3, 0.6, 1.0)):
    from splitpeft.hsplit.memory import ModelShapes, predict_peak_bytes

    shapes = ModelShapes.from_model(Simulation(tiny_config("tiny-llama")).loaded.model)
    low = predict_peak_bytes(shapes, 2, {n: 2 for n in shapes.modules_before(2)}, batch_size=4, seq_len=48)
    high = predict_peak_bytes(shapes, 2, {n: 16 for n in shapes.modules_before(2)}, batch_size=4, seq_len=48)
    return [int(low + f * (high - low)) for f in fractions]


@pytest.mark.parametrize("rslora", [False, True])
def test_every_party_and_every_aggregated_copy_use_the_same_scale(rslora, tmp_path):
    """Devices of different ranks: the peft layers' scaling is lora.scale of their rank, the copies the
    aggregator weighs carry that scale, and the exported adapter reproduces the merged global model."""
    sim = Simulation(tiny_config("tiny-llama", *HSPLIT, f"fleet.memory_bytes={_budgets()}",
                                 f"lora.rslora={str(rslora).lower()}"))
    ranks = sorted({max(d.ranks.values()) for d in sim.devices})
    assert len(ranks) > 1, "the fleet should give the devices different ranks"
    alpha = sim.config.lora.alpha
    parties = [*sim.devices]
    seen: list[tuple[float, float]] = []
    original = sim._copy

    def copy_and_check(holder, weights, tokens):
        made = original(holder, weights, tokens)
        seen.append((made.scale, lora.scale(alpha, weights.rank, rslora)))
        return made

    sim._copy = copy_and_check  # type: ignore[method-assign]
    sim.run_round()
    parties += list(sim.server.sessions.values())
    for party in parties:
        for name, module in party.model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER_NAME in module.r:
                r = module.r[ADAPTER_NAME]
                assert module.scaling[ADAPTER_NAME] == pytest.approx(alpha / (math.sqrt(r) if rslora else r)), name
    assert seen and all(made == pytest.approx(expected) for made, expected in seen)
    assert_export_reproduces_global_model(sim, tmp_path / "adapter")


def test_dlora_server_branches_use_the_rslora_scale():
    """dlora's server computes the device's branches: with rsLoRA its first step equals centralized's,
    and both differ from the alpha / r run (so the scale is really in use)."""

    def first_loss(*overrides):
        sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "federation.local_steps=1",
                                     *overrides))
        generator = torch.Generator().manual_seed(1)  # B != 0, so the branch scale changes the loss
        for name, weights in sim.state.global_adapters.items():
            sim.state.global_adapters[name] = LoraWeights(weights.A, 0.5 * torch.randn(weights.B.shape, generator=generator))
        record = sim.run_round()
        return record.devices["device-0"].train_loss

    central = first_loss("placement.placement=centralized", "lora.rslora=true")
    dlora = first_loss("placement.placement=dlora", "lora.rslora=true")
    plain = first_loss("placement.placement=dlora", "lora.rslora=false")
    assert dlora == pytest.approx(central, rel=1e-5)
    assert abs(plain - dlora) > 1e-3


@pytest.mark.parametrize("rslora", [False, True])
def test_dlora_server_computes_killed_branches_at_the_devices_scale(rslora):
    """The server computes a killed adapter's branch itself, with the scale it derives from its own
    config and the rank: the same as the device's peft layer."""
    sim = Simulation(tiny_config("tiny-llama", "placement.placement=dlora", "federation.num_devices=1", "lora.rank=4",
                                 f"lora.rslora={str(rslora).lower()}"))
    device = sim.devices[0]
    device.load(sim.state.global_adapters)
    device.open_session(sim.channels[device.device_id])
    scales = sim.server.sessions[device.device_id].step_state.scales
    layers = lora.lora_layers(device.model)
    assert scales.keys() == layers.keys()
    for name, layer in layers.items():
        assert scales[name] == pytest.approx(layer.scaling[ADAPTER_NAME]) == pytest.approx(lora.scale(sim.config.lora.alpha, 4, rslora))
