"""Building a fleet from a config: the adapted modules, each device's data, budgets and runtime.

The simulation builds every device here; a real device (the Flower ClientApp) calls the same
functions for itself alone: its own shard (`device_examples`), its own runtime (`build_device`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from splitpeft.config import ExperimentConfig
from splitpeft.data.batching import BatchStream, EncodedExample
from splitpeft.data.examples import Example
from splitpeft.data.partition import partition, split_by_group
from splitpeft.data.sources import load_examples
from splitpeft.defences.cut import Defence
from splitpeft.hsplit.budget import DeviceProfile, fleet_preset
from splitpeft.hsplit.planning import warm_frozen_of
from splitpeft.model import adapters as lora
from splitpeft.model.backbone import Backbone
from splitpeft.model.runtime import CPU_FP32, Runtime
from splitpeft.parties.device import DeviceRuntime
from splitpeft.parties.party import Training, WarmStart
from splitpeft.parties.shells import ShellPool
from splitpeft.placements.base import Placement

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def device_ids(count: int) -> list[str]:
    return [f"device-{index}" for index in range(count)]


def adapted_modules(config: ExperimentConfig, backbone: Backbone) -> list[str]:
    """Every module of the model that `lora.target_modules` names (all blocks)."""
    targets = config.lora.target_modules or list(backbone.default_target_modules)
    modules = lora.target_module_names(backbone, targets, range(backbone.num_blocks))
    if not modules:
        raise ValueError(f"lora.target_modules {targets} match no module of {config.model.name}")
    return modules


def modules_in(modules: Mapping[str, int], backbone: Backbone, blocks: range) -> dict[str, int]:
    """The part of a {module: rank} map that lives in `blocks`."""
    prefixes = tuple(backbone.block_prefix(j) for j in blocks)
    return {name: rank for name, rank in modules.items() if name.startswith(prefixes)}


def device_examples(config: ExperimentConfig, num_devices: int, *, hold_out: bool = True
                    ) -> tuple[list[Example], list[list[Example]], list[Example]]:
    """(training examples, one shard per device, held-out examples) of the configured data.

    `hold_out=False`: no held-out split, every example trains (a real device's own data file).
    """
    examples = load_examples(config.data.source, config.data.path, limit=config.data.limit, seed=config.seed)
    train, held_out = split_by_group(examples, config.data.eval_fraction, config.seed) if hold_out else (examples, [])
    shards = partition(train, num_devices, config.data.partition, alpha=config.data.dirichlet_alpha,
                       field=config.data.partition_field, seed=config.seed)
    return train, shards, held_out


def device_stream(config: ExperimentConfig, items: list[EncodedExample], index: int, pad_id: int) -> BatchStream:
    """Device `index`'s batches: its own order, seeded by (seed, index)."""
    return BatchStream(items, config.federation.batch_size, pad_id, config.seed + index)


UNLIMITED_MEMORY = 2**50  # a device's memory where the fleet sets none (the planners then have no memory bound)
TRACE_COLUMNS = ("flops_per_s", "memory_bytes", "up_bytes_per_s", "down_bytes_per_s", "availability")


def fleet_profiles(config: ExperimentConfig, ids: list[str]) -> list[DeviceProfile] | None:
    """Each device's budget: from `fleet.trace`, or from per-device lists or a range spread evenly
    over the fleet, with compute and link drawn from `fleet.*_distribution` where set. None where
    the fleet sets no budget at all (no memory, trace, distribution, availability or deadline)."""
    fleet, n = config.fleet, len(ids)
    if fleet.trace is not None:
        rows = read_trace(fleet.trace)
        return [DeviceProfile(d, int(row["memory_bytes"]), row["flops_per_s"], row["down_bytes_per_s"], limit,
                              row["up_bytes_per_s"], row["availability"])
                for d, row, limit in zip(ids, (rows[i % len(rows)] for i in range(n)), _each(fleet.max_step_s, n))]
    if fleet.memory_bytes is not None:
        budgets = [int(b) for b in fleet.memory_bytes]
    elif fleet.memory_range is not None:
        budgets = [p.memory_bytes for p in fleet_preset(n, (fleet.memory_range[0], fleet.memory_range[1]), 1.0, 1.0)]
    elif (fleet.compute_distribution or fleet.link_distribution or fleet.availability < 1
          or config.federation.round_deadline_s is not None or config.federation.over_select > 1):
        budgets = [UNLIMITED_MEMORY] * n
    else:
        return None
    generator = np.random.default_rng([config.seed, 23])
    flops = draw(fleet.compute_distribution, n, generator) if fleet.compute_distribution else _each(fleet.flops_per_s, n)
    links = draw(fleet.link_distribution, n, generator) if fleet.link_distribution else _each(fleet.bandwidth_bytes_per_s, n)
    return [DeviceProfile(d, b, float(f), float(w), t, availability=fleet.availability) for d, b, f, w, t in
            zip(ids, budgets, flops, links, _each(fleet.max_step_s, n))]


def _each(value: float | list[float] | None, n: int) -> list[Any]:
    return list(value) if isinstance(value, list) else [value] * n


def draw(spec: str, n: int, generator: np.random.Generator) -> list[float]:
    """`n` positive values from a named distribution: 'lognormal:MEDIAN:SIGMA' (the spread of
    phones' compute and links) or 'uniform:LOW:HIGH'. ValueError naming the problem otherwise."""
    name, _, rest = spec.partition(":")
    try:
        numbers = [float(v) for v in rest.split(":")] if rest else []
    except ValueError:
        raise ValueError(f"distribution {spec!r}: parameters must be numbers") from None
    if name == "lognormal" and len(numbers) == 2:
        median, sigma = numbers
        if not (median > 0 and sigma >= 0 and np.isfinite(median) and np.isfinite(sigma)):
            raise ValueError(f"distribution {spec!r}: lognormal needs a median > 0 and a sigma >= 0")
        return [float(v) for v in median * np.exp(sigma * generator.standard_normal(n))]
    if name == "uniform" and len(numbers) == 2:
        low, high = numbers
        if not (0 < low <= high and np.isfinite(high)):
            raise ValueError(f"distribution {spec!r}: uniform needs 0 < LOW <= HIGH")
        return [float(v) for v in generator.uniform(low, high, n)]
    raise ValueError(f"unknown distribution {spec!r}: expected 'lognormal:MEDIAN:SIGMA' or 'uniform:LOW:HIGH'")


def read_trace(path: str) -> list[dict[str, float]]:
    """The rows of a fleet trace (CSV with a header naming `TRACE_COLUMNS`, other columns ignored).
    ValueError naming the file, row and column of anything missing, not a number, or out of range
    (availability in [0, 1], the rest > 0)."""
    import csv

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"fleet.trace: no such file {path}")
    with file.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in TRACE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"fleet.trace {path}: missing columns {missing} (needs {list(TRACE_COLUMNS)})")
        rows = []
        for line, raw in enumerate(reader, start=2):
            row = {}
            for column in TRACE_COLUMNS:
                try:
                    value = float(raw[column])
                except (TypeError, ValueError):
                    raise ValueError(f"fleet.trace {path}, line {line}: {column} {raw[column]!r} is not a number") from None
                good = 0 <= value <= 1 if column == "availability" else 0 < value < float("inf")
                if not good:
                    allowed = "in [0, 1]" if column == "availability" else "a finite number > 0"
                    raise ValueError(f"fleet.trace {path}, line {line}: {column} {value} must be {allowed}")
                row[column] = value
            rows.append(row)
    if not rows:
        raise ValueError(f"fleet.trace {path}: no devices in it")
    return rows


def build_device(config: ExperimentConfig, base: PreTrainedModel, placement: Placement, index: int,
                 stream: BatchStream, split_layer: int, ranks: Mapping[str, int], *, runtime: Runtime = CPU_FP32,
                 pool: ShellPool | None = None) -> DeviceRuntime:
    """Device `index` at `split_layer` with adapters `ranks`, Kill and Revive attached if enabled.
    It holds only its part of `base` (see `DeviceRuntime`)."""
    device = DeviceRuntime(
        f"device-{index}", base, placement, split_layer, ranks, stream, training_of(config, runtime),
        count_flops=config.count_flops, defence=defence_of(config, index), pool=pool,
    )
    if config.kill_revive.enabled:
        device.attach_kill_revive(config.kill_revive, seed=config.seed + index)
    return device


def training_of(config: ExperimentConfig, runtime: Runtime) -> Training:
    """How every party of the run trains (`Training`), from `lora.*`, `federation.lr`, the
    aggregator's restarts and `kill_revive.server_trains_killed`, on `runtime`."""
    return Training(alpha=config.lora.alpha, dropout=config.lora.dropout, lr=config.federation.lr,
                    rslora=config.lora.rslora, runtime=runtime, warm=warm_start_of(config),
                    train_killed=config.kill_revive.enabled and config.kill_revive.server_trains_killed)


def warm_start_of(config: ExperimentConfig) -> WarmStart | None:
    """How parties take their adapters: noise-free's warm start (`federation.noise_free_start=warm`,
    with `federation.noise_free_moments` and `federation.noise_free_frozen`), or None (cold, and every other aggregator)."""
    frozen = warm_frozen_of(config)  # the planner prices the same choice
    if frozen is None:
        return None
    return WarmStart(keep_moments=config.federation.noise_free_moments == "keep", low_rank=frozen == "low_rank")


def defence_of(config: ExperimentConfig, index: int) -> Defence:
    """Device `index`'s defences from `privacy.*`, its noise seeded by (seed, index)."""
    p = config.privacy
    return Defence(noise_multiplier=p.noise_multiplier, clip_norm=p.clip_norm, gradient_clip_norm=p.gradient_clip_norm,
                   nopeek_weight=p.nopeek_weight, clip_per=p.clip_per, seed=config.seed * 1_000 + index + 7)


