"""What a trained LoRA update keeps when it is merged into a bf16 frozen weight (issue 22).

    .venv/bin/python bench/bf16_merge.py --adapter RUN/adapter [--examples 64] [--merges 3]

Loads SmolLM2-135M (the embedded default) in fp32 with its weights rounded to bf16 (W0), and the
update s B A of every module of a run's exported PEFT adapter. Then the loss on `--examples`
lines of ../shared/data/e2e/valid.txt ("MR => text", every token scored), computed in fp32, of
the model whose weights are:

- W0 (untuned) and W0 + update exactly (fp32);
- W0 + update rounded to bf16 once: nearest, and stochastically (`stochastic_round`);
- the update merged a `--merges`-th at a time, rounding to bf16 after each merge (what noise-free
  aggregation does over that many rounds): nearest, and stochastically.

How far each loss moved from W0's towards the exact one is the share of the update's effect the
rounding kept. The loss is that of a different text format than the run trained on (it moves
away from W0 as the update is applied): it measures how much of the update arrives, not quality.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from splitpeft.model.loading import smollm2_folder
from splitpeft.model.runtime import stochastic_round

REPO = Path(__file__).resolve().parents[1]


def updates(adapter: Path) -> dict[str, torch.Tensor]:
    """s B A (d_out, d_in) per module of a PEFT adapter folder (rank_pattern honoured)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    found = {}
    for key, a in tensors.items():
        if "lora_A" not in key:
            continue
        module = key.split("base_model.model.", 1)[1].replace(".lora_A.weight", "")
        b = tensors[key.replace("lora_A", "lora_B")].float()
        rank = a.shape[0]
        scale = config["lora_alpha"] / (rank ** 0.5 if config.get("use_rslora") else rank)
        found[module] = scale * (b @ a.float())
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, type=Path)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--merges", type=int, default=3)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "e2e" / "valid.txt")
    args = parser.parse_args()

    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lines = args.data.read_text().splitlines()
    lines = lines[:: max(1, len(lines) // args.examples)][: args.examples]
    texts = [line.split("||")[0] + " => " + line.split("||")[1] for line in lines]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    update = updates(args.adapter)
    original = {name: model.get_submodule(name).weight.detach().bfloat16().float().clone() for name in update}

    def nearest(x: torch.Tensor, name: str) -> torch.Tensor:
        return x.bfloat16().float()

    def stochastic(x: torch.Tensor, name: str) -> torch.Tensor:
        return stochastic_round(x, torch.bfloat16, name).float()

    def merged(rounding, times: int):
        def weight(w: torch.Tensor, d: torch.Tensor, name: str) -> torch.Tensor:
            for index in range(times):
                w = rounding(w + d / times, f"{name} {index}")
            return w
        return weight

    variants = {
        "W0 (untuned)": lambda w, d, name: w,
        "W0 + update, exact": lambda w, d, name: w + d,
        "nearest, once": merged(nearest, 1),
        "stochastic, once": merged(stochastic, 1),
        f"nearest, {args.merges} merges": merged(nearest, args.merges),
        f"stochastic, {args.merges} merges": merged(stochastic, args.merges),
    }
    losses = {}
    for label, weight in variants.items():
        with torch.no_grad():
            for name, d in update.items():
                model.get_submodule(name).weight.copy_(weight(original[name], d, name))
            losses[label] = float(model(**batch, labels=labels).loss)
    start, end = losses["W0 (untuned)"], losses["W0 + update, exact"]
    print(f"adapter {args.adapter}, {len(update)} modules, {len(texts)} examples of {args.data.name}\n")
    print("| weights | loss | share of the update's effect kept |\n|---|---:|---:|")
    for label, loss in losses.items():
        print(f"| {label} | {loss:.4f} | {(loss - start) / (end - start):.3f} |")


if __name__ == "__main__":
    main()
