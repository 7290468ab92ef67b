"""A run's largest final adapters, and how many adapters its devices kept active after the warm-up (issue 25).

    .venv/bin/python bench/adapter_norms.py RUN [RUN ...] [--top 3]

RUN is a run folder (`simulate --out`, or a `compare` / `bench/papers_claims.py` run): from its
exported PEFT adapter (`adapter/adapter_model.safetensors`) the `--top` modules by ||B A||_F
(unscaled, `killrevive.product_norm`); with Kill and Revive, from its `report.json`, the fewest and
most adapters each device held active at a step after `kill_revive.warmup`
(`kill_revive.<device>.active_per_step`), and for each of the `--top` modules the share of those
steps each device held it active, and how many modules each device held active on most of those
steps, counted by how many devices held them so. Kill and Revive's drift shows as modules whose ||B A|| grows far
past no KR's, trained by few devices (BENCHMARKS, "The published `dynamic` at 720 steps").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

from splitpeft.parties.killrevive import kr_summary, product_norm


def norms(run: Path) -> dict[str, float]:
    """||B A||_F per module of RUN's exported adapter."""
    tensors = run / "adapter" / "adapter_model.safetensors"
    if not tensors.is_file():
        raise SystemExit(f"{run}: no adapter/adapter_model.safetensors (not a finished run folder)")
    found: dict[str, float] = {}
    try:
        with safe_open(str(tensors), "pt") as handle:
            for key in handle.keys():
                if key.endswith(".lora_A.weight"):
                    a, b = handle.get_tensor(key).double(), handle.get_tensor(key.replace(".lora_A.", ".lora_B.")).double()
                    found[key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")] = product_norm(a, b)
    except SafetensorError as error:
        raise SystemExit(f"{tensors}: not a readable safetensors file ({error})") from None
    return found


def after_warmup(run: Path) -> tuple[dict[str, tuple[int, int]], dict[str, dict[str, float]]]:
    """From one read of RUN's report.json: per device, the fewest and most adapters active at a step after the
    warm-up (none without Kill and Revive); and per device that names its adapters, each adapter's share of those
    steps at which it was active (`killrevive.kr_summary`'s `active_share`)."""
    try:
        report = json.loads((run / "report.json").read_text())
        warmup = int(report["config"]["kill_revive"]["warmup"])
        counts, shares = {}, {}
        for device, record in report.get("kill_revive", {}).items():
            steps = record["active_per_step"]
            if after := steps[max(warmup, 1) - 1:]:
                counts[device] = (min(map(len, after)), max(map(len, after)))
            if names := list(record.get("modules", [])):
                shares[device] = kr_summary(names, [[names[index] for index in step] for step in steps], [], warmup, 0.0)["active_share"]
        return counts, shares
    except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
        raise SystemExit(f"{run}: no readable report.json with kill_revive settings ({error!r})") from None


def holders(shares: dict[str, dict[str, float]]) -> dict[int, int]:
    """How many modules are held active on more than half of a device's steps after the warm-up by exactly
    n devices, per n."""
    held: dict[str, int] = {}
    for per_module in shares.values():
        for name, share in per_module.items():
            if share > 0.5:
                held[name] = held.get(name, 0) + 1
    return {n: sum(count == n for count in held.values()) for n in sorted(set(held.values()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=3, help="how many modules to name, largest ||B A|| first")
    args = parser.parse_args()
    for run in args.runs:
        sizes = norms(run)
        largest = sorted(sizes.items(), key=lambda item: -item[1])[:args.top]
        print(f"{run}: {len(sizes)} modules, largest ||B A||: " + ", ".join(f"{name} {size:.2f}" for name, size in largest))
        counts, shares = after_warmup(run)
        for device, (fewest, most) in sorted(counts.items()):
            print(f"  {device}: {fewest}-{most} adapters active a step after the warm-up")
        if held_by := holders(shares):
            print(f"  modules active on most steps after the warm-up: {sum(held_by.values())}, by number of devices holding them: "
                  + ", ".join(f"{n}: {count}" for n, count in held_by.items()))
        for name, _ in largest:
            if held := {device: per_module[name] for device, per_module in shares.items() if name in per_module}:
                print(f"  {name} active after the warm-up: " + ", ".join(f"{device} {share:.0%}" for device, share in sorted(held.items())))


if __name__ == "__main__":
    main()
