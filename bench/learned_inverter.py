"""The learned inverter on real E2E text: trained a fixed 300 steps (the old default), until its
validation accuracy flattens, on generated pairs, and under noise with augmentation (issue 24,
item 3).

    .venv/bin/python bench/learned_inverter.py [--data ../shared/data/e2e/valid.txt] [--examples 64]
        [--depth 4] [--generate 3] [--noise 0.05] [--clip 85] [--patience 3] [--max-steps 3000]

SmolLM2's base model (no adapters), fp32. Private text: the file's first `--examples` examples.
The server's text: 256 examples of the built-in task (`privacy.aux_source=builtin`'s draw), and,
for the generated rows, `--generate` completions per built-in prompt sampled from the model itself
(`privacy.aux_generate`, `privacy/corpus.py`). Under `--noise` sigma and `--clip` C, each token's
state is clipped to C and N(0, (sigma C)^2) added on the private traffic; the inverter is trained
either on one noisy copy of the aux states (as the meter did before) or on the clipped states
with fresh noise every step (noise augmentation). Prints per row: token accuracy over every real
private token, the step training stopped at, the best validation accuracy, the seconds of fitting.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from splitpeft.data.batching import encode
from splitpeft.data.builtin import builtin_examples
from splitpeft.data.sources import load_examples
from splitpeft.defences.cut import Defence
from splitpeft.model.loading import load_model
from splitpeft.privacy.attackers import ServerKnowledge, make_attacker
from splitpeft.privacy.corpus import sampled_completions
from splitpeft.privacy.meter import Exposure, capture
from splitpeft.privacy.scoring import score

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "e2e" / "valid.txt"))
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--aux", type=int, default=256, help="built-in aux examples")
    parser.add_argument("--generate", type=int, default=3, help="sampled completions per aux prompt")
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--clip", type=float, default=85.0)
    parser.add_argument("--patience", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--only", help="comma-separated row numbers (1-5) to run")
    args = parser.parse_args()
    loaded = load_model("smollm2-135m", seed=0)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    pad_id = int(tokenizer.pad_token_id)
    knowledge = ServerKnowledge.of(model)
    private = encode(load_examples("e2e", args.data)[: args.examples], tokenizer, 96)
    prompts = builtin_examples(seed=7_919)[-args.aux:]
    started = time.perf_counter()
    sampled = sampled_completions(model, tokenizer, prompts, args.generate, max_new_tokens=96, seed=1, batch_size=32)
    print(f"sampled {len(sampled)} completions of {len(prompts)} prompts in {time.perf_counter() - started:.0f} s; e.g. "
          f"{sampled[0].completion[:120]!r}")
    aux = encode(prompts, tokenizer, 96)
    generated = aux + encode(sampled, tokenizer, 96)
    exposure = Exposure("split", args.depth, labels=False, head_gradient=False)
    clean = Defence(clip_norm=args.clip) if args.noise else Defence()
    noisy = Defence(args.noise, args.clip, seed=1)
    rows = [  # (label, aux text, defence of the server's aux copy, defence of the private traffic, settings)
        (f"builtin {args.aux}, 300 steps (old default)", aux, Defence(), Defence(), {"steps": 300}),
        (f"builtin {args.aux}, until flat", aux, Defence(), Defence(), {"steps": args.max_steps, "patience": args.patience}),
        (f"builtin {args.aux} + {args.generate} x {args.aux} generated, until flat", generated, Defence(), Defence(),
         {"steps": args.max_steps, "patience": args.patience}),
        (f"sigma {args.noise}: one noisy copy of builtin + generated, until flat", generated, noisy,
         Defence(args.noise, args.clip, seed=2), {"steps": args.max_steps, "patience": args.patience}),
        (f"sigma {args.noise}: fresh noise every step (augmented), builtin + generated, until flat", generated, clean,
         Defence(args.noise, args.clip, seed=2),
         {"steps": args.max_steps, "patience": args.patience, "noise_std": args.noise * args.clip}),
    ]
    chosen = {int(i) for i in args.only.split(",")} if args.only else set(range(1, len(rows) + 1))
    print(f"SmolLM2 base, k = {args.depth}, {len(private)} private examples of {args.data}")
    print("| aux text and training | token accuracy | stopped at | best validation | fit s |")
    print("|---|---:|---:|---:|---:|")
    for index, (label, text, server_defence, device_defence, settings) in enumerate(rows, start=1):
        if index not in chosen:
            continue
        aux_seen = capture(model, text, exposure, server_defence, pad_id=pad_id)
        private_seen = capture(model, private, exposure, device_defence, pad_id=pad_id)
        attacker = make_attacker("learned", knowledge, seed=0, **settings)
        start = time.perf_counter()
        attacker.fit(aux_seen)
        seconds = time.perf_counter() - start
        guesses = [attacker.reconstruct(seen) for seen, _ in private_seen]
        accuracy = score(guesses, [ids for _, ids in private_seen], [seen.mask for seen, _ in private_seen]).token_accuracy
        report = attacker.fit_report()
        curve = report["validation_curve"]
        best = max((a for _, a in curve), default=float("nan"))
        print(f"| {label} | {accuracy:.3f} | {report['stopped_at']} | {best:.3f} | {seconds:.0f} |", flush=True)
        if curve:
            print(f"  curve: {curve}", flush=True)


if __name__ == "__main__":
    main()
