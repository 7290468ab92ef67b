"""HSplitLoRA in the federation: per-device split points and ranks from budgets, copies of one
block on several devices and the server, noise-free aggregation, and the comparison command."""

import json

import pytest
import torch
from conftest import record_holders, tiny_config

from splitpeft.aggregation.base import AdapterCopy
from splitpeft.experiment.compare import run_comparison
from splitpeft.federation.simulation import Simulation
from splitpeft.hsplit.memory import ModelShapes, predict_peak_bytes
from splitpeft.model.adapters import LoraWeights

HSPLIT = ["hsplit.planner=armsc", "federation.aggregator=noise_free", "federation.num_devices=3",
          "hsplit.max_split=3", "federation.local_steps=2", "data.max_length=48"]


def _budgets(sim_config_overrides, fractions=(0.35, 0.6, 1.0)):
    """Budgets between what one block and what three blocks need on tiny-llama."""
    probe = Simulation(tiny_config("tiny-llama", *sim_config_overrides[:0]))
    shapes = ModelShapes.from_model(probe.loaded.model)
    low = predict_peak_bytes(shapes, 1, {}, batch_size=4, seq_len=48)
    high = predict_peak_bytes(shapes, 3, {n: 16 for n in shapes.modules_before(3)}, batch_size=4, seq_len=48)
    return [int(low + f * (high - low)) for f in fractions]


def test_heterogeneous_fleet_gets_different_plans_and_trains():
    budgets = _budgets(HSPLIT)
    sim = Simulation(tiny_config("tiny-llama", *HSPLIT, f"fleet.memory_bytes={budgets}"))
    splits = [d.split_layer for d in sim.devices]
    assert splits == sorted(splits) and len(set(splits)) > 1 or len({len(d.ranks) for d in sim.devices}) > 1
    for device, budget in zip(sim.devices, budgets):
        plan = next(p for p in sim.planning.plans if p.device == device.device_id)
        assert plan.predicted_peak_bytes <= budget
    record = sim.run_round()
    for device in sim.devices:
        stats = record.devices[device.device_id]
        assert stats.peak_memory_bytes <= 1.15 * next(p.predicted_peak_bytes for p in sim.planning.plans if p.device == device.device_id)
        assert stats.simulated_s is not None and stats.simulated_s > 0
    # noise-free: every adapted module's update went into the frozen weights, adapters restart at B = 0
    assert sim.state.merged
    for holder, state in sim.state.holder_state.items():
        assert all(float(w.B.abs().max()) == 0.0 for w in state.values()), holder
    info = sim.info()
    assert len(info["plans"]) == 3 and all("predicted_peak_bytes" in row for row in info["plans"])


def test_block_copies_on_devices_and_server_are_all_aggregated():
    """Block 1 lives on the deep device and, for the shallow device, on the server: both count."""
    overrides = ["federation.aggregator=noise_free", "federation.num_devices=2", "federation.local_steps=2",
                 "data.max_length=48"]
    sim = Simulation(tiny_config("tiny-llama", *overrides))
    sim.devices[0] = sim.build_device(0, 1)
    sim.devices[1] = sim.build_device(1, 3)
    seen = record_holders(sim)
    base_weight = sim.loaded.model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    sim.run_round()
    assert seen["model.layers.1.self_attn.q_proj"] == ["device-1", "server/device-0"]
    assert seen["model.layers.0.self_attn.q_proj"] == ["device-0", "device-1"]
    assert seen["model.layers.3.self_attn.q_proj"] == ["server/device-0", "server/device-1"]
    assert not torch.equal(sim.loaded.model.model.layers[1].self_attn.q_proj.weight, base_weight)


def test_export_after_merges_reproduces_the_global_model(tmp_path):
    from peft import PeftModel

    from splitpeft.model.loading import load_model

    budgets = _budgets(HSPLIT)
    sim = Simulation(tiny_config("tiny-llama", *HSPLIT, f"fleet.memory_bytes={budgets}"))
    sim.run_round()
    model = sim.global_model()
    sim.export(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(load_model("tiny-llama").model, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_budget_too_small_for_one_block_names_the_device():
    with pytest.raises(ValueError, match="device-0"):
        Simulation(tiny_config("tiny-llama", *HSPLIT, "fleet.memory_bytes=[1000, 10000000, 10000000]"))


def test_budget_rank_gives_bigger_ranks_to_bigger_budgets():
    budgets = _budgets(HSPLIT, fractions=(0.3, 0.6, 1.0))
    sim = Simulation(tiny_config("tiny-llama", "hsplit.planner=budget_rank", "federation.aggregator=zero_pad",
                                 "federation.num_devices=3", "placement.split_layer=1", "data.max_length=48",
                                 f"fleet.memory_bytes={budgets}"))
    ranks = [max(d.ranks.values()) for d in sim.devices]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1]
    sim.run_round()


@pytest.mark.slow
def test_compare_command_writes_table_and_plot(tmp_path):
    budgets = _budgets(HSPLIT)
    comparison = run_comparison(
        "hsplit", tmp_path / "cmp", preset="tiny",
        overrides=["federation.num_devices=3", "federation.rounds=2", "federation.local_steps=2", "data.max_length=48",
                   "hsplit.max_split=3", "placement.split_layer=1", f"fleet.memory_bytes={budgets}",
                   "eval.groups=2", "eval.max_new_tokens=4"],
        progress=False,
    )
    assert set(comparison["methods"]) == {"hsplitlora", "hetlora", "splitlora", "cenlora"}
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["methods"]["cenlora"]["tokens"] > 0
    assert (tmp_path / "cmp" / "convergence.png").is_file()
    assert "| hsplitlora |" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_per_device_profiles_and_simulated_time():
    budgets = _budgets(HSPLIT)
    sim = Simulation(tiny_config("tiny-llama", *HSPLIT, f"fleet.memory_bytes={budgets}",
                                 "fleet.flops_per_s=[1e9, 2e9, 4e9]", "fleet.bandwidth_bytes_per_s=1e6"))
    assert [p.flops_per_s for p in sim.profiles] == [1e9, 2e9, 4e9]
    record = sim.run_round()
    for profile, stats in zip(sim.profiles, record.devices.values()):
        expected = stats.flops / profile.flops_per_s + (stats.bytes_up + stats.bytes_down) / 1e6
        assert stats.simulated_s == pytest.approx(expected)
        assert len(stats.step_flops) == stats.steps and sum(stats.step_flops) == stats.flops


def test_poisoned_upload_is_rejected_and_the_round_goes_on():
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=2", "federation.local_steps=1"))
    original = sim.state.aggregate

    def poisoned(copies):
        """device-0's copy of the first module arrives with A = inf (past the wire's own check)."""
        first = copies[sorted(copies)[0]]
        index = next(i for i, c in enumerate(first) if c.holder == "device-0")
        bad = first[index]
        first[index] = AdapterCopy(bad.holder, LoraWeights(bad.weights.A * float("inf"), bad.weights.B), bad.tokens, bad.scale)
        return original(copies)

    sim.state.aggregate = poisoned
    record = sim.run_round()
    assert any("contains NaN or Inf" in line and "device-0" in line for line in record.rejected)
    assert all(torch.isfinite(w.A).all() and torch.isfinite(w.B).all() for w in sim.state.global_adapters.values())


def test_restarted_adapters_drop_their_optimiser_moments():
    """Bug: after noise-free aggregation every holder restarts from fresh adapters (B = 0), but
    AdamW kept the moments of the merged-away adapters and applied them to the new ones."""
    sim = Simulation(tiny_config("tiny-llama", "federation.aggregator=noise_free", "federation.num_devices=1",
                                 "federation.local_steps=2"))
    sim.run_round()
    device = sim.devices[0]
    assert device.optimizer is not None and device.optimizer.state
    device.load(sim.state.start_state(device.device_id, device.ranks))
    assert not device.optimizer.state
    sim.run_round()  # and training goes on
