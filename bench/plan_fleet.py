"""ARMSC plans for the HSplitLoRA paper's fleet on paper-size models, from shapes alone (no weights).

    .venv/bin/python bench/plan_fleet.py [--model gpt2-large llama-2-7b] [--dtype bf16] [--quantization nf4]
                                         [--batch 8] [--seq-len 512] [--budgets-gib 5 8.75 12.5 16.25 20]
                                         [--scores uniform|late] [--checkpointing] [--labels-on-device]

Each model is built from a hand-written transformers config on the meta device
(`ModelShapes.from_config`), in every --dtype x --quantization asked for (GPT-2 is never
quantized: bitsandbytes does not quantize its Conv1D linears). The paper's five devices have
5 to 20 "GB" of GPU memory; read here as GiB (2**30 bytes), the unit GPU memory is sold in.
Without data there is no IWI probe; a stand-in (--scores) gives each linear a raw importance,
normalised by its adapter cost r (d_in + d_out) as IWI normalises: `uniform` (default) the same
for all (smaller linears rank first, ties by model order, so the minimal adapter sits in block 0
and every device block keeps activations), `late` (j + 1) / L for block j (the deepest device
block's linears rank first, so the blocks before them keep none). Per device the table shows the split k, the adapted modules and their ranks, the
predicted peak and its terms, the device's FLOPs per step and the tensor bytes per step over
the link (activations up, their gradient down, int32 labels up).

`--round-time` (issue 25) adds compute and link budgets (`--device-tflops`, `--link-mbit`, spread
4x by default) and a server (`--server-tflops`) and compares, in the simulated time model that
ARMSC optimises (`hsplit/budget.py`: a step of the fleet takes the slowest device's compute + link
+ server share, or the server's summed work), the plans of three planners: HSplitLoRA's optimiser
(`armsc`, warm noise-free: each adapted module's frozen copy counts), HetLoRA's (`budget_rank`:
the fixed split `--split`, per device the largest rank its memory fits) and SplitLoRA's
(`uniform`: the weakest device's rank for all). Per planner: each device's k, ranks and step
time, the fleet's step time, the trained importance sum_i I_i and J = sum_i I_i / T_step, then
the ratios against HetLoRA.
"""

from __future__ import annotations

import argparse
from collections import Counter

from transformers import GPT2Config, LlamaConfig, PretrainedConfig

from splitpeft.hsplit.armsc import FleetOptions, PlanError, fleet_objective, plan_fleet
from splitpeft.hsplit.budget import DeviceProfile, round_time_s
from splitpeft.hsplit.importance import normalised_scores
from splitpeft.hsplit.memory import ModelShapes, flops_per_step, memory_breakdown, split_bytes_per_step

GIB = 2**30


# Shapes as published; dropout 0 (the memory model counts no dropout masks: module docstring).
MODELS: dict[str, PretrainedConfig] = {
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "llama-2-7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                              vocab_size=32000, tie_word_embeddings=False),
}


PAPER_BUDGETS_GIB = (5.0, 8.75, 12.5, 16.25, 20.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS), default=["gpt2-large", "llama-2-7b"])
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16", "fp16"], default=["bf16"])
    parser.add_argument("--quantization", nargs="+", choices=["none", "int8", "nf4"], default=["nf4"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--budgets-gib", type=float, nargs="+", default=list(PAPER_BUDGETS_GIB))
    parser.add_argument("--rank-set", type=int, nargs="+", default=[0, 2, 4, 8, 16])
    parser.add_argument("--labels-on-device", action="store_true", help="U-shaped: the device keeps the head and loss")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on the device blocks")
    parser.add_argument("--scores", choices=["uniform", "late"], default="uniform", help="importance stand-in")
    parser.add_argument("--round-time", action="store_true",
                        help="compare the simulated step time of ARMSC's plan with HetLoRA's and SplitLoRA's")
    parser.add_argument("--device-tflops", type=float, nargs="+", default=[2.5, 3.75, 5.0, 7.5, 10.0],
                        help="each device's compute (TFLOP/s), with --round-time")
    parser.add_argument("--link-mbit", type=float, nargs="+", default=[100.0, 150.0, 200.0, 300.0, 400.0],
                        help="each device's link (Mbit/s), with --round-time")
    parser.add_argument("--server-tflops", type=float, default=300.0, help="the server's compute, with --round-time")
    parser.add_argument("--split", type=int, default=4, help="HetLoRA's and SplitLoRA's fixed split, with --round-time")
    parser.add_argument("--warm-frozen", choices=["copy", "low_rank"], default="copy",
                        help="with --round-time, what HSplitLoRA's warm holders keep for W - s B A "
                             "(federation.noise_free_frozen): a copy of each adapted weight, or its factors")
    args = parser.parse_args()

    memory = {"batch_size": args.batch, "seq_len": args.seq_len, "labels_on_device": args.labels_on_device,
              "checkpointing": args.checkpointing}
    profiles = [DeviceProfile(f"device-{i}", int(gib * GIB), 1e14, 1e9) for i, gib in enumerate(args.budgets_gib)]
    print(f"ARMSC assumes: batch {args.batch} x {args.seq_len} tokens, labels_on_device={args.labels_on_device}, "
          f"gradient checkpointing {'on' if args.checkpointing else 'off'}, rank set {sorted(set(args.rank_set))}, "
          "split k in 1..L-1, memory the only budget (no step-time limit), adapters + gradients + AdamW moments in fp32, "
          "base dropout 0; budgets in GiB (2**30 bytes); importance: "
          + ("uniform stand-in (no data), g = 1 for every linear" if args.scores == "uniform" else
             "stand-in rising with depth (no data), g = (j + 1) / L for block j")
          + ", normalised by r (d_in + d_out), ties by model order")
    for name in args.model:
        for dtype in args.dtype:
            for quantization in args.quantization:
                if quantization != "none" and name.startswith("gpt2"):
                    print(f"\n{name} {dtype}+{quantization}: skipped, bitsandbytes does not quantize GPT-2's Conv1D")
                    continue
                shapes = ModelShapes.from_config(MODELS[name], dtype=dtype, quantization=quantization)
                if args.round_time:
                    print_round_time(name, dtype, quantization, shapes, args)
                else:
                    print_table(name, dtype, quantization, shapes, profiles, args.rank_set, memory, args.scores)


def print_round_time(name: str, dtype: str, quantization: str, shapes: ModelShapes, args: argparse.Namespace) -> None:
    """The three planners' plans for one model in the simulated time model (module docstring)."""
    from splitpeft.hsplit.planning import PLANNERS, PlanOptions

    budgets = [args.budgets_gib, args.device_tflops, args.link_mbit]
    if len({len(b) for b in budgets}) != 1:
        raise SystemExit("--budgets-gib, --device-tflops and --link-mbit need one value per device each")
    profiles = [DeviceProfile(f"device-{i}", int(gib * GIB), tflops * 1e12, mbit * 1e6 / 8)
                for i, (gib, tflops, mbit) in enumerate(zip(*budgets))]
    raw = {m: 1.0 if args.scores == "uniform" else (shapes.module_block[m] + 1) / shapes.num_blocks
           for m in shapes.modules}
    scores = normalised_scores(raw, shapes.modules, max(args.rank_set))
    print(f"\n{name} {dtype}+{quantization}, labels_on_device={args.labels_on_device}: devices "
          + ", ".join(f"{g:g} GiB / {t:g} TFLOP/s / {m:g} Mbit/s" for g, t, m in zip(*budgets))
          + f"; server {args.server_tflops:g} TFLOP/s; batch {args.batch} x {args.seq_len}; fixed split {args.split}")
    print("| planner (method) | per device: k, adapted modules @ ranks, step s (device + link + server) "
          "| fleet step s | trained importance | J = importance / step s |")
    print("|---|---|---|---|---|")
    results = {}
    for planner, method in (("armsc", "HSplitLoRA"), ("budget_rank", "HetLoRA"), ("uniform", "SplitLoRA")):
        warm = args.warm_frozen if planner == "armsc" else None
        options = PlanOptions(args.split, 8, tuple(args.rank_set), None, args.batch, args.seq_len,
                              args.labels_on_device, args.checkpointing, None, args.server_tflops * 1e12, warm)
        fleet = FleetOptions(args.batch, args.seq_len, tuple(args.rank_set), 8, args.server_tflops * 1e12,
                             args.labels_on_device, args.checkpointing, warm=warm)
        try:
            plans = PLANNERS[planner](options).plan(profiles, shapes, scores)
        except PlanError as error:
            print(f"| {planner} ({method}) | {error} | - | - | - |")
            continue
        chosen = [fleet.candidate(p, shapes, scores, plan.split_layer, plan.ranks) for p, plan in zip(profiles, plans)]
        step = round_time_s([c.time for c in chosen])
        importance = sum(c.importance for c in chosen)
        results[method] = (step, importance, fleet_objective(chosen))
        cells = "; ".join(
            f"k={c.split_layer}, {len(c.ranks)} @ {dict(sorted(Counter(c.ranks.values()).items()))}, "
            f"{c.time.total_s:.2f} ({c.time.device_s:.2f} + {c.time.link_s:.2f} + {c.time.server_s:.2f})" for c in chosen)
        print(f"| {planner} ({method}) | {cells} | {step:.2f} | {importance:.2f} | {importance / step:.3f} |")
    if "HetLoRA" in results:
        base = results["HetLoRA"]
        for method, (step, importance, objective) in results.items():
            print(f"{method}: step time {step / base[0]:.2f}x HetLoRA's, trained importance {importance / base[1]:.2f}x, "
                  f"J {objective / base[2]:.2f}x")


def print_table(name: str, dtype: str, quantization: str, shapes: ModelShapes, profiles: list[DeviceProfile],
                rank_set: list[int], memory: dict, stand_in: str = "uniform") -> None:
    raw = {m: 1.0 if stand_in == "uniform" else (shapes.module_block[m] + 1) / shapes.num_blocks for m in shapes.modules}
    scores = normalised_scores(raw, shapes.modules, max(rank_set))
    frozen_all = shapes.embedding_bytes + sum(shapes.block_bytes) + shapes.head_bytes
    link_mb = split_bytes_per_step(shapes, memory["batch_size"], memory["seq_len"], memory["labels_on_device"]) / 1e6
    print(f"\n{name} {dtype}+{quantization}: {shapes.num_blocks} blocks, {len(shapes.modules)} candidate linears, "
          f"whole frozen model {frozen_all / GIB:.2f} GiB")
    print("| device | budget GiB | k | adapted modules | ranks | predicted peak GiB | frozen / adapters / activations GiB "
          "| device TFLOPs/step | link MB/step (up+down) |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        plans = plan_fleet(profiles, shapes, scores, rank_set=rank_set, **memory)
    except PlanError as error:
        print(f"| - | - | - | - | - | - | - | - | {error} |")
        return
    for plan in plans:
        ranks = dict(sorted(Counter(plan.ranks.values()).items()))
        terms = memory_breakdown(shapes, plan.split_layer, plan.ranks, **memory)
        unmetered = f" (+{terms.unmetered_bytes / GIB:.2f})" if terms.unmetered_bytes else ""
        flops = flops_per_step(shapes, plan.split_layer, plan.ranks, **memory)
        print(f"| {plan.device} | {plan.budget_bytes / GIB:g} | {plan.split_layer} | {len(plan.ranks)} | {ranks} "
              f"| {plan.predicted_peak_bytes / GIB:.2f} | {terms.frozen_bytes / GIB:.2f} / {terms.adapter_bytes / GIB:.3f} / "
              f"{terms.activation_bytes / GIB:.2f}{unmetered} | {flops / 1e12:.1f} | {link_mb:.1f} |")


if __name__ == "__main__":
    main()
