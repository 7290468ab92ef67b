"""Command line: `splitpeft simulate | compare | evaluate | generate | deploy-keys`.

Every user error (bad config key or value, missing file, unknown model, split point out of range,
an output or checkpoint folder that could not be replaced without losing data, a corrupted or
mismatching checkpoint, a checkpoint another run is using, a disk full while writing) is one line
on stderr naming the problem and exit status 2. A run that fails on its own (a round with fewer
than `federation.min_devices` completed devices, an evaluation that raised) is one line and exit
status 1.

SIGINT (Ctrl-C) and SIGTERM stop a command cleanly: the round in progress is abandoned (a
checkpoint being written is finished first), staging folders are removed, and one line says what
stands and how to resume; exit status 130 (SIGINT) or 143 (SIGTERM). A second signal stops at once.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from splitpeft.config import ConfigError, ExperimentConfig, describe_keys, load_config
from splitpeft.storage import Stopped, stop_on_signals

USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, ValueError, FileNotFoundError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitpeft", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)

    simulate = commands.add_parser("simulate", help="run a federated split fine-tuning experiment",
                                   epilog=describe_keys(), formatter_class=argparse.RawDescriptionHelpFormatter)
    source = simulate.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, help="YAML config file")
    source.add_argument("--preset", help="built-in preset: default, tiny, e2e")
    simulate.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. federation.rounds=5")
    simulate.add_argument("--out", type=Path, required=True, help="run folder to write")
    simulate.add_argument("--overwrite", action="store_true",
                          help="replace an existing run folder splitpeft wrote (and start --checkpoint over)")
    simulate.add_argument("--no-progress", action="store_true", help="no progress bars")
    simulate.add_argument("--checkpoint", type=Path,
                          help="save the federation's state here after every round (a new folder, or one splitpeft wrote)")
    simulate.add_argument("--resume", action="store_true",
                          help="continue from --checkpoint's last completed round (verified: intact and of this run)")

    compare = commands.add_parser("compare", help="run a suite of methods side by side (hsplit, dlora), over seeds")
    compare.add_argument("suite", help="hsplit: HSplitLoRA against its baselines; dlora: Kill and Revive against no KR and static")
    compare_source = compare.add_mutually_exclusive_group()
    compare_source.add_argument("--config", type=Path, help="YAML config file (the shared base)")
    compare_source.add_argument("--preset", help="built-in preset: default, tiny, e2e")
    compare.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every method")
    compare.add_argument("--methods", help="comma-separated subset of the suite's methods (default: all)")
    compare.add_argument("--seeds", type=int, default=1,
                         help="runs per method, with seeds seed, seed+1, ... (config key `seed`); the table shows mean ± std")
    compare.add_argument("--target-loss", type=float,
                         help="held-out loss for rounds and simulated time to target (default: see --target)")
    compare.add_argument("--target", choices=["worst-mean", "per-seed"], default="worst-mean",
                         help="without --target-loss: worst-mean = one target, the worst of the methods' mean final "
                              "held-out losses; per-seed = per seed, the worst of the methods' final losses on that seed")
    compare.add_argument("--reuse", action="store_true",
                         help="read a method's run folder whose finished report has exactly its config instead of running it again")
    compare.add_argument("--checkpoints", action="store_true",
                         help="keep each run's federation state beside its folder (METHOD/seed-S.checkpoint): a run "
                              "stopped part way continues from its last round, and with --reuse a finished run with "
                              "fewer federation.rounds is continued to these (its folder replaced by the longer run)")
    compare.add_argument("--out", type=Path, required=True, help="folder for the runs and the table")
    compare.add_argument("--overwrite", action="store_true")
    compare.add_argument("--no-progress", action="store_true")

    evaluate = commands.add_parser("evaluate", help="evaluate a saved run's adapter on its held-out data, or on --data")
    evaluate.add_argument("run", type=Path, help="run folder written by simulate")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value",
                          help="e.g. eval.num_beams=10 eval.length_penalty=0.8 eval.no_repeat_ngram_size=4 eval.groups=100")
    evaluate.add_argument("--data", type=Path,
                          help="a test file of E2E 'MR||text' lines: every MR of it is held out (perplexity over all its "
                               "examples unless eval.perplexity_examples is given, generation for eval.groups of its MRs), "
                               "and the run's own data is not read; writes RUN/eval-<file stem>.json")

    generate = commands.add_parser("generate", help="generate text with a saved run's adapter")
    generate.add_argument("run", type=Path, help="run folder written by simulate")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--mr", help="an E2E meaning representation, formatted with the training template")
    prompt.add_argument("--prompt", help="a raw prompt")
    generate.add_argument("--num-beams", type=int, default=1)
    generate.add_argument("--max-new-tokens", type=int, default=40)

    privacy = commands.add_parser(
        "privacy", help="measure how much of a device's text the server can recover at each split depth",
        description="Plays an honest-but-curious server against the traffic of plain split, U-shaped split and "
                    "dlora at each depth, on the config's model, data and defences (privacy.*): attackers trained "
                    "on public auxiliary text (privacy.aux_*) reconstruct the devices' private tokens.")
    privacy_source = privacy.add_mutually_exclusive_group()
    privacy_source.add_argument("--config", type=Path, help="YAML config file")
    privacy_source.add_argument("--preset", help="built-in preset: default, tiny, e2e")
    privacy.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. privacy.noise_multiplier=1 privacy.clip_norm=50")
    privacy.add_argument("--depths", default=",".join(map(str, (0, 1, 2, 4, 8, 16))),
                         help="comma-separated split depths k (those below the model's block count are measured)")
    privacy.add_argument("--out", type=Path, required=True, help="folder to write privacy.json, privacy.md, leakage.png")
    privacy.add_argument("--overwrite", action="store_true", help="replace a folder splitpeft wrote")

    keys = commands.add_parser("deploy-keys", help="write device tokens, a TLS certificate and SuperNode keys for a real deployment")
    keys.add_argument("--devices", type=int, required=True, help="number of devices (device-0 ... device-N-1)")
    keys.add_argument("--hosts", default="localhost,127.0.0.1",
                      help="comma-separated names/IPs the server is reached at (in the certificate)")
    keys.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`compare hsplit --preset e2e key=value`):
    # argparse fills the positional list before it sees the options, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        stray = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "peft", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        with stop_on_signals():
            if args.command == "simulate":
                return _simulate(args)
            if args.command == "evaluate":
                return _evaluate(args)
            if args.command == "compare":
                return _compare(args)
            if args.command == "deploy-keys":
                return _deploy_keys(args)
            if args.command == "privacy":
                return _privacy(args)
            return _generate(args)
    except USER_ERRORS as error:
        print(f"splitpeft: error: {error}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"splitpeft: {stop}; {_after_stop(stop, args, sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return stop.exit_status
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        print("splitpeft: interrupted again while stopping; a folder being written was left as it was before "
              "the write (its staging folder goes at the next run)", file=sys.stderr)
        return 130


def _after_stop(stop: Stopped, args: argparse.Namespace, argv: list[str]) -> str:
    """What a stop left and how to go on, for the one line the CLI prints."""
    if args.command == "compare":
        return (f"the run folders finished so far stay in {args.out}, and the same command with --reuse reads them "
                "instead of running them again")
    if args.command != "simulate":
        return "nothing was written"
    checkpoint, done = stop.notes.get("checkpoint"), stop.notes.get("checkpoint_rounds")
    if stop.notes.get("out_written") and not stop.notes.get("evaluated"):  # in the evaluation after training
        return (f"the trained run is in {stop.notes.get('out')}, not evaluated: `splitpeft evaluate "
                f"{stop.notes.get('out')}` evaluates it")
    if stop.notes.get("out_written"):  # the stop came while the finished run folder was swapped in
        return f"the run had finished: {stop.notes.get('out')} is complete"
    if checkpoint is None:
        return "no run folder was written, and without --checkpoint there is nothing to resume from"
    if done is None:
        return f"no run folder was written and no round was checkpointed; to start again: splitpeft {shlex.join(argv)}"
    again = argv if "--resume" in argv else [*argv, "--resume"]
    return (f"no run folder was written; {checkpoint} holds round {done} of {stop.notes.get('rounds')}; "
            f"to resume: splitpeft {shlex.join(again)}")


def _run_failed(error: Exception) -> int:
    """A run that failed on its own (not on bad input): one line, exit status 1."""
    print(f"splitpeft: error: {error}", file=sys.stderr)
    return 1


def _simulate(args: argparse.Namespace) -> int:
    from splitpeft.experiment.run import EvaluationError, run_experiment
    from splitpeft.federation.simulation import RoundError, Simulation

    config = load_config(args.config, args.overrides, preset=args.preset)

    def start_line(sim: Simulation) -> None:
        runtime = sim.runtime
        print(f"splitpeft: {sim.loaded.name}, {config.placement.placement}, {len(sim.devices)} devices, "
              f"{runtime.dtype_name} on {runtime.server_device} ({runtime.dtype_reason})", flush=True)

    try:
        report = run_experiment(config, args.out, overwrite=args.overwrite, progress=not args.no_progress,
                                checkpoint=args.checkpoint, resume=args.resume, on_start=start_line)
    except (RoundError, EvaluationError) as error:
        return _run_failed(error)
    _summary(report, config)
    print(f"report: {args.out / 'report.json'}  adapter: {args.out / 'adapter'}")
    return 0


def _privacy(args: argparse.Namespace) -> int:
    from splitpeft.experiment.run import write_privacy_table

    config = load_config(args.config, args.overrides, preset=args.preset)
    try:
        depths = [int(k) for k in args.depths.split(",") if k.strip()]
    except ValueError:
        raise ValueError(f"--depths must be comma-separated integers, not {args.depths!r}") from None
    table = write_privacy_table(config, args.out, depths, overwrite=args.overwrite)
    print((args.out / "privacy.md").read_text())
    print(f"table: {args.out / 'privacy.json'}  plot: {args.out / 'leakage.png'}  "
          f"(chance {table['chance_token_accuracy']:.3f})")
    return 0


def _deploy_keys(args: argparse.Namespace) -> int:
    from splitpeft.deploy.keys import write_deployment_keys

    hosts = tuple(h.strip() for h in args.hosts.split(",") if h.strip())
    for path in write_deployment_keys(args.out, args.devices, hosts):
        print(path)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from splitpeft.experiment.compare import run_comparison
    from splitpeft.experiment.run import EvaluationError
    from splitpeft.federation.simulation import RoundError

    try:
        run_comparison(
            args.suite, args.out, config_path=args.config, preset=args.preset, overrides=args.overrides,
            methods=args.methods.split(",") if args.methods else None, seeds=args.seeds, target_loss=args.target_loss,
            target=args.target.replace("-", "_"), overwrite=args.overwrite, reuse=args.reuse, progress=not args.no_progress,
            checkpoints=args.checkpoints,
        )
    except (RoundError, EvaluationError) as error:
        return _run_failed(error)
    print((args.out / "comparison.md").read_text())
    print(f"comparison: {args.out / 'comparison.json'}  plot: {args.out / 'convergence.png'}")
    return 0


def _load_run(run: Path, overrides: list[str]) -> ExperimentConfig:
    if not (run / "config.yaml").is_file() or not (run / "adapter" / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{run} is not a splitpeft run folder (config.yaml and adapter/ expected)")
    return load_config(run / "config.yaml", overrides)


def _adapted_model(run: Path, config: ExperimentConfig) -> tuple[Any, Any]:
    from peft import PeftModel

    from splitpeft.model.adapters import peft_quietly
    from splitpeft.model.loading import load_model

    loaded = load_model(config.model.name, seed=config.seed)
    with peft_quietly():
        model = PeftModel.from_pretrained(loaded.model, str(run / "adapter"))
    return model.eval(), loaded.tokenizer


def _evaluate(args: argparse.Namespace) -> int:
    from splitpeft.storage import exclusive

    _load_run(args.run, args.overrides)  # not a run folder: refused before anything is made beside it
    with exclusive(args.run, "run folder"):  # a run still writing it, or a second evaluation, is refused
        return _evaluate_held(args)


def _evaluate_held(args: argparse.Namespace) -> int:
    import dataclasses

    from splitpeft.data.batching import encode
    from splitpeft.data.partition import split_by_group
    from splitpeft.data.sources import load_examples
    from splitpeft.experiment.report import write_json
    from splitpeft.experiment.run import evaluate_model
    from splitpeft.federation.preflight import check_held_out

    config = _load_run(args.run, args.overrides)
    if args.data is None:
        examples = load_examples(config.data.source, config.data.path, limit=config.data.limit, seed=config.seed)
        _, held_out = split_by_group(examples, config.data.eval_fraction, config.seed)
        written = args.run / "eval.json"
    else:
        held_out = load_examples("e2e", str(args.data))  # a missing or malformed file fails here, before the model loads
        if not any(item.partition("=")[0].strip() == "eval.perplexity_examples" for item in args.overrides):
            config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, perplexity_examples=len(held_out)))
        written = args.run / f"eval-{args.data.stem}.json"
    model, tokenizer = _adapted_model(args.run, config)
    encoded = encode(held_out, tokenizer, config.data.max_length)
    check_held_out(config, model, tokenizer, held_out, encoded)  # warns of what the context truncates
    result = evaluate_model(model, tokenizer, config, held_out, encoded, progress=True)
    result["data"] = "held-out split of data.path" if args.data is None else str(args.data)
    if "perplexity" in result:
        result["perplexity_examples"] = min(len(held_out), config.eval.perplexity_examples)
    write_json(written, result)
    _print_metrics({"adapter": result})
    print(f"written: {written}")
    if args.data is None and not args.overrides and _complete_report(args.run, result, config):
        print(f"completed: {args.run / 'report.json'} (its evaluation had not finished)")
    return 0


def _complete_report(run: Path, result: dict[str, Any], config: ExperimentConfig) -> bool:
    """Finish the report of a run whose evaluation failed or was stopped (``"status"`` other than
    "finished") with `result`, an evaluation with the run's own config; True if it did."""
    import json

    from splitpeft.experiment.report import write_json

    try:
        report = json.loads((run / "report.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(report, dict) or report.get("status", "finished") == "finished":
        return False
    report["eval"] = {key: value for key, value in result.items() if key not in ("data", "perplexity_examples")}
    report.pop("eval_error", None)
    # The privacy audit needs the training's traffic, which the run folder does not hold.
    report["status"] = "finished" if not config.privacy.audit else "evaluated; the privacy audit did not run"
    write_json(run / "report.json", report)
    return True


def _generate(args: argparse.Namespace) -> int:
    from splitpeft.data.examples import format_mr_prompt
    from splitpeft.experiment.evaluation import generate

    config = _load_run(args.run, [])
    model, tokenizer = _adapted_model(args.run, config)
    prompt = format_mr_prompt(args.mr) if args.mr is not None else args.prompt
    [text] = generate(model, tokenizer, [prompt], max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    print(text)
    return 0


METRICS = ("perplexity", "bleu", "nist", "meteor", "rouge_l", "cider")


def _print_metrics(columns: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="held-out evaluation")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    for metric in METRICS:
        values = [columns[name].get(metric) for name in columns]
        if all(v is None for v in values):
            continue
        table.add_row(metric, *("-" if v is None else f"{v:.4g}" for v in values))
    Console().print(table)


def _absence(last_round: dict[str, Any], device: str) -> str:
    """Why a device has no loss in the last round: dropped, or not selected for it."""
    if any(entry["device"] == device for entry in last_round.get("dropped", [])):
        return "dropped"
    return "not selected"


def _completed_per_round(rounds: list[dict[str, Any]]) -> str:
    """'3/3 2/3 ...': per round, the devices that completed (trained, upload accepted) of those selected."""
    return " ".join(f"{len(entry.get('completed', []))}/{len(entry.get('selected', []))}" for entry in rounds)


SUMMARY_ROWS = 20  # device rows the summary tables print (a fleet of thousands has its rows in report.json)


def _summary(report: dict[str, Any], config: ExperimentConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.placement.placement} on {config.model.name}: per device, all rounds")
    for column in ("device", "split k", "tokens", "MB up", "MB down", "GFLOP", "peak MB", "last loss"):
        table.add_column(column, justify="right")
    info = report["info"]["devices"]
    last = report["rounds"][-1]["devices"]
    per_device = list(report["totals"]["per_device"].items())
    for device, entry in per_device[:SUMMARY_ROWS]:
        table.add_row(
            device, str(info[device]["split_layer"]), str(entry["tokens"]), f"{entry['bytes_up'] / 1e6:.2f}",
            f"{entry['bytes_down'] / 1e6:.2f}", f"{entry['flops'] / 1e9:.1f}", f"{entry['peak_memory_bytes'] / 1e6:.1f}",
            f"{last[device]['train_loss']:.3f}" if device in last else _absence(report["rounds"][-1], device),
        )
    if len(per_device) > SUMMARY_ROWS:
        table.add_row("...", *[""] * 7)
    console = Console()
    console.print(table)
    if len(per_device) > SUMMARY_ROWS:
        console.print(f"the first {SUMMARY_ROWS} of {len(per_device)} devices that trained; all of them: report.json")
    console.print(f"devices completed per round: {_completed_per_round(report['rounds'])}")
    plans = report["info"].get("plans")
    if plans:
        plan_table = Table(title=f"device plans (hsplit.planner={config.hsplit.planner})")
        for column in ("device", "budget MB", "k", "ranks: modules", "pred. MB", "meas. MB", "GFLOP/step",
                       "importance", "step s"):
            plan_table.add_column(column, justify="right")
        for row in plans[:SUMMARY_ROWS]:
            plan_table.add_row(
                row["device"], f"{row['budget_bytes'] / 1e6:.0f}", str(row["split_layer"]),
                " ".join(f"{rank}:{count}" for rank, count in row["ranks"].items()),
                f"{row['predicted_peak_bytes'] / 1e6:.1f}", f"{row['measured_peak_bytes'] / 1e6:.1f}",
                f"{row['measured_flops_per_step'] / 1e9:.2f}",
                "-" if row.get("importance") is None else f"{row['importance']:.3f}",
                "-" if row.get("planned_step_s") is None else f"{row['planned_step_s']:.2f}",
            )
        if len(plans) > SUMMARY_ROWS:
            plan_table.add_row("...", *[""] * 8)
        console.print(plan_table)
        if len(plans) > SUMMARY_ROWS:
            console.print(f"the first {SUMMARY_ROWS} of {len(plans)} plans; all of them: report.json")
        simulated = [r.get("simulated_round_s") for r in report["rounds"]]
        if all(t is not None for t in simulated):
            console.print(f"simulated wall time: {sum(simulated):.1f} s over {len(simulated)} rounds "
                          "(each round: its slowest device, or the shared server)")
    columns = {"fine-tuned": report["eval"]}
    if "baseline_eval" in report:
        columns = {"untuned": report["baseline_eval"], **columns}
    _print_metrics(columns)
    full = "privacy" in report
    privacy = report.get("privacy") or report.get("privacy_estimate") or {}
    for row in privacy.get("leakage", []):
        exposure = f"{row['placement']}@{row['split_layer']}"
        devices = [d for d, e in privacy["devices"].items() if e == exposure]
        named = ", ".join(devices[:5]) + (f" and {len(devices) - 5} more" if len(devices) > 5 else "")
        what = "privacy" if full else "privacy (estimate; privacy.audit=true for every attacker)"
        console.print(f"{what}: the server recovers {row['token_accuracy']:.1%} of the private tokens of {named} "
                      f"({exposure}; attackers {' + '.join(row['attackers'])}; chance {privacy['chance_token_accuracy']:.1%})"
                      f"; held-out perplexity {report['eval'].get('perplexity', float('nan')):.3f}")


if __name__ == "__main__":
    sys.exit(main())
