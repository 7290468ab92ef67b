"""Experiment configuration: typed dataclasses, YAML presets, `key=value` overrides.

Every field has a type and a help string; `validate` rejects bad values with a message naming the
field. Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import import_module, resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


@dataclass(frozen=True)
class Bound:
    """An interval of allowed values: [low, high], either end open if so marked."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e12 else f"{value:g}"


# A numeric field's `bound` is its range (each entry of a list), checked first by `validate`. The
# upper ends are far above any real run and low enough that a slip (rounds=1e9, max_new_tokens=1e6,
# lora.rank=1e8) fails at once, not after hours or when the kernel kills the process. Sizes that
# depend on the model and the machine (rank <= min(d_in, d_out), one step's frame, predicted memory)
# are checked once the model is loaded: `federation/preflight.py`.
def registry(choices: str) -> Mapping[str, Any]:
    """The registry `choices` ("module:NAME") points to, imported now (a policy's name -> its class
    or constructor)."""
    module, attribute = choices.split(":")
    return getattr(import_module(module), attribute)


def registry_names(choices: str) -> tuple[str, ...]:
    """The names of the registry `choices` points to."""
    return tuple(registry(choices))


def registry_entry(choices: str, name: str) -> Any:
    """What the registry `choices` holds under `name`, whose facts the config's rules ask for
    instead of testing the name."""
    return registry(choices)[name]


AGGREGATORS = "splitpeft.aggregation.registry:REGISTRY"
PLANNERS = "splitpeft.hsplit.planning:PLANNERS"
SELECTIONS = "splitpeft.parties.killrevive:SELECTIONS"
PLACEMENTS = "splitpeft.placements.registry:REGISTRY"


def failed_checks(checks: list[tuple[bool, str]]) -> list[str]:
    """The messages of the checks that do not hold."""
    return [message for ok, message in checks if not ok]


def _help(text: str, default: Any = dataclasses.MISSING, *, bound: Bound | None = None, choices: str | None = None,
          **kwargs: Any) -> Any:
    """A config field: its help string (the CLI's and the documentation's), its default, for a
    number (each entry of a list of numbers) the range it must be in, written here once, and for a
    policy chosen by name, `choices`: "module:NAME", the registry whose names are the allowed
    values (the names exist there only; it is imported when the config is checked)."""
    metadata = {"help": text, "bound": bound, "choices": choices}
    if default is dataclasses.MISSING:
        return field(metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ModelConfig:
    name: str = _help("smollm2-135m (embedded), tiny-llama|tiny-qwen2|tiny-mistral|tiny-gpt2, a folder or a hub id", "smollm2-135m")


@dataclass
class LoraSettings:
    rank: int = _help("LoRA rank r of every adapted module", 8, bound=Bound(1, 65_536))
    alpha: float = _help("LoRA alpha; the branch is scaled by alpha / r (alpha / sqrt(r) with rslora)", 16.0, bound=Bound(0, 1e6, low_open=True))
    rslora: bool = _help(
        "rank-stabilised LoRA: scale the branch by alpha / sqrt(r), not alpha / r, so adapters of different ranks "
        "(HSplitLoRA, HetLoRA) learn at the same speed; under alpha / r a larger rank learns slower", False)
    dropout: float = _help("dropout on the LoRA branch input", 0.0, bound=Bound(0, 1, high_open=True))
    target_modules: list[str] | None = _help("module names to adapt; null = all attention and MLP linears", None)


@dataclass
class DataConfig:
    source: str = _help("builtin | e2e | jsonl | text (one example a line) | hf:<name>[:split]", "builtin")
    path: str | None = _help("file for e2e / jsonl sources", None)
    limit: int | None = _help("use only the first N examples", None, bound=Bound(1, 10**9))
    eval_fraction: float = _help("share of groups (e.g. E2E MRs) held out for evaluation", 0.1, bound=Bound(0, 1, low_open=True, high_open=True))
    max_length: int = _help("tokens per example (prompt truncated first)", 128, bound=Bound(8, 131_072))
    partition: Literal["iid", "dirichlet", "whole"] = _help(
        "how training data is spread over devices (whole: each device trains on all of it, e.g. its own file)", "iid")
    dirichlet_alpha: float = _help("Dirichlet concentration for non-IID partitions (small = skewed)", 0.5, bound=Bound(0, 1e6, low_open=True))
    partition_field: str | None = _help("field the Dirichlet partition is over (E2E: type, food, area...)", None)

    def problems(self) -> list[str]:
        return failed_checks([
            (self.partition != "dirichlet" or self.partition_field is not None,
             "data.partition_field is required when data.partition is dirichlet"),
            (self.source in ("builtin", "hf") or self.source.startswith("hf:") or self.path is not None,
             f"data.path is required for data.source {self.source!r}"),
        ])


@dataclass
class PlacementConfig:
    placement: str = _help("where each part of the model runs (placements/registry.py)", "split",
                           choices=PLACEMENTS)
    split_layer: int = _help("k: the device runs blocks [0, k)", 2, bound=Bound(0, 4096))
    labels_on_device: bool = _help(
        "U-shaped split (the default): the device also keeps head and loss, so no label tensor leaves it; "
        "false = plain split, the server computes the loss from the completion tokens sent up as labels", True)
    dlora_device_blocks: int = _help(
        "dlora's hybrid: the device also runs blocks [0, k) itself (their frozen weights and adapters), so the "
        "server receives the hidden states after k blocks instead of raw token embeddings (0 = DLoRA as published)", 0, bound=Bound(0, 4096))


@dataclass
class FederationConfig:
    num_devices: int = _help("number of simulated devices", 3, bound=Bound(1, 1_000_000))
    devices_per_round: int | None = _help(
        "devices that train in each round, drawn uniformly without replacement (seeded); null = all", None, bound=Bound(1, 1_000_000))
    min_devices: int = _help(
        "a round in which fewer devices complete (trained, and their upload accepted) stops the run with an "
        "error naming why each was dropped, and is not checkpointed: a run whose devices all fail must not "
        "report the untrained model as its result (centralized: its one party)", 1, bound=Bound(1, 1_000_000))
    rounds: int = _help("federated rounds", 3, bound=Bound(1, 100_000))
    local_steps: int = _help("training steps per device per round", 10, bound=Bound(1, 1_000_000))
    batch_size: int = _help("examples per step", 4, bound=Bound(1, 65_536))
    lr: float = _help("AdamW learning rate (devices and server)", 1e-3, bound=Bound(0, 1, low_open=True))
    aggregator: str = _help(
        "how the copies of an adapter are combined: fedavg (equal ranks), noise_free (HSplitLoRA NAA), "
        "zero_pad (HetLoRA), svd (FlexLoRA)", "fedavg", choices=AGGREGATORS)
    noise_free_start: Literal["cold", "warm"] = _help(
        "with federation.aggregator=noise_free, what each holder starts the next round from (the aggregate is "
        "exact either way): cold = a fresh adapter (A random, B = 0) on the merged weight; warm = the top-r SVD "
        "of the copies' aggregate as its adapter at its own rank, the rest merged into its own frozen weight, "
        "so it computes the merged model and trains on from a non-zero adapter", "cold")
    noise_free_moments: Literal["reset", "keep"] = _help(
        "with federation.noise_free_start=warm, the AdamW moments at a round boundary: reset = dropped (the "
        "warm factors are a new basis, U sqrt(S) and sqrt(S) V^T, not the holder's own A and B, so old "
        "per-coordinate moments describe other coordinates); keep = carried over as they are", "reset")
    noise_free_factors: Literal["balanced", "lora", "own_a", "mean_a"] = _help(
        "with federation.noise_free_start=warm, how the top-r SVD U S V^T is split into the adapter's factors "
        "(s B A is the same either way): balanced = B = U sqrt(S / s), A = sqrt(S / s) V^T (as FlexLoRA); lora = "
        "A's rows are V's at the norm peft gives a fresh A's rows and B = U S / (s |A_j|) carries the singular "
        "values, the scale LoRA training starts from (balanced factors of a small update shrink A, and with it "
        "how fast B can move the product); own_a = each holder keeps its own trained A and gets B = P A^+ / s, the "
        "least-squares fit of the aggregate P in A's row space (A keeps its coordinates and its moments); mean_a = "
        "the same fit in the row space of the holders' A's averaged as HetLoRA averages them (zero-padded to the "
        "largest rank, token-weighted; holder h takes the first r_h rows), so the holders' A's do not drift apart "
        "over rounds", "balanced")
    noise_free_frozen: Literal["copy", "low_rank"] = _help(
        "with federation.noise_free_start=warm, how a holder computes with its frozen weight W - s B A (the "
        "aggregate minus its warm adapter): copy = its own (d_out, d_in) copy of every adapted module's weight, "
        "as much memory as the frozen linears it adapts; low_rank = W x - s B (A x) on the shared W, holding "
        "only A and B (r (d_in + d_out) values a module) for 2 r (d_in + d_out) FLOPs a token more forward and "
        "as many backward; the planner prices either", "copy")
    state_memory_bytes: int | None = _help(
        "devices and server sessions are state between rounds (adapters, AdamW moments) and borrow a model "
        "to compute with only while they train (parties/shells.py); their state is kept in memory up to this "
        "many bytes per side, the rest written to a folder under federation.spill_dir and read back when the "
        "party next trains; null = all in memory", None, bound=Bound(0, 2**50))
    over_select: float = _help(
        "select ceil(federation.devices_per_round x this) of the devices online in a round and keep the "
        "devices_per_round that finish first in simulated time (the rest are dropped as over-selected), as "
        "production federated systems do to beat stragglers; 1 = select exactly devices_per_round", 1.0, bound=Bound(1, 100))
    round_deadline_s: float | None = _help(
        "a device whose simulated round (its compute, its link and the server's work for it, from the fleet's "
        "budgets) takes longer is dropped as a straggler and its update discarded; null = no deadline", None, bound=Bound(0, 1e9, low_open=True))
    spill_dir: str | None = _help(
        "where federation.state_memory_bytes spills: a folder is created in it for the run and removed at "
        "its end; null = the system's temporary folder", None)
    device_waves: bool = _help(
        "the round's devices that cut at the same block with the same ranks run their forward to the cut and "
        "their backward from it as one pass of the frozen model, each on its rows with its own adapters and its "
        "own optimiser (federation/lockstep.py; split placement; equal to one at a time to float rounding with "
        "LoRA dropout 0); a device's activation memory is then its token share of the pass's", False)
    workers: int = _help(
        "processes that train the round's devices (federation/workers.py): each holds a copy of the model and "
        "the devices whose index mod workers is its own (their state stays there), with the machine's CPU "
        "threads divided among them; this process plans and aggregates, in the same device order, so the "
        "adapters equal workers=1's to float rounding where every device draws its own randomness (LoRA "
        "dropout 0, no noise defence); 1 = devices train in this process", 1, bound=Bound(1, 256))

    def problems(self) -> list[str]:
        return failed_checks([
            (self.devices_per_round is None or self.devices_per_round <= self.num_devices,
             "federation.devices_per_round must be in 1..federation.num_devices (or null for all)"),
            (self.min_devices <= (self.devices_per_round or self.num_devices),
             "federation.min_devices must be at most the devices that train in a round (federation.devices_per_round, "
             "or federation.num_devices)"),
            (self.noise_free_start == "cold" or registry_entry(AGGREGATORS, self.aggregator).warm_restarts,
             "federation.noise_free_start=warm needs federation.aggregator=noise_free"),
            (self.noise_free_factors == "balanced" or self.noise_free_start == "warm",
             f"federation.noise_free_factors={self.noise_free_factors} needs federation.noise_free_start=warm "
             "(a cold start has no factors to split)"),
            (self.noise_free_frozen == "copy" or self.noise_free_start == "warm",
             "federation.noise_free_frozen=low_rank needs federation.noise_free_start=warm (a cold start computes "
             "with the merged weight itself)"),
            (self.noise_free_moments == "reset" or self.noise_free_start == "warm",
             "federation.noise_free_moments=keep needs federation.noise_free_start=warm (a cold start has B = 0 "
             "and drops its moments)"),
        ])


@dataclass
class RobustConfig:
    clip: Literal["median", "none"] = _help(
        "update clipping before aggregation: median = every holder's update of a module (what it uploads "
        "minus what it was given; A and B separately for fedavg-style aggregators) is scaled down to at "
        "most robust.clip_factor x the median update of that module's copies; none = off", "median")
    clip_factor: float = _help("c: an update may be at most c x the median update of its module (>= 1)", 4.0, bound=Bound(1, 1e6))
    combine: Literal["mean", "trimmed_mean", "median", "centered_clip"] = _help(
        "with federation.aggregator=fedavg: combine A and B by their token-weighted mean (FedAvg), or, "
        "per coordinate and unweighted, by a trimmed mean or the median, or by centered clipping around the "
        "module's last aggregate update (Karimireddy et al. 2021; radius robust.clip_factor x the median "
        "distance, or x the last update with fewer than 3 copies)", "mean")
    trim_fraction: float = _help(
        "trimmed_mean: share of the copies cut at each end of every coordinate, rounded up "
        "(at most (n - 1) // 2 of n)", 0.2, bound=Bound(0, 0.5, high_open=True))
    frame_norm_factor: float = _help(
        "the server refuses, before any compute, a frame whose cut activations or head gradient has a position "
        "whose norm exceeds this x the largest the frozen model itself produces there for random tokens "
        "(plus what a configured privacy defence adds); 0 = no bound", 100.0)

    def problems(self) -> list[str]:
        return failed_checks([
            (self.frame_norm_factor == 0 or 1 <= self.frame_norm_factor <= 1e9,
             "robust.frame_norm_factor must be 0 (off) or in [1, 1e9]"),
        ])


@dataclass
class TransportConfig:
    compression: Literal["none", "bf16", "int8"] = _help(
        "compression of split activations and gradients on the wire (int8: per channel)", "none")
    max_message_bytes: int = _help("largest frame either side accepts", 512 * 1024 * 1024, bound=Bound(64 * 1024, 2**31 - 1))
    idle_timeout_s: float = _help(
        "the split server closes a device's stream that sends no frame (or does not read its reply) for this "
        "long, and resets its session; one stream per device, a newer one replaces it", 300.0, bound=Bound(0, 86_400, low_open=True))
    step_timeout_s: float = _help(
        "the split server closes a device's stream whose training step (ACTIVATIONS to its last reply) "
        "takes longer than this, and resets its session", 600.0, bound=Bound(0, 86_400, low_open=True))


@dataclass
class ServerConfig:
    batch_devices: bool | None = _help(
        "run the split steps of devices that arrive together as one pass of the server's frozen model, each "
        "device's LoRA on its own rows (simulation: a round's devices step in lockstep; gRPC: the steps that "
        "arrive within batch_window_ms); the same adapters as one device at a time; null = on (measured faster in "
        "fp32 and bf16, on CPU and GPU, BENCHMARKS.md; not under fp16 loss scaling, gradient checkpointing or a "
        "quantized server base, which step one device at a time)", None)
    batch_window_ms: float = _help(
        "gRPC split server with batch_devices: how long the first step of a pass waits for others to join it", 5.0, bound=Bound(0, 60_000))


@dataclass
class FleetConfig:
    memory_bytes: list[int] | None = _help("each device's memory budget in bytes (one per device)", None, bound=Bound(1, 2**50))
    memory_range: list[int] | None = _help("[min, max]: budgets spread evenly over the devices", None, bound=Bound(1, 2**50))
    flops_per_s: float | list[float] = _help("device compute (one value, or one per device), for the simulated wall time", 5e10, bound=Bound(0, 1e18, low_open=True))
    bandwidth_bytes_per_s: float | list[float] = _help("device link (one value, or one per device), for the simulated wall time", 1.25e7, bound=Bound(0, 1e15, low_open=True))
    server_flops_per_s: float = _help(
        "the server's compute, shared by every device's session: the simulated round time and the armsc planner", 5e11, bound=Bound(0, 1e21, low_open=True))
    max_step_s: float | list[float] | None = _help(
        "each device's time budget: the planners choose no plan whose simulated step (device compute + link + "
        "server) exceeds it (one value, or one per device); null = none", None, bound=Bound(0, 1e9, low_open=True))
    trace: str | None = _help(
        "a CSV file with one row per device (rows reused in turn for a larger fleet) and the columns "
        "flops_per_s, memory_bytes, up_bytes_per_s, down_bytes_per_s, availability (the probability it is online "
        "in a round): each device's compute, memory and link, instead of the settings above", None)
    compute_distribution: str | None = _help(
        "draw each device's FLOP/s (seeded): 'lognormal:MEDIAN:SIGMA' or 'uniform:LOW:HIGH'; null = "
        "fleet.flops_per_s", None)
    link_distribution: str | None = _help(
        "draw each device's link bytes/s, both ways (seeded), as fleet.compute_distribution; null = "
        "fleet.bandwidth_bytes_per_s", None)
    availability: float = _help(
        "the probability that a device is online in a round (drawn per device and round, seeded); a trace's "
        "availability column replaces it", 1.0, bound=Bound(0, 1, low_open=True))

    def problems(self) -> list[str]:
        return failed_checks([
            (self.memory_range is None or (len(self.memory_range) == 2 and self.memory_range[0] <= self.memory_range[1]),
             "fleet.memory_range must be [min, max] with 0 < min <= max"),
        ])


@dataclass
class HSplitConfig:
    planner: str = _help(
        "fixed: placement.split_layer and lora.rank everywhere; armsc: per-device split and per-module "
        "ranks maximising the IWI importance trained per second of simulated round time under every "
        "budget (HSplitLoRA); armsc_deepest: the first ARMSC, deepest split that fits then ranks by "
        "score per byte; budget_rank: fixed split, one rank per device, the largest that fits its budget "
        "(HetLoRA); uniform: fixed split, one rank for all, the largest that fits the weakest device (SplitLoRA)",
        "fixed", choices=PLANNERS)
    rank_set: list[int] = _help("ranks the planner may give a module (0 = no adapter)",
                                default_factory=lambda: [0, 2, 4, 8, 16], bound=Bound(0, 65_536))
    probe_batches: int = _help("batches per IWI probe (each round)", 2, bound=Bound(1, 10_000))
    replan_threshold: float = _help("re-plan when IWI scores moved this much (relative L1) since the plan", 0.2, bound=Bound(0, 1e6))
    max_split: int | None = _help("deepest split the planner may choose (default L - 1)", None, bound=Bound(0, 4096))
    server_rank: int | None = _help(
        "split: the rank of the server sessions' adapters on the blocks after each device's cut, which the "
        "planners also count as the importance the server trains; null = lora.rank. The server is not bound "
        "by a device's memory: e.g. the largest of hsplit.rank_set", None, bound=Bound(1, 65_536))
    time_tokens: Literal["max", "data"] = _help(
        "the tokens ARMSC's time model prices a step at: max = every row at data.max_length with every position "
        "labelled (an upper bound); data = the mean padded length and labelled positions of batches drawn from the "
        "planner's probe data. Memory is planned at the maximum either way", "max")
    min_split: int = _help("privacy floor: the shallowest split the planner may choose (armsc, budget_rank: "
                           "a device whose budget fits no split this deep fails the plan)", 0, bound=Bound(0, 4096))
    max_leakage: float | None = _help(
        "privacy ceiling: splits whose measured leakage (the strongest attacker's token accuracy at that depth "
        "in hsplit.leakage_table) exceeds this are never planned; null = no ceiling", None, bound=Bound(0, 1))
    leakage_table: str | None = _help(
        "privacy.json written by `splitpeft privacy` for this model (needed by hsplit.max_leakage; its "
        "leakage is reported with every plan)", None)
    plan_dtype: Literal["runtime", "fp32", "bf16", "fp16"] = _help(
        "the precision the budget planners size a device's frozen blocks, activations and cut in: runtime = "
        "what the devices compute in here (runtime.dtype); fp32 / bf16 / fp16 = the precision of the fleet "
        "being planned for, e.g. a bf16 simulation of devices that run fp32 (the plans, and so the splits "
        "and ranks trained, are then those of that fleet)", "runtime")

    def plans_per_device(self) -> bool:
        """The planner gives devices their own plans from their budgets (every planner but the one
        that puts placement.split_layer and lora.rank everywhere)."""
        return bool(registry_entry(PLANNERS, self.planner).uses_budgets)

    def problems(self) -> list[str]:
        return failed_checks([
            (any(r > 0 for r in self.rank_set), "hsplit.rank_set needs non-negative ranks, at least one above 0"),
            (self.max_leakage is None or self.leakage_table is not None,
             "hsplit.max_leakage needs hsplit.leakage_table (privacy.json from `splitpeft privacy` for this model)"),
            (self.max_split is None or self.min_split <= self.max_split, "hsplit.min_split must be <= hsplit.max_split"),
        ])


@dataclass
class KillReviveConfig:
    enabled: bool = _help("Kill and Revive: keep only the adapters that matter active on the device", False)
    warmup: int = _help("steps before the first kill", 10, bound=Bound(0, 10**9))
    interval: int = _help("kill the lowest-scoring active adapters every N steps", 5, bound=Bound(1, 10**9))
    active_fraction: float = _help("at most this share of a device's adapters stays active", 0.125, bound=Bound(0, 1, low_open=True))
    revive_interval: int = _help("score killed adapters by gradient norm every N steps", 10, bound=Bound(1, 10**9))
    revive_margin: float = _help("a killed adapter revives if it beats the weakest active one by this (relative)", 0.1, bound=Bound(0, 1e6))
    ema: float = _help("EMA factor of the update-size score ||delta(BA)|| / ||BA||", 0.9, bound=Bound(0, 1, high_open=True))
    selection: str = _help(
        "dynamic = KR; scheduled = KR whose active share shrinks from fraction_start to active_fraction over "
        "decay_intervals kill steps; converged = KR killing only adapters whose update score fell below "
        "kill_threshold; gradient = KR killing the lowest EMA of gradient norm (what revival compares); "
        "static_* = baselines choosing the active set once when warm-up ends", "dynamic",
        choices=SELECTIONS)
    fraction_start: float = _help("scheduled: the active share when warm-up ends (>= active_fraction)", 1.0, bound=Bound(0, 1, low_open=True))
    decay_intervals: int = _help("scheduled: kill steps over which the active share falls linearly to active_fraction", 4, bound=Bound(0, 10**9))
    kill_threshold: float = _help(
        "converged: an active adapter is killed only once its update score (EMA of ||delta(BA)|| / ||BA|| per step) "
        "is below this", 0.01, bound=Bound(0, 1e6))
    kill_threshold_relative: bool = _help(
        "converged: kill_threshold is a share of the median update score over the device's adapters when warm-up "
        "ended, not an absolute score (scores shrink with the learning rate and the run's length: measured at 720 "
        "steps, every adapter scored below 0.05 from the first kill on, so an absolute 0.05 killed as dynamic does)",
        False)
    block_floor: int = _help(
        "dynamic, scheduled, converged: kills and revival swaps keep at least this many active adapters in every "
        "transformer block (may keep more than active_fraction; 0 = no floor)", 0, bound=Bound(0, 4096))
    server_trains_killed: bool = _help(
        "dlora: the server keeps training the killed adapters it computes (its own AdamW at federation.lr, from the "
        "gradients its backward reaches anyway) and the device fetches them before it uploads; false = frozen while "
        "killed, as published. The hybrid's own blocks' killed adapters stay frozen on the device", False)
    upload_killed: bool = _help(
        "the device uploads its killed adapters too, at their frozen values (the round's start, or where a kill "
        "froze them), so each module's mean counts every device: a module that one device alone keeps training "
        "no longer takes that device's whole update each round (measured at 720 steps: the published rule's "
        "held-out drift sat in such modules); an adapter killed before the round began and still as loaded travels as "
        "its name (the server counts the value it gave), only those killed during the round as tensors; false = they "
        "stay home, as published",
        False)
    spare_device_blocks: bool = _help(
        "dlora's hybrid (placement.dlora_device_blocks > 0): the adapters of the device's own blocks stay out of "
        "Kill and Revive and always train there (killing one saves its branch's device FLOPs but no traffic, and "
        "no server computes it); active_fraction then counts the server's blocks' adapters", False)

    def problems(self) -> list[str]:
        return failed_checks([
            (self.fraction_start >= self.active_fraction,
             "kill_revive.fraction_start must be >= kill_revive.active_fraction (the schedule only shrinks)"),
            (self.block_floor == 0 or not registry_entry(SELECTIONS, self.selection).chooses_once,
             "kill_revive.block_floor: the static baselines choose once by count; use dynamic, scheduled, converged or gradient"),
            (not self.kill_threshold_relative or self.selection == "converged",
             "kill_revive.kill_threshold_relative is a setting of selection=converged"),
        ])


@dataclass
class EvalConfig:
    perplexity: bool = _help("perplexity on held-out examples", True)
    perplexity_examples: int = _help("held-out examples used for perplexity", 64, bound=Bound(1, 1_000_000))
    every_round: bool = _help("also compute held-out perplexity after each round", True)
    generation: bool = _help("generate for held-out groups and score BLEU/NIST/METEOR/ROUGE-L/CIDEr", True)
    groups: int = _help("held-out groups (e.g. distinct MRs) to generate for", 32, bound=Bound(1, 100_000))
    max_new_tokens: int = _help(
        "generation length limit; a prompt keeps at most the model's context less this many tokens (its end)", 40, bound=Bound(1, 2048))
    max_generation_s_per_prompt: float | None = _help(
        "time bound on generation: a batch of n prompts stops after n x this many seconds (Hugging Face's "
        "max_time); its outputs are scored as they stood and counted in the result's generation_cut; null = no bound",
        60.0, bound=Bound(0, 86_400, low_open=True))
    num_beams: int = _help("1 = greedy, >1 = beam search", 1, bound=Bound(1, 32))
    length_penalty: float = _help(
        "beam search: a finished beam scores sum log p / length^length_penalty (< 1 favours shorter outputs, "
        "> 1 longer; no effect when greedy)", 1.0, bound=Bound(-10, 10))
    no_repeat_ngram_size: int = _help("no n-gram of this size appears twice in one output (0 = off)", 0, bound=Bound(0, 64))
    meteor: bool = _help("compute METEOR (starts a Java process)", True)
    baseline: bool = _help("also evaluate the untuned base model for comparison", False)


ATTACKER_NAMES = ("embedding_nn", "linear", "learned", "gradient", "labels", "search", "bisr")  # privacy/attackers.py
DEFAULT_ATTACKERS = ATTACKER_NAMES[:5]  # search and bisr (slow: they run the device's blocks) on request


@dataclass
class PrivacyConfig:
    audit: bool = _help(
        "after training, play an honest-but-curious server against each device's traffic (privacy/meter.py) "
        "and add the leakage to the report (report section privacy)", False)
    attackers: list[str] = _help(
        f"attackers the audit runs ({', '.join(ATTACKER_NAMES)}); search (the known-weights search, which runs the "
        "device's blocks on every candidate token) and bisr (soft inputs optimised through the device's blocks) are "
        "not in the default list: add search for the strongest audit, with or without noise",
        default_factory=lambda: list(DEFAULT_ATTACKERS))
    estimate: bool = _help(
        "when privacy.audit is off, every run's report still gets a cheap `privacy_estimate` (seconds): the "
        "linear attacker and the side channels against a few of each exposure's private examples, printed "
        "beside perplexity; a lower bound on the full audit", True)
    search_candidates: int = _help("search: tokens per position the linear attacker proposes", 16, bound=Bound(1, 1_000_000))
    search_lm_candidates: int = _help("search: tokens per position the model proposes after each decoded prefix", 8, bound=Bound(0, 1_000_000))
    search_beam: int = _help("search: decoded prefixes kept per sequence", 1, bound=Bound(1, 1024))
    bisr_steps: int = _help("bisr: Adam steps on the soft inputs that should reproduce the observed states", 100, bound=Bound(0, 1_000_000))
    bisr_lr: float = _help(
        "bisr: the Adam learning rate of those steps (SmolLM2 under noise: 0.0005 beat 0.002 and 0.02, which "
        "drift away from the linear map's start; BENCHMARKS, \"Known-weights attackers under noise\")", 0.0005, bound=Bound(1e-9, 1e3))
    audit_examples: int = _help("private examples per device the audit tries to reconstruct", 32, bound=Bound(1, 100_000))
    aux_source: Literal["builtin", "e2e", "jsonl", "text"] = _help(
        "public auxiliary text the attackers train on (the built-in task, or a file: e2e, jsonl, or text = "
        "one example a line, e.g. any public corpus)", "builtin")
    aux_path: str | None = _help("file for aux_source e2e / jsonl / text; its last privacy.aux_examples examples "
                                 "are used, and any whose text the devices train on is dropped", None)
    aux_examples: int = _help("auxiliary examples the attackers train on", 256, bound=Bound(2, 1_000_000))
    aux_generate: int = _help(
        "completions the server samples per auxiliary prompt from the model it knows (the base with the "
        "aggregated adapters; privacy/corpus.py), added to the attackers' training text: generated pairs, "
        "as many as the server cares to make; 0 = the auxiliary text alone", 0, bound=Bound(0, 10_000))
    learned_steps: int = _help("most training steps of the learned inverter", 300, bound=Bound(0, 1_000_000))
    learned_patience: int = _help(
        "the learned inverter holds out 10% of its training text and stops once this many checks in a row "
        "(one every 50 steps) gained under 0.005 token accuracy, keeping its best weights (report: the "
        "learned row's `fit`); 0 = exactly privacy.learned_steps steps", 0, bound=Bound(0, 1_000_000))
    noise_multiplier: float = _help(
        "sigma: Gaussian release of what the device sends up, each token's vector clipped to privacy.clip_norm C "
        "and N(0, (sigma C)^2) added (defences/cut.py); 0 = off", 0.0, bound=Bound(0, 1e6))
    clip_norm: float = _help("C: L2 clipping of each token's vector sent up (0 = off; needed with noise)", 0.0, bound=Bound(0, 1e9))
    gradient_clip_norm: float = _help(
        "C_g: with noise, the head gradient the device sends (U-shaped split, dlora) is also clipped to C_g per "
        "token and gets N(0, (sigma C_g)^2) (its rows are far smaller than the activations'); 0 = sent as is. "
        "With privacy.clip_norm 0, only the head gradient is noised (it carries the labels; the states go clean)", 0.0, bound=Bound(0, 1e9))
    clip_per: Literal["token", "sequence"] = _help(
        "what privacy.clip_norm (and gradient_clip_norm) bounds: each token's vector (sensitivity 2C per token, "
        "2C sqrt(T) per sequence) or each sequence's whole (T, d) release (2C per sequence, DP-Forward's "
        "sequence-level guarantee, with far less signal per token)", "token")
    nopeek_weight: float = _help(
        "alpha: the device adds alpha dCor(input embeddings, cut activations) to its loss (NoPeek); needs "
        "device-side adapters before the cut", 0.0, bound=Bound(0, 1e6))
    delta: float = _help("delta of the (epsilon, delta) the report gives for the Gaussian release", 1e-5, bound=Bound(0, 1, low_open=True, high_open=True))

    def problems(self) -> list[str]:
        return failed_checks([
            (all(name in ATTACKER_NAMES for name in self.attackers), f"privacy.attackers: choose from {', '.join(ATTACKER_NAMES)}"),
            (self.noise_multiplier == 0 or self.clip_norm > 0 or self.gradient_clip_norm > 0,
             "privacy.noise_multiplier needs privacy.clip_norm > 0 (the noise is sigma x C), or "
             "privacy.gradient_clip_norm > 0 alone for noise on the head gradient only"),
            (self.clip_norm > 0 or self.gradient_clip_norm == 0 or self.noise_multiplier > 0,
             "privacy.gradient_clip_norm clips the head gradient of the Gaussian release: set privacy.noise_multiplier"),
        ])


@dataclass
class RuntimeConfig:
    server_device: str = _help("where the server's part runs: cpu, cuda, cuda:N or auto (cuda if one is visible)", "cpu")
    device_device: str = _help("where each simulated device's part runs: cpu, cuda, cuda:N or auto", "cpu")
    dtype: Literal["fp32", "bf16", "fp16", "auto"] = _help(
        "dtype of the frozen base and of the activations and gradients at the cut (adapters and AdamW "
        "state stay fp32); fp16 uses dynamic loss scaling and needs CUDA; auto = bf16 where the server's and "
        "the devices' hardware have bf16 matrix units (AMX-BF16, AVX512-BF16, Arm BF16, a CUDA GPU with bf16), "
        "else fp32 (the report says which and why)", "auto")
    base_quantization: Literal["none", "int8", "nf4"] = _help(
        "quantize the frozen linears of the transformer blocks with bitsandbytes (nf4 = QLoRA's 4-bit "
        "NormalFloat, int8 = LLM.int8 weights); embedding, norms and head stay in runtime.dtype", "none")
    quantize: Literal["devices", "server", "both"] = _help("which parties hold the quantized base", "both")
    gradient_checkpointing: bool = _help(
        "recompute each block's activations in backward instead of keeping them (device and server blocks)", False)
    malloc_arenas: int = _help(
        "glibc (Linux) only: at most this many malloc arenas, set when a run starts. Each thread that allocates "
        "can take its own arena (up to 8 a core) and keep freed tensors' pages from the others: a 720-step "
        "hybrid run held 5.6 GB in 12 arenas with 1.3 GB in use. 0 = glibc's default; MALLOC_ARENA_MAX in "
        "the environment wins", 2, bound=Bound(0, 1024))
    release_memory_each_round: bool = _help(
        "after each round hand the C heap's free pages back to the system (glibc malloc_trim), so a long "
        "run's resident memory is what it holds rather than the most it ever held", True)


@dataclass
class ExperimentConfig:
    seed: int = _help("seed for data split, partition, adapter init and batch order", 0, bound=Bound(0, 2**31 - 1))
    count_flops: bool = _help("count device FLOPs with torch's FlopCounterMode", True)
    export_merged: bool = _help("also write merged full weights under adapter/merged", False)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    kill_revive: KillReviveConfig = field(default_factory=KillReviveConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    hsplit: HSplitConfig = field(default_factory=HSplitConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> ExperimentConfig:
        """Every number finite and in its field's range (`bound`), then each section's own rules
        (its `problems`), then the rules that tie sections together (`cross_section_problems`); the
        first that fails is a ConfigError naming its keys."""
        for key, value in _numbers(self):  # NaN and inf pass most comparisons, so first
            try:
                finite = math.isfinite(value)
            except OverflowError:  # an integer beyond any float: 400 nines
                raise ConfigError(f"{key} must be in {NUMERIC_BOUNDS.get(key) or 'range'}, not a number of "
                                  f"{len(str(abs(value)))} digits") from None
            if not finite:
                raise ConfigError(f"{key} must be a finite number, not {value}")
        for key, value in _numbers(self):
            bound = NUMERIC_BOUNDS.get(key)
            if bound is not None and not bound.holds(value):
                raise ConfigError(f"{key} must be in {bound}, not {_number(value)}")
        named = {item.name: getattr(self, item.name) for item in fields(self) if dataclasses.is_dataclass(getattr(self, item.name))}
        for prefix, part in named.items():  # policies chosen by name: the names their registry holds
            for item in fields(part):
                if item.metadata.get("choices") is not None:
                    names, value = registry_names(item.metadata["choices"]), getattr(part, item.name)
                    if value not in names:
                        raise ConfigError(f"{prefix}.{item.name} must be one of {', '.join(names)}, not {value!r}")
        sections = list(named.values())
        for problem in [p for section in sections if hasattr(section, "problems") for p in section.problems()]:
            raise ConfigError(problem)
        for problem in self.cross_section_problems():
            raise ConfigError(problem)
        return self

    def cross_section_problems(self) -> list[str]:
        """The rules that involve keys of more than one section, the placement's own among them
        (its `config_problems`: what it cannot run with)."""
        from splitpeft.placements.registry import placement_of  # placements own their rules

        fed, hs, rt = self.federation, self.hsplit, self.runtime
        shared_adapter = registry_entry(AGGREGATORS, fed.aggregator).shared_adapter  # the global update stays one adapter
        planner = registry_entry(PLANNERS, hs.planner)
        return placement_of(self).config_problems(self) + failed_checks([
            (not self.kill_revive.server_trains_killed or self.placement.placement == "dlora",
             "kill_revive.server_trains_killed: only dlora hands killed adapters to the server; use placement.placement=dlora"),
            (not self.kill_revive.spare_device_blocks
             or (self.placement.placement == "dlora" and self.placement.dlora_device_blocks > 0),
             "kill_revive.spare_device_blocks: only dlora's hybrid has device blocks; use placement.placement=dlora "
             "with placement.dlora_device_blocks >= 1"),
            (self.robust.combine == "mean" or shared_adapter,
             f"robust.combine={self.robust.combine} combines A and B like fedavg; it needs federation.aggregator=fedavg"),
            (self.fleet.memory_bytes is None or len(self.fleet.memory_bytes) == fed.num_devices,
             "fleet.memory_bytes needs one budget per device (federation.num_devices)"),
            (not hs.plans_per_device() or self.fleet.memory_bytes is not None or self.fleet.memory_range is not None,
             f"hsplit.planner={hs.planner} needs device budgets: fleet.memory_bytes or fleet.memory_range"),
            (all(not isinstance(v, list) or len(v) == fed.num_devices
                 for v in (self.fleet.flops_per_s, self.fleet.bandwidth_bytes_per_s, self.fleet.max_step_s)),
             "fleet.flops_per_s, fleet.bandwidth_bytes_per_s and fleet.max_step_s lists need one value per device"),
            (rt.base_quantization == "none" or shared_adapter,
             "runtime.base_quantization: only fedavg keeps the global update a LoRA adapter; noise_free, zero_pad "
             "and svd merge dense updates into the frozen weights, which a quantized base cannot take exactly"),
            (rt.base_quantization == "none" or (planner.one_rank and not planner.uses_scores),
             f"runtime.base_quantization: hsplit.planner={hs.planner} "
             + ("plans from IWI scores, which need float weights" if planner.uses_scores
                else "gives devices different ranks, which fedavg cannot average")
             + f"; use one of {', '.join(n for n, p in registry(PLANNERS).items() if p.one_rank and not p.uses_scores)}"),
            (rt.base_quantization == "none" or not self.export_merged,
             "runtime.base_quantization: export_merged would merge into a quantized base; set export_merged=false"),
        ])


def _bounds(section: Any, prefix: str = "") -> dict[str, Bound]:
    """Every numeric key's range, from the `bound` its field was declared with."""
    found: dict[str, Bound] = {}
    for item in fields(section):
        value, key = getattr(section, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            found |= _bounds(value, f"{key}.")
        elif item.metadata.get("bound") is not None:
            found[key] = item.metadata["bound"]
    return found


NUMERIC_BOUNDS: dict[str, Bound] = _bounds(ExperimentConfig())


def _numbers(section: Any, prefix: str = "") -> typing.Iterator[tuple[str, float]]:
    """(key, value) for every number in `section` and its sub-sections, each entry of a list."""
    for item in fields(section):
        value, key = getattr(section, item.name), f"{prefix}{item.name}"
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{key}.")
            continue
        for entry in value if isinstance(value, list) else [value]:
            if isinstance(entry, (int, float)) and not isinstance(entry, bool):
                yield key, entry


def describe_keys() -> str:
    """Every config key with its default and help, one per line (for `splitpeft simulate --help`)."""
    lines = ["config keys (key=value overrides; defaults before any preset):"]

    def walk(section: Any, prefix: str) -> None:
        for item in fields(section):
            value = getattr(section, item.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{item.name}.")
            else:
                lines.append(f"  {prefix}{item.name} = {value!r}\n      {item.metadata.get('help', '')}")

    walk(ExperimentConfig(), "")
    return "\n".join(lines)


def _type_name(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    return {bool: "true/false", int: "integer", float: "number", str: "string"}.get(hint, str(hint))


def reference_rows() -> list[dict[str, str]]:
    """Every config key, in schema order: key, type (a Literal's choices), default (before any
    preset), allowed range (`NUMERIC_BOUNDS`) and help string. The documentation's configuration
    reference is generated from this, so no key can be left out of it."""
    rows: list[dict[str, str]] = []

    def walk(section: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(section))
        for item in fields(section):
            value = getattr(section, item.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{item.name}.")
                continue
            key = f"{prefix}{item.name}"
            bound = NUMERIC_BOUNDS.get(key)
            choices = item.metadata.get("choices")
            kind = " \\| ".join(f"`{name}`" for name in registry_names(choices)) if choices else _type_name(hints[item.name])
            rows.append({"key": key, "type": kind,
                         "default": "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip()
                         .removesuffix("...").strip(),
                         "range": "" if bound is None else str(bound), "help": item.metadata.get("help", "")})

    walk(ExperimentConfig(), "")
    return rows


def reference_markdown() -> str:
    """`reference_rows` as one Markdown table per config section."""
    lines: list[str] = []
    section = None
    for row in reference_rows():
        head = row["key"].split(".")[0] if "." in row["key"] else "(top level)"
        if head != section:
            section = head
            lines += ["", f"## `{head}`" if head != "(top level)" else "## Top-level keys", "",
                      "| key | type | default | range | what it does |", "|---|---|---|---|---|"]
        cells = [f"`{row['key']}`", row["type"], f"`{row['default']}`", row["range"].replace("|", "\\|"),
                 row["help"].replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines).strip() + "\n"


PRESETS = ("default", "tiny", "e2e")


def preset_path(name: str) -> Path:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return Path(str(resources.files("splitpeft") / "presets" / f"{name}.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, *, preset: str | None = None) -> ExperimentConfig:
    """Defaults <- preset or YAML file <- `key=value` overrides, then validated."""
    if path is not None and preset is not None:
        raise ConfigError("give either a config file or a preset, not both")
    source = Path(path) if path is not None else preset_path(preset or "default")
    if not source.is_file():
        raise ConfigError(f"config file {str(source)!r} does not exist")
    try:
        raw = yaml.load(source.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {source} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {source} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {source} must hold a mapping")
    config = config_from_dict(raw, validate=False)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            parsed = value
        _set(config, key.strip().split("."), _Override(value, parsed), key.strip())
    return config.validate()


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last, so a
    second `federation:` section would silently drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


@dataclass(frozen=True)
class _Override:
    """A `key=value` override: its text, and the value YAML reads from it. A string field takes
    the text as typed (YAML would read `0755` as 493 and `1:30` as 90); every other field the value."""

    text: str
    parsed: Any


def config_from_dict(raw: dict[str, Any], *, validate: bool = True) -> ExperimentConfig:
    """Defaults <- a nested mapping (as `to_dict` writes it), checked like a config file."""
    config = ExperimentConfig()
    _apply(config, raw, prefix="")
    return config.validate() if validate else config


def _apply(target: Any, raw: dict[str, Any], prefix: str) -> None:
    for key, value in raw.items():
        _set(target, [key], value, f"{prefix}{key}")


def _set(target: Any, path: list[str], value: Any, full_key: str) -> None:
    names = {f.name: f for f in fields(target)}
    head = path[0]
    if head not in names:
        raise ConfigError(f"unknown config key {full_key!r}; known here: {', '.join(names)}")
    hint = typing.get_type_hints(type(target))[head]
    current = getattr(target, head)
    if dataclasses.is_dataclass(current):
        if len(path) > 1:
            _set(current, path[1:], value, full_key)
        elif isinstance(value, dict):
            _apply(current, value, prefix=f"{full_key}.")
        else:
            raise ConfigError(f"config key {full_key!r} is a section; give its fields")
        return
    if len(path) > 1:
        raise ConfigError(f"unknown config key {full_key!r}: {head!r} has no sub-keys")
    setattr(target, head, _coerce(value, hint, full_key))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if isinstance(value, _Override):
        if hint is str:
            return value.text
        if origin not in (typing.Union, types.UnionType) or value.parsed is None:
            value = value.parsed
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {', '.join(map(str, args))}, not {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [v.strip() for v in str(value).split(",") if v.strip()]
        return [_coerce(v, args[0], key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, not {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be an integer, not {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e9 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, not {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # YAML read 0755 as 493, 1:30 as 90
            raise ConfigError(f"{key} must be a string, not the number {value!r}: quote it in YAML (\"...\")")
        raise ConfigError(f"{key} must be a string, not {value!r}")
    raise ConfigError(f"{key}: unsupported type {hint}")


def to_dict(config: ExperimentConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_yaml(config: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
