"""Greedy generation of held-out E2E outputs with and without the output layer's input made
contiguous (`experiment/evaluation.py`, `_contiguous_head_input`), alternated in one process.

    .venv/bin/python bench/generation_speed.py [--model smollm2-135m] [--dtype bf16] [--prompts 48]
        [--batch 8] [--max-new-tokens 40] [--rank 16] [--reps 2] [--data ../shared/data/e2e/valid.txt]

Hugging Face's generation asks for the last position's logits only, a strided (B, 1, d) slice of
the prompt's hidden states, which torch's linear turned into a batched product against B copies of
the output weight. The model carries rank-`--rank` adapters on every linear of its blocks (B drawn
small, so they change the outputs; 0: none), as an evaluated run's model does. Prints seconds and
prompts/s per way and repetition, and whether every way and repetition generated the same texts.
Without the E2E file, the built-in task's prompts.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

import splitpeft.experiment.evaluation as evaluation
from splitpeft.data.sources import load_examples
from splitpeft.model.adapters import ADAPTER_NAME, inject, lora_layers, target_module_names
from splitpeft.model.backbone import backbone_of
from splitpeft.model.loading import load_model
from splitpeft.model.runtime import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--rank", type=int, default=16, help="adapters on every linear of every block (0: none)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/e2e/valid.txt"))
    args = parser.parse_args()
    examples = (load_examples("e2e", args.data) if Path(args.data).is_file()
                else load_examples("builtin", limit=args.prompts))
    prompts = [example.prompt for example in examples[-args.prompts:]]
    loaded = load_model(args.model, dtype=DTYPES[args.dtype])
    model = loaded.model
    if args.rank:
        backbone = backbone_of(model)
        linears = target_module_names(backbone, backbone.default_target_modules, range(backbone.num_blocks))
        model = inject(model, {name: args.rank for name in linears}, alpha=2.0 * args.rank)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                weight = layer.lora_B[ADAPTER_NAME].weight
                weight.copy_(0.01 * torch.randn(weight.shape, generator=generator))
    contiguous = evaluation._contiguous_head_input
    ways = {"strided head input (before)": lambda _model: contextlib.nullcontext(), "contiguous (now)": contiguous}
    print(f"{args.model} {args.dtype}, rank {args.rank}, {len(prompts)} prompts, batch {args.batch}, "
          f"up to {args.max_new_tokens} new tokens")
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    texts = []
    try:
        for _ in range(args.reps):
            for way, helper in ways.items():
                evaluation._contiguous_head_input = helper
                start = time.perf_counter()
                outputs = evaluation.generate_outputs(model, loaded.tokenizer, prompts,
                                                      max_new_tokens=args.max_new_tokens, batch_size=args.batch)
                seconds[way].append(time.perf_counter() - start)
                texts.append([output.text for output in outputs])
                print(f"{way}: {seconds[way][-1]:.2f} s ({len(prompts) / seconds[way][-1]:.2f} prompts/s)", flush=True)
    finally:
        evaluation._contiguous_head_input = contiguous
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    before = medians["strided head input (before)"]
    print("median: " + "; ".join(f"{way} {value:.2f} s ({before / value:.2f}x)" for way, value in medians.items()))
    print(f"same texts every time: {all(t == texts[0] for t in texts)}")


if __name__ == "__main__":
    main()
