"""What `torch.compile` would gain on a LoRA training step of SmolLM2-shaped blocks on this CPU
(issue 22: elementwise kernels and Python were about two thirds of a bf16 round's samples; a
compiler fuses the first and removes much of the second). A probe, not a code path of splitpeft:

    .venv/bin/python bench/compile_blocks.py [--blocks 6] [--batch 4] [--length 96] [--reps 6] [--dtypes bf16,fp32]

Random-weight decoder blocks with SmolLM2-135M's shapes (576 wide, 9/3 heads, MLP 1536), splitpeft's
attention (`splitpeft_sdpa`: fp32 attention for short bf16 sequences on a CPU), peft LoRA at r = 8 on
every linear with A and B in fp32; one step = the blocks forward over B x T embeddings, a loss on the
output, backward. Eager and compiled (each block `torch.compile`d, `dynamic=False`) alternate in one
process after one untimed step each; prints the median step times, their ratio and the first compiled
step's time (the compilation).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaModel

from splitpeft.model.attention import ATTENTION

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def blocks(count: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                         num_hidden_layers=count, vocab_size=256, max_position_embeddings=2048, use_cache=False)
    config._attn_implementation = ATTENTION
    model = LlamaModel(config).to(dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_" in name:
            parameter.data = parameter.data.float()
    return model


def step(model: torch.nn.Module, embeddings: torch.Tensor) -> None:
    hidden = model(inputs_embeds=embeddings).last_hidden_state
    hidden.float().pow(2).mean().backward()
    for parameter in model.parameters():
        parameter.grad = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=96)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--dtypes", default="bf16,fp32")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.blocks} blocks, "
          f"B={args.batch}, T={args.length}, r=8 on every linear")
    print("| dtype | eager (ms) | compiled (ms) | eager / compiled | first compiled step (s) |")
    print("|---|---:|---:|---:|---:|")
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        eager, compiled = blocks(args.blocks, dtype), blocks(args.blocks, dtype)
        layers = compiled.base_model.model.layers
        for i, layer in enumerate(layers):
            layers[i] = torch.compile(layer, dynamic=False)
        embeddings = torch.randn(args.batch, args.length, 576, dtype=dtype, requires_grad=True)
        start = time.perf_counter()
        step(compiled, embeddings)
        first = time.perf_counter() - start
        step(eager, embeddings)
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(args.reps):
            for way, model in (("eager", eager), ("compiled", compiled)):
                start = time.perf_counter()
                step(model, embeddings)
                times[way].append(time.perf_counter() - start)
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        print(f"| {name} | {1e3 * e:.1f} | {1e3 * c:.1f} | {e / c:.2f}x | {first:.1f} |", flush=True)


if __name__ == "__main__":
    main()
