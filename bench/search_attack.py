"""The known-weights attackers (the search, and the optimisation attacker bisr) against the linear
map on real E2E text: accuracy and time per depth (issue 24, items 1 and 2).

    .venv/bin/python bench/search_attack.py [--data ../shared/data/e2e/valid.txt] [--examples 64]
        [--depths 1,16,29] [--model smollm2-135m] [--candidates 16] [--lm-candidates 8] [--beam 1]
        [--attackers linear,search] [--noise 0] [--clip 0] [--bisr-steps 100] [--bisr-lr 0.0005]

The base model (no adapters), fp32; no defence, or with `--noise` sigma and `--clip` C the
Gaussian release (each token's state clipped to C, N(0, (sigma C)^2) added; the server knows the
mechanism, so the search and bisr clip their own candidates' states alike). Private text: the file's first `--examples`
examples. The attackers' auxiliary text: 256 examples of the built-in task (another draw than any
run trains on: `privacy.aux_source=builtin`'s), so the linear map, and the search's proposals,
are fitted on other text than the private one. Prints per depth the token accuracy of each
attacker over every real token, and the seconds its reconstruction took (the linear map's fit
aside).
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
from splitpeft.privacy.meter import Exposure, capture
from splitpeft.privacy.scoring import score

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "e2e" / "valid.txt"))
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--depths", default="1,16,29")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--candidates", type=int, default=16)
    parser.add_argument("--lm-candidates", type=int, default=8)
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--attackers", default="linear,search", help="of linear, search, bisr (linear always runs)")
    parser.add_argument("--noise", type=float, default=0.0, help="sigma of the Gaussian release (needs --clip)")
    parser.add_argument("--clip", type=float, default=0.0, help="C: each token's state clipped to this L2 norm")
    parser.add_argument("--bisr-steps", type=int, default=100)
    parser.add_argument("--bisr-lr", type=float, default=0.0005)
    args = parser.parse_args()
    names = ["linear", *(n for n in args.attackers.split(",") if n != "linear")]
    loaded = load_model(args.model, seed=0)
    model = loaded.model.eval()
    pad_id = int(loaded.tokenizer.pad_token_id)
    private = encode(load_examples("e2e", args.data)[: args.examples], loaded.tokenizer, 128)
    aux = encode(builtin_examples(seed=7_919)[-256:], loaded.tokenizer, 128)
    knowledge = ServerKnowledge.of(model)
    print(f"{args.model}, {len(private)} private examples of {args.data}, 256 built-in aux examples; search: "
          f"{args.candidates} + {args.lm_candidates} candidates, beam {args.beam}; bisr: {args.bisr_steps} steps at lr "
          f"{args.bisr_lr}; defence: sigma {args.noise}, C {args.clip}")
    print("| k | " + " | ".join(names) + " | " + " | ".join(f"{n} s" for n in names[1:]) + " |")
    print("|---:|" + "---:|" * (2 * len(names) - 1))
    options = {"search": {"candidates": args.candidates, "lm_candidates": args.lm_candidates, "beam": args.beam,
                          "clip_norm": args.clip},
               "bisr": {"steps": args.bisr_steps, "lr": args.bisr_lr, "clip_norm": args.clip}}
    for k in (int(d) for d in args.depths.split(",")):
        exposure = Exposure("split", k, labels=False, head_gradient=False)
        # the server's copy of the mechanism draws its own noise for the aux traffic
        aux_seen = capture(model, aux, exposure, Defence(args.noise, args.clip, seed=1), pad_id=pad_id)
        private_seen = capture(model, private, exposure, Defence(args.noise, args.clip, seed=2), pad_id=pad_id)
        truths, masks = [ids for _, ids in private_seen], [seen.mask for seen, _ in private_seen]
        results = {}
        for name in names:
            settings = {"split_layer": k, **options[name]} if name in options else {}
            attacker = make_attacker(name, knowledge, **settings)
            attacker.fit(aux_seen)
            start = time.perf_counter()
            guesses = [attacker.reconstruct(seen) for seen, _ in private_seen]
            results[name] = (score(guesses, truths, masks).token_accuracy, time.perf_counter() - start)
        print(f"| {k} | " + " | ".join(f"{results[n][0]:.3f}" for n in names) + " | "
              + " | ".join(f"{results[n][1]:.0f}" for n in names[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
