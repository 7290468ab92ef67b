"""Side-by-side comparisons on the same data, model, fleet and token budget, over several seeds.

Suites (each method is the base config plus a few overrides; a method is one entry of `SUITES`):

* `hsplit` (every method fits every device's memory budget):
  - `hsplitlora`: IWI + ARMSC as the optimiser (`armsc`) + noise_free with warm restarts that
    keep each holder's own A, fit B to the exact aggregate and keep the AdamW moments (`own_a`);
  - `hsplitlora_server16`: `hsplitlora` with the server sessions at rank 16 (`hsplit.server_rank`), the top
    of the default rank set, instead of lora.rank: the server is not bound by a device's memory;
  - `hsplitlora_server16_data`: and ARMSC's time model at the data's tokens a step (`hsplit.time_tokens`);
  - `hsplitlora_zero_pad`: its plans with HetLoRA's aggregation (zero-padding; FedAvg at equal ranks);
  - `hsplitlora_mean_a`: its plans, noise-free with one A per module (HetLoRA's average of the A's) and B
    fitted to the exact aggregate (`mean_a`);
  - `hsplitlora_svd`: warm restarts from the balanced top-r SVD of the aggregate, moments reset;
  - `hsplitlora_lora_factors`: the same SVD with A at peft's initial row norms and B carrying S;
  - `hsplitlora_cold`: noise_free's cold restarts (B = 0 every round);
  - `hsplitlora_v1`: the first version: the deepest-fit rule (`armsc_deepest`) + cold noise_free;
  - `hetlora`: the fixed split, per device the largest rank that fits its budget, zero-padding
    aggregation, as published;
  - `hetlora_mean_a`: HetLoRA's plans with noise-free aggregation (`mean_a`), the aggregation alone changed;
  - `splitlora`: the fixed split and one rank for all, the largest that fits the weakest device,
    FedAvg of A and B (as `zero_pad`, which on equal ranks is exactly that average);
  - `cenlora`: centralized, one party doing every device's steps on the pooled data (same tokens).
  (FedLoRA, every device training the whole model, applies only where the whole model fits every
  device's budget: not a method of this suite.)
* `dlora`: dlora without KR, with KR (`dynamic`; `scheduled`: the active share decays from all to
  `kill_revive.active_fraction`; `gradient`: kills by gradient norm; `converged`: kills only adapters whose
  update score fell below `kill_revive.kill_threshold`; `converged_rel`: below half the median score when
  warm-up ended), and the static baselines (same number of active adapters,
  chosen once at random / by initial score).

Each method runs once per seed (config key `seed`: base, base + 1, ...), in `out/METHOD/seed-S`.
`comparison.json` keeps every run's summary and, per method, the mean, sample standard deviation,
min and max over seeds of each number in `SCALARS`; `comparison.md` is the table (mean ± std);
`convergence.png` plots held-out loss per round, training loss per round and held-out loss against
cumulative simulated time (mean over seeds, band min-max).

Rounds and simulated time to target are measured against a target held-out loss: `target_loss`
if given; else, with `target="worst_mean"`, one target for every run, the worst (highest) of the
methods' mean final held-out losses, so every method reaches it on average; with
`target="per_seed"`, one target per seed, the worst of the methods' final losses on that seed (the
seed also draws the held-out examples, so losses compare within a seed, not across seeds).

With `reuse`, a run folder holding a finished report of exactly this method's config (and this
splitpeft version) is read instead of run again, so a comparison can grow by seeds or methods. A reused
report is checked against `REPORT_SCHEMA` (what `summarise` reads, with the values it accepts) before
any number of it is used; a folder whose report does not fit is refused like one of another config.

With `checkpoints`, each run keeps its federation state after every round in
`out/METHOD/seed-S.checkpoint`, beside its folder. A run stopped part way (a session's end, a crash)
then continues from its last round on the next call, and, with `reuse`, a finished run whose config
differs from this call's only in a smaller `federation.rounds` is continued to this call's rounds
from its checkpoint rather than run again: its folder is replaced by the longer run, whose report
holds every round of the shorter one (the shorter run's final evaluation is not kept). The learning
rate is constant, so the continued run is the run that would have gone that long from the start.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

from splitpeft import __version__
from splitpeft.config import ExperimentConfig, load_config, to_dict
from splitpeft.experiment.report import _clean, write_json
from splitpeft.experiment.run import RunFolderError, run_experiment
from splitpeft.federation.checkpoint import CheckpointError, is_state_folder, verify_checkpoint
from splitpeft.placements.registry import placement_of

TARGETS = ("worst_mean", "per_seed")

# suite -> method -> the overrides that make the method from the base config. A new method is one
# more entry; run_comparison (and the CLI's --methods) take the names from here.
SUITES: dict[str, dict[str, list[str]]] = {
    "hsplit": {
        "hsplitlora": ["hsplit.planner=armsc", "federation.aggregator=noise_free", "federation.noise_free_start=warm",
                       "federation.noise_free_factors=own_a", "federation.noise_free_moments=keep"],
        # the server sessions at the rank set's top (16 by default) instead of lora.rank (issue 25)
        "hsplitlora_server16": ["hsplit.planner=armsc", "federation.aggregator=noise_free", "federation.noise_free_start=warm",
                                "federation.noise_free_factors=own_a", "federation.noise_free_moments=keep",
                                "hsplit.server_rank=16"],
        # and ARMSC's time model at the data's tokens a step, not data.max_length's (issue 25)
        "hsplitlora_server16_data": ["hsplit.planner=armsc", "federation.aggregator=noise_free",
                                     "federation.noise_free_start=warm", "federation.noise_free_factors=own_a",
                                     "federation.noise_free_moments=keep", "hsplit.server_rank=16",
                                     "hsplit.time_tokens=data"],
        # its plans with HetLoRA's aggregation: zero-padding, at equal ranks FedAvg of A and B (issue 25)
        "hsplitlora_zero_pad": ["hsplit.planner=armsc", "federation.aggregator=zero_pad", "hsplit.server_rank=16",
                                "hsplit.time_tokens=data"],
        # noise-free aggregation whose warm restarts share one A per module, averaged as HetLoRA averages
        # A (own_a's A's drift apart over rounds), B fitted to the exact aggregate (issue 25)
        "hsplitlora_mean_a": ["hsplit.planner=armsc", "federation.aggregator=noise_free",
                              "federation.noise_free_start=warm", "federation.noise_free_factors=mean_a",
                              "federation.noise_free_moments=keep", "hsplit.server_rank=16", "hsplit.time_tokens=data"],
        # the same, its warm holders computing W x - s B (A x) instead of holding W - s B A per module:
        # the planner gets the copies' memory back for ranks and blocks (issue 25)
        "hsplitlora_low_rank": ["hsplit.planner=armsc", "federation.aggregator=noise_free",
                                "federation.noise_free_start=warm", "federation.noise_free_factors=mean_a",
                                "federation.noise_free_moments=keep", "federation.noise_free_frozen=low_rank",
                                "hsplit.server_rank=16", "hsplit.time_tokens=data"],
        "hsplitlora_svd": ["hsplit.planner=armsc", "federation.aggregator=noise_free", "federation.noise_free_start=warm"],
        "hsplitlora_lora_factors": ["hsplit.planner=armsc", "federation.aggregator=noise_free",
                                    "federation.noise_free_start=warm", "federation.noise_free_factors=lora"],
        "hsplitlora_cold": ["hsplit.planner=armsc", "federation.aggregator=noise_free", "federation.noise_free_start=cold"],
        "hsplitlora_v1": ["hsplit.planner=armsc_deepest", "federation.aggregator=noise_free",
                          "federation.noise_free_start=cold"],
        "hetlora": ["hsplit.planner=budget_rank", "federation.aggregator=zero_pad"],
        # HetLoRA's plans (fixed split, ranks by budget) with noise-free aggregation (mean_a): where the
        # ranks differ, exact aggregation against zero-padding's cross terms; its warm holders keep the
        # factors, not copies of W, so HetLoRA's budgets hold its ranks (issue 25)
        "hetlora_mean_a": ["hsplit.planner=budget_rank", "federation.aggregator=noise_free",
                           "federation.noise_free_start=warm", "federation.noise_free_factors=mean_a",
                           "federation.noise_free_moments=keep", "federation.noise_free_frozen=low_rank"],
        # one rank for all, so zero_pad's average of A and B is FedAvg's (fedavg itself keeps lora.rank)
        "splitlora": ["hsplit.planner=uniform", "federation.aggregator=zero_pad"],
        "cenlora": ["placement.placement=centralized", "hsplit.planner=fixed", "federation.aggregator=fedavg"],
    },
    "dlora": {
        "no_kr": ["placement.placement=dlora", "kill_revive.enabled=false"],
        "kr": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=dynamic"],
        "kr_scheduled": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=scheduled"],
        "kr_gradient": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=gradient"],
        "kr_converged": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=converged",
                         "kill_revive.kill_threshold=0.05"],  # 0.01 (the default) never killed in 120 steps
        # the same test against half the median score when warm-up ended: at 720 steps every score sat below 0.05
        # from the first kill on, so kr_converged killed exactly as kr did (BENCHMARKS.md)
        "kr_converged_rel": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=converged",
                             "kill_revive.kill_threshold_relative=true", "kill_revive.kill_threshold=0.5"],
        # dynamic whose devices upload their killed adapters at their frozen values (kill_revive.upload_killed)
        "kr_upload_killed": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=dynamic",
                             "kill_revive.upload_killed=true"],
        # KR whose killed adapters the server keeps training (kill_revive.server_trains_killed)
        "kr_server": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=dynamic",
                      "kill_revive.server_trains_killed=true"],
        # the same in dlora's hybrid, its own blocks' adapters always training (kill_revive.spare_device_blocks)
        "kr_server_spared": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=dynamic",
                             "kill_revive.server_trains_killed=true", "kill_revive.spare_device_blocks=true"],
        "static_random": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=static_random"],
        "static_score": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=static_score"],
    },
}


# Methods a suite runs only when named: they need a setting the suite's defaults lack.
ONLY_WHEN_NAMED = {"kr_server_spared"}  # dlora's hybrid: placement.dlora_device_blocks >= 1


def default_methods(suite: str) -> list[str]:
    """The methods `suite` runs when none are named: all but `ONLY_WHEN_NAMED`."""
    return [method for method in SUITES[suite] if method not in ONLY_WHEN_NAMED]


# How many rounds `last_rounds_fall` looks back: one round's fall is within the held-out
# perplexity's round-to-round noise (up to 0.9% either way at 480 steps a device, BENCHMARKS).
FLAT_WINDOW = 4

# The per-run numbers whose mean and spread over seeds comparison.json keeps (summary key: what it is).
SCALARS: dict[str, str] = {
    "bleu": "BLEU of the final adapter on the held-out MRs",
    "rouge_l": "ROUGE-L",
    "meteor": "METEOR",
    "perplexity": "held-out perplexity of the final adapter",
    "final_heldout_loss": "held-out loss (log perplexity) after the last round",
    "last_round_fall": "relative fall of the held-out perplexity in the last round (one round: noisy)",
    "last_rounds_fall": f"relative fall of the held-out perplexity over the last {FLAT_WINDOW} rounds "
                        "(near 0: the run has flattened)",
    "rounds_to_target": "first round whose held-out loss is at or below the target",
    "simulated_s_to_target": "simulated wall time up to and including that round",
    "simulated_s": "simulated wall time of the whole run (sum of the rounds' times)",
    "device_flops": "FLOPs on the devices",
    "device_adapter_flops": "of which in adapter branches (dlora)",
    "bytes_up": "bytes devices -> server",
    "bytes_down": "bytes server -> devices",
    "max_peak_memory_bytes": "largest device peak memory",
    "tokens": "tokens trained on",
    "bytes_after_warmup": "bytes up + down of the device rounds after Kill and Revive's warm-up (after_warmup)",
    "adapter_flops_after_warmup": "adapter-branch FLOPs of those device rounds",
}


def method_config(base: ExperimentConfig, path: Path | None, preset: str | None, overrides: list[str], method_overrides: list[str]) -> ExperimentConfig:
    config = load_config(path, [*overrides, *method_overrides], preset=preset)
    if not placement_of(config).uses_server():
        # same token budget: the one party does the steps of all devices
        steps = base.federation.local_steps * base.federation.num_devices
        config = load_config(path, [*overrides, *method_overrides, f"federation.local_steps={steps}"], preset=preset)
    return config


def round_simulated_s(record: dict[str, Any]) -> float | None:
    """Simulated wall time of one round of a report (`report["rounds"][i]`).

    The round's own `simulated_round_s` when the report has it (the round including the server's
    shared compute); else the slowest device's `simulated_s`, since the round waits for it:
    `max_i simulated_s_i`. None when no device has a simulated time (no fleet profiles: set
    `fleet.memory_bytes` or `fleet.memory_range`); 0.0 for a round in which no device trained.
    """
    if record.get("simulated_round_s") is not None:
        return float(record["simulated_round_s"])
    devices = record["devices"].values()
    if not devices:
        return 0.0
    times = [d["simulated_s"] for d in devices if d.get("simulated_s") is not None]
    return max(times) if times else None


def cumulative_simulated_s(rounds: list[dict[str, Any]]) -> list[float | None]:
    """Simulated wall time from the start to the end of each round; None from the first round
    without a simulated time on."""
    total: float | None = 0.0
    out: list[float | None] = []
    for record in rounds:
        step = round_simulated_s(record)
        total = None if total is None or step is None else total + step
        out.append(total)
    return out


def heldout_loss(record: dict[str, Any]) -> float | None:
    """A round's held-out loss: log of its eval perplexity (None if the round was not evaluated)."""
    return math.log(record["eval_perplexity"]) if record.get("eval_perplexity") else None


def rounds_to_target(losses: list[float | None], target: float) -> int | None:
    """First round (1-based) whose held-out loss is at or below `target`."""
    for index, loss in enumerate(losses):
        if loss is not None and loss <= target:
            return index + 1
    return None


def simulated_s_to_target(rounds: list[dict[str, Any]], target: float) -> float | None:
    """Simulated wall time to the target held-out loss: the sum of `round_simulated_s` over the
    rounds up to and including the first whose held-out loss (log eval perplexity) is <= `target`.
    None if no round gets there or a round on the way has no simulated time."""
    reached = rounds_to_target([heldout_loss(r) for r in rounds], target)
    return None if reached is None else cumulative_simulated_s(rounds)[reached - 1]


def after_warmup(report: dict[str, Any]) -> tuple[int, float]:
    """(bytes up + down, adapter FLOPs) of the device rounds that start after `kill_revive.warmup`
    steps of that device (its steps counted over the rounds it was selected for); the same cut for
    a method without KR, so the two compare over the same steps when warm-up is whole rounds."""
    warmup = int(report["config"].get("kill_revive", {}).get("warmup", 0))
    done: dict[str, int] = {}
    traffic, flops = 0, 0.0
    for record in report["rounds"]:
        for device, stats in record["devices"].items():
            if done.get(device, 0) >= warmup:
                traffic += stats.get("bytes_up", 0) + stats.get("bytes_down", 0)
                flops += stats.get("adapter_flops", 0)
            done[device] = done.get(device, 0) + stats.get("steps", 0)
    return traffic, flops


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """One run's numbers (the keys of `SCALARS` but the two to-target ones, and per-round curves)."""
    rounds = report["rounds"]
    evaluation = report["eval"]
    heldout = [heldout_loss(r) for r in rounds]
    cumulative = cumulative_simulated_s(rounds)
    traffic_after, flops_after = after_warmup(report)
    return {
        "seed": report["config"].get("seed"),
        "bleu": evaluation.get("bleu"),
        "rouge_l": evaluation.get("rouge_l"),
        "meteor": evaluation.get("meteor"),
        "perplexity": evaluation.get("perplexity"),
        "final_heldout_loss": heldout[-1] if heldout else None,
        "last_round_fall": last_round_fall(heldout),
        "last_rounds_fall": last_round_fall(heldout, FLAT_WINDOW),
        "heldout_loss_per_round": heldout,
        "train_loss_per_round": [
            sum(s["train_loss"] * s["tokens"] for s in r["devices"].values()) / max(1, sum(s["tokens"] for s in r["devices"].values()))
            for r in rounds
        ],
        "simulated_s_per_round": [round_simulated_s(r) for r in rounds],
        "cumulative_simulated_s": cumulative,
        "simulated_s": cumulative[-1] if cumulative else None,
        "device_flops": report["totals"]["device_flops"],
        "device_adapter_flops": sum(s.get("adapter_flops", 0) for r in rounds for s in r["devices"].values()),
        "bytes_up": report["totals"]["bytes_up"],
        "bytes_down": report["totals"]["bytes_down"],
        "tokens": report["totals"]["tokens"],
        "max_peak_memory_bytes": max((d["peak_memory_bytes"] for d in report["totals"]["per_device"].values()), default=None),
        "bytes_after_warmup": traffic_after,
        "adapter_flops_after_warmup": flops_after,
        "plans": report["info"].get("plans"),
    }


def last_round_fall(heldout: list[float | None], rounds: int = 1) -> float | None:
    """1 - ppl_last / ppl_`rounds`_before from the held-out losses (log perplexities): how much the
    last `rounds` rounds still gained (a run has flattened when this is near 0). None for a run of
    at most `rounds` rounds or without both evaluations."""
    if len(heldout) <= rounds:
        return None
    last, before = heldout[-1], heldout[-1 - rounds]
    return None if last is None or before is None else 1.0 - math.exp(last - before)


def spread(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation (n - 1), min and max of the values that are not None, and
    their count `n`; std is None below two values, everything but n is None with none."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {
        "mean": statistics.fmean(present),
        "std": statistics.stdev(present) if len(present) > 1 else None,
        "min": min(present),
        "max": max(present),
        "n": len(present),
    }


def curves(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, float | int | None]]]:
    """Per round, the spread over seeds of held-out loss, training loss and cumulative simulated time."""
    keys = {"heldout_loss": "heldout_loss_per_round", "train_loss": "train_loss_per_round",
            "cumulative_simulated_s": "cumulative_simulated_s"}
    return {name: [spread(list(per_round)) for per_round in zip(*(run[key] for run in runs))] for name, key in keys.items()}


def with_defaults(stored: Any, defaults: Any) -> Any:
    """`stored` (a config as JSON) with every key of `defaults` it lacks, at any depth, set to its default."""
    if not isinstance(stored, dict) or not isinstance(defaults, dict):
        return stored
    return {**defaults, **{key: with_defaults(value, defaults.get(key)) for key, value in stored.items()}}


def config_json(config: ExperimentConfig) -> Any:
    """`config` as the JSON a report stores it as."""
    return json.loads(json.dumps(_clean(to_dict(config))))


def stored_config(report: dict[str, Any]) -> Any:
    """The config a report stores, a key added since the run was written counting as its default
    (which keeps the earlier behaviour)."""
    return with_defaults(report.get("config"), config_json(ExperimentConfig()))


def first_difference(stored: Any, wanted: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first key (dotted, '' for the roots) where two JSON trees differ, with the two values
    there; None if they are equal."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        for key in sorted(set(stored) | set(wanted)):
            found = first_difference(stored.get(key), wanted.get(key), f"{path}.{key}" if path else key)
            if found is not None:
                return found
        return None
    return None if stored == wanted else (path, stored, wanted)


# ------------------------------------------------------------------------------ what a reused report must hold
# Written by hand: JSON Schema (the jsonschema package, not a dependency) has no "finite", and a refusal
# here is one line naming the key and the value.


@dataclass(frozen=True)
class Number:
    """A JSON number (not true/false), finite, in [low, high]; a whole number if `whole`; null if `null`."""

    low: float | None = None
    high: float | None = None
    whole: bool = False
    null: bool = False

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.null
        if isinstance(value, bool) or not isinstance(value, int if self.whole else (int, float)):
            return False
        try:
            finite = math.isfinite(float(value))
        except OverflowError:  # an integer beyond float's range: 1e309 written out
            return False
        return finite and (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        span = (f" from {self.low} to {self.high}" if self.low is not None and self.high is not None
                else f" >= {self.low}" if self.low is not None else f" <= {self.high}" if self.high is not None else "")
        return ("a whole number" if self.whole else "a finite number") + span + (" or null" if self.null else "")


@dataclass(frozen=True)
class Fields:
    """A JSON object with the `required` keys and perhaps the `optional` ones (other keys are not read)."""

    required: dict[str, Schema] = field(default_factory=dict)
    optional: dict[str, Schema] = field(default_factory=dict)


@dataclass(frozen=True)
class Each:
    """A JSON list (`keyed`: an object, any keys) whose every item fits `item`; null too if `null`."""

    item: Schema
    keyed: bool = False
    null: bool = False


Schema: TypeAlias = Number | Fields | Each | None  # None: any JSON value (its depth is bounded by MAX_REPORT_DEPTH)

PERPLEXITY = Number(1, null=True)  # exp(mean NLL) >= 1; null where it was not finite
SECONDS = Number(0, null=True)
COUNT = Number(0, 2**63 - 1, whole=True)  # bytes, FLOPs, tokens, steps: spread() takes them to float
MAX_REPORT_DEPTH = 32  # splitpeft's reports nest 6 deep; far below the recursion first_difference and json.dump need

# What summarise (and simulated_s_to_target) read of a report: a key read with [] is required, one read with
# .get() optional. `config` is compared key by key with the method's config before this is checked.
REPORT_SCHEMA = Fields({
    "config": Fields(),
    "rounds": Each(Fields({"devices": Each(Fields(
        {"train_loss": Number(), "tokens": COUNT},
        {"simulated_s": SECONDS, "bytes_up": COUNT, "bytes_down": COUNT, "adapter_flops": COUNT, "steps": COUNT},
    ), keyed=True)}, {"eval_perplexity": PERPLEXITY, "simulated_round_s": SECONDS})),
    "eval": Fields(optional={"perplexity": PERPLEXITY, "bleu": Number(0, 100, null=True),
                             "rouge_l": Number(0, 1, null=True), "meteor": Number(0, 1, null=True)}),
    "totals": Fields({"device_flops": COUNT, "bytes_up": COUNT, "bytes_down": COUNT, "tokens": COUNT,
                      "per_device": Each(Fields({"peak_memory_bytes": COUNT}), keyed=True)}),
    "info": Fields(optional={"plans": Each(None, null=True)}),
})


def _shown(value: Any, limit: int = 60) -> str:
    """`value` as JSON on one line, cut to `limit` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key(at: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{at}[{key}]"
    if re.fullmatch(r"[A-Za-z0-9_-]{1,60}", key):
        return f"{at}.{key}" if at else key
    return f"{at}[{_shown(key)}]"


def too_deep(value: Any, limit: int = MAX_REPORT_DEPTH) -> str | None:
    """The key of the first list or object nested more than `limit` deep in `value` (the top is depth
    1; '' for the top itself), or None. Walks with its own stack, so any depth json.loads returns is safe."""
    stack: list[tuple[Any, str, int]] = [(value, "", 1)]
    while stack:
        item, at, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return at
            children = item.items() if isinstance(item, dict) else enumerate(item)
            stack.extend((child, _key(at, key), depth + 1) for key, child in children)
    return None


def misfit(value: Any, schema: Schema, at: str = "") -> str | None:
    """Where `value` first does not fit `schema`, as 'KEY = VALUE is not WHAT' or 'KEY is missing';
    None if it fits. Recurses only as deep as the schema."""
    if schema is None:
        return None
    name = at or "the report"
    if isinstance(schema, Number):
        return None if schema.accepts(value) else f"{name} = {_shown(value)} is not {schema}"
    if isinstance(schema, Fields):
        if not isinstance(value, dict):
            return f"{name} = {_shown(value)} is not an object"
        for key in schema.required:
            if key not in value:
                return f"{_key(at, key)} is missing"
        for key, inner in {**schema.required, **schema.optional}.items():
            found = misfit(value[key], inner, _key(at, key)) if key in value else None
            if found is not None:
                return found
        return None
    if value is None and schema.null:
        return None
    if not isinstance(value, dict if schema.keyed else list):
        return f"{name} = {_shown(value)} is not {'an object' if schema.keyed else 'a list'}{' or null' if schema.null else ''}"
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for place, item in items:
        found = misfit(item, schema.item, _key(at, place))
        if found is not None:
            return found
    return None


def finished_report(folder: Path, config: ExperimentConfig) -> tuple[dict[str, Any] | None, str | None]:
    """(the report, None) if `folder` holds a finished run of exactly `config` by this splitpeft
    version whose report fits `REPORT_SCHEMA`; else (None, why not, one line), or (None, None) where
    there is no report at all."""
    path = folder / "report.json"
    if not path.is_file():
        return None, None
    try:
        report = json.loads(path.read_text())
    except RecursionError:  # json.loads recurses once per level: 100,000 nested lists exhaust the stack
        return None, f"its report.json nests lists or objects deeper than Python can parse (at most {MAX_REPORT_DEPTH} are read)"
    except (OSError, ValueError) as error:
        return None, f"its report.json does not parse ({error})"
    if not isinstance(report, dict):
        return None, "its report.json is not a report"
    deep = too_deep(report)
    if deep is not None:
        return None, f"its report.json nests deeper than {MAX_REPORT_DEPTH} levels at {deep}"
    if report.get("splitpeft_version") != __version__:
        return None, f"it was written by splitpeft {report.get('splitpeft_version')}, this is {__version__}"
    difference = first_difference(stored_config(report), config_json(config))
    if difference is not None:
        key, there, now = difference
        return None, f"its config differs at {key or 'the top'} ({there!r} there, {now!r} now)"
    problem = misfit(report, REPORT_SCHEMA)
    if problem is not None:
        return None, f"in its report.json, {problem}"
    return report, None


def run_comparison(
    suite: str,
    out: Path,
    *,
    config_path: Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    methods: list[str] | None = None,
    seeds: int = 1,
    target_loss: float | None = None,
    target: Literal["worst_mean", "per_seed"] = "worst_mean",
    overwrite: bool = False,
    reuse: bool = False,
    progress: bool = True,
    checkpoints: bool = False,
) -> dict[str, Any]:
    """Run each method of `suite` with seeds base, base + 1, ..., base + seeds - 1 (base: the config's
    `seed`) into `out/METHOD/seed-S`; write and return the comparison (see the module docstring;
    `checkpoints`: each run's state in `out/METHOD/seed-S.checkpoint`, to continue it from)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"--seeds must be a whole number of runs per method, at least 1, not {seeds!r}")
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    chosen = methods or default_methods(suite)
    unknown = [m for m in chosen if m not in SUITES[suite]]
    if unknown:
        raise ValueError(f"unknown methods for suite {suite}: {unknown}; choose from {', '.join(SUITES[suite])}")
    overrides = list(overrides or [])
    base = load_config(config_path, overrides, preset=preset)
    seed_list = [base.seed + i for i in range(seeds)]
    configs = {  # all validated before any run
        (method, seed): method_config(base, config_path, preset, [*overrides, f"seed={seed}"], SUITES[suite][method])
        for method in chosen for seed in seed_list
    }
    out = Path(out)
    folders = {key: out / key[0] / f"seed-{key[1]}" for key in configs}
    found = {key: finished_report(folders[key], config) if reuse else (None, None) for key, config in configs.items()}
    states = {key: state_folder(folder) if checkpoints else None for key, folder in folders.items()}
    continued = set()
    for key, (report, why_not) in found.items():  # every folder judged before any run
        state = states[key]
        if report is None and why_not is None and state is not None and is_state_folder(state) and not overwrite:
            try:  # a run stopped part way: its kept state must be of this run
                verify_checkpoint(state, configs[key])
            except CheckpointError as error:
                raise RunFolderError(f"{folders[key]} cannot continue: {error}; use --overwrite to run it again") from None
        if why_not is None:
            continue
        shorter = continuable(folders[key], state, configs[key]) if reuse and state is not None else None
        if reuse and state is not None and shorter is None:
            continued.add(key)
        elif not overwrite:
            also = f"; nor continued: {shorter}" if shorter is not None else ""
            raise RunFolderError(f"{folders[key]} was not reused: {why_not}{also}; use --overwrite to run it again")
    reports = {}
    for key, (report, _) in found.items():
        state = states[key]
        # continued to more rounds, or stopped part way (--overwrite starts such a run over)
        resume = key in continued or (state is not None and is_state_folder(state) and not overwrite)
        reports[key] = report if report is not None else run_experiment(
            configs[key], folders[key], overwrite=overwrite or key in continued, progress=progress,
            checkpoint=state, resume=resume)
    return write_comparison(suite, out, reports, chosen, seed_list, target_loss=target_loss, target=target)


def state_folder(folder: Path) -> Path:
    """Where `run_comparison(checkpoints=True)` keeps the run in `folder`'s federation state: beside it."""
    return folder.parent / f"{folder.name}.checkpoint"


def continuable(folder: Path, state: Path, config: ExperimentConfig) -> str | None:
    """None if `folder` holds a finished run of `config` but for fewer `federation.rounds`, whose
    federation state after its last round, or after a later one (a continuation stopped part way),
    is in `state`; else why not (one line)."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError, RecursionError):
        return "its report.json does not read"
    stored = report.get("config") if isinstance(report, dict) else None
    federation = stored.get("federation") if isinstance(stored, dict) else None
    rounds = federation.get("rounds") if isinstance(federation, dict) else None
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 0 < rounds < config.federation.rounds:
        return f"it is not a shorter run of this config (federation.rounds {rounds!r} there, {config.federation.rounds} now)"
    shorter = config_json(replace_rounds(config, rounds))
    if report.get("splitpeft_version") != __version__ or first_difference(stored_config(report), shorter):
        return "it differs in more than federation.rounds"
    if not is_state_folder(state):
        return f"there is no checkpoint of it in {state} to continue from"
    try:
        done = verify_checkpoint(state, config)
    except CheckpointError as error:
        return str(error)
    if done < rounds:  # more: a continuation that stopped part way, which goes on from there
        return f"its checkpoint {state} holds {done} rounds, fewer than the run's {rounds}"
    return None


def replace_rounds(config: ExperimentConfig, rounds: int) -> ExperimentConfig:
    """`config` with `federation.rounds` = `rounds`."""
    return dataclasses.replace(config, federation=dataclasses.replace(config.federation, rounds=rounds))


def write_comparison(suite: str, out: Path, reports: dict[tuple[str, int], dict[str, Any]], methods: list[str],
                     seed_list: list[int], *, target_loss: float | None = None,
                     target: Literal["worst_mean", "per_seed"] = "worst_mean") -> dict[str, Any]:
    """The comparison of finished run `reports` ((method, seed) -> report): summaries, spread over
    seeds, targets, rounds and simulated time to target; written to OUT/comparison.json, .md and
    convergence.png, and returned."""
    runs = {method: {seed: summarise(reports[method, seed]) for seed in seed_list} for method in methods}
    targets, source = _targets(runs, seed_list, target_loss, target)
    for (method, seed), report in reports.items():
        run = runs[method][seed]
        goal = targets[seed]
        run["target_heldout_loss"] = goal
        run["rounds_to_target"] = None if goal is None else rounds_to_target(run["heldout_loss_per_round"], goal)
        run["simulated_s_to_target"] = None if goal is None else simulated_s_to_target(report["rounds"], goal)
    distinct = set(targets.values())

    comparison = {
        "suite": suite,
        "seeds": seed_list,
        "target_heldout_loss": distinct.pop() if len(distinct) == 1 else None,
        "target_per_seed": {f"seed-{seed}": goal for seed, goal in targets.items()},
        "target_from": source,
        "methods": {
            method: {
                "spread": {key: spread([r[key] for r in by_seed.values()]) for key in SCALARS},
                "curves": curves(list(by_seed.values())),
                "runs": {f"seed-{seed}": run for seed, run in by_seed.items()},
            }
            for method, by_seed in runs.items()
        },
    }
    write_json(out / "comparison.json", comparison)
    (out / "comparison.md").write_text(markdown_table(comparison))
    plot_convergence(comparison, out / "convergence.png")
    return comparison


def _targets(runs: dict[str, dict[int, dict[str, Any]]], seeds: list[int], target_loss: float | None,
             target: str) -> tuple[dict[int, float | None], str]:
    """The target held-out loss of each seed, and where it came from (see the module docstring)."""
    if target_loss is not None:
        return dict.fromkeys(seeds, target_loss), "--target-loss"
    if target == "per_seed":
        targets: dict[int, float | None] = {}
        for seed in seeds:
            finals = [by_seed[seed]["final_heldout_loss"] for by_seed in runs.values()]
            present = [f for f in finals if f is not None]
            targets[seed] = max(present) if present else None
        return targets, "per seed, the worst final held-out loss among the methods on that seed"
    means = {method: spread([r["final_heldout_loss"] for r in by_seed.values()])["mean"] for method, by_seed in runs.items()}
    reached = {m: v for m, v in means.items() if v is not None}
    if not reached:
        return dict.fromkeys(seeds), "no held-out loss"
    worst = max(reached, key=lambda m: reached[m])
    return dict.fromkeys(seeds, reached[worst]), f"worst mean final held-out loss ({worst})"


def markdown_table(comparison: dict[str, Any]) -> str:
    """Mean ± sample std over seeds per method; `(k/n)` where only k of the n seeds have the value
    (for example only k reached the target)."""
    columns = [  # header, SCALARS key, format, scale
        ("BLEU", "bleu", ".2f", 1.0), ("ROUGE-L", "rouge_l", ".4f", 1.0), ("METEOR", "meteor", ".4f", 1.0),
        ("perplexity", "perplexity", ".3f", 1.0), ("last round's perplexity fall %", "last_round_fall", ".2f", 100.0),
        (f"fall over the last {FLAT_WINDOW} rounds %", "last_rounds_fall", ".2f", 100.0),
        ("rounds to target", "rounds_to_target", ".1f", 1.0),
        ("simulated s to target", "simulated_s_to_target", ".1f", 1.0), ("device GFLOP", "device_flops", ".0f", 1e-9),
        ("of which adapters", "device_adapter_flops", ".1f", 1e-9), ("MB up", "bytes_up", ".1f", 1e-6),
        ("MB down", "bytes_down", ".1f", 1e-6), ("max peak MB", "max_peak_memory_bytes", ".0f", 1e-6),
        ("simulated s", "simulated_s", ".1f", 1.0),
    ]
    measures_branches = any((entry["spread"]["device_adapter_flops"]["mean"] or 0) > 0 for entry in comparison["methods"].values())
    if measures_branches:  # the devices compute adapter branches (dlora): Kill and Revive's claim is after its warm-up
        columns += [("MB after warm-up", "bytes_after_warmup", ".1f", 1e-6),
                    ("adapter GFLOP after warm-up", "adapter_flops_after_warmup", ".1f", 1e-9)]
    seeds = len(comparison["seeds"])
    header = "| method | seeds | " + " | ".join(c[0] for c in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]

    def cell(stats: dict[str, Any], spec: str, scale: float) -> str:
        if stats["mean"] is None:
            return "-"
        text = format(stats["mean"] * scale, spec)
        if stats["std"] is not None:
            text += " ± " + format(stats["std"] * scale, spec)
        return text if stats["n"] == seeds else f"{text} ({stats['n']}/{seeds})"

    for method, entry in comparison["methods"].items():
        cells = [cell(entry["spread"][key], spec, scale) for _, key, spec, scale in columns]
        lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    seed_list = comparison["seeds"]
    per_seed = comparison.get("target_per_seed") or {}

    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    targets = ", ".join(f"{number(per_seed.get(f'seed-{s}'), '.4f')} (seed {s})" for s in seed_list)
    target = comparison.get("target_heldout_loss")
    lines += ["", f"Mean ± sample standard deviation over seeds {seed_list[0]}..{seed_list[-1]} (n = {seeds}).",
              f"Target held-out loss (log perplexity): {targets if target is None and per_seed else number(target, '.4f')}, "
              f"from {comparison['target_from']}.",
              "", "Per seed: final perplexity / simulated s to target.", "",
              "| method | " + " | ".join(f"seed {s}" for s in seed_list) + " |", "|" + "---|" * (len(seed_list) + 1)]
    for method, entry in comparison["methods"].items():
        cells = [f"{number(r['perplexity'], '.3f')} / {number(r['simulated_s_to_target'], '.1f')}"
                 for r in (entry["runs"][f"seed-{s}"] for s in seed_list)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_convergence(comparison: dict[str, Any], path: Path) -> None:
    """Held-out and training loss per round, and held-out loss against cumulative simulated time:
    the mean over seeds, shaded from the min to the max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    timed = False
    for method, entry in comparison["methods"].items():
        for ax, name in ((axes[0], "heldout_loss"), (axes[1], "train_loss")):
            points = [(i + 1, s) for i, s in enumerate(entry["curves"][name]) if s["mean"] is not None]
            x = [i for i, _ in points]
            (line,) = ax.plot(x, [s["mean"] for _, s in points], marker="o", label=method)
            ax.fill_between(x, [s["min"] for _, s in points], [s["max"] for _, s in points], color=line.get_color(), alpha=0.2)
        pairs = [(t["mean"], h) for t, h in zip(entry["curves"]["cumulative_simulated_s"], entry["curves"]["heldout_loss"])
                 if t["n"] == len(comparison["seeds"]) and h["mean"] is not None]
        if pairs:
            timed = True
            x = [t for t, _ in pairs]
            (line,) = axes[2].plot(x, [h["mean"] for _, h in pairs], marker="o", label=method)
            axes[2].fill_between(x, [h["min"] for _, h in pairs], [h["max"] for _, h in pairs], color=line.get_color(), alpha=0.2)
    axes[0].set_title("held-out loss (log perplexity) after each round")
    axes[1].set_title("training loss per round (token-weighted)")
    axes[2].set_title("held-out loss against simulated wall time")
    for ax in axes[:2]:
        ax.set_xlabel("round")
    axes[2].set_xlabel("cumulative simulated time (s; mean over seeds)")
    if not timed:
        axes[2].text(0.5, 0.5, "no simulated time\n(set fleet.memory_bytes or fleet.memory_range)",
                     ha="center", va="center", transform=axes[2].transAxes)
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"mean over {len(comparison['seeds'])} seed(s); band: min to max")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
