"""The run report: report.json (per round, per device) and plots, written atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from splitpeft.federation.records import RoundRecord

MEASUREMENT_NOTES = {
    "bytes": "length of every encoded message (split traffic and adapter exchange), as on the wire",
    "flops": "device-side forward+backward FLOPs counted by torch.utils.flop_counter.FlopCounterMode",
    "peak_memory_bytes": (
        "CPU: tensor account of the device's largest step: frozen weights it holds, adapters, "
        "their gradients and optimiser state, plus every distinct tensor saved for backward; "
        "CUDA: the device's resident tensors plus the allocator's peak rise during its own compute"
    ),
    "resident_bytes": "frozen base tensors the device holds (its part of the model; the rest is on the meta device)",
    "wall_s": ("measured wall-clock seconds of the device's local phase (server time included in-process; with "
               "server.batch_devices the round's devices run in lockstep, so it spans the other devices' turns too)"),
    "simulated_s": "device FLOPs / fleet.flops_per_s + bytes both ways / fleet.bandwidth_bytes_per_s (measured FLOPs and bytes)",
    "simulated_server_s": ("the server's FLOPs for the device's steps, estimated by hsplit/memory.server_flops_per_step "
                           "at the configured batch and sequence length, / fleet.server_flops_per_s"),
    "simulated_round_s": "max(max over devices of simulated_s + simulated_server_s, sum of simulated_server_s)",
    "server_passes": ("server.batch_devices: the number of devices whose steps each shared pass of the server's "
                      "frozen model served, in order (a step served alone is not listed)"),
    "device_waves": ("federation.device_waves: the number of devices whose forward to the cut each shared pass of the "
                     "devices' frozen part served, in order (a device that computed alone is not listed); a device in "
                     "a wave reports as its activation memory its token share of what the pass saved"),
}


def round_entries(rounds: list[RoundRecord]) -> list[dict[str, Any]]:
    return [
        {
            "round": record.round,
            "wall_s": record.wall_s,
            "eval_perplexity": record.eval_perplexity,
            "rejected": record.rejected,
            "replanned": record.replanned,
            "dropped": record.dropped,
            "clipped": record.clipped,
            "repaired": record.repaired,
            "selected": record.selected,
            "completed": record.completed,
            "simulated_round_s": record.simulated_round_s,
            "server_passes": record.server_passes,
            "device_waves": record.device_waves,
            "online": record.online,
            "resident_bytes": record.resident_bytes,
            "devices": {device: asdict(stats) for device, stats in record.devices.items()},
        }
        for record in rounds
    ]


def totals(rounds: list[RoundRecord]) -> dict[str, Any]:
    per_device: dict[str, dict[str, int]] = {}
    for record in rounds:
        for device, stats in record.devices.items():
            entry = per_device.setdefault(device, {"bytes_up": 0, "bytes_down": 0, "flops": 0, "tokens": 0, "peak_memory_bytes": 0})
            entry["bytes_up"] += stats.bytes_up
            entry["bytes_down"] += stats.bytes_down
            entry["flops"] += stats.flops
            entry["tokens"] += stats.tokens
            entry["peak_memory_bytes"] = max(entry["peak_memory_bytes"], stats.peak_memory_bytes)
    return {
        "bytes_up": sum(d["bytes_up"] for d in per_device.values()),
        "bytes_down": sum(d["bytes_down"] for d in per_device.values()),
        "device_flops": sum(d["flops"] for d in per_device.values()),
        "tokens": sum(d["tokens"] for d in per_device.values()),
        "wall_s": sum(r.wall_s for r in rounds),
        "per_device": per_device,
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Write JSON via a temporary file, flushed to disk, and rename, so that a reader (or a
    power cut) never sees half a file; a failed write removes its temporary file and leaves
    `path` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(_clean(data), file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def plot_rounds(rounds: list[RoundRecord], out: Path) -> list[Path]:
    """loss.png: training loss per step for each device (rounds marked); bytes.png: bytes per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    devices = sorted({d for r in rounds for d in r.devices})
    fig, ax = plt.subplots(figsize=(7, 4))
    for device in devices:
        xs, ys = [], []
        for record in rounds:
            stats = record.devices.get(device)
            if stats is None:
                continue
            n = len(stats.losses)
            xs += [record.round + (i + 1) / n for i in range(n)]
            ys += stats.losses
        ax.plot(xs, ys, marker=".", label=device)
    evals = [(r.round + 1, r.eval_perplexity) for r in rounds if r.eval_perplexity is not None]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([x for x, _ in evals], [math.log(p) for _, p in evals], "k--o", label="held-out log-ppl")
        ax2.set_ylabel("held-out log perplexity")
        ax2.legend(loc="upper center")
    ax.set_xlabel("round")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss per device")
    ax.legend(loc="upper right")
    fig.tight_layout()
    written.append(out / "loss.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(devices))
    for i, device in enumerate(devices):
        xs = [r.round + i * width for r in rounds if device in r.devices]
        up = [r.devices[device].bytes_up / 1e6 for r in rounds if device in r.devices]
        down = [r.devices[device].bytes_down / 1e6 for r in rounds if device in r.devices]
        ax.bar(xs, up, width, label=f"{device} up")
        ax.bar(xs, down, width, bottom=up, alpha=0.5, label=f"{device} down")
    ax.set_xlabel("round")
    ax.set_ylabel("MB")
    ax.set_title("Bytes per round per device (up, down stacked)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written.append(out / "bytes.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


def _block_role(name: str) -> tuple[int, str]:
    """(block index, module's short name) from a full module name."""
    parts = name.split(".")
    index = next(int(p) for p in parts if p.isdigit())
    return index, parts[-1]


def plot_importance(scores: dict[str, float], path: Path) -> None:
    """Heatmap of IWI scores: block x module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = {_block_role(name): value for name, value in scores.items()}
    blocks = sorted({b for b, _ in cells})
    roles = sorted({r for _, r in cells})
    grid = np.full((len(blocks), len(roles)), np.nan)
    for (block, role), value in cells.items():
        grid[blocks.index(block), roles.index(role)] = value
    fig, ax = plt.subplots(figsize=(1.2 * len(roles) + 2, 0.25 * len(blocks) + 2))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(roles)), roles, rotation=45, ha="right")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    ax.set_ylabel("block")
    ax.set_title("IWI score (resource-normalised, smoothed)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_active_adapters(modules: list[str], history: list[list[int]], path: Path, title: str) -> None:
    """Kill and Revive: module x step, bright = active."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.zeros((len(modules), max(1, len(history))))
    for step, active in enumerate(history):
        grid[active, step] = 1.0
    fig, ax = plt.subplots(figsize=(8, max(3, 0.04 * len(modules) + 2)))
    ax.imshow(grid, aspect="auto", cmap="Greys", interpolation="nearest")
    ax.set_xlabel("step")
    ax.set_ylabel("adapter (module index, block order)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
