"""The papers' claims in the papers' own setting (issue 25).

`--suite hsplit`: HSplitLoRA against HetLoRA, SplitLoRA and CenLoRA with plain split (labels at the
server) and five devices whose budgets spread 4x, and the same fleet U-shaped beside it:

    .venv/bin/python bench/papers_claims.py --placement plain --seeds 0,1,2 \
        --methods hsplitlora,hetlora,splitlora,cenlora --out runs/papers_plain

`--suite dlora`: Kill and Revive's selections against no KR, each with warm-ups of 10% and 20% of a
device's steps, in dlora or (with `--hybrid-blocks K`) in the hybrid whose device also runs blocks
[0, K); per (selection, warm-up): the traffic and device adapter-FLOP saving after the warm-up against
no KR over the same steps, and the held-out perplexity change; the recommended setting is the one
keeping perplexity within 2% of no KR with the largest traffic saving:

    .venv/bin/python bench/papers_claims.py --suite dlora --seeds 0,1,2 --out runs/papers_kr

`--methods` without `no_kr` runs only the selections named (a second process beside one running no
KR into the same `--out`); the table compares them with whatever no-KR runs the folder holds.

Runs seed by seed (every method of seed 0, then of seed 1, ...), so a session that stops early still
has whole seeds to compare; each run lands in OUT/METHOD/seed-S and is reused when its report is
finished (the `compare --reuse` rule). At the end the suite's table over the finished seeds is written
to OUT/comparison.md (target per seed: the worst final held-out loss of the methods on that seed).

The fleet (SmolLM2-135M, E2E, Dirichlet over `type`): memory 230-920 MB, compute 25-100 GFLOP/s and
links 50-200 Mbit/s, each spread 4x over the five devices as the paper's 5-20 GB, one 500 GFLOP/s
server. 40% of the MRs are held out, so BLEU is scored on 200 of them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

from splitpeft.experiment.compare import (
    REPORT_SCHEMA,
    after_warmup,
    heldout_loss,
    last_round_fall,
    markdown_table,
    misfit,
    run_comparison,
    write_comparison,
)

MEMORY = [230_000_000, 320_000_000, 460_000_000, 640_000_000, 920_000_000]
FLOPS = [2.5e10, 3.5e10, 5.0e10, 7.0e10, 1.0e11]
LINKS = [6.25e6, 8.8e6, 1.25e7, 1.77e7, 2.5e7]


def fleet_overrides(args: argparse.Namespace) -> list[str]:
    return [
        f"data.path={args.data}", "data.eval_fraction=0.4", "data.max_length=64",
        "federation.num_devices=5", f"federation.rounds={args.rounds}", f"federation.local_steps={args.local_steps}",
        "federation.batch_size=2",
        f"fleet.memory_bytes=[{','.join(map(str, MEMORY))}]",
        f"fleet.flops_per_s=[{','.join(f'{f:.3e}' for f in FLOPS)}]",
        f"fleet.bandwidth_bytes_per_s=[{','.join(f'{b:.3e}' for b in LINKS)}]",
        "fleet.server_flops_per_s=5.0e+11",
        f"placement.labels_on_device={'true' if args.placement == 'ushaped' else 'false'}",
        f"eval.perplexity_examples={args.perplexity_examples}", f"eval.groups={args.groups}",
        "eval.max_new_tokens=32", "eval.baseline=false", "eval.meteor=false",
        *args.overrides,
    ]


def run_seed_major(suite: str, out: Path, overrides: list[str], seeds: list[int], methods: list[str],
                   checkpoints: bool = False) -> None:
    for seed in seeds:
        for method in methods:
            print(f"== {out} {method} seed {seed}", flush=True)
            run_comparison(suite, out, preset="e2e", overrides=[*overrides, f"seed={seed}"], methods=[method],
                           seeds=1, reuse=True, progress=True, checkpoints=checkpoints)


def finished_run(folder: Path) -> dict | None:
    """The report of the run in `folder` once it is finished and fits REPORT_SCHEMA, else None (no
    run yet, still running, or stopped while it was evaluated: no scores to compare)."""
    path = folder / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else None
    if report is None or report.get("status") != "finished" or misfit(report, REPORT_SCHEMA) is not None:
        return None
    return report


def table_of_finished(out: Path, methods: list[str], seeds: list[int]) -> dict:
    """The hsplit comparison (target per seed) over the seeds every method finished, read from the
    run folders as they stand: runs written by earlier code are compared as they are (each report
    holds its own config and version)."""
    reports, complete = {}, []
    for seed in seeds:
        found = {}
        for method in methods:
            report = finished_run(out / method / f"seed-{seed}")
            if report is not None:
                found[method, seed] = report
        if len(found) == len(methods):
            reports |= found
            complete.append(seed)
    if not complete:
        raise SystemExit(f"no seed of {seeds} has a finished run of every method in {out}")
    print(f"seeds with every method finished: {complete}")
    return write_comparison("hsplit", out, reports, methods, complete, target="per_seed")


def plans_table(overrides: list[str], methods: list[str]) -> str:
    """Each method's plans for the fleet, from the planner alone (no training): per device its
    split, adapted modules and ranks, predicted peak against its budget, planned step time."""
    from collections import Counter

    from splitpeft.config import load_config
    from splitpeft.experiment.compare import SUITES, method_config
    from splitpeft.federation.simulation import Simulation

    base = load_config(None, overrides, preset="e2e")
    lines = ["| method | device | k | adapted modules at ranks | predicted peak / budget (MB) | planned step (s) |",
             "|---|---|---:|---|---|---:|"]
    for method in methods:
        sim = Simulation(method_config(base, None, "e2e", overrides, SUITES["hsplit"][method]))
        if sim.planning is None:
            raise SystemExit(f"{method} has no planner (its placement plans nothing)")
        for plan in sim.planning.plans:
            ranks = ", ".join(f"{n} at r = {r}" for r, n in sorted(Counter(plan.ranks.values()).items()))
            step = f"{plan.step_s:.3f}" if plan.step_s else "-"
            lines.append(f"| {method} | {plan.device} | {plan.split_layer} | {ranks} | "
                         f"{plan.predicted_peak_bytes / 1e6:.1f} / {plan.budget_bytes / 1e6:.1f} | {step} |")
        sim.close()
    return "\n".join(lines) + "\n"


def kill_and_revive(args: argparse.Namespace, overrides: list[str], seeds: list[int], methods: list[str]) -> str:
    """Run no KR once (when `methods` names it) and each KR selection per warm-up; the table of
    savings after warm-up, against the no-KR runs in the folder whoever ran them."""
    steps = args.rounds * args.local_steps
    warmups = {fraction: max(1, round(fraction * steps)) for fraction in args.warmups}
    if args.hybrid_blocks:
        # the base config is validated before each method sets its placement: name dlora here too
        overrides = [*overrides, "placement.placement=dlora", f"placement.dlora_device_blocks={args.hybrid_blocks}"]
    for seed in seeds if not args.table_only else []:  # seed-major: whole seeds are there when a session stops early
        if "no_kr" in methods:  # without it, only the selections run (e.g. beside a process running no KR)
            run_seed_major("dlora", args.out / "no_kr", overrides, [seed], ["no_kr"], args.checkpoints)
        for warmup in warmups.values():
            run_seed_major("dlora", args.out / f"warmup-{warmup}", [*overrides, f"kill_revive.warmup={warmup}"],
                           [seed], [m for m in methods if m != "no_kr"], args.checkpoints)

    def report(folder: Path, seed: int) -> dict | None:
        return finished_run(folder / f"seed-{seed}")

    lines = [f"Warm-up in steps of each device's {steps}; savings after the warm-up against no KR over the same "
             "steps; mean ± sd over seeds (n = seeds with both runs).", "",
             "| selection | warm-up | traffic saved | adapter FLOPs saved | perplexity change | BLEU change | n |",
             "|---|---|---|---|---|---|---|"]
    best: tuple[float, str] | None = None
    for fraction, warmup in warmups.items():
        for method in methods:
            if method == "no_kr":
                continue
            traffic, flops, ppl, bleu = [], [], [], []
            for seed in seeds:
                base, kr = report(args.out / "no_kr" / "no_kr", seed), report(args.out / f"warmup-{warmup}" / method, seed)
                if base is None or kr is None:
                    continue
                base = copy.deepcopy(base)
                base["config"]["kill_revive"]["warmup"] = warmup  # the same cut as the KR run's
                (base_bytes, base_flops), (kr_bytes, kr_flops) = after_warmup(base), after_warmup(kr)
                if base_bytes == 0 or base_flops == 0:  # no device round starts after the warm-up: nothing to compare
                    print(f"{method}, warm-up {warmup}, seed {seed}: no device round starts after the warm-up "
                          "(after_warmup counts whole rounds); give it more rounds")
                    continue
                traffic.append(1 - kr_bytes / base_bytes)
                flops.append(1 - kr_flops / base_flops)
                ppl.append(kr["eval"]["perplexity"] / base["eval"]["perplexity"] - 1)
                if kr["eval"].get("bleu") is not None and base["eval"].get("bleu") is not None:
                    bleu.append(kr["eval"]["bleu"] - base["eval"]["bleu"])

            def shown(values: list[float], scale: float, spec: str, unit: str = "") -> str:
                if not values:
                    return "-"
                sd = f" ± {format(statistics.stdev(values) * scale, spec.lstrip('+'))}" if len(values) > 1 else ""
                return format(statistics.mean(values) * scale, spec) + sd + unit

            lines.append(f"| {method} | {warmup} ({fraction:.0%}) | {shown(traffic, 100, '.1f', '%')} | "
                         f"{shown(flops, 100, '.1f', '%')} | {shown(ppl, 100, '+.2f', '%')} | {shown(bleu, 1, '+.2f')} | "
                         f"{len(traffic)} |")
            # a selection that killed nothing saves nothing: it is no recommendation, whatever its perplexity
            if traffic and statistics.mean(traffic) > 0 and statistics.mean(ppl) <= 0.02 and (
                    best is None or statistics.mean(traffic) > best[0]):
                best = (statistics.mean(traffic), f"{method} with a warm-up of {warmup} steps")
    falls = [fall for seed in seeds if (base := report(args.out / "no_kr" / "no_kr", seed)) is not None
             and (fall := last_round_fall([heldout_loss(r) for r in base["rounds"]])) is not None]
    if falls:
        lines += ["", f"No KR's held-out perplexity fell {statistics.mean(falls):.2%} in the last round "
                      f"(seeds: {', '.join(f'{f:.2%}' for f in falls)}; near 0 once the runs have flattened)."]
    lines += ["", f"Recommended (perplexity within 2% of no KR, largest traffic saving): "
                  f"{best[1] if best else 'none of them'}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=["hsplit", "dlora"], default="hsplit")
    parser.add_argument("--warmups", default="0.1,0.2", help="dlora: KR warm-ups as shares of a device's steps")
    parser.add_argument("--hybrid-blocks", type=int, default=0, help="dlora: the hybrid's device blocks (0 = dlora)")
    parser.add_argument("--placement", choices=["plain", "ushaped"], default="plain",
                        help="plain: labels at the server (the papers' setting); ushaped: head and labels on the device")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", help="default: hsplitlora,hetlora,splitlora,cenlora (hsplit); "
                        "no_kr,kr,kr_scheduled,kr_gradient,kr_converged (dlora; also kr_converged_rel: converged against half the "
                        "median score at the end of warm-up; kr_upload_killed: dynamic uploading killed adapters at their frozen values; "
                        "kr_server: "
                        "dynamic with the server training killed adapters; kr_server_spared: the same, the hybrid's own blocks never killed)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--groups", type=int, default=200, help="held-out MRs for BLEU")
    parser.add_argument("--perplexity-examples", type=int, default=200)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e" / "valid.txt"))
    parser.add_argument("--out", type=Path, help="where the runs go (required unless --plans-only)")
    parser.add_argument("--checkpoints", action="store_true",
                        help="keep each run's state beside its folder: a stopped run continues, and a finished one "
                             "is continued to a larger --rounds instead of run again (`compare --checkpoints`)")
    parser.add_argument("--table-only", action="store_true", help="run nothing: only the table of the finished runs in --out")
    parser.add_argument("--plans-only", action="store_true",
                        help="hsplit: train nothing, print each method's plans for the fleet (the planner alone)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every run")
    args = parser.parse_args()
    if args.out is None and not args.plans_only:
        parser.error("--out is required (unless --plans-only)")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.warmups = [float(w) for w in args.warmups.split(",")]
    overrides = fleet_overrides(args)
    if args.suite == "dlora":
        methods = (args.methods or "no_kr,kr,kr_scheduled,kr_gradient,kr_converged").split(",")
        table = kill_and_revive(args, overrides, seeds, methods)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kill_and_revive.md").write_text(table)
        print(table)
        return
    methods = (args.methods or "hsplitlora,hetlora,splitlora,cenlora").split(",")
    if args.plans_only:
        print(plans_table(overrides, methods))
        return
    if not args.table_only:
        run_seed_major("hsplit", args.out, overrides, seeds, methods, args.checkpoints)
    print(markdown_table(table_of_finished(args.out, methods, seeds)))


if __name__ == "__main__":
    main()
