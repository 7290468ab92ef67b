"""Does `runtime.dtype=auto` (bf16 on this machine) train as well as fp32? Issue 22's quality check.

    .venv/bin/python bench/dtype_quality.py [--seeds 0,1,2] [--jobs main,e2e] [--out runs/dtype_quality] [--keep]

Runs `splitpeft simulate` for each job, dtype (auto, fp32) and seed, one at a time, and reads each
run's report.json. Jobs, as their presets configure them (training, planner, fleet) but evaluated
only once, after the last round, without the untuned baseline and without METEOR:

- main: the default preset (SmolLM2-135M, HSplitLoRA, 3 devices; ARMSC plans each dtype's own
  splits and ranks, as the default job would); held-out perplexity and BLEU on every held-out
  example and MR of the built-in task (`eval.perplexity_examples` and `eval.groups` above its size).
- e2e: the e2e preset (4 devices, non-IID, 10 steps a round) on data.path (default
  ../shared/data/e2e/valid.txt) for `--e2e-rounds` rounds, `--e2e-eval-fraction` of its MRs held
  out; perplexity on `--e2e-perplexity` held-out examples, BLEU (greedy, 40 new tokens) on
  `--e2e-groups` held-out MRs (default: all of them).

Each run's saved adapter is also scored for perplexity in fp32 (`splitpeft evaluate RUN
runtime.dtype=fp32 eval.generation=false`, written to RUN/eval.json), so that a bf16 run's training
is told apart from its bf16 evaluation. Prints per job a markdown table: mean ± std over the seeds
per dtype, then the per-seed numbers and each run's device splits; then whether auto's mean
perplexity (scored in fp32) is within 2% of fp32's and its mean BLEU within the seeds' spread
(|difference of the means| <= the larger of the two stds). `--keep` reuses the report (and
eval.json) of a finished run already in its folder (a run is its job, dtype and seed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
EVAL_ONCE = ["eval.every_round=false", "eval.baseline=false", "eval.meteor=false"]


def job_arguments(job: str, args: argparse.Namespace) -> list[str]:
    """`splitpeft simulate` arguments of a job, dtype and seed aside."""
    if job == "main":
        return ["--preset", "default", *EVAL_ONCE, "eval.perplexity_examples=100000", "eval.groups=100000"]
    if job == "e2e":
        return ["--preset", "e2e", f"data.path={args.e2e_path}", f"data.eval_fraction={args.e2e_eval_fraction}",
                f"federation.rounds={args.e2e_rounds}",
                *EVAL_ONCE, f"eval.perplexity_examples={args.e2e_perplexity}", f"eval.groups={args.e2e_groups}"]
    raise SystemExit(f"unknown job {job!r} (main, e2e)")


def dtype_arguments(dtype: str) -> list[str]:
    """A --dtypes entry: `auto`, `fp32`, ..., or `auto+plan_fp32` (runtime.dtype=auto with the
    planner sizing the fleet in fp32: hsplit.plan_dtype=fp32, so the plans are fp32's)."""
    runtime, _, planned = dtype.partition("+plan_")
    return [f"runtime.dtype={runtime}", *([f"hsplit.plan_dtype={planned}"] if planned else [])]


def run(job: str, dtype: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run's report.json (run now, or read back with --keep)."""
    out = Path(args.out) / f"{job}-{dtype}-seed{seed}"
    report = out / "report.json"
    finished = report.is_file() and json.loads(report.read_text()).get("status") == "finished"
    if not (args.keep and finished):  # a run writes report.json once trained, again once evaluated
        command = [sys.executable, "-m", "splitpeft.cli", "simulate", "--out", str(out), "--overwrite", "--no-progress",
                   *job_arguments(job, args), *dtype_arguments(dtype), f"seed={seed}"]
        print(f"{job} {dtype} seed {seed}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    data: dict[str, Any] = json.loads(report.read_text())
    scored = out / "eval.json"
    if not (args.keep and scored.is_file()):
        subprocess.run([sys.executable, "-m", "splitpeft.cli", "evaluate", str(out), "runtime.dtype=fp32",
                        "eval.generation=false"], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    data["fp32_eval_perplexity"] = json.loads(scored.read_text())["perplexity"]
    if job == "main" and args.main_test_groups > 0:  # the real E2E file is held out from the built-in task entirely
        tested = out / f"eval-{Path(args.e2e_path).stem}.json"
        if not (args.keep and tested.is_file()):
            subprocess.run([sys.executable, "-m", "splitpeft.cli", "evaluate", str(out), "--data", args.e2e_path,
                            "runtime.dtype=fp32", f"eval.groups={args.main_test_groups}",
                            f"eval.perplexity_examples={args.main_test_perplexity}"], check=True, cwd=REPO,
                           stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        data["test"] = json.loads(tested.read_text())
    return data


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", default="main,e2e")
    parser.add_argument("--dtypes", default="auto,fp32",
                        help="the first is compared against the second; auto+plan_fp32 = auto, planned as fp32")
    parser.add_argument("--out", default="runs/dtype_quality")
    parser.add_argument("--keep", action="store_true", help="reuse runs whose report.json exists")
    parser.add_argument("--e2e-path", default=str(REPO.parent / "shared" / "data" / "e2e" / "valid.txt"))
    parser.add_argument("--e2e-rounds", type=int, default=1,
                        help="of the preset's 4 rounds, 1 (40 steps in all) to fit 12 runs in an hour on 2 cores")
    parser.add_argument("--e2e-eval-fraction", type=float, default=0.2,
                        help="of the MRs held out (the preset's 0.1 holds out about 50 MRs)")
    parser.add_argument("--e2e-perplexity", type=int, default=200, help="held-out examples for perplexity")
    parser.add_argument("--e2e-groups", type=int, default=100000, help="held-out MRs for BLEU (default: all)")
    parser.add_argument("--main-test-groups", type=int, default=200,
                        help="the main job's adapters also generate, in fp32, for this many MRs of --e2e-path "
                             "(real E2E text, never seen by the built-in task; 0 = skip)")
    parser.add_argument("--main-test-perplexity", type=int, default=500, help="examples of --e2e-path for that perplexity")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    dtypes = args.dtypes.split(",")
    for job in args.jobs.split(","):
        reports = {(dtype, seed): run(job, dtype, seed, args) for seed in seeds for dtype in dtypes}
        some = next(iter(reports.values()))
        print(f"\n### {job}: {len(seeds)} seeds; perplexity on {some['info']['held_out_examples']} held-out examples "
              f"(at most eval.perplexity_examples={some['config']['eval']['perplexity_examples']}), "
              f"BLEU on {some['eval']['groups']} held-out MRs\n")
        print("| dtype (as run) | perplexity | perplexity, fp32 eval | BLEU | per-seed perplexity "
              "| per-seed perplexity, fp32 eval | per-seed BLEU | device splits per seed | wall s per seed |")
        print("|---|---:|---:|---:|---|---|---|---|---|")
        summary = {}
        for dtype in dtypes:
            runs = [reports[dtype, seed] for seed in seeds]
            ppl = [r["eval"]["perplexity"] for r in runs]
            ppl32 = [r["fp32_eval_perplexity"] for r in runs]
            bleu = [r["eval"]["bleu"] for r in runs]
            summary[dtype] = (mean_std(ppl32), mean_std(bleu))
            splits = ["/".join(str(p["split_layer"]) for p in r["info"]["plans"]) if r["info"].get("plans")
                      else str(r["config"]["placement"]["split_layer"]) for r in runs]
            (qm, qs), (bm, bs) = summary[dtype]
            pm, ps = mean_std(ppl)
            walls = ", ".join(f"{r['wall_s']:.0f}" for r in runs)
            print(f"| {dtype} ({runs[0]['info']['runtime']['dtype']}) | {pm:.4f} ± {ps:.4f} | {qm:.4f} ± {qs:.4f} | "
                  f"{bm:.2f} ± {bs:.2f} | {', '.join(f'{v:.4f}' for v in ppl)} | {', '.join(f'{v:.4f}' for v in ppl32)} | "
                  f"{', '.join(f'{v:.2f}' for v in bleu)} | {', '.join(splits)} | "
                  f"{walls} |")
        if job == "main" and args.main_test_groups > 0:
            some_test = some["test"]
            print(f"\nThe same adapters on {some_test['perplexity_examples']} examples and {some_test['groups']} MRs of "
                  f"{Path(args.e2e_path).name} (scored in fp32):\n")
            print("| dtype | perplexity | BLEU | per-seed perplexity | per-seed BLEU |")
            print("|---|---:|---:|---|---|")
            for dtype in dtypes:
                tests = [reports[dtype, seed]["test"] for seed in seeds]
                test_ppl = [t["perplexity"] for t in tests]
                test_bleu = [t["bleu"] for t in tests]
                (tm, ts), (um, us) = mean_std(test_ppl), mean_std(test_bleu)
                print(f"| {dtype} | {tm:.4f} ± {ts:.4f} | {um:.2f} ± {us:.2f} | "
                      f"{', '.join(f'{v:.4f}' for v in test_ppl)} | {', '.join(f'{v:.2f}' for v in test_bleu)} |")
        if len(dtypes) == 2:
            (pa, _), (ba, bsa) = summary[dtypes[0]]
            (pb, _), (bb, bsb) = summary[dtypes[1]]
            ppl_change = pa / pb - 1
            print(f"\n{dtypes[0]} against {dtypes[1]}: perplexity (fp32 eval) {ppl_change:+.2%} "
                  f"({'within' if abs(ppl_change) <= 0.02 else 'OUTSIDE'} 2%), BLEU {ba - bb:+.2f} "
                  f"({'within' if abs(ba - bb) <= max(bsa, bsb) else 'OUTSIDE'} the seeds' spread, "
                  f"std {max(bsa, bsb):.2f})")


if __name__ == "__main__":
    main()
