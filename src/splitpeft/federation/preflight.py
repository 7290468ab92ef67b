"""Checks of a config against the loaded model and this machine, before any training.

`ExperimentConfig.validate` checks every key alone (finite, in range); what depends on the model
waits until it is loaded, and is checked here, at the start of a `Simulation`:

- the split point and `hsplit.max_split` lie within the model's blocks;
- `lora.rank` <= min(d_in, d_out) of every adapted linear (a larger rank adds parameters, not rank);
- a learned position table (GPT-2) holds data.max_length positions, and any model's context holds
  eval.max_new_tokens and a prompt token;
- the run's predicted peak memory fits the machine (host memory, or the GPU the model is on);
- `transport.max_message_bytes` holds one step's largest frame and a device's adapter upload.

Each failure is one ConfigError naming the key, as `validate` gives.

`check_held_out` then checks the held-out set against the context: what is longer runs truncated
(`experiment/evaluation.py`), so it is a logged warning with the counts, not an error.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from splitpeft.config import ConfigError, ExperimentConfig
from splitpeft.data.batching import EncodedExample, bounded_token_ids
from splitpeft.data.examples import Example
from splitpeft.hsplit.memory import ModelShapes, adapter_bytes, memory_breakdown
from splitpeft.model.backbone import context_length
from splitpeft.model.runtime import resolve_runtime
from splitpeft.placements.base import Placement

log = logging.getLogger(__name__)

# Room in a frame for its header (kind, meta, the safetensors header, compression scales).
FRAME_HEADER_ALLOWANCE_BYTES = 64 * 1024


def check_against_model(config: ExperimentConfig, model: PreTrainedModel, placement: Placement) -> None:
    """Raise ConfigError (one line naming the key) if `config` does not fit `model` or this machine;
    `placement`: the run's, built from `config` once (`placements.registry.placement_of`)."""
    quantized = config.runtime.quantize in ("server", "both")
    shapes = ModelShapes.from_config(
        model.config, dtype=resolve_runtime(config.runtime).dtype,
        quantization=config.runtime.base_quantization if quantized else "none",
        target_modules=config.lora.target_modules)
    if not shapes.modules:
        raise ConfigError(f"lora.target_modules {config.lora.target_modules} match no module of {config.model.name}")
    check_blocks(config, shapes, placement)
    check_ranks(config, shapes)
    check_positions(config, model)
    check_memory(config, shapes, machine_memory_bytes(model), placement)
    check_frame_size(config, shapes, placement)


def check_blocks(config: ExperimentConfig, shapes: ModelShapes, placement: Placement) -> None:
    blocks = shapes.num_blocks
    for problem in placement.block_problems(config, blocks):
        raise ConfigError(problem)
    if config.hsplit.min_split > blocks:
        raise ConfigError(f"hsplit.min_split {config.hsplit.min_split} is out of range: "
                          f"{config.model.name} has {blocks} blocks (0..{blocks})")
    if config.hsplit.max_split is not None and config.hsplit.max_split > blocks:
        raise ConfigError(f"hsplit.max_split {config.hsplit.max_split} is out of range: "
                          f"{config.model.name} has {blocks} blocks (0..{blocks})")


def check_ranks(config: ExperimentConfig, shapes: ModelShapes) -> None:
    """lora.rank and hsplit.server_rank against every adapted linear; with a planner, no rank of hsplit.rank_set may
    exceed every module's min(d_in, d_out)."""
    name, (d_in, d_out) = min(shapes.modules.items(), key=lambda item: min(item[1]))
    for key, rank in (("lora.rank", config.lora.rank), ("hsplit.server_rank", config.hsplit.server_rank)):
        if rank is not None and rank > min(d_in, d_out):
            raise ConfigError(f"{key} {rank} exceeds min(d_in, d_out) = {min(d_in, d_out)} of {name} ({d_in} -> {d_out})")
    if config.hsplit.plans_per_device():
        widest = max(min(dims) for dims in shapes.modules.values())
        too_big = [r for r in config.hsplit.rank_set if r > widest]
        if too_big:
            raise ConfigError(f"hsplit.rank_set {too_big}: above min(d_in, d_out) of every adapted module (at most {widest})")


def check_positions(config: ExperimentConfig, model: PreTrainedModel) -> None:
    """A learned position table (GPT-2's wpe) has no row past n_positions: an index error mid-run.
    Generation keeps a prompt's end to fit the context, but the context must hold the new tokens
    and one prompt token."""
    positions = getattr(model.config, "n_positions", None)
    if positions is not None and config.data.max_length > positions:
        raise ConfigError(f"data.max_length {config.data.max_length} exceeds the {positions} positions of "
                          f"{config.model.name}")
    context = context_length(model)
    if config.eval.generation and context is not None and config.eval.max_new_tokens >= context:
        raise ConfigError(f"eval.max_new_tokens {config.eval.max_new_tokens} leaves no room for a prompt in the "
                          f"{context} positions of {config.model.name}")


def check_held_out(config: ExperimentConfig, model: Any, tokenizer: Any, held_out: Sequence[Example],
                   held_out_encoded: Sequence[EncodedExample]) -> dict[str, int]:
    """Count what of the held-out set exceeds the model's context (`context_length`), log a warning
    naming the counts, and return them: ``prompts_truncated`` (of the prompts generation would use,
    one per group of the first eval.groups, those longer than the context less eval.max_new_tokens:
    they keep their end) and ``perplexity_truncated`` (scored sequences longer than the context:
    scored on their last positions). Empty where nothing exceeds it or the model names no context.
    """
    context = context_length(model)
    if context is None:
        return {}
    counts: dict[str, int] = {}
    if config.eval.generation and config.eval.max_new_tokens < context:
        budget = context - config.eval.max_new_tokens
        prompts: dict[str, str] = {}
        for example in held_out:
            if len(prompts) >= config.eval.groups:
                break
            prompts.setdefault(example.group, example.prompt)
        # The ids of a window at each prompt's end tell whether it exceeds the budget, whatever its size.
        longer = sum(len(bounded_token_ids(tokenizer, p, budget + 1, keep="end")) > budget for p in prompts.values())
        if longer:
            counts["prompts_truncated"] = longer
            log.warning("%d of the %d held-out prompts generation uses are longer than the %d tokens the context of "
                        "%s leaves them (%d positions less eval.max_new_tokens %d): they keep their last %d tokens",
                        longer, len(prompts), budget, config.model.name, context, config.eval.max_new_tokens, budget)
    if config.eval.perplexity:
        scored = held_out_encoded[: config.eval.perplexity_examples]
        longer = sum(len(item.input_ids) > context for item in scored)
        if longer:
            counts["perplexity_truncated"] = longer
            log.warning("%d of the %d held-out examples perplexity scores are longer than the %d positions of %s "
                        "(data.max_length %d): they are scored on their last %d positions",
                        longer, len(scored), context, config.model.name, config.data.max_length, context)
    return counts


def step_frame_bytes(config: ExperimentConfig, shapes: ModelShapes, placement: Placement) -> int:
    """The largest frame of one step, uncompressed: (B, T, width) activations in the runtime dtype
    (+ int32 labels in plain split). width: d at the cut (split, U-shaped, dlora's embeddings); in
    dlora also every branch message, d_in of a linear group or the sum of its d_out."""
    batch, seq_len = config.federation.batch_size, config.data.max_length
    width = placement.step_frame_width(shapes)
    labels = 4 * batch * seq_len if placement.sends_labels() else 0
    return batch * seq_len * width * shapes.dtype_bytes + labels + FRAME_HEADER_ALLOWANCE_BYTES


def upload_frame_bytes(config: ExperimentConfig, shapes: ModelShapes, placement: Placement) -> int:
    """A device's ADAPTERS frame: r (d_in + d_out) fp32 per module it holds (with a planner, every
    module at the largest rank of hsplit.rank_set: the most a plan can give one device)."""
    if config.hsplit.plans_per_device():
        modules, rank = list(shapes.modules), max(config.hsplit.rank_set)
    else:
        held = placement.device_blocks(shapes.num_blocks, placement.fixed_split(config))
        modules, rank = shapes.modules_before(held.stop), config.lora.rank
    return adapter_bytes(shapes, dict.fromkeys(modules, rank), copies=1) + FRAME_HEADER_ALLOWANCE_BYTES


def check_frame_size(config: ExperimentConfig, shapes: ModelShapes, placement: Placement) -> None:
    if not placement.uses_server():
        return
    limit = config.transport.max_message_bytes
    step, upload = step_frame_bytes(config, shapes, placement), upload_frame_bytes(config, shapes, placement)
    if limit < step:
        raise ConfigError(f"transport.max_message_bytes {limit} is too small for one step's activations "
                          f"({step} bytes at federation.batch_size {config.federation.batch_size} x "
                          f"data.max_length {config.data.max_length})")
    if limit < upload:
        raise ConfigError(f"transport.max_message_bytes {limit} is too small for a device's adapter upload ({upload} bytes)")


def predicted_peak_bytes(config: ExperimentConfig, shapes: ModelShapes, placement: Placement) -> int:
    """The run's predicted peak in one process (`hsplit/memory.py`'s model, one step of the whole
    model: device and server halves are alive together): frozen weights + head, the activations of
    a (federation.batch_size, data.max_length) step through every block and the head, and the
    adapters with gradients and AdamW moments of every party (each device's and its server
    session's halves make one full set per device) plus the global state's weights."""
    rank = max(config.hsplit.rank_set) if config.hsplit.plans_per_device() else config.lora.rank
    ranks = dict.fromkeys(shapes.modules, rank)
    step = memory_breakdown(shapes, shapes.num_blocks, ranks, config.federation.batch_size, config.data.max_length,
                            labels_on_device=True, checkpointing=config.runtime.gradient_checkpointing)
    parties = config.federation.num_devices if placement.uses_server() else 1
    return step.peak_bytes + (parties - 1) * adapter_bytes(shapes, ranks) + adapter_bytes(shapes, ranks, copies=1)


def machine_memory_bytes(model: PreTrainedModel) -> int:
    """Memory of where `model` runs: its GPU's, or this machine's physical memory."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # no sysconf (not POSIX): nothing to check against
        return 2**63


def check_memory(config: ExperimentConfig, shapes: ModelShapes, available_bytes: int, placement: Placement) -> None:
    peak = predicted_peak_bytes(config, shapes, placement)
    if peak > available_bytes:
        raise ConfigError(
            f"the run needs about {peak / 2**30:.1f} GiB (predicted peak at federation.batch_size "
            f"{config.federation.batch_size}, data.max_length {config.data.max_length}, lora.rank {config.lora.rank}, "
            f"federation.num_devices {config.federation.num_devices}), more than the {available_bytes / 2**30:.1f} GiB "
            "this machine has")
