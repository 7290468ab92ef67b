"""A long run's resident memory under glibc's default malloc against `runtime.malloc_arenas=2` with
`runtime.release_memory_each_round=true` (the defaults), side by side on one machine.

Runs `bench/papers_claims.py` twice at once with the same arguments, one process a setting (one
torch thread each), into OUT/glibc_default and OUT/tamed; samples each process's resident memory
every `--interval` seconds from /proc; prints the peak, the median over the run's second half and
each round's `resident_bytes` (the report's, taken before the round's release), the wall time, and
whether every round's held-out perplexity is the same in both (the allocator must not move a number):

    .venv/bin/python bench/allocator_memory.py --out runs/allocator_memory -- \\
        --suite dlora --hybrid-blocks 2 --rounds 12 --seeds 0 --warmups 0.2 --methods kr

Linux only (/proc). Writes OUT/allocator_memory.json.
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

from splitpeft.model.runtime import resident_bytes

SETTINGS = {
    "glibc_default": ["runtime.malloc_arenas=0", "runtime.release_memory_each_round=false"],
    "tamed": ["runtime.malloc_arenas=2", "runtime.release_memory_each_round=true"],
}


def reports(folder: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(folder)): json.loads(p.read_text()) for p in sorted(folder.rglob("report.json"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    parser.add_argument("claims", nargs=argparse.REMAINDER, help="-- then bench/papers_claims.py's arguments (no --out)")
    args = parser.parse_args()
    claims = [a for a in args.claims if a != "--"]
    if "--out" in claims:
        parser.error("give --out to this script, not to papers_claims")
    options = [a for a in claims if a.startswith("-") or "=" not in a]
    overrides = [a for a in claims if a not in options]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    env.pop("MALLOC_ARENA_MAX", None)
    script = Path(__file__).with_name("papers_claims.py")
    children = {}
    for name, extra in SETTINGS.items():
        command = [sys.executable, str(script), *options, "--out", str(args.out / name), *overrides, *extra]
        log = (args.out / f"{name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        children[name] = (subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env), time.time())
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in children}
    walls: dict[str, float] = {}
    while len(walls) < len(children):
        for name, (child, started) in children.items():
            if name in walls:
                continue
            if child.poll() is not None:
                walls[name] = time.time() - started
                if child.returncode != 0:
                    sys.exit(f"{name} failed ({child.returncode}): see {args.out / (name + '.log')}")
                continue
            value = resident_bytes(child.pid)
            if value is not None:
                samples[name].append((time.time() - started, value))
        time.sleep(args.interval)
    runs = {name: reports(args.out / name) for name in children}
    gib = 1 << 30
    result: dict[str, object] = {"command": claims, "settings": SETTINGS, "wall_s": walls}
    print(f"{'setting':<14} {'peak GiB':>9} {'median, 2nd half':>17} {'wall s':>8}  allocator; resident GiB at each round's end")
    for name in children:
        values = [v for _, v in samples[name]]
        second_half = values[len(values) // 2:] or values
        for run, report in runs[name].items():
            rounds = [r.get("resident_bytes") for r in report["rounds"]]
            print(f"{name:<14} {max(values) / gib:>9.2f} {statistics.median(second_half) / gib:>17.2f} {walls[name]:>8.0f}  "
                  f"{report.get('allocator')}; {run}: " + " ".join(f"{(v or 0) / gib:.2f}" for v in rounds))
        result[name] = {"peak_bytes": max(values), "median_second_half_bytes": statistics.median(second_half),
                        "samples": samples[name],
                        "resident_bytes": {run: [r.get("resident_bytes") for r in report["rounds"]]
                                           for run, report in runs[name].items()}}
    same = all(
        [r["eval_perplexity"] for r in runs["glibc_default"][run]["rounds"]]
        == [r["eval_perplexity"] for r in runs["tamed"][run]["rounds"]]
        for run in runs["glibc_default"])
    result["same_perplexity_every_round"] = same
    print(f"held-out perplexity the same at every round in both: {same}")
    (args.out / "allocator_memory.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
