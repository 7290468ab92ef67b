"""A whole experiment: simulate the federation, evaluate, export, and write the run folder.

Run folder layout::

    report.json   per round and device: bytes_up/down, flops, peak_memory_bytes, tokens,
                  train_loss, wall_s; eval metrics; totals; the resolved config
    config.yaml   the resolved config (re-runnable with --config)
    adapter/      PEFT adapter folder (PeftModel.from_pretrained(base, adapter) loads it)
    loss.png, bytes.png

Everything is written into a hidden staging folder beside the target and renamed into place at
the end, so a failed or interrupted run never leaves a folder that looks complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from splitpeft import __version__
from splitpeft.config import ExperimentConfig, dump_yaml, to_dict
from splitpeft.data.batching import EncodedExample
from splitpeft.data.examples import Example
from splitpeft.experiment.evaluation import evaluate_generation, perplexity
from splitpeft.experiment.report import (
    MEASUREMENT_NOTES,
    plot_active_adapters,
    plot_importance,
    plot_rounds,
    round_entries,
    totals,
    write_json,
)
from splitpeft.federation.checkpoint import (
    checkpoint_extra,
    load_checkpoint,
    save_checkpoint,
)
from splitpeft.federation.engine import Engine, InProcessEngine
from splitpeft.federation.simulation import Simulation
from splitpeft.storage import atomic_folder

log = logging.getLogger(__name__)


class RunFolderError(ValueError):
    """The output folder cannot be used."""


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    config: ExperimentConfig,
    held_out: list[Example],
    held_out_encoded: list[EncodedExample],
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Held-out perplexity and generation metrics (grouped references) for `model`."""
    result: dict[str, Any] = {}
    if config.eval.perplexity:
        result["perplexity"] = perplexity(
            model, held_out_encoded[: config.eval.perplexity_examples], config.federation.batch_size,
            int(tokenizer.pad_token_id),
        )
    if config.eval.generation:
        scores, samples = evaluate_generation(
            model, tokenizer, held_out, max_new_tokens=config.eval.max_new_tokens,
            num_beams=config.eval.num_beams, limit_groups=config.eval.groups, progress=progress,
            meteor=config.eval.meteor,
        )
        result.update(scores)
        result["samples"] = samples[:8]
        result["groups"] = len(samples)
    return result


def run_experiment(
    config: ExperimentConfig,
    out: Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
    checkpoint: Path | None = None,
    resume: bool = False,
    engine: Engine | None = None,
) -> dict[str, Any]:
    """Run `config` end to end and write the run folder `out`; returns the report.

    With `checkpoint`, the federation's state is saved there after every completed round;
    `resume` first restores it and continues from the next round. `engine` plays the rounds
    (default: every device in this process; `splitpeft.flower` plays them on Flower nodes).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunFolderError(f"output folder {out} is not empty (use --overwrite to replace it)")
    if resume and checkpoint is None:
        raise RunFolderError("--resume needs --checkpoint DIR")
    with atomic_folder(out) as staging:
        return _run(config, staging, progress=progress, on_round=on_round, checkpoint=checkpoint, resume=resume,
                    engine=engine or InProcessEngine())


def _run(config: ExperimentConfig, staging: Path, *, progress: bool, on_round: Callable[[int, dict[str, Any]], None] | None,
         checkpoint: Path | None, resume: bool, engine: Engine) -> dict[str, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.perf_counter()
    sim = Simulation(config)
    tokenizer = sim.loaded.tokenizer
    report: dict[str, Any] = {"splitpeft_version": __version__, "config": to_dict(config), "info": sim.info()}
    if config.eval.baseline:
        log.info("evaluating the untuned base model")
        report["baseline_eval"] = evaluate_model(
            sim.loaded.model, tokenizer, config, sim.held_out, sim.held_out_encoded, progress=False
        )
    fed = config.federation
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), disable=not progress, transient=True,
    ) as bar:
        done = load_checkpoint(sim, checkpoint) if resume and checkpoint is not None else 0
        extra = engine.open(sim, checkpoint_extra(checkpoint) if done and checkpoint is not None else None)
        per_round = [len(sim.selected_devices(r)) for r in range(fed.rounds)]  # device rounds, for the bar
        task = bar.add_task("training", total=sum(per_round), completed=sum(per_round[:done]))
        try:
            for round_index in range(done, fed.rounds):
                bar.update(task, description=f"round {round_index + 1}/{fed.rounds}")
                record = engine.play_round(sim, lambda _device: bar.advance(task))
                if config.eval.perplexity and config.eval.every_round:
                    record.eval_perplexity = perplexity(
                        sim.global_model(), sim.held_out_encoded[: config.eval.perplexity_examples],
                        fed.batch_size, sim.pad_id,
                    )
                if checkpoint is not None:
                    save_checkpoint(sim, checkpoint, extra)
                if on_round is not None:
                    on_round(round_index, round_entries([record])[0])
        finally:
            engine.close()
    report["rounds"] = round_entries(sim.rounds)
    report["totals"] = totals(sim.rounds)
    report["info"] = sim.info()  # after training: plans may have been re-made
    for row in report["info"]["plans"] or []:
        device = report["totals"]["per_device"][row["device"]]
        steps = sum(r["devices"][row["device"]]["steps"] for r in report["rounds"])
        row["measured_peak_bytes"] = device["peak_memory_bytes"]
        row["measured_flops_per_step"] = device["flops"] / max(1, steps)
    model = sim.global_model()
    report["eval"] = evaluate_model(model, tokenizer, config, sim.held_out, sim.held_out_encoded, progress=progress)
    sim.export(staging / "adapter", merged=config.export_merged)
    (staging / "config.yaml").write_text(dump_yaml(config))
    plot_rounds(sim.rounds, staging)
    if sim.planning is not None and sim.planning.history:
        report["importance"] = sim.planning.history
        plot_importance(sim.planning.history[-1]["scores"], staging / "importance.png")
    kill_revive = {}
    for device in sim.devices:
        policy = device.kill_revive
        if policy is None or not policy.active_history:  # devices that trained elsewhere report events per round
            continue
        modules = list(policy.modules)
        active = [[modules.index(n) for n in sorted(members)] for _, members in policy.active_history]
        kill_revive[device.device_id] = {"modules": modules, "events": policy.events, "active_per_step": active}
        plot_active_adapters(modules, active, staging / f"active_{device.device_id}.png",
                             f"{device.device_id}: active adapters per step (Kill and Revive)")
    if kill_revive:
        report["kill_revive"] = kill_revive
    report["measurement"] = MEASUREMENT_NOTES
    report["wall_s"] = time.perf_counter() - started
    write_json(staging / "report.json", report)
    return report
