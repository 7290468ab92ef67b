"""The memory model in the precision a device runs: bf16 / nf4 / int8 bases, gradient
checkpointing, and shapes from a config alone (meta device) against shapes read from real models."""

import pytest
import torch
from memory_probe import CASES, base_in, kept_out_of_sight, measured_peak, probe_labelled, runtime_for, spread_ranks
from transformers import GPT2Config, LlamaConfig

from splitpeft.hsplit.armsc import plan_device
from splitpeft.hsplit.budget import DeviceProfile
from splitpeft.hsplit.memory import (
    ModelShapes,
    blocks_saved,
    memory_breakdown,
    quantized_weight_bytes,
    roles_per_block,
)
from splitpeft.model.loading import load_model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("split_layer, pattern, batch_size, seq_len, labels_on_device", CASES)
def test_bf16_prediction_is_the_meters_account(name, split_layer, pattern, batch_size, seq_len, labels_on_device):
    """bf16 base and activations, fp32 adapters, AdamW state, LoRA input copies and loss: to the byte."""
    base, shapes = base_in(name, "bf16")
    ranks = spread_ranks(shapes, split_layer, pattern)
    measured = measured_peak(base, split_layer, ranks, batch_size, seq_len, labels_on_device, runtime_for("bf16"))
    predicted = memory_breakdown(shapes, split_layer, ranks, batch_size, seq_len, labels_on_device,
                                 labelled=probe_labelled(batch_size, seq_len))
    assert predicted.unmetered_bytes == 0 and predicted.peak_bytes == measured


@pytest.mark.parametrize("dtype, quantization", [("bf16", "nf4"), ("bf16", "int8"), ("fp32", "int8")])
@pytest.mark.parametrize("split_layer, pattern, batch_size, seq_len, labels_on_device", CASES)
def test_quantized_prediction_is_the_meters_account(dtype, quantization, split_layer, pattern, batch_size, seq_len,
                                                    labels_on_device):
    """nf4 / int8 block linears (bitsandbytes on CPU): the meter's account to the byte."""
    base, shapes = base_in("tiny-llama", dtype, quantization)
    ranks = spread_ranks(shapes, split_layer, pattern)
    measured = measured_peak(base, split_layer, ranks, batch_size, seq_len, labels_on_device,
                             runtime_for(dtype, quantization))
    assert memory_breakdown(shapes, split_layer, ranks, batch_size, seq_len, labels_on_device,
                            labelled=probe_labelled(batch_size, seq_len)).metered_bytes == measured


PATTERNS = [(8,), (0, 4, 16), (0, 0, 0, 2), (0,) * 20 + (4,)]  # the last adapts only block 2's down_proj


@pytest.mark.parametrize("dtype, quantization", [("fp32", "int8"), ("bf16", "int8"), ("bf16", "nf4")])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_what_the_meter_cannot_see_is_predicted(dtype, quantization, pattern):
    """int8 keeps each frozen linear's input on its autograd node (`ctx.A`), out of the saved-tensor
    hooks' sight; nf4 keeps nothing there. Counted by walking the real graph."""
    base, shapes = base_in("tiny-llama", dtype, quantization)
    ranks = spread_ranks(shapes, 3, pattern)
    seen = kept_out_of_sight(base, 3, ranks, 2, 16, runtime_for(dtype, quantization))
    predicted = memory_breakdown(shapes, 3, ranks, 2, 16)
    assert seen.saved == predicted.activation_bytes
    assert seen.node_attributes == predicted.unmetered_bytes
    if quantization == "nf4" or pattern == PATTERNS[-1]:  # nf4 keeps only its weight; no live int8 input
        assert seen.node_attributes == 0


@pytest.mark.parametrize("name, dtype, quantization", [
    ("tiny-llama", "fp32", "none"), ("tiny-llama", "bf16", "none"), ("tiny-gpt2", "fp32", "none"),
    ("tiny-gpt2", "bf16", "none"), ("tiny-llama", "bf16", "nf4"), ("tiny-llama", "bf16", "int8"),
])
@pytest.mark.parametrize("pattern", PATTERNS[:3])
def test_gradient_checkpointing(name, dtype, quantization, pattern):
    """Checkpointed blocks save only their input (the meter sees it); backward recomputes each
    block's activations through torch's own hooks, out of the meter's sight, one block at a time."""
    shapes = base_in(name, dtype, quantization)[1]
    ranks = spread_ranks(shapes, 3, pattern)
    runtime = runtime_for(dtype, quantization, checkpointing=True)
    predicted = memory_breakdown(shapes, 3, ranks, 2, 16, checkpointing=True)
    # every device block is adapted or live here, so every block input is kept and none is freed at once
    # (each probe gets a fresh base: see base_in on int8)
    assert measured_peak(base_in(name, dtype, quantization)[0], 3, ranks, 2, 16, runtime=runtime) == predicted.metered_bytes
    seen = kept_out_of_sight(base_in(name, dtype, quantization)[0], 3, ranks, 2, 16, runtime)
    saved = blocks_saved(shapes, roles_per_block(shapes, 3, ranks), 2, 16)
    assert seen.recomputed == [block.recompute_bytes for block in saved if block.graph]
    assert seen.node_attributes == sum(block.int8_checkpointed_bytes for block in saved)
    # the recompute is what the block would have saved without checkpointing, less its kept input
    plain = kept_out_of_sight(base_in(name, dtype, quantization)[0], 3, ranks, 2, 16, runtime_for(dtype, quantization))
    rotary = 2 * 16 * shapes.head_dim * shapes.dtype_bytes if shapes.family == "llama" else 0
    kept_input = 2 * 16 * shapes.hidden_size * shapes.dtype_bytes if shapes.norm_keeps_input() else 0
    assert sum(seen.recomputed) == plain.saved - rotary - kept_input * (len(seen.recomputed) - 1)
    assert predicted.peak_bytes < memory_breakdown(shapes, 3, ranks, 2, 16).peak_bytes


@pytest.mark.parametrize("name, dtype, quantization", [
    ("tiny-llama", "fp32", "none"), ("tiny-llama", "bf16", "none"), ("tiny-llama", "bf16", "nf4"),
    ("tiny-llama", "bf16", "int8"), ("tiny-llama", "fp32", "nf4"), ("tiny-gpt2", "bf16", "none"),
    ("tiny-qwen2", "bf16", "nf4"), ("tiny-mistral", "bf16", "int8"),
])
def test_shapes_from_a_config_equal_shapes_from_the_real_model(name, dtype, quantization):
    """From the config on the meta device, no weight allocated: the same shapes and byte counts as
    read from the materialised, quantized model (nf4 absmax and code tables, int8 scales included)."""
    base, from_model = base_in(name, dtype, quantization)
    from_config = ModelShapes.from_config(load_model(name).model.config, dtype=dtype, quantization=quantization)
    assert from_config == from_model
    assert from_model.quantization == quantization and from_model.dtype_bytes == (4 if dtype == "fp32" else 2)


def test_quantized_block_bytes_follow_bitsandbytes():
    """nf4: half a byte a weight, an fp32 absmax per 64, a 64-byte code table; int8: a byte a weight
    and an fp32 scale per row; norms stay in the dtype."""
    _, nf4 = base_in("tiny-llama", "bf16", "nf4")
    _, int8 = base_in("tiny-llama", "bf16", "int8")
    linears = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]  # q k v o gate up down
    norms = 2 * 32 * 2
    assert nf4.block_bytes[0] == sum(n // 2 + 4 * (n // 64) + 64 for n in (a * b for a, b in linears)) + norms
    assert int8.block_bytes[0] == sum(a * b + 4 * b for a, b in linears) + norms
    assert quantized_weight_bytes(33, 7, "nf4") == 116 + 4 * 4 + 64  # odd count, last block partial
    with pytest.raises(ValueError, match="GPT-2"):
        ModelShapes.from_config(load_model("tiny-gpt2").model.config, dtype="bf16", quantization="nf4")


LLAMA_2_7B = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         vocab_size=32000, tie_word_embeddings=False)
GPT2_LARGE = GPT2Config(n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024)


def test_paper_size_shapes_without_weights():
    """LLaMA-2-7B and GPT-2-large on the meta device: their published parameter counts, in fp32 bytes."""
    llama = ModelShapes.from_config(LLAMA_2_7B, dtype="fp32")
    total = llama.embedding_bytes + sum(llama.block_bytes) + llama.head_bytes
    assert total == 4 * 6_738_415_616
    gpt2 = ModelShapes.from_config(GPT2_LARGE, dtype="fp32")
    assert gpt2.embedding_bytes + sum(gpt2.block_bytes) + gpt2.head_bytes == 4 * 774_030_080
    assert len(gpt2.modules) == 36 * 4 and len(llama.modules) == 32 * 7
    nf4 = ModelShapes.from_config(LLAMA_2_7B, dtype="bf16", quantization="nf4")
    weights = 4 * 4096 * 4096 + 3 * 4096 * 11008
    assert nf4.block_bytes[0] == weights // 2 + 4 * weights // 64 + 7 * 64 + 2 * 4096 * 2


def test_a_lower_precision_buys_a_deeper_split():
    """Same budget, same scores: bf16 goes deeper than fp32, nf4 deeper than bf16 (LLaMA-2-7B)."""
    splits = []
    for dtype, quantization in (("fp32", "none"), ("bf16", "none"), ("bf16", "nf4")):
        shapes = ModelShapes.from_config(LLAMA_2_7B, dtype=dtype, quantization=quantization)
        scores = dict.fromkeys(shapes.modules, 1.0)
        plan = plan_device(DeviceProfile("d", 10 * 2**30, 1e12, 1e8), shapes, scores, batch_size=8, seq_len=512)
        assert plan.predicted_peak_bytes <= 10 * 2**30
        splits.append(plan.split_layer)
    assert splits[0] < splits[1] < splits[2], splits


def test_planning_plans_the_run_as_it_will_run():
    """The Planning loop's shapes and options follow the config's runtime (dtype, device
    quantization, checkpointing), not the precision the base it is handed is held in."""
    from conftest import tiny_config

    from splitpeft.data.batching import EncodedExample
    from splitpeft.hsplit.planning import ArmscPlanner, Planning, PlanOptions

    config = tiny_config("tiny-llama", "fleet.memory_bytes=[1,2,3]", "runtime.dtype=bf16",
                         "runtime.base_quantization=nf4", "runtime.quantize=devices", "runtime.gradient_checkpointing=true")
    config.hsplit.planner = "armsc"  # planning an nf4 fleet on paper (a run refuses armsc + nf4: see config.validate)
    fp32_base = load_model("tiny-llama").model
    planning = Planning(ArmscPlanner(PlanOptions.from_config(config)), config, fp32_base, [],
                        [EncodedExample([5, 6, 7], [5, 6, 7])], pad_id=1)
    assert planning.shapes == base_in("tiny-llama", "bf16", "nf4")[1]
    assert PlanOptions.from_config(config).memory()["checkpointing"] is True
    server_only = tiny_config("tiny-llama", "runtime.dtype=bf16", "runtime.base_quantization=nf4", "runtime.quantize=server")
    planning = Planning(ArmscPlanner(PlanOptions.from_config(server_only)), server_only, fp32_base, [],
                        [EncodedExample([5, 6, 7], [5, 6, 7])], pad_id=1)
    assert planning.shapes == base_in("tiny-llama", "bf16")[1]
    assert torch.float32 == next(fp32_base.parameters()).dtype  # the base itself is left as it was
