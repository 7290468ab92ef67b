"""Checkpoints of a simulated federation after each completed round, and exact resumption.

A checkpoint folder (written atomically: a crash mid-write leaves the previous one intact)::

    state.json          round count, round records, batch-stream positions, Kill-and-Revive state,
                        importance tracker, optimiser hyper-state (steps), plans
    tensors.safetensors global adapters, every holder's adapters, merged weight deltas,
                        every device's and server session's AdamW moments

No pickle anywhere: tensors go through safetensors, the rest through JSON. Restoring into a
`Simulation` built from the same config continues exactly where the run stopped: the final
adapters equal those of an uninterrupted run with the same seed (tested).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from splitpeft.federation.records import DeviceRound, RoundRecord
from splitpeft.model.adapters import LoraWeights
from splitpeft.storage import atomic_folder

if TYPE_CHECKING:
    from splitpeft.federation.simulation import Simulation
    from splitpeft.parties.device import DeviceRuntime
    from splitpeft.parties.party import Party


STATE_FILE = "state.json"


TENSOR_FILE = "tensors.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, or from a different experiment."""


def _put_adapters(tensors: dict[str, torch.Tensor], prefix: str, adapters: dict[str, LoraWeights]) -> None:
    for name, weights in adapters.items():
        tensors[f"{prefix}/{name}/A"] = weights.A.detach().clone()  # copies may share storage
        tensors[f"{prefix}/{name}/B"] = weights.B.detach().clone()


def _get_adapters(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, LoraWeights]:
    names = {key[len(prefix) + 1:].rsplit("/", 1)[0] for key in tensors if key.startswith(prefix + "/")}
    return {name: LoraWeights(tensors[f"{prefix}/{name}/A"], tensors[f"{prefix}/{name}/B"]) for name in names}


def _optimizer_state(party: Party, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Moments as tensors, step counts as JSON, keyed by the parameter's index in the party."""
    steps: dict[str, float] = {}
    if party.optimizer is None:
        return steps
    for index, parameter in enumerate(party.parameters):
        state = party.optimizer.state.get(parameter)
        if not state:
            continue
        for key, value in state.items():
            if key == "step":
                steps[str(index)] = float(value)
            elif torch.is_tensor(value):
                tensors[f"{prefix}/{index}/{key}"] = value.detach().clone()
    return steps


def _restore_optimizer(party: Party, prefix: str, steps: dict[str, float], tensors: dict[str, torch.Tensor]) -> None:
    if party.optimizer is None:
        return
    party.optimizer.state.clear()
    for index, parameter in enumerate(party.parameters):
        if str(index) not in steps:
            continue
        state: dict[str, Any] = {"step": torch.tensor(steps[str(index)])}
        for key in ("exp_avg", "exp_avg_sq"):
            name = f"{prefix}/{index}/{key}"
            if name not in tensors:
                raise CheckpointError(f"checkpoint lacks {name}")
            state[key] = tensors[name].clone()
        party.optimizer.state[parameter] = state


def device_state(device: DeviceRuntime, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """What a device carries from one round to the next beyond the adapters it downloads:
    its plan, data-stream position, AdamW moments (into `tensors` under `prefix`), Kill-and-Revive state."""
    policy = device.kill_revive
    return {
        "split_layer": device.split_layer,
        "ranks": device.ranks,
        "stream": list(device.data.position),
        "optimizer_steps": _optimizer_state(device, prefix, tensors),
        "killed": sorted(device.killed),
        "kill_revive": None if policy is None else {
            "active": sorted(policy.active), "scores": policy.scores, "events": policy.events,
            "step": policy.step, "frozen_choice": policy._frozen_choice,
            "history": [[step, sorted(active)] for step, active in policy.active_history],
        },
    }


def restore_device_state(device: DeviceRuntime, info: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Inverse of `device_state` on a device built with the same plan; load its adapters first."""
    device.data.seek(*info["stream"])
    _restore_optimizer(device, prefix, info["optimizer_steps"], tensors)
    device.killed = set(info["killed"])
    device.set_trainable(device.killed, False)
    saved = info["kill_revive"]
    if saved is not None and device.kill_revive is not None:
        policy = device.kill_revive
        policy.active, policy.scores, policy.events = set(saved["active"]), saved["scores"], saved["events"]
        policy.step, policy._frozen_choice = saved["step"], saved["frozen_choice"]
        policy.active_history = [(step, frozenset(active)) for step, active in saved["history"]]


def save_checkpoint(sim: Simulation, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the state after the last completed round to `path` (atomically), with `extra`
    (JSON) for whoever drives the rounds (`checkpoint_extra` reads it back)."""
    tensors: dict[str, torch.Tensor] = {}
    _put_adapters(tensors, "global", sim.state.global_adapters)
    for holder, adapters in sim.state.holder_state.items():
        _put_adapters(tensors, f"holder/{holder}", adapters)
    for name, delta in sim.state.merged.items():
        tensors[f"merged/{name}"] = delta.detach().clone()
    devices = {device.device_id: device_state(device, tensors, f"opt/{device.device_id}") for device in sim.devices}
    sessions = {
        device_id: {"optimizer_steps": _optimizer_state(session, f"session/{device_id}", tensors), "tokens": session.tokens}
        for device_id, session in sim.server.sessions.items()
    }
    planning = None
    if sim.planning is not None:
        planning = {
            "tracker_scores": sim.planning.tracker.scores,
            "planned_scores": sim.planning.planned_scores,
            "history": sim.planning.history,
            "probe_stream": list(sim.planning.probe_stream.position),
        }
    state = {
        "model": sim.loaded.name,
        "seed": sim.config.seed,
        "rounds_done": len(sim.rounds),
        "rounds": [_round_to_json(r) for r in sim.rounds],
        "devices": devices,
        "sessions": sessions,
        "last_weights": sim.state.last_weights,
        "planning": planning,
        "extra": extra or {},
    }
    write_state(Path(path), state, tensors)


def write_state(path: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """A state folder: `state` as JSON beside `tensors` as safetensors, written atomically."""
    with atomic_folder(path) as staging:
        save_file(tensors, str(staging / TENSOR_FILE))
        (staging / STATE_FILE).write_text(json.dumps(state))


def read_state(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The (state, tensors) of a folder `write_state` wrote."""
    if not (path / STATE_FILE).is_file() or not (path / TENSOR_FILE).is_file():
        raise CheckpointError(f"no complete checkpoint in {path}")
    return json.loads((path / STATE_FILE).read_text()), load_file(str(path / TENSOR_FILE))


def checkpoint_extra(path: Path) -> dict[str, Any] | None:
    """The `extra` saved with the checkpoint in `path`, or None if there is no checkpoint."""
    state_file = Path(path) / STATE_FILE
    if not state_file.is_file():
        return None
    return dict(json.loads(state_file.read_text()).get("extra", {}))


def _round_to_json(record: RoundRecord) -> dict[str, Any]:
    entry = asdict(record)
    return entry


def _round_from_json(entry: dict[str, Any]) -> RoundRecord:
    devices = {device: DeviceRound(**stats) for device, stats in entry.pop("devices").items()}
    return RoundRecord(devices=devices, **entry)


def load_checkpoint(sim: Simulation, path: Path) -> int:
    """Restore `sim` (built from the same config) to the checkpoint; returns the rounds done."""
    path = Path(path)
    state, tensors = read_state(path)
    if state.get("model") != sim.loaded.name or state.get("seed") != sim.config.seed:
        raise CheckpointError(
            f"checkpoint {path} is from model {state.get('model')!r} seed {state.get('seed')}, "
            f"not {sim.loaded.name!r} seed {sim.config.seed}")
    sim.state.global_adapters.update(_get_adapters(tensors, "global"))
    holders = {key.split("/")[1] if not key.startswith("holder/server/") else "server/" + key.split("/")[2]
               for key in tensors if key.startswith("holder/")}
    for holder in holders:
        sim.state.holder_state[holder] = _get_adapters(tensors, f"holder/{holder}")
    for key, delta in tensors.items():
        if key.startswith("merged/"):
            sim.state.merge(key[len("merged/"):], delta)
    sim.state.last_weights = state["last_weights"]
    if state["planning"] is not None and sim.planning is not None:
        planning = state["planning"]
        sim.planning.tracker.scores = planning["tracker_scores"]
        sim.planning.planned_scores = planning["planned_scores"]
        sim.planning.history = planning["history"]
        sim.planning.probe_stream.seek(*planning["probe_stream"])
    plans = {d: (info["split_layer"], {n: int(r) for n, r in info["ranks"].items()}) for d, info in state["devices"].items()}
    sim.replan(plans)
    for device in sim.devices:
        device.load(sim.state.start_state(device.device_id, device.ranks))
        restore_device_state(device, state["devices"][device.device_id], tensors, f"opt/{device.device_id}")
    for device_id, info in state["sessions"].items():
        device = next(d for d in sim.devices if d.device_id == device_id)
        device.open_session(sim.channels[device_id])  # rebuilds the server half for this device
        session = sim.server.sessions[device_id]
        _restore_optimizer(session, f"session/{device_id}", info["optimizer_steps"], tensors)
    for channel in sim.channels.values():
        channel.traffic.reset()  # the session set-up above is not part of any round
    sim.rounds = [_round_from_json(entry) for entry in state["rounds"]]
    return int(state["rounds_done"])
