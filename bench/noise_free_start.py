"""noise_free cold vs warm start (federation.noise_free_start, noise_free_moments) on tiny-llama:
three devices at splits 1, 2, 3 with ranks 2, 4, 8 (server sessions at lora.rank 4), mean training
loss and held-out perplexity of the global model after every round.

    .venv/bin/python bench/noise_free_start.py ROUNDS SEEDS     # e.g. 10 0,1,2 (about 1 min a seed on 2 cores)
"""
import json
import sys
import time

import torch

from splitpeft.config import load_config
from splitpeft.experiment.evaluation import perplexity
from splitpeft.federation.fleet import modules_in
from splitpeft.federation.simulation import Simulation

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 6
SEEDS = [int(s) for s in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0]
COMMON = ["federation.aggregator=noise_free", "federation.num_devices=3", "federation.local_steps=8",
          "data.max_length=96", "federation.lr=0.003", "lora.rank=4", f"federation.rounds={ROUNDS}"]
OPTIONS = {"cold": [], "warm-reset": ["federation.noise_free_start=warm"],
           "warm-keep": ["federation.noise_free_start=warm", "federation.noise_free_moments=keep"]}
out = {}
for seed in SEEDS:
    for label, extra in OPTIONS.items():
        torch.manual_seed(seed)
        sim = Simulation(load_config(preset="tiny", overrides=["model.name=tiny-llama", *COMMON, *extra, f"seed={seed}"]))
        for index, (split, rank) in enumerate(((1, 2), (2, 4), (3, 8))):
            sim.devices[index] = sim.build_device(index, split, {n: rank for n in modules_in(sim.ranks, sim.backbone, range(split))})
        start = time.perf_counter()
        rows = []
        for _ in range(ROUNDS):
            record = sim.run_round()
            train = sum(sum(s.losses) / len(s.losses) for s in record.devices.values()) / len(record.devices)
            ppl = perplexity(sim.global_model(), sim.held_out_encoded[:32], 8, sim.pad_id)
            rows.append((round(train, 4), round(ppl, 3)))
        out[f"{label}/seed{seed}"] = rows
        print(label, seed, f"{time.perf_counter() - start:.0f}s", "train loss / held-out ppl per round:", rows, flush=True)
print(json.dumps(out))
