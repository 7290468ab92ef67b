"""How far apart the holders' LoRA A's of a run have drifted (issue 25).

    .venv/bin/python bench/adapter_drift.py RUN.checkpoint [RUN2.checkpoint ...]

Reads a run's kept federation state (`compare --checkpoints` / `simulate --checkpoint`: the
folder's `tensors.safetensors`, adapters under `holder/<holder>/<module>/A|B`) and prints, over
every adapted module, the overlap of the row spaces of its holders' A's, pair by pair: the mean
of cos^2 of the principal angles between the two r-dimensional subspaces (1 = the same subspace,
r / d_in for unrelated random ones), mean and minimum over modules and pairs, and the mean
Frobenius norm of the holders' B's.

Under noise-free aggregation with `federation.noise_free_factors=own_a` each holder keeps its
own A across rounds and B = P A^+ / s is the aggregate P projected onto A's row space, so as the
A's drift apart a holder's adapter holds less of the aggregate and more of it is merged into its
frozen copy, where it no longer trains. Under `mean_a` (and zero_pad) every holder restarts from
one A, so the overlap is 1 at every round boundary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


def drift(checkpoint: Path) -> dict[str, float]:
    """Rounds done, overlap of holders' A row spaces (mean, min) and mean |B|, over every module of
    `checkpoint`."""
    tensors = checkpoint / "tensors.safetensors"
    if not tensors.is_file():
        raise SystemExit(f"{checkpoint}: no tensors.safetensors (not a kept run state)")
    try:
        rounds_done = int(json.loads((checkpoint / "state.json").read_text())["rounds_done"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"{checkpoint}: no readable state.json with rounds_done ({error})") from None
    try:
        return _measure(tensors, rounds_done)
    except SafetensorError as error:
        raise SystemExit(f"{tensors}: not a readable safetensors file ({error})") from None


def _measure(tensors: Path, rounds_done: int) -> dict[str, float]:
    """`drift` of an existing tensors file (its reading errors raised as they come)."""
    overlaps: list[float] = []
    b_norms: list[float] = []
    with safe_open(str(tensors), "pt") as handle:
        holders_of: dict[str, list[str]] = {}
        for key in handle.keys():
            parts = key.split("/")
            if parts[0] == "holder" and parts[-1] == "A":
                holders_of.setdefault(parts[-2], []).append("/".join(parts[1:-2]))
        for module, holders in sorted(holders_of.items()):
            bases = []
            for holder in sorted(holders):
                a = handle.get_tensor(f"holder/{holder}/{module}/A").double()
                bases.append(torch.linalg.qr(a.T).Q)  # (d_in, r): an orthonormal basis of A's rows
                b_norms.append(float(handle.get_tensor(f"holder/{holder}/{module}/B").double().norm()))
            for one, two in itertools.combinations(bases, 2):
                cosines = torch.linalg.svdvals(one.T @ two)
                overlaps.append(float((cosines**2).sum()) / max(one.shape[1], two.shape[1]))
    if not overlaps:
        raise SystemExit(f"{tensors}: no module has two holders")
    return {"rounds_done": float(rounds_done), "modules": float(len(holders_of)), "overlap_mean": statistics.mean(overlaps),
            "overlap_min": min(overlaps), "b_norm_mean": statistics.mean(b_norms)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", type=Path)
    args = parser.parse_args()
    for checkpoint in args.checkpoints:
        numbers = drift(checkpoint)
        print(f"{checkpoint}: after round {int(numbers['rounds_done'])}, {int(numbers['modules'])} modules: A row-space "
              f"overlap {numbers['overlap_mean']:.4f} (min {numbers['overlap_min']:.4f}), mean |B| {numbers['b_norm_mean']:.4f}")


if __name__ == "__main__":
    main()
