"""HSplitLoRA in the federation: per-device split points and ranks from budgets, copies of one
block on several devices and the server, noise-free aggregation, and the comparison command."""

import json

import pytest
import torch
from conftest import assert_export_reproduces_global_model, record_holders, tiny_config

from splitpeft.aggregation.base import AdapterCopy
from splitpeft.experiment.compare import run_comparison
from splitpeft.federation.simulation import Simulation
from splitpeft.hsplit.memory import ModelShapes, predict_peak_bytes
from splitpeft.model.adapters import LoraWeights

HSPLIT = ["hsplit.planner=armsc", "federation.aggregator=noise_free", "federation.num_devices=3",
          "hsplit.max_split=3", "federation.local_steps=2", "data.max_length=48"]
DEEPEST = ["hsplit.planner=armsc_deepest", *HSPLIT[1:]]  # the first ARMSC's rule, which these tests re-derive


def _budgets(sim_config_overrides, fractions=(0.35, 0.6, 1.0)):
    """Budgets between what one block and what three blocks need on tiny-llama."""
    probe = Simulation(tiny_config("tiny-llama", *sim_config_overrides[:0]))
    shapes = ModelShapes.from_model(probe.loaded.model)
    low = predict_peak_bytes(shapes, 1, {}, batch_size=4, seq_len=48)
    high = predict_peak_bytes(shapes, 3, {n: 16 for n in shapes.modules_before(3)}, batch_size=4, seq_len=48)
    return [int(low + f * (high - low)) for f in fractions]


def _split_needs(shapes, scores, smallest_rank, batch_size, seq_len, deepest):
    """needs[k - 1]: the least budget at which ARMSC can put the split at k, re-derived from its rule
    (plan_device, step 1): the predicted peak of blocks [0, k) with the smallest non-zero rank on
    the top-scoring module of those blocks (ties: the earliest in model order)."""
    needs = []
    for k in range(1, deepest + 1):
        candidates = shapes.modules_before(k)
        top = min(candidates, key=lambda m: (-scores.get(m, 0.0), candidates.index(m)))
        needs.append(predict_peak_bytes(shapes, k, {top: smallest_rank}, batch_size=batch_size, seq_len=seq_len))
    return needs


def test_heterogeneous_fleet_gets_different_plans_and_trains():
    # The split a budget buys depends on which module the IWI probe scores highest, so read the
    # scores first: the probe sees only the model and the training data, never the budgets, so a
    # fleet with other budgets gets the very same scores (checked below).
    probe = Simulation(tiny_config("tiny-llama", *DEEPEST, f"fleet.memory_bytes={[10**9] * 3}"))
    scores, shapes, config = probe.planning.planned_scores, probe.planning.shapes, probe.config
    smallest = min(r for r in config.hsplit.rank_set if r > 0)
    batch, seq, max_split = config.federation.batch_size, config.data.max_length, config.hsplit.max_split
    needs = _split_needs(shapes, scores, smallest, batch, seq, deepest=max_split + 1)
    assert all(a < b for a, b in zip(needs, needs[1:])), needs
    # device i sits halfway between what split i + 1 and split i + 2 need: it fits i + 1 blocks, not i + 2
    budgets = [(needs[i] + needs[i + 1]) // 2 for i in range(max_split)]
    expected = [max(k for k in range(1, max_split + 1) if needs[k - 1] <= budget) for budget in budgets]
    assert expected == [1, 2, 3]  # one device per split point, deeper with the bigger budget

    sim = Simulation(tiny_config("tiny-llama", *DEEPEST, f"fleet.memory_bytes={budgets}"))
    assert sim.planning.planned_scores == scores
    assert [d.split_layer for d in sim.devices] == expected
    plans = {p.device: p for p in sim.planning.plans}
    for device, budget, k in zip(sim.devices, budgets, expected):
        plan = plans[device.device_id]
        assert (plan.split_layer, plan.budget_bytes) == (k, budget)
        assert plan.ranks and all(shapes.module_block[m] < k for m in plan.ranks)
        assert device.ranks == plan.ranks
        assert plan.predicted_peak_bytes == predict_peak_bytes(shapes, k, plan.ranks, batch_size=batch, seq_len=seq)
        assert plan.predicted_peak_bytes <= budget
        # every example is longer than data.max_length (cut to it), so every batch is exactly the
        # (batch, seq) the planner assumed
        assert device.data.batch_size == batch and all(len(item.input_ids) == seq for item in device.data.items)
    record = sim.run_round()
    for device in sim.devices:
        stats = record.devices[device.device_id]
        # Exact, to the byte: the meter's peak is a CPU tensor account (resident frozen weights,
        # adapters, their gradients and AdamW moments, plus every distinct storage autograd saves),
        # and the memory model predicts exactly those terms for full (batch, seq) batches; the
        # peak is reached on step 2, once AdamW's moments exist (local_steps=2).
        assert stats.steps == 2
        assert stats.peak_memory_bytes == plans[device.device_id].predicted_peak_bytes
        assert stats.simulated_s is not None and stats.simulated_s > 0
    # noise-free: every adapted module's update went into the frozen weights, adapters restart at B = 0
    assert sim.state.merged
    for holder, state in sim.state.holder_state.items():
        assert all(float(w.B.abs().max()) == 0.0 for w in state.values()), holder
    info = sim.info()
    assert len(info["plans"]) == 3 and all("predicted_peak_bytes" in row for row in info["plans"])
    assert [row["split_layer"] for row in info["plans"]] == expected


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


@pytest.mark.parametrize("server_rank", [None, 6])
def test_server_sessions_train_at_hsplit_server_rank_and_the_planner_counts_it(server_rank):
    """hsplit.server_rank sets the rank of every server session's adapters (null: lora.rank), the
    server's simulated time and what ARMSC counts the server as training; devices keep their plans' ranks."""
    from splitpeft.hsplit.planning import PlanOptions

    extra = [] if server_rank is None else [f"hsplit.server_rank={server_rank}"]
    overrides = ["federation.aggregator=noise_free", "federation.num_devices=2", "federation.local_steps=1",
                 "data.max_length=48", "lora.rank=4", *extra]
    sim = Simulation(tiny_config("tiny-llama", *overrides))
    sim.devices[0] = sim.build_device(0, 1)
    ranks: dict[str, list[tuple[str, int]]] = {}
    original = sim.state.aggregator.aggregate

    def spy(module, copies):
        ranks[module] = sorted((c.holder, c.weights.A.shape[0]) for c in copies)
        return original(module, copies)

    sim.state.aggregator.aggregate = spy
    sim.run_round()
    want = server_rank or 4
    assert ranks["model.layers.0.self_attn.q_proj"] == [("device-0", 4), ("device-1", 4)]
    assert ranks["model.layers.1.self_attn.q_proj"] == [("device-1", 4), ("server/device-0", want)]
    assert PlanOptions.from_config(sim.config).fleet().server_rank == want
    assert sim.server_rank == want


def test_a_server_rank_above_every_adapted_linear_is_refused_before_training():
    from splitpeft.config import ConfigError

    with pytest.raises(ConfigError, match=r"hsplit.server_rank 4096 exceeds min\(d_in, d_out\)"):
        Simulation(tiny_config("tiny-llama", "hsplit.server_rank=4096"))
    with pytest.raises(ConfigError, match="hsplit.server_rank must be in"):
        tiny_config("tiny-llama", "hsplit.server_rank=0")


def test_export_after_merges_reproduces_the_global_model(tmp_path):
    budgets = _budgets(HSPLIT)
    sim = Simulation(tiny_config("tiny-llama", *HSPLIT, f"fleet.memory_bytes={budgets}"))
    sim.run_round()
    assert_export_reproduces_global_model(sim, tmp_path / "adapter")


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
    plans = {p.device: p for p in sim.planning.plans}
    uploads: dict[str, dict[str, LoraWeights]] = {}
    original = sim.state.aggregate

    def spy(copies):
        for module, module_copies in copies.items():
            for copy in module_copies:
                uploads.setdefault(copy.holder, {})[module] = copy.weights
        return original(copies)

    sim.state.aggregate = spy
    record = sim.run_round()
    assert record.rejected == []
    assert sorted(record.devices) == sorted(plans)
    local_steps = sim.config.federation.local_steps
    for device_id, plan in plans.items():
        stats = record.devices[device_id]
        assert stats.steps == local_steps and len(stats.losses) == local_steps and stats.tokens > 0
        # the upload holds exactly the planned modules, each at its planned rank: A (r, d_in), B (d_out, r)
        uploaded = uploads[device_id]
        assert {m: w.A.shape[0] for m, w in uploaded.items()} == plan.ranks
        assert {m: w.B.shape[1] for m, w in uploaded.items()} == plan.ranks
        # and it was trained: LoRA starts from B = 0, so a non-zero B is the round's own update
        assert all(float(w.B.abs().max()) > 0.0 for w in uploaded.values()), device_id


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
    assert set(comparison["methods"]) == {"hsplitlora", "hsplitlora_server16", "hsplitlora_server16_data", "hsplitlora_zero_pad", "hsplitlora_mean_a", "hsplitlora_low_rank", "hsplitlora_svd", "hsplitlora_lora_factors", "hsplitlora_cold",
                                           "hsplitlora_v1", "hetlora", "hetlora_mean_a", "splitlora", "cenlora"}
    splitlora = comparison["methods"]["splitlora"]["runs"]["seed-0"]["plans"]
    assert len({(p["split_layer"], str(p["ranks"])) for p in splitlora}) == 1  # one plan for all: the weakest's
    saved = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert saved["methods"]["cenlora"]["runs"]["seed-0"]["tokens"] > 0
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


def test_a_bf16_fleet_is_planned_as_it_runs():
    """runtime.dtype=bf16: ARMSC plans from the devices' precision (bf16 base and activations,
    fp32 adapters), and each device's measured peak is its planned peak to the byte."""
    bf16 = [*DEEPEST, "runtime.dtype=bf16"]
    probe = Simulation(tiny_config("tiny-llama", *bf16, f"fleet.memory_bytes={[10**9] * 3}"))
    shapes, scores = probe.planning.shapes, probe.planning.planned_scores
    assert (shapes.dtype_bytes, shapes.quantization) == (2, "none")
    assert shapes == ModelShapes.from_model(probe.device_base)
    needs = _split_needs(shapes, scores, 2, batch_size=4, seq_len=48, deepest=4)
    budgets = [(needs[i] + needs[i + 1]) // 2 for i in range(3)]  # fits i + 1 blocks, not i + 2
    sim = Simulation(tiny_config("tiny-llama", *bf16, f"fleet.memory_bytes={budgets}"))
    plans = {p.device: p for p in sim.planning.plans}
    assert [p.split_layer for p in sim.planning.plans] == [1, 2, 3]
    record = sim.run_round()
    for device in sim.devices:
        assert record.devices[device.device_id].peak_memory_bytes == plans[device.device_id].predicted_peak_bytes


def test_plan_dtype_plans_a_bf16_simulation_as_its_fp32_fleet():
    """hsplit.plan_dtype=fp32 in a bf16 run: the planner sizes blocks at 4 bytes, so the splits and
    ranks are those of the same fleet run in fp32, where planning at the run's own bf16 fits more."""
    budgets = "fleet.memory_bytes=[700000,1200000,4000000]"
    common = [*DEEPEST, "hsplit.max_split=3", "data.max_length=48", budgets]

    def plans(*extra):
        sim = Simulation(tiny_config("tiny-llama", *common, *extra))
        return [(row["split_layer"], row["ranks"]) for row in sim.planning.describe()]

    fp32 = plans("runtime.dtype=fp32")
    assert plans("runtime.dtype=bf16", "hsplit.plan_dtype=fp32") == fp32
    assert plans("runtime.dtype=bf16") != fp32


def test_time_tokens_data_prices_a_step_at_the_datas_tokens_and_memory_at_the_maximum():
    """hsplit.time_tokens=data: ARMSC's time model prices each device's step at the mean padded
    length and labelled positions of batches drawn from the planner's data (the head and loss run
    on labelled positions only), while every peak is still predicted at data.max_length."""
    from splitpeft.data.batching import BatchStream
    from splitpeft.hsplit.memory import flops_per_step
    from splitpeft.hsplit.planning import data_step_tokens

    overrides = [*HSPLIT, f"fleet.memory_bytes={[10**9] * 3}", "placement.labels_on_device=true"]
    assert Simulation(tiny_config("tiny-llama", *overrides)).planning.planner.options.time_tokens is None
    sim = Simulation(tiny_config("tiny-llama", *overrides, "hsplit.time_tokens=data"))
    config, planning = sim.config, sim.planning
    options = planning.planner.options
    stream = BatchStream(planning.probe_stream.items, config.federation.batch_size, planning.probe_stream.pad_id,
                         config.seed + 20_000)
    lengths, labelled = [], []
    for _ in range(64):  # by hand: the batches' widths, and the labels each position predicts
        batch = stream.next()
        lengths.append(batch.input_ids.shape[1])
        labelled.append(sum(1 for row in batch.labels.tolist() for label in row[1:] if label != -100))
    want = (round(sum(lengths) / 64), round(sum(labelled) / 64))
    assert options.time_tokens == want == data_step_tokens(BatchStream(
        planning.probe_stream.items, config.federation.batch_size, planning.probe_stream.pad_id, config.seed + 20_000))
    assert want[1] < config.federation.batch_size * want[0]  # prompts carry no labels
    for plan in planning.plans:
        assert plan.flops_per_step == flops_per_step(planning.shapes, plan.split_layer, plan.ranks,
                                                     config.federation.batch_size, want[0], True, labelled=want[1])
        assert plan.predicted_peak_bytes == predict_peak_bytes(planning.shapes, plan.split_layer, plan.ranks,
                                                               **options.memory())
        assert options.memory()["seq_len"] == config.data.max_length
