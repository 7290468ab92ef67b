"""A whole experiment: simulate the federation, export, write the run folder, then evaluate.

Run folder layout::

    report.json   per round and device: bytes_up/down, flops, peak_memory_bytes, tokens,
                  train_loss, wall_s; eval metrics; totals; the resolved config; status
    config.yaml   the resolved config (re-runnable with --config)
    adapter/      PEFT adapter folder (PeftModel.from_pretrained(base, adapter) loads it)
    loss.png, bytes.png
    .splitpeft-run  marker: splitpeft wrote this folder (only such a folder is ever replaced)

The trained run (adapter, config, plots, a report with ``"status": "trained"``) is written into a
hidden staging folder beside the target and swapped into place once training ends
(`storage.atomic_folder`), so a failed or interrupted training never leaves a folder that looks
complete. Evaluation comes after, on the folder in place, and rewrites its report.json
(``"status": "finished"``): an evaluation that fails (`EvaluationError`, its report saying
``"status": "evaluation failed"`` and why) or is stopped loses nothing of the training, and
`splitpeft evaluate RUN` evaluates it and completes the report. Before any work, `check_paths` refuses every output and checkpoint path whose
replacement could destroy something splitpeft did not write, and the run takes its checkpoint
folder for itself (`storage.exclusive`: a second run on it is refused). A system error while
writing (disk full) is one `WriteError` line naming the folder.

A stop (SIGINT, SIGTERM: `storage.Stopped`) abandons the round in progress at once; a checkpoint
being written when it comes is finished first. So the checkpoint that stands is that of the last
completed round, and `--resume` continues from it; the exception's `notes` say which round
(`checkpoint_rounds`, None when this run has none to resume from).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
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
    MANIFEST_FILE,
    CheckpointError,
    checkpoint_extra,
    is_state_folder,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from splitpeft.federation.engine import Engine, InProcessEngine
from splitpeft.federation.fleet import seed_everything
from splitpeft.federation.records import RoundRecord
from splitpeft.federation.simulation import Simulation
from splitpeft.model.loading import load_model
from splitpeft.model.runtime import limit_malloc_arenas, release_freed_memory, resident_bytes, resolve_runtime
from splitpeft.privacy.audit import audit_simulation, leakage_table, markdown, plot_leakage, run_accounting
from splitpeft.storage import (
    FolderInUse,
    Stopped,
    WriteError,
    atomic_folder,
    exclusive,
    holding_stops,
    recover,
    writing,
)

log = logging.getLogger(__name__)

RUN_MARKER = ".splitpeft-run"


class RunFolderError(ValueError):
    """The output folder (or the checkpoint folder) cannot be used."""


class EvaluationError(RuntimeError):
    """The evaluation of a trained run failed; the trained run is in its folder (the message says
    which, and how to evaluate it again)."""


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_replaceable(out: Path, overwrite: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RunFolderError(f"output folder {out} is a symbolic link or a file; it was left as it is")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise RunFolderError(f"output folder {out} is not empty (use --overwrite to replace it)")
        if not (out / RUN_MARKER).is_file():
            raise RunFolderError(f"output folder {out} was not written by splitpeft (no {RUN_MARKER} in it); "
                                 "refusing to replace it: remove it yourself or choose another --out")


def _check_unchanged(out: Path, overwrite: bool, what: str) -> None:
    """`_check_replaceable` again, just before the swap: something may have appeared at `out`
    while the run trained (a folder of the user's, which must not be replaced)."""
    try:
        _check_replaceable(out, overwrite)
    except RunFolderError as error:
        raise RunFolderError(f"{error} (it changed during the run; {what} were not written)") from None


def check_paths(out: Path, checkpoint: Path | None, *, overwrite: bool, resume: bool) -> None:
    """Refuse (RunFolderError, one line) every `out` and `checkpoint` that replacing could lose
    data with: a symbolic link, the working folder or one of its parents, one folder inside the
    other, a non-empty `out` without --overwrite or without splitpeft's marker, an existing
    `checkpoint` splitpeft did not write, or one holding a run's state without --resume or
    --overwrite. Finishes first any swap of either that a killed run left half done."""
    cwd = Path.cwd().resolve()
    folders = [("output folder", out)] + ([("checkpoint folder", checkpoint)] if checkpoint is not None else [])
    for what, path in folders:
        recover(path)
        if path.is_symlink():
            raise RunFolderError(f"{what} {path} is a symbolic link; give the folder itself")
        if _inside(cwd, path.resolve()):
            raise RunFolderError(f"{what} {path} is the working folder or one of its parents; choose a folder of its own")
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{what} {path} exists and is not a folder")
    if checkpoint is not None:
        if _inside(checkpoint.resolve(), out.resolve()):
            raise RunFolderError(f"checkpoint folder {checkpoint} is inside the output folder {out}, which is replaced "
                                 "at the end; put it beside it")
        if _inside(out.resolve(), checkpoint.resolve()):
            raise RunFolderError(f"output folder {out} is inside the checkpoint folder {checkpoint}, which is replaced "
                                 "every round; put it beside it")
    _check_replaceable(out, overwrite)
    if resume and checkpoint is None:
        raise RunFolderError("--resume needs --checkpoint DIR")
    if checkpoint is not None and checkpoint.is_dir() and any(checkpoint.iterdir()):
        if not is_state_folder(checkpoint):
            raise RunFolderError(f"checkpoint folder {checkpoint} exists and was not written by splitpeft (no valid "
                                 f"{MANIFEST_FILE}); refusing to overwrite it")
        if not resume and not overwrite:
            raise RunFolderError(f"checkpoint folder {checkpoint} holds a checkpoint already: --resume continues "
                                 "that run, --overwrite starts over")
    if resume and checkpoint is not None and not checkpoint.is_dir():
        raise CheckpointError(f"no checkpoint in {checkpoint} to resume from")


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    config: ExperimentConfig,
    held_out: list[Example],
    held_out_encoded: list[EncodedExample],
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Held-out perplexity and generation metrics (grouped references) for `model`; with
    generation, how many prompts lost their beginning to the context (`prompts_truncated`) and
    how many outputs the time bound cut short (`generation_cut`, eval.max_generation_s_per_prompt)."""
    result: dict[str, Any] = {}
    if config.eval.perplexity:
        result["perplexity"] = perplexity(
            model, held_out_encoded[: config.eval.perplexity_examples], config.federation.batch_size,
            int(tokenizer.pad_token_id), progress=progress,
        )
    if config.eval.generation:
        scores, samples = evaluate_generation(
            model, tokenizer, held_out, max_new_tokens=config.eval.max_new_tokens,
            num_beams=config.eval.num_beams, length_penalty=config.eval.length_penalty,
            no_repeat_ngram_size=config.eval.no_repeat_ngram_size, limit_groups=config.eval.groups, progress=progress,
            meteor=config.eval.meteor, max_s_per_prompt=config.eval.max_generation_s_per_prompt,
        )
        result.update(scores)
        result["samples"] = samples[:8]
        result["groups"] = len(samples)
        result["prompts_truncated"] = sum(bool(s["prompt_truncated"]) for s in samples)
        result["generation_cut"] = sum(bool(s["cut"]) for s in samples)
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
    on_start: Callable[[Simulation], None] | None = None,
) -> dict[str, Any]:
    """Run `config` end to end and write the run folder `out`; returns the report.

    `on_start` is called once the federation is built and checked, before any training (the CLI
    prints its start-up line there).

    The trained run is in `out` before evaluation starts; an evaluation that fails raises
    EvaluationError and leaves it there (`_evaluate_run`).

    With `checkpoint`, the federation's state is saved there after every completed round;
    `resume` first restores it (refused, CheckpointError, unless it is intact and of this run)
    and continues from the next round. `check_paths` runs before any work. `engine` plays the rounds
    (default: every device in this process; `splitpeft.flower` plays them on Flower nodes).
    """
    out = Path(out)
    checkpoint = None if checkpoint is None else Path(checkpoint)
    check_paths(out, checkpoint, overwrite=overwrite, resume=resume)
    held: AbstractContextManager[None] = (
        exclusive(checkpoint, "checkpoint folder") if checkpoint is not None else nullcontext())
    # What a stop leaves: the rounds of the checkpoint that stands (None: none this run may resume),
    # whether the trained run folder was already in place (a stop that came during its swap or in
    # the evaluation after it), and whether its evaluation had finished.
    leaves: dict[str, Any] = {"checkpoint": checkpoint, "rounds": config.federation.rounds, "checkpoint_rounds": None,
                              "out": out, "out_written": False, "evaluated": False}
    staging_inode = None
    try:
        # for the run's whole life, evaluation included: a second run on the same output folder or
        # checkpoint is refused here, not after its training
        with exclusive(out, "output folder"), held:
            if resume and checkpoint is not None:
                leaves["checkpoint_rounds"] = verify_checkpoint(checkpoint, config)  # before any work
            started = time.perf_counter()
            with atomic_folder(out, before_swap=lambda: _check_unchanged(out, overwrite, "this run's results")) as staging:
                staging_inode = staging.stat().st_ino
                sim, report = _train(config, staging, out=out, progress=progress, on_round=on_round,
                                     checkpoint=checkpoint, resume=resume, engine=engine or InProcessEngine(),
                                     leaves=leaves, started=started, on_start=on_start)
            leaves["out_written"] = True
            report = _evaluate_run(sim, report, out, progress=progress, started=started)
            leaves["evaluated"] = True
    except FolderInUse as error:
        raise RunFolderError(str(error)) from None
    except Stopped as stop:
        leaves["out_written"] = staging_inode is not None and out.is_dir() and out.stat().st_ino == staging_inode
        stop.notes.update(leaves)
        raise
    return report


def _train(config: ExperimentConfig, staging: Path, *, out: Path, progress: bool,
           on_round: Callable[[int, dict[str, Any]], None] | None, checkpoint: Path | None, resume: bool,
           engine: Engine, leaves: dict[str, Any], started: float,
           on_start: Callable[[Simulation], None] | None = None) -> tuple[Simulation, dict[str, Any]]:
    """Train, and write the trained run into `staging`: adapter, config, plots, and the report
    without its evaluation (``"status": "trained"``). Returns the simulation and the report."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with writing(out):
        (staging / RUN_MARKER).write_text(f"a run folder written by splitpeft {__version__}\n")
    allocator = limit_malloc_arenas(config.runtime.malloc_arenas)  # before the rounds' threads make arenas
    sim = Simulation(config)
    if on_start is not None:
        on_start(sim)
    tokenizer = sim.loaded.tokenizer
    report: dict[str, Any] = {"splitpeft_version": __version__, "config": to_dict(config), "info": sim.info(),
                              "allocator": allocator}
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
                record.resident_bytes = resident_bytes()
                if config.runtime.release_memory_each_round:
                    release_freed_memory()
                if checkpoint is not None:
                    with holding_stops():  # a stop during the write comes after it: this round stands
                        save_checkpoint(sim, checkpoint, extra)
                        leaves["checkpoint_rounds"] = round_index + 1
                if progress:  # one line a round, on a terminal (above the bar) or in a log file alike
                    bar.console.print(round_line(record, fed.rounds, time.perf_counter() - started),
                                      highlight=False, markup=False, soft_wrap=True)
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
    with writing(out):  # disk full, permissions: one line naming the run folder
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
        with writing(out):
            plot_active_adapters(modules, active, staging / f"active_{device.device_id}.png",
                                 f"{device.device_id}: active adapters per step (Kill and Revive)")
    if kill_revive:
        report["kill_revive"] = kill_revive
    report["measurement"] = MEASUREMENT_NOTES
    report["status"] = "trained"  # evaluation comes after the folder is in place (`_evaluate_run`)
    report["wall_s"] = time.perf_counter() - started
    with writing(out):
        write_json(staging / "report.json", report)
    return sim, report


def round_line(record: RoundRecord, rounds: int, wall_s: float) -> str:
    """The console's line for a finished round: devices that finished of those asked, their mean
    training loss (token-weighted), held-out perplexity, simulated and wall time, traffic."""
    stats = list(record.devices.values())
    tokens = sum(s.tokens for s in stats)
    loss = sum(s.train_loss * s.tokens for s in stats) / tokens if tokens else float("nan")
    asked = len(record.selected) or len(stats)
    parts = [f"round {record.round + 1}/{rounds}", f"devices {len(record.completed or stats)}/{asked}",
             f"train loss {loss:.4f}"]
    if record.eval_perplexity is not None:
        parts.append(f"held-out ppl {record.eval_perplexity:.3f}")
    if record.simulated_round_s is not None:
        parts.append(f"simulated {record.simulated_round_s:.1f} s")
    parts += [f"wall {record.wall_s:.1f} s (run {wall_s:.0f} s)",
              f"MB up {sum(s.bytes_up for s in stats) / 1e6:.1f} down {sum(s.bytes_down for s in stats) / 1e6:.1f}"]
    return " | ".join(parts)


def _privacy_estimate(sim: Simulation) -> dict[str, Any]:
    """The report's `privacy_estimate` (privacy.estimate); one that fails says why in the report
    (an estimate is not worth the evaluation it follows)."""
    try:
        return audit_simulation(sim, estimate=True)
    except Exception as error:
        log.warning("the privacy estimate failed: %s: %s", type(error).__name__, error)
        return {"error": " ".join(f"{type(error).__name__}: {error}".split())[:300]}


def _evaluate_run(sim: Simulation, report: dict[str, Any], out: Path, *, progress: bool, started: float) -> dict[str, Any]:
    """Evaluate the trained run in `out` (and audit its privacy if configured), then rewrite its
    report.json with the results and ``"status": "finished"``. A failure writes the report with
    ``"status": "evaluation failed"`` and `eval_error`, and raises EvaluationError; the trained
    run stays as it is."""
    config, tokenizer = sim.config, sim.loaded.tokenizer
    try:
        report["eval"] = evaluate_model(sim.global_model(), tokenizer, config, sim.held_out, sim.held_out_encoded,
                                        progress=progress)
        if config.privacy.audit:
            log.info("privacy audit: an honest-but-curious server against each device's traffic")
            report["privacy"] = audit_simulation(sim)
            if "leakage" in report["privacy"]:
                utility = {"perplexity": report["eval"].get("perplexity"), "bleu / 100": _scaled(report["eval"].get("bleu"))}
                with writing(out):  # beside it first, then renamed: a reader never sees half a plot
                    partial = out / f".leakage-{os.getpid()}.png"
                    plot_leakage(report["privacy"], partial, utility=utility)
                    os.replace(partial, out / "leakage.png")
        elif config.privacy.estimate:
            report["privacy_estimate"] = _privacy_estimate(sim)
        # (epsilon, delta) of the Gaussian release over the whole run, whatever was audited
        report["privacy_accounting"] = run_accounting(sim)
    except WriteError:
        raise
    except Exception as error:
        log.info("the evaluation of %s failed", out, exc_info=True)
        cause = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        report.pop("eval", None)
        report.update({"status": "evaluation failed", "eval_error": cause})
        with writing(out):
            write_json(out / "report.json", report)
        raise EvaluationError(f"evaluation failed ({cause}); the trained run is in {out} (adapter/, config.yaml, "
                              f"report.json): `splitpeft evaluate {out}` evaluates it and completes its report") from error
    report["status"] = "finished"
    report["wall_s"] = time.perf_counter() - started
    with writing(out):
        write_json(out / "report.json", report)
    return report


def _scaled(value: Any) -> float | None:
    return None if value is None else float(value) / 100


def write_privacy_table(config: ExperimentConfig, out: Path, depths: list[int], *, overwrite: bool = False) -> dict[str, Any]:
    """`splitpeft privacy`: the leakage table of `config`'s model at `depths`, written to `out`
    (a new folder, or one splitpeft wrote, replaced only with `overwrite`)."""
    check_paths(out, None, overwrite=overwrite, resume=False)
    try:
        with exclusive(out, "output folder"):
            seed_everything(config.seed)
            runtime = resolve_runtime(config.runtime)
            loaded = load_model(config.model.name, seed=config.seed, dtype=runtime.dtype, device=runtime.server_device)
            table = leakage_table(config, loaded.model, loaded.tokenizer, depths)
            with atomic_folder(out, before_swap=lambda: _check_unchanged(out, overwrite, "the table's files")) as staging, \
                    writing(out):
                (staging / RUN_MARKER).write_text(f"a privacy table written by splitpeft {__version__}\n")
                write_json(staging / "privacy.json", table)
                (staging / "privacy.md").write_text(markdown(table))
                (staging / "config.yaml").write_text(dump_yaml(config))
                plot_leakage(table, staging / "leakage.png")
    except FolderInUse as error:
        raise RunFolderError(str(error)) from None
    return table
