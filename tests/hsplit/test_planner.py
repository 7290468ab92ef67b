"""ARMSC: the memory model against the measured peak, and the planner's guarantees."""

import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from memory_probe import CASES, base_in, measured_peak, probe_labelled, spread_ranks

from splitpeft.data.batching import BatchStream, EncodedExample
from splitpeft.hsplit.armsc import PlanError, minimal_ranks, plan_device, plan_fleet
from splitpeft.hsplit.budget import DeviceProfile, fleet_preset, simulated_step_s
from splitpeft.hsplit.memory import ModelShapes, memory_breakdown, predict_peak_bytes
from splitpeft.hsplit.planning import needs_replan
from splitpeft.model.loading import load_model
from splitpeft.model.usage import tensor_nbytes
from splitpeft.parties.device import DeviceRuntime
from splitpeft.parties.party import Training
from splitpeft.placements.split import SplitPlacement


def model(name: str):
    """(fp32 base, its shapes)."""
    return base_in(name)


_SHAPES: dict = {}


def shapes_in(name: str, dtype: str, quantization: str) -> ModelShapes:
    """The tiny model's shapes in a precision, from its config alone."""
    key = (name, dtype, quantization)
    if key not in _SHAPES:
        _SHAPES[key] = ModelShapes.from_config(model(name)[0].config, dtype=dtype, quantization=quantization)
    return _SHAPES[key]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("split_layer, pattern, batch_size, seq_len, labels_on_device", CASES)
def test_predicted_peak_matches_measured(name, split_layer, pattern, batch_size, seq_len, labels_on_device):
    """fp32: the prediction is the meter's CPU account to the byte (nothing is out of its sight)."""
    base, shapes = model(name)
    ranks = spread_ranks(shapes, split_layer, pattern)
    measured = measured_peak(base, split_layer, ranks, batch_size, seq_len, labels_on_device)
    predicted = predict_peak_bytes(shapes, split_layer, ranks, batch_size, seq_len, labels_on_device,
                                   labelled=probe_labelled(batch_size, seq_len))
    assert predicted == measured


def test_frozen_terms_match_what_the_device_holds():
    for name in ("tiny-llama", "tiny-gpt2"):
        base, shapes = model(name)
        for k in (1, 3):
            for keeps_head in (False, True):
                device = DeviceRuntime("d", base, SplitPlacement(labels_on_device=keeps_head), k, {},
                                       BatchStream([EncodedExample([5, 6], [5, 6])], 1, 1, 0),
                                       Training(lr=1e-3), count_flops=False)
                assert memory_breakdown(shapes, k, {}, 1, 8, keeps_head).frozen_bytes == tensor_nbytes(device.shell.frozen)


def uniform_scores(shapes: ModelShapes) -> dict[str, float]:
    # varied, deterministic across runs (str hash is salted per process, crc32 is not)
    return {m: 1.0 + (zlib.crc32(m.encode()) % 97) / 10.0 for m in shapes.modules}


def minimal_peak(shapes, scores, k, batch_size=2, seq_len=16, smallest=2, checkpointing=False):
    return predict_peak_bytes(shapes, k, minimal_ranks(shapes, scores, k, smallest), batch_size, seq_len,
                              checkpointing=checkpointing)


PRECISIONS = [("fp32", "none"), ("bf16", "none"), ("bf16", "nf4"), ("bf16", "int8"), ("fp32", "int8")]


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["tiny-llama", "tiny-gpt2"]),
    precision=st.sampled_from(PRECISIONS),
    checkpointing=st.booleans(),
    memories=st.lists(st.integers(50_000, 1_500_000), min_size=1, max_size=4),
    batch_size=st.integers(1, 4),
    seq_len=st.integers(4, 64),
    seed=st.integers(0, 1000),
)
def test_plans_never_exceed_the_budget(name, precision, checkpointing, memories, batch_size, seq_len, seed):
    dtype, quantization = precision
    if name == "tiny-gpt2":
        quantization = "none"  # bitsandbytes does not quantize GPT-2's Conv1D
    shapes = shapes_in(name, dtype, quantization)
    memory_options = {"batch_size": batch_size, "seq_len": seq_len, "checkpointing": checkpointing}
    generator = torch.Generator().manual_seed(seed)
    scores = {m: float(v) for m, v in zip(shapes.modules, torch.rand(len(shapes.modules), generator=generator))}
    for i, memory in enumerate(memories):
        profile = DeviceProfile(f"dev{i}", memory, 1e9, 1e7)
        # A deeper split can fit where k = 1 does not: its minimal adapter may sit in a later
        # block, and blocks before the first adapter keep no activations.
        fits_some_split = any(minimal_peak(shapes, scores, k, **memory_options) <= memory
                              for k in range(1, shapes.num_blocks))
        if not fits_some_split:
            with pytest.raises(PlanError, match=f"dev{i}"):
                plan_device(profile, shapes, scores, **memory_options)
            continue
        plan = plan_device(profile, shapes, scores, **memory_options)
        assert plan.predicted_peak_bytes <= memory
        assert plan.predicted_peak_bytes == predict_peak_bytes(shapes, plan.split_layer, plan.ranks, **memory_options)
        assert 1 <= plan.split_layer <= shapes.num_blocks - 1
        assert plan.ranks and all(r in (2, 4, 8, 16) for r in plan.ranks.values())
        assert all(shapes.module_block[m] < plan.split_layer for m in plan.ranks)
        # the split is the deepest one whose minimal plan fits
        deeper = range(plan.split_layer + 1, shapes.num_blocks)
        assert all(minimal_peak(shapes, scores, k, **memory_options) > memory for k in deeper)


def test_plan_error_names_the_device_and_the_bytes_needed():
    _, shapes = model("tiny-llama")
    scores = uniform_scores(shapes)
    needed = minimal_peak(shapes, scores, 1)
    with pytest.raises(PlanError, match=rf"'phone'.*{needed} bytes"):
        plan_device(DeviceProfile("phone", needed - 1, 1e9, 1e6), shapes, scores, batch_size=2, seq_len=16)
    plan = plan_device(DeviceProfile("phone", needed, 1e9, 1e6), shapes, scores, batch_size=2, seq_len=16)
    assert plan.split_layer == 1 and plan.predicted_peak_bytes == needed


def test_bigger_budgets_get_deeper_splits_and_more_rank():
    _, shapes = model("tiny-gpt2")
    scores = uniform_scores(shapes)
    profiles = fleet_preset(6, (minimal_peak(shapes, scores, 1), minimal_peak(shapes, scores, 3) * 2), 1e9, 1e7)
    plans = plan_fleet(profiles, shapes, scores, batch_size=2, seq_len=16)
    splits = [p.split_layer for p in plans]
    assert splits == sorted(splits) and splits[0] == 1 and splits[-1] == 3
    assert [p.device for p in plans] == [f"device-{i}" for i in range(6)]
    assert plans == plan_fleet(profiles, shapes, scores, batch_size=2, seq_len=16)  # deterministic


def test_ranks_go_to_the_highest_score_per_cost_first():
    _, shapes = model("tiny-llama")
    scores = uniform_scores(shapes)
    b, t = 2, 16
    start = minimal_ranks(shapes, scores, 1, 2)
    base_peak = predict_peak_bytes(shapes, 1, start, b, t)
    next_rank = {0: 2, 2: 4}

    def priority(m):
        cost = predict_peak_bytes(shapes, 1, {**start, m: next_rank[start.get(m, 0)]}, b, t) - base_peak
        return scores[m] / cost, cost

    best = max(shapes.modules_before(1), key=lambda m: priority(m)[0])
    budget = base_peak + priority(best)[1]
    plan = plan_device(DeviceProfile("d", budget, 1e9, 1e7), shapes, scores, batch_size=b, seq_len=t, max_split=1)
    assert plan.ranks == {**start, best: next_rank[start.get(best, 0)]}

    # with room for everything, every scored module reaches the top rank
    roomy = plan_device(DeviceProfile("d", 10**9, 1e9, 1e7), shapes, scores, batch_size=b, seq_len=t, max_split=1)
    assert roomy.ranks == {m: 16 for m in shapes.modules_before(1)}


def test_zero_scores_get_no_adapter_beyond_the_minimal_one():
    _, shapes = model("tiny-llama")
    top = shapes.modules_before(2)[3]
    plan = plan_device(DeviceProfile("d", 10**9, 1e9, 1e7), shapes, {top: 1.0}, batch_size=2, seq_len=8, max_split=2)
    assert plan.ranks == {top: 16}


def test_shapes_read_from_the_model():
    _, shapes = model("tiny-llama")
    assert shapes.num_blocks == 4 and shapes.hidden_size == 32 and shapes.qkv_dims == (32, 16, 16)
    assert shapes.modules["model.layers.0.self_attn.k_proj"] == (32, 16)
    assert shapes.head_bytes == 32 * 4  # final norm only: the LM head is tied to the embedding
    _, gpt2 = model("tiny-gpt2")
    assert gpt2.modules["transformer.h.1.attn.c_attn"] == (32, 96)
    assert gpt2.embedding_bytes == (320 + 256) * 32 * 4  # wte + wpe


def test_fleet_preset_and_step_time():
    fleet = fleet_preset(3, (100, 300), 2e9, 1e6)
    assert [p.memory_bytes for p in fleet] == [100, 200, 300]
    assert simulated_step_s(fleet[0], 4e9, 5e5) == pytest.approx(2.0 + 0.5)
    with pytest.raises(ValueError):
        fleet_preset(0, (1, 2), 1.0, 1.0)


def test_needs_replan_past_the_threshold():
    old = {"a": 1.0, "b": 1.0}
    assert not needs_replan(old, {"a": 1.1, "b": 1.0}, threshold=0.1)
    assert needs_replan(old, {"a": 1.3, "b": 1.0}, threshold=0.1)


def test_planners_are_named_objects_chosen_by_config():
    """`hsplit.planner` picks a Planner; `fixed` plans every device at the config's split and rank."""
    from conftest import tiny_config

    from splitpeft.hsplit.planning import PLANNERS, ArmscPlanner, BudgetRankPlanner, FixedPlanner, make_planner

    assert sorted(PLANNERS) == ["armsc", "armsc_deepest", "budget_rank", "fixed", "uniform"]
    config = tiny_config("tiny-llama", "placement.split_layer=2", "lora.rank=4")
    planner = make_planner(config)
    assert isinstance(planner, FixedPlanner) and not planner.uses_budgets and not planner.uses_scores
    model = load_model("tiny-llama").model
    shapes = ModelShapes.from_model(model)
    plans = planner.plan([DeviceProfile("device-0", 10**9, 1e9, 1e6)], shapes, {})
    assert [(p.split_layer, set(p.ranks.values())) for p in plans] == [(2, {4})]
    assert sorted(plans[0].ranks) == sorted(shapes.modules_before(2))
    assert plans[0].predicted_peak_bytes == predict_peak_bytes(shapes, 2, plans[0].ranks, batch_size=4, seq_len=160)
    budget_config = tiny_config("tiny-llama", "hsplit.planner=budget_rank", "fleet.memory_bytes=[1,2,3]")
    assert isinstance(make_planner(budget_config), BudgetRankPlanner)
    armsc_config = tiny_config("tiny-llama", "hsplit.planner=armsc", "fleet.memory_bytes=[1,2,3]")
    assert isinstance(make_planner(armsc_config), ArmscPlanner) and ArmscPlanner.uses_scores
