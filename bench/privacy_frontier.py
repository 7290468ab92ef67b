"""Privacy against utility: each defence trained with the same data and seed, then audited by the
privacy meter on its own traffic (issue 13).

    .venv/bin/python bench/privacy_frontier.py --data ../shared/data/e2e/valid.txt [--only NAME,...] [--search]

Every run is the `e2e` preset shortened (federation.rounds, local steps below), trained on the
first lines of the file; the attackers' auxiliary text is the file's last `--aux` lines, which
no device trains on (data.limit keeps them out). A row gives the run's placement and split, the
leakage of its traffic (the combined reconstruction's token accuracy and ROUGE-L F, and which
activation attacker was strongest), (epsilon, delta) where the defence has one, and the run's
held-out perplexity and BLEU. Runs go to runs/privacy/<name>; the table is printed in Markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from splitpeft.config import load_config
from splitpeft.experiment.run import run_experiment

DEFENCES: dict[str, list[str]] = {  # name -> overrides on top of the shared ones
    "U-shaped k=4": [],
    "U-shaped k=4, noise 0.2": ["privacy.noise_multiplier=0.2", "privacy.clip_norm={clip}", "privacy.gradient_clip_norm={grad_clip}"],
    "U-shaped k=4, NoPeek 1": ["privacy.nopeek_weight=1.0"],
    "dlora": ["placement.placement=dlora"],
    "dlora hybrid k=2": ["placement.placement=dlora", "placement.dlora_device_blocks=2"],
    "U-shaped k=4, noise 0.05": ["privacy.noise_multiplier=0.05", "privacy.clip_norm={clip}", "privacy.gradient_clip_norm={grad_clip}"],
    "plain split k=4": ["placement.labels_on_device=false"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="E2E file (MR||text lines)")
    parser.add_argument("--aux", type=int, default=256, help="last lines of the file kept for the attackers")
    parser.add_argument("--clip", type=float, default=85.0,
                        help="privacy.clip_norm C of the noisy rows (SmolLM2's median row norm after 4 blocks)")
    parser.add_argument("--grad-clip", type=float, default=0.0012,
                        help="privacy.gradient_clip_norm C_g of the noisy rows (SmolLM2's median head-gradient row norm)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--only", help="comma-separated subset of the defences")
    parser.add_argument("--search", action="store_true",
                        help="add the known-weights search attacker to the audit (privacy.attackers; minutes per run)")
    parser.add_argument("--out", type=Path, default=Path("runs/privacy"))
    args = parser.parse_args()
    lines = sum(1 for line in Path(args.data).read_text().splitlines() if line.strip())
    shared = [
        f"data.path={args.data}", f"data.limit={lines - args.aux}", "privacy.audit=true", "privacy.aux_source=e2e",
        f"privacy.aux_path={args.data}", f"privacy.aux_examples={args.aux}", "privacy.audit_examples=16",
        f"federation.rounds={args.rounds}", f"federation.local_steps={args.local_steps}",
        "eval.groups=20", "eval.meteor=false", "eval.baseline=false", "eval.every_round=false", "eval.perplexity_examples=32",
        "count_flops=false",  # FlopCounterMode slows CPU steps; the FLOPs are not what this bench compares
    ]
    if args.search:
        shared.append("privacy.attackers=[embedding_nn,linear,learned,gradient,labels,search]")
    chosen = args.only.split(",") if args.only else list(DEFENCES)
    rows = []
    for name in chosen:
        overrides = shared + [o.format(clip=args.clip, grad_clip=args.grad_clip) for o in DEFENCES[name]]
        config = load_config(preset="e2e", overrides=overrides)
        started = time.perf_counter()
        out = args.out / name.replace(" ", "_").replace(",", "").replace("=", "")
        report = run_experiment(config, out, overwrite=True, progress=False)
        privacy = report["privacy"]
        leak = privacy["leakage"][0]
        strongest = max((r for r in privacy["rows"]), key=lambda r: r["token_accuracy"])
        accounting = report.get("privacy_accounting") or {}
        rows.append({
            "defence": name, "placement": leak["placement"], "k": leak["split_layer"],
            "leakage": leak["token_accuracy"], "rouge_l_f": leak["rouge_l_f"],
            "strongest": f"{strongest['attacker']} {strongest['token_accuracy']:.3f}",
            "epsilon": accounting.get("epsilon_per_sequence"), "eps_token": accounting.get("epsilon_per_token_vector"),
            "chance": privacy["chance_token_accuracy"],
            "perplexity": report["eval"].get("perplexity"), "bleu": report["eval"].get("bleu"),
            "minutes": (time.perf_counter() - started) / 60,
        })
        print(json.dumps(rows[-1]), flush=True)
    print("\n| defence | exposure | leakage: token acc. (ROUGE-L F) | strongest single attacker | epsilon per sequence (per token vector) | held-out ppl | BLEU | minutes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        epsilon = "-" if r["epsilon"] is None else f"{r['epsilon']:.3g} ({r['eps_token']:.3g})"
        print(f"| {r['defence']} | {r['placement']}@{r['k']} | {r['leakage']:.3f} ({r['rouge_l_f']:.3f}) | {r['strongest']} "
              f"| {epsilon} | {r['perplexity']:.2f} | {r['bleu']:.1f} | {r['minutes']:.1f} |")
    print(f"\nchance (most frequent auxiliary token): {rows[0]['chance']:.3f}")


if __name__ == "__main__":
    main()
