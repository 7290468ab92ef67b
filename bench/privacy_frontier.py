"""Privacy against utility: each defence trained with the same data and seed, then audited by the
privacy meter on its own traffic (issue 13; issue 24, item 5).

    .venv/bin/python bench/privacy_frontier.py --data ../shared/data/e2e/valid.txt [--only "NAME;..."]
        [--seeds 0,1,2] [--rounds 4] [--local-steps 10] [--attackers linear,learned,search,gradient,labels]
    .venv/bin/python bench/privacy_frontier.py --plot runs/privacy/frontier.jsonl --png docs/privacy_frontier.png

Every run is the `e2e` preset (4 devices, batch 4; by default its full length, 4 rounds x 10
local steps), trained on the first lines of the file with `--eval-fraction` of its MRs held out:
held-out perplexity on `--perplexity` examples and BLEU (greedy) on `--groups` MRs. The attackers'
auxiliary text is the file's last `--aux` lines, which no device trains on (data.limit keeps them
out); the audit attacks `--audit-examples` private examples per device, at the run's split, with
the run's defence, with every attacker of `--attackers` (the learned inverter trains until its
validation accuracy flattens, `privacy.learned_patience`). The first defence also scores the
untuned model on the same held-out data (the reference of the fine-tuning's gain).

A row: the run's exposure, leakage (the strongest reconstruction, and which attacker), each
attacker's token accuracy, (epsilon, delta = 1e-5) per sequence and per token vector from the
dp-accounting library where the defence has noise, held-out perplexity and BLEU, and the share of
the fine-tuning's perplexity gain it keeps: (untuned - ppl) / (untuned - undefended ppl). Each
row is appended to OUT/frontier.jsonl as it finishes; the Markdown table is printed at the end;
`--plot` draws leakage against perplexity per defence from such a file (the issue's goal region,
>= 90% of the gain at <= 30% recovery, shaded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from splitpeft.config import load_config
from splitpeft.experiment.run import run_experiment

NOISE = ["privacy.clip_norm={clip}", "privacy.gradient_clip_norm={grad_clip}"]
DEFENCES: dict[str, list[str]] = {  # name -> overrides on top of the shared ones
    "U-shaped k=4": [],
    "U-shaped k=4, noise 0.05": ["privacy.noise_multiplier=0.05", *NOISE],
    "U-shaped k=4, noise 0.1": ["privacy.noise_multiplier=0.1", *NOISE],
    "U-shaped k=4, noise 0.2": ["privacy.noise_multiplier=0.2", *NOISE],
    "U-shaped k=4, head-gradient noise 1.0": ["privacy.noise_multiplier=1.0", "privacy.gradient_clip_norm={grad_clip}"],
    "U-shaped k=16, noise 0.1": ["placement.split_layer=16", "privacy.noise_multiplier=0.1",
                                 "privacy.clip_norm={clip16}", "privacy.gradient_clip_norm={grad_clip}"],
    # the labels hidden, the states clean but 16 blocks deep: what depth adds to hiding the labels
    "U-shaped k=16, head-gradient noise 1.0": ["placement.split_layer=16", "privacy.noise_multiplier=1.0",
                                               "privacy.gradient_clip_norm={grad_clip}"],
    "U-shaped k=4, NoPeek 1": ["privacy.nopeek_weight=1.0"],
    # the states' noise alone: the head gradient goes as it is (its noise at sigma 0.1 is above its signal)
    "U-shaped k=4, noise 0.1, clean head gradient": ["privacy.noise_multiplier=0.1", "privacy.clip_norm={clip}"],
    # each sequence's (T, d) release clipped to C_seq (its median norm), which keeps the first token's
    # state (about 10x the others' norm at k = 4) as large against the rest as the model made it; sigma
    # chosen for the same noise per entry as token-level sigma 0.1 (8.5) and 0.25 (21)
    "U-shaped k=4, sequence clip, noise 0.0065, clean head gradient": [
        "privacy.clip_per=sequence", "privacy.noise_multiplier=0.0065", "privacy.clip_norm={clip_seq}"],
    "U-shaped k=4, sequence clip, noise 0.016, clean head gradient": [
        "privacy.clip_per=sequence", "privacy.noise_multiplier=0.016", "privacy.clip_norm={clip_seq}"],
    "dlora": ["placement.placement=dlora"],
    "dlora hybrid k=2": ["placement.placement=dlora", "placement.dlora_device_blocks=2"],
    "plain split k=4": ["placement.labels_on_device=false"],
}
GOAL_GAIN, GOAL_LEAKAGE = 0.9, 0.3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="E2E file (MR||text lines)")
    parser.add_argument("--aux", type=int, default=256, help="last lines of the file kept for the attackers")
    parser.add_argument("--clip", type=float, default=85.0,
                        help="privacy.clip_norm C at k = 4 (SmolLM2's median row norm after 4 blocks)")
    parser.add_argument("--clip16", type=float, default=177.0,
                        help="privacy.clip_norm C at k = 16 (SmolLM2's median row norm after 16 blocks)")
    parser.add_argument("--clip-seq", type=float, default=1300.0,
                        help="privacy.clip_norm C with privacy.clip_per=sequence at k = 4 (SmolLM2's median norm of a "
                        "padded (T, d) batch row of E2E after 4 blocks: 1303 over 64 examples, T up to 37)")
    parser.add_argument("--grad-clip", type=float, default=0.0012,
                        help="privacy.gradient_clip_norm C_g (SmolLM2's median head-gradient row norm)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds; each defence runs once per seed")
    parser.add_argument("--eval-fraction", type=float, default=0.4)
    parser.add_argument("--perplexity", type=int, default=200, help="held-out examples scored for perplexity")
    parser.add_argument("--groups", type=int, default=200, help="held-out MRs scored for BLEU")
    parser.add_argument("--audit-examples", type=int, default=8, help="private examples per device the audit attacks")
    parser.add_argument("--attackers", default="linear,learned,search,gradient,labels")
    parser.add_argument("--learned-patience", type=int, default=3)
    parser.add_argument("--learned-steps", type=int, default=1500)
    parser.add_argument("--only", help="semicolon-separated subset of the defences (their names hold commas)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="do not score the untuned model with the first defence (a resumed --only list)")
    parser.add_argument("--out", type=Path, default=Path("runs/privacy"))
    parser.add_argument("--plot", type=Path, help="draw the frontier from this frontier.jsonl instead of running")
    parser.add_argument("--png", type=Path, default=Path("docs/privacy_frontier.png"))
    args = parser.parse_args()
    if args.plot:
        saved = [json.loads(line) for line in args.plot.read_text().splitlines() if line.strip()]
        print(markdown(saved))
        plot(saved, args.png)
        return
    if not args.data:
        parser.error("--data is required to run the defences")
    lines = sum(1 for line in Path(args.data).read_text().splitlines() if line.strip())
    shared = [
        f"data.path={args.data}", f"data.limit={lines - args.aux}", f"data.eval_fraction={args.eval_fraction}",
        "privacy.audit=true", "privacy.aux_source=e2e", f"privacy.aux_path={args.data}",
        f"privacy.aux_examples={args.aux}", f"privacy.audit_examples={args.audit_examples}",
        f"privacy.attackers=[{args.attackers}]", f"privacy.learned_patience={args.learned_patience}",
        f"privacy.learned_steps={args.learned_steps}",
        f"federation.rounds={args.rounds}", f"federation.local_steps={args.local_steps}",
        f"eval.groups={args.groups}", f"eval.perplexity_examples={args.perplexity}",
        "eval.meteor=false", "eval.every_round=false",
        "count_flops=false",  # FlopCounterMode slows CPU steps; the FLOPs are not what this bench compares
    ]
    chosen = [name.strip() for name in args.only.split(";")] if args.only else list(DEFENCES)
    unknown = [name for name in chosen if name not in DEFENCES]
    if unknown:
        parser.error(f"unknown defence(s) {unknown}; choose from {list(DEFENCES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "frontier.jsonl"
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for index, name in enumerate(chosen):
            baseline = "true" if index == 0 and not args.no_baseline else "false"
            overrides = shared + [f"seed={seed}", f"eval.baseline={baseline}"] + [
                o.format(clip=args.clip, clip16=args.clip16, clip_seq=args.clip_seq, grad_clip=args.grad_clip) for o in DEFENCES[name]]
            config = load_config(preset="e2e", overrides=overrides)
            started = time.perf_counter()
            out = args.out / f"seed{seed}" / name.replace(" ", "_").replace(",", "").replace("=", "")
            report = run_experiment(config, out, overwrite=True, progress=False)
            rows.append(row_of(name, seed, report, time.perf_counter() - started))
            with log.open("a") as handle:
                handle.write(json.dumps(rows[-1]) + "\n")
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))


def row_of(name: str, seed: int, report: dict[str, Any], seconds: float) -> dict[str, Any]:
    privacy = report["privacy"]
    leak = privacy["leakage"][0]
    accounting = report.get("privacy_accounting") or {}
    learned = [r.get("fit", {}) for r in privacy["rows"] if r["attacker"] == "learned"]
    baseline = report.get("baseline_eval") or {}  # only the run with eval.baseline=true has it
    return {
        "defence": name, "seed": seed, "placement": leak["placement"], "k": leak["split_layer"],
        "leakage": leak["token_accuracy"], "rouge_l_f": leak["rouge_l_f"], "leakage_by": leak["attackers"],
        "attackers": {r["attacker"]: r["token_accuracy"] for r in privacy["rows"]},
        "learned_stopped_at": learned[0].get("stopped_at") if learned else None,
        "epsilon_sequence": accounting.get("epsilon_per_sequence"),
        "epsilon_token": accounting.get("epsilon_per_token_vector"),
        "in_the_clear": accounting.get("in_the_clear"),
        "chance": privacy["chance_token_accuracy"],
        "perplexity": report["eval"].get("perplexity"), "bleu": report["eval"].get("bleu"),
        "untuned_perplexity": baseline.get("perplexity"), "untuned_bleu": baseline.get("bleu"),
        "minutes": seconds / 60,
    }


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def gains(rows: list[dict[str, Any]]) -> dict[tuple[str, int], float]:
    """Per (defence, seed): the share of the fine-tuning's perplexity gain it keeps, against the
    undefended first defence and the untuned model of the same seed."""
    reference = {r["seed"]: r for r in rows if r.get("untuned_perplexity") and r["defence"] == rows[0]["defence"]}
    out = {}
    for r in rows:
        ref = reference.get(r["seed"])
        if ref is not None:
            out[(r["defence"], r["seed"])] = ((ref["untuned_perplexity"] - r["perplexity"])
                                              / (ref["untuned_perplexity"] - ref["perplexity"]))
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    gain = gains(rows)
    attackers = sorted({a for r in rows for a in r["attackers"]})
    lines = ["| defence | exposure | seeds | leakage (token acc.) | " + " | ".join(attackers)
             + " | epsilon per sequence (per token vector) | held-out ppl | gain kept | BLEU |",
             "|---|---|---|---|" + "---|" * len(attackers) + "---|---|---|---|"]
    for name in dict.fromkeys(r["defence"] for r in rows):
        group = [r for r in rows if r["defence"] == name]
        first = group[0]
        epsilon = "-" if first["epsilon_sequence"] is None else (
            f"{first['epsilon_sequence']:.3g} ({first['epsilon_token']:.3g})")
        kept = [gain[(name, r["seed"])] for r in group if (name, r["seed"]) in gain]
        cells = [_mean_std([r["attackers"][a] for r in group if a in r["attackers"]]) if any(
            a in r["attackers"] for r in group) else "-" for a in attackers]
        lines.append(f"| {name} | {first['placement']}@{first['k']} | {len(group)} | "
                     f"**{_mean_std([r['leakage'] for r in group])}** | " + " | ".join(cells)
                     + f" | {epsilon} | {_mean_std([r['perplexity'] for r in group])} | "
                     + (_mean_std(kept) if kept else "-") + f" | {_mean_std([r['bleu'] for r in group])} |")
    untuned = [r for r in rows if r.get("untuned_perplexity")]
    if untuned:
        lines.append("")
        lines.append("untuned: perplexity " + _mean_std([r["untuned_perplexity"] for r in untuned])
                     + ", BLEU " + _mean_std([r["untuned_bleu"] for r in untuned if r["untuned_bleu"] is not None]))
    lines.append(f"chance (most frequent auxiliary token): {rows[0]['chance']:.3f}")
    reached = [r for r in rows if (r["defence"], r["seed"]) in gain and gain[(r["defence"], r["seed"])] >= GOAL_GAIN
               and r["leakage"] <= GOAL_LEAKAGE]
    if reached:
        lines.append("goal reached (>= 90% of the gain at <= 30% recovery) by: "
                     + ", ".join(sorted({f"{r['defence']} (seed {r['seed']})" for r in reached})))
    elif gain:
        scored = [r for r in rows if (r["defence"], r["seed"]) in gain]
        useful = [r for r in scored if gain[(r["defence"], r["seed"])] >= GOAL_GAIN]
        private = [r for r in scored if r["leakage"] <= GOAL_LEAKAGE]
        lines.append("goal not reached (>= 90% of the gain at <= 30% recovery). Least leakage among points keeping "
                     ">= 90% of the gain: " + (_point(min(useful, key=lambda r: r["leakage"]), gain) if useful else "none")
                     + "; most gain among points at <= 30% recovery: "
                     + (_point(max(private, key=lambda r: gain[(r["defence"], r["seed"])]), gain) if private else "none")
                     + "; least leakage at any gain: " + _point(min(scored, key=lambda r: r["leakage"]), gain))
    return "\n".join(lines)


def _point(row: dict[str, Any], gain: dict[tuple[str, int], float]) -> str:
    return (f"{row['defence']} (seed {row['seed']}: leakage {row['leakage']:.3f}, "
            f"gain kept {gain[(row['defence'], row['seed'])]:.2f})")


def plot(rows: list[dict[str, Any]], png: Path) -> None:
    """Leakage (strongest attacker) against held-out perplexity, one marker per defence and seed;
    the goal region shaded, the frontier (points no other point beats on both) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(8, 5))
    reference = [r for r in rows if r.get("untuned_perplexity")]
    if reference:
        untuned = statistics.mean(r["untuned_perplexity"] for r in reference)
        tuned = statistics.mean(r["perplexity"] for r in reference)
        axis.axvspan(tuned, untuned - GOAL_GAIN * (untuned - tuned), ymax=GOAL_LEAKAGE, color="tab:green", alpha=0.15,
                     label=">= 90% of the gain at <= 30% recovery")
        axis.axvline(untuned, linestyle="--", color="grey", label="untuned")
    # past twice the untuned perplexity a point is drawn at the edge (a ">" with its perplexity), so one
    # diverged run does not squeeze the rest into a corner
    edge = 2 * max(r["untuned_perplexity"] for r in reference) if reference else float("inf")
    for name in dict.fromkeys(r["defence"] for r in rows):
        group = [r for r in rows if r["defence"] == name]
        inside = [r for r in group if r["perplexity"] <= edge]
        outside = [r for r in group if r["perplexity"] > edge]
        color = None
        if inside:
            drawn = axis.scatter([r["perplexity"] for r in inside], [r["leakage"] for r in inside], label=name)
            color = drawn.get_facecolor()[0]
        if outside:
            axis.scatter([edge] * len(outside), [r["leakage"] for r in outside], marker=">", color=color,
                         label=None if inside else name)
            for r in outside:
                axis.annotate(f"ppl {r['perplexity']:.0f}", (edge, r["leakage"]), textcoords="offset points",
                              xytext=(-8, 6), ha="right", fontsize=7)
    points = sorted((r["perplexity"], r["leakage"]) for r in rows)
    frontier, best = [], 2.0
    for ppl, leak in points:
        if leak < best:
            frontier.append((ppl, leak))
            best = leak
    axis.step([p for p, _ in frontier], [leak for _, leak in frontier], where="post", color="black", linewidth=1,
              label="frontier")
    axis.axhline(rows[0]["chance"], linestyle=":", color="grey", label="chance")
    axis.set_xlabel("held-out perplexity (lower is better)")
    axis.set_ylabel("private tokens recovered by the strongest attacker")
    axis.set_ylim(0, 1.02)
    if edge < float("inf"):
        axis.set_xlim(0, edge * 1.03)
    axis.set_title("privacy against utility per defence (SmolLM2-135M, E2E)")
    axis.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
