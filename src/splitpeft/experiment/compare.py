"""Side-by-side comparisons on the same data, model, fleet and token budget.

Suites (each method is the base config plus a few overrides):

* `hsplit`: HSplitLoRA (IWI + ARMSC + noise_free), HetLoRA (rank by budget, fixed split,
  zero_pad), SplitLoRA (fixed split, one rank, fedavg), CenLoRA (centralized; one party doing
  every device's steps, so the token budget is the same).
* `dlora`: dlora without KR, with KR, and the static baselines (same number of active adapters,
  chosen once at random / by initial score).

Writes one run folder per method under `out/`, `comparison.json`, `comparison.md` (the table) and
`convergence.png` (held-out loss and training loss per round, one line per method).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from splitpeft.config import ExperimentConfig, load_config
from splitpeft.experiment.report import write_json
from splitpeft.experiment.run import run_experiment

SUITES: dict[str, dict[str, list[str]]] = {
    "hsplit": {
        "hsplitlora": ["hsplit.planner=armsc", "federation.aggregator=noise_free"],
        "hetlora": ["hsplit.planner=budget_rank", "federation.aggregator=zero_pad"],
        "splitlora": ["hsplit.planner=fixed", "federation.aggregator=fedavg"],
        "cenlora": ["placement.placement=centralized", "hsplit.planner=fixed", "federation.aggregator=fedavg"],
    },
    "dlora": {
        "no_kr": ["placement.placement=dlora", "kill_revive.enabled=false"],
        "kr": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=dynamic"],
        "static_random": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=static_random"],
        "static_score": ["placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.selection=static_score"],
    },
}


def method_config(base: ExperimentConfig, path: Path | None, preset: str | None, overrides: list[str], method_overrides: list[str]) -> ExperimentConfig:
    config = load_config(path, [*overrides, *method_overrides], preset=preset)
    if config.placement.placement == "centralized":
        # same token budget: the one party does the steps of all devices
        steps = base.federation.local_steps * base.federation.num_devices
        config = load_config(path, [*overrides, *method_overrides, f"federation.local_steps={steps}"], preset=preset)
    return config


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    rounds = report["rounds"]
    evaluation = report["eval"]
    simulated = [s.get("simulated_s") for r in rounds for s in r["devices"].values()]
    return {
        "bleu": evaluation.get("bleu"),
        "rouge_l": evaluation.get("rouge_l"),
        "meteor": evaluation.get("meteor"),
        "perplexity": evaluation.get("perplexity"),
        "heldout_loss_per_round": [math.log(r["eval_perplexity"]) if r.get("eval_perplexity") else None for r in rounds],
        "train_loss_per_round": [
            sum(s["train_loss"] * s["tokens"] for s in r["devices"].values()) / max(1, sum(s["tokens"] for s in r["devices"].values()))
            for r in rounds
        ],
        "device_flops": report["totals"]["device_flops"],
        "device_adapter_flops": sum(s.get("adapter_flops", 0) for r in rounds for s in r["devices"].values()),
        "bytes_up": report["totals"]["bytes_up"],
        "bytes_down": report["totals"]["bytes_down"],
        "tokens": report["totals"]["tokens"],
        "max_peak_memory_bytes": max(d["peak_memory_bytes"] for d in report["totals"]["per_device"].values()),
        "simulated_s": sum(s for s in simulated if s is not None) if any(s is not None for s in simulated) else None,
        "plans": report["info"].get("plans"),
    }


def rounds_to_target(losses: list[float | None], target: float) -> int | None:
    """First round (1-based) whose held-out loss is at or below `target`."""
    for index, loss in enumerate(losses):
        if loss is not None and loss <= target:
            return index + 1
    return None


def run_comparison(
    suite: str,
    out: Path,
    *,
    config_path: Path | None = None,
    preset: str | None = None,
    overrides: list[str] | None = None,
    methods: list[str] | None = None,
    target_loss: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
    chosen = methods or list(SUITES[suite])
    unknown = [m for m in chosen if m not in SUITES[suite]]
    if unknown:
        raise ValueError(f"unknown methods for suite {suite}: {unknown}; choose from {', '.join(SUITES[suite])}")
    overrides = list(overrides or [])
    base = load_config(config_path, overrides, preset=preset)
    configs = {m: method_config(base, config_path, preset, overrides, SUITES[suite][m]) for m in chosen}  # validate all first
    out = Path(out)
    results: dict[str, Any] = {}
    for method, config in configs.items():
        report = run_experiment(config, out / method, overwrite=overwrite, progress=progress)
        results[method] = summarise(report)
    finals = [r["heldout_loss_per_round"][-1] for r in results.values() if r["heldout_loss_per_round"][-1] is not None]
    target = target_loss if target_loss is not None else (max(finals) if finals else None)
    for result in results.values():
        result["rounds_to_target"] = rounds_to_target(result["heldout_loss_per_round"], target) if target is not None else None
    comparison = {"suite": suite, "target_heldout_loss": target, "methods": results}
    write_json(out / "comparison.json", comparison)
    (out / "comparison.md").write_text(markdown_table(comparison))
    plot_convergence(results, out / "convergence.png")
    return comparison


def markdown_table(comparison: dict[str, Any]) -> str:
    header = ("| method | BLEU | ROUGE-L | METEOR | perplexity | rounds to target | device GFLOP | of which adapters "
              "| MB up | MB down | max peak MB | simulated s |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for method, r in comparison["methods"].items():
        lines.append(
            f"| {method} | {fmt(r['bleu'], '.2f')} | {fmt(r['rouge_l'], '.4f')} | {fmt(r['meteor'], '.4f')} "
            f"| {fmt(r['perplexity'], '.3f')} | {fmt(r['rounds_to_target'], 'd')} | {r['device_flops'] / 1e9:.0f} "
            f"| {r['device_adapter_flops'] / 1e9:.1f} "
            f"| {r['bytes_up'] / 1e6:.1f} | {r['bytes_down'] / 1e6:.1f} | {r['max_peak_memory_bytes'] / 1e6:.0f} "
            f"| {fmt(r['simulated_s'], '.1f')} |"
        )
    target = comparison.get("target_heldout_loss")
    lines.append("")
    lines.append(f"Target held-out loss (log perplexity): {fmt(target, '.4f')}")
    return "\n".join(lines) + "\n"


def plot_convergence(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, r in results.items():
        held = r["heldout_loss_per_round"]
        axes[0].plot(range(1, len(held) + 1), held, marker="o", label=method)
        train = r["train_loss_per_round"]
        axes[1].plot(range(1, len(train) + 1), train, marker="o", label=method)
    axes[0].set_title("held-out loss (log perplexity) after each round")
    axes[1].set_title("training loss per round (token-weighted)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
