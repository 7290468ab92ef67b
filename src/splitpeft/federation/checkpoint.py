"""Checkpoints of a simulated federation after each completed round, and exact resumption.

A checkpoint folder (written by `storage.atomic_folder`: a kill at any instant leaves the
previous checkpoint or the new one, complete)::

    state.json          round count, round records, batch-stream positions, Kill-and-Revive state,
                        importance tracker, optimiser hyper-state (steps), plans
    tensors.safetensors global adapters, every holder's adapters, merged weight deltas,
                        every device's and server session's AdamW moments
    manifest.json       splitpeft's marker: format, the size and SHA-256 of both files, and the
                        run's identity (its config, less what may change on resume: `run_identity`)

No pickle anywhere: tensors go through safetensors, the rest through JSON. Restoring into a
`Simulation` built from the same config continues exactly where the run stopped: the final
adapters equal those of an uninterrupted run with the same seed (tested). Before anything is
restored, the files are checked against the manifest (corruption, truncation), the identity
against the run's config, and every field and tensor against what the run can hold (names,
shapes, ranges, finiteness); any failure is one `CheckpointError` line naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from splitpeft import __version__
from splitpeft.config import ExperimentConfig, to_dict
from splitpeft.dlora.remote import DLoRASession
from splitpeft.federation.records import DeviceRound, RoundRecord
from splitpeft.model.adapters import LoraWeights
from splitpeft.storage import atomic_folder, recover, writing

if TYPE_CHECKING:
    from splitpeft.federation.simulation import Simulation
    from splitpeft.parties.device import DeviceRuntime
    from splitpeft.parties.party import Party


STATE_FILE = "state.json"
TENSOR_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT, FORMAT_VERSION = "splitpeft-state", 1

# Config keys a resumed run may change: they do not shape the state a checkpoint holds
# (federation.min_devices only decides whether a round counts).
NOT_IDENTITY = ("eval.", "federation.rounds", "federation.min_devices", "count_flops", "export_merged",
                "fleet.flops_per_s", "fleet.bandwidth_bytes_per_s", "transport.max_message_bytes",
                "federation.workers", "federation.state_memory_bytes", "federation.spill_dir",
                "federation.device_waves")  # where it computes, not what


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupted, malformed, or from a different experiment."""


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
    for index, state in sorted(party.optimizer_moments().items()):  # a parked party's without a shell
        for key, value in state.items():
            if key == "step":
                steps[str(index)] = float(value)
            elif torch.is_tensor(value):
                tensors[f"{prefix}/{index}/{key}"] = value.detach().clone()
    return steps


def _restore_optimizer(party: Party, prefix: str, steps: dict[str, float], tensors: dict[str, torch.Tensor]) -> None:
    if party.optimizer is None:
        _need(not steps, f"{prefix} has optimiser steps, but this party has no optimiser")
        return
    unknown = sorted(set(steps) - {str(i) for i in range(len(party.parameters))})
    _need(not unknown, f"{prefix} has optimiser steps for parameters {unknown[:3]} it does not have")
    party.optimizer.state.clear()
    for index, parameter in enumerate(party.parameters):
        if str(index) not in steps:
            continue
        state: dict[str, Any] = {"step": torch.tensor(steps[str(index)])}
        for key in ("exp_avg", "exp_avg_sq"):
            name = f"{prefix}/{index}/{key}"
            _need(name in tensors, f"it lacks {name}")
            _need(tensors[name].shape == parameter.shape,
                  f"{name} has shape {list(tensors[name].shape)}, its parameter {list(parameter.shape)}")
            state[key] = tensors[name].to(device=parameter.device, dtype=parameter.dtype, copy=True)
        party.optimizer.state[parameter] = state


def _flop_counts(device: DeviceRuntime) -> list[Any]:
    """The FLOPs the device's meter recorded per step key, as JSON: [[shape, killed, measure_killed,
    corrected], flops, adapter_flops] (`DeviceRuntime.local_phase`'s key; corrected: the modules under
    a low-rank warm correction, absent from checkpoints written before it). Saved because counting
    runs a step under torch's FlopCounterMode, whose decompositions round differently (~1e-8): a
    resumed run that counted each shape again would not be bit-identical to an uninterrupted one,
    which counted it before the stop."""
    meter = device.meter
    counts = []
    for key, flops in meter._flops_by_key.items():
        if not (isinstance(key, tuple) and len(key) == 4 and isinstance(key[1], frozenset)):
            continue  # a key of another form is counted again after a resume
        shape, killed, measure_killed, corrected = key
        counts.append([[list(shape), sorted(killed), bool(measure_killed), sorted(corrected)], flops,
                       meter._adapter_flops_by_key.get(key, 0)])
    return counts


def _restore_flop_counts(device: DeviceRuntime, counts: list[Any]) -> None:
    meter = device.meter
    for (shape, killed, measure_killed, *corrected), flops, adapter_flops in counts:
        key = (tuple(shape), frozenset(killed), measure_killed, frozenset(corrected[0] if corrected else ()))
        meter._flops_by_key[key], meter._adapter_flops_by_key[key] = flops, adapter_flops


def device_state(device: DeviceRuntime, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    """What a device carries from one round to the next beyond the adapters it downloads:
    its plan, data-stream position, AdamW moments (into `tensors` under `prefix`), Kill-and-Revive
    state, and the FLOPs its meter counted per step shape."""
    policy = device.kill_revive
    return {
        "split_layer": device.split_layer,
        "ranks": device.ranks,
        "stream": list(device.data.position),
        "optimizer_steps": _optimizer_state(device, prefix, tensors),
        "killed": sorted(device.killed),
        "kill_revive": None if policy is None else {
            "active": sorted(policy.active), "scores": policy.scores, "grad_scores": policy.grad_scores,
            "events": policy.events, "step": policy.step, "frozen_choice": policy._frozen_choice,
            "reference_score": policy.reference_score,
            "history": [[step, sorted(active)] for step, active in policy.active_history],
        },
        "flop_counts": _flop_counts(device),
    }


def restore_device_state(device: DeviceRuntime, info: dict[str, Any], tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Inverse of `device_state` on a device built with the same plan; load its adapters first."""
    device.data.seek(*info["stream"])
    _restore_optimizer(device, prefix, info["optimizer_steps"], tensors)
    device.killed = set(info["killed"])
    device.set_trainable(device.killed, False)
    _restore_flop_counts(device, info.get("flop_counts", []))  # absent from checkpoints before it was saved
    saved = info["kill_revive"]
    if saved is not None and device.kill_revive is not None:
        policy = device.kill_revive
        policy.active, policy.scores, policy.events = set(saved["active"]), saved["scores"], saved["events"]
        policy.grad_scores = saved["grad_scores"]
        policy.step, policy._frozen_choice = saved["step"], saved["frozen_choice"]
        policy.reference_score = saved.get("reference_score")  # absent from checkpoints before it was saved
        policy.active_history = [(step, frozenset(active)) for step, active in saved["history"]]


def run_identity(config: ExperimentConfig) -> dict[str, Any]:
    """What a checkpoint must have been written under to be resumed by a run of `config`: every
    config key (dotted) except those in NOT_IDENTITY, with JSON values."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        elif not prefix[:-1].startswith(NOT_IDENTITY):
            flat[prefix[:-1]] = value

    walk("", to_dict(config))
    return dict(json.loads(json.dumps(flat)))


def party_state(sim: Simulation, device_ids: list[str]) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """The devices `device_ids` and their server sessions as a checkpoint holds them: (devices,
    sessions, tensors). A worker process (`federation.workers`) answers with its own."""
    tensors: dict[str, torch.Tensor] = {}
    wanted = set(device_ids)
    devices = {device.device_id: device_state(device, tensors, f"opt/{device.device_id}")
               for device in sim.devices if device.device_id in wanted}
    sessions = {
        device_id: {"optimizer_steps": _optimizer_state(session, f"session/{device_id}", tensors), "tokens": session.tokens}
        | _killed_moments(session.step_state, f"killed/{device_id}", tensors)
        for device_id, session in sim.server.sessions.items() if device_id in wanted
    }
    return devices, sessions, tensors


def _killed_moments(state: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A dlora session's moments of the killed adapters it trains (`kill_revive.server_trains_killed`):
    {"killed_moments": {module: [A's step, B's step]}}, the moments as tensors; {} for every other session."""
    if not isinstance(state, DLoRASession) or not state.train_killed:
        return {}
    steps: dict[str, list[float]] = {}
    for name, pair in state.moments().items():
        steps[name] = []
        for part, moment in zip("AB", pair):
            steps[name].append(float(moment["step"]))
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[f"{prefix}/{name}/{part}/{key}"] = moment[key].detach().to("cpu", copy=True)
    return {"killed_moments": steps}


def _restore_killed_moments(state: Any, prefix: str, steps: dict[str, list[float]], tensors: dict[str, torch.Tensor],
                            shapes: dict[str, tuple[torch.Size, torch.Size]]) -> None:
    """Give a reopened dlora session the killed adapters' moments a checkpoint holds, each checked
    against the device's adapter shapes (`shapes`: module -> (A, B))."""
    _need(isinstance(state, DLoRASession), f"{prefix}: killed adapters' moments for a session that is not dlora")
    moments: dict[str, list[dict[str, Any]]] = {}
    for name, pair in steps.items():
        _need(name in shapes, f"{prefix} names {name!r}, which this device does not adapt")
        moments[name] = []
        for part, step, shape in zip("AB", pair, shapes[name]):
            moment: dict[str, Any] = {"step": torch.tensor(step)}
            for key in ("exp_avg", "exp_avg_sq"):
                tensor = tensors.get(f"{prefix}/{name}/{part}/{key}")
                _need(tensor is not None, f"it lacks {prefix}/{name}/{part}/{key}")
                assert tensor is not None
                _need(tensor.shape == shape, f"{prefix}/{name}/{part}/{key} has shape {list(tensor.shape)}, "
                                             f"the adapter's {list(shape)}")
                _need(bool(torch.isfinite(tensor).all()), f"{prefix}/{name}/{part}/{key} is not finite")
                moment[key] = tensor.to(device=state.device, dtype=torch.float32, copy=True)
            moments[name].append(moment)
    state.load_moments(moments)


def save_checkpoint(sim: Simulation, path: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the state after the last completed round to `path` (atomically), with `extra`
    (JSON) for whoever drives the rounds (`checkpoint_extra` reads it back)."""
    tensors: dict[str, torch.Tensor] = {}
    _put_adapters(tensors, "global", sim.state.global_adapters)
    for holder, adapters in sim.state.holder_state.items():
        _put_adapters(tensors, f"holder/{holder}", adapters)
    for name, delta in sim.state.merged.items():
        tensors[f"merged/{name}"] = delta.detach().clone()
    if sim.workers is not None:  # the devices and their sessions live on the worker processes
        devices, sessions, held = sim.workers.party_state()
        tensors.update(held)
    else:
        devices, sessions, held = party_state(sim, sim.device_ids)
        tensors.update(held)
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
    aggregation_state = getattr(sim.state.aggregator, "state", None)  # robust clipping's history across rounds
    if aggregation_state is not None:
        state["aggregation"] = aggregation_state()
    aggregation_tensors = getattr(sim.state.aggregator, "state_tensors", None)  # centered clipping's centres
    if aggregation_tensors is not None:
        tensors.update({f"robust/{key}": tensor.detach().clone() for key, tensor in aggregation_tensors().items()})
    for name, tensor in tensors.items():  # the round's end repaired every party (`Simulation.repair_parties`)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"refusing to write checkpoint {path}: {name} is not finite (the last complete "
                                  "checkpoint stays as it was)")
    write_state(Path(path), state, tensors, run_identity(sim.config))


# ------------------------------------------------------------------------------------ files


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def write_state(path: Path, state: dict[str, Any], tensors: dict[str, torch.Tensor],
                identity: dict[str, Any] | None = None) -> None:
    """A state folder: `state` as JSON beside `tensors` as safetensors and a manifest (their
    sizes and SHA-256, `identity`), written atomically."""
    with atomic_folder(path) as staging, writing(path):  # disk full: one WriteError line naming `path`
        # safetensors refuses strided tensors (a zero-padded aggregate's B at a lower rank is a
        # transposed view's copy, strides (1, d_out)): every tensor is written in row-major order
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(staging / TENSOR_FILE))
        (staging / STATE_FILE).write_text(json.dumps(state, allow_nan=False))
        files = {name: {"bytes": (staging / name).stat().st_size, "sha256": _digest(staging / name)}
                 for name in (STATE_FILE, TENSOR_FILE)}
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, "splitpeft_version": __version__,
                    "files": files, "identity": identity}
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))


def is_state_folder(path: Path) -> bool:
    """Whether `path` holds a manifest that says splitpeft wrote it (its files unchecked)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _completed(saved: Any) -> Any:
    """A checkpoint's identity with each key added to the config since it was written counted as
    its default (which keeps the earlier behaviour), as `compare --reuse` counts a stored report's."""
    if not isinstance(saved, dict):
        return saved
    return run_identity(ExperimentConfig()) | saved


def _differences(saved: Any, current: dict[str, Any]) -> str:
    if not isinstance(saved, dict):
        return "it records no run identity"
    keys = [k for k in current if saved.get(k, "<absent>") != current[k]]
    keys += [k for k in saved if k not in current]
    shown = ", ".join(f"{k} is {saved.get(k, '<absent>')!r} there, {current.get(k, '<absent>')!r} here" for k in keys[:4])
    return shown + (f" (and {len(keys) - 4} more)" if len(keys) > 4 else "")


def _verified(path: Path, identity: dict[str, Any] | None) -> dict[str, Any]:
    """The parsed state.json of the state folder `path`, after checking its files against the
    manifest and the manifest's identity against `identity` (if given)."""
    path = Path(path)
    recover(path)  # a write killed mid-swap leaves the previous folder beside `path`
    if not path.is_dir():
        raise CheckpointError(f"no complete checkpoint in {path}")
    manifest_file = path / MANIFEST_FILE
    if not manifest_file.is_file():
        raise CheckpointError(f"{path} is not a complete splitpeft checkpoint: it has no {MANIFEST_FILE} "
                              "(not written by splitpeft, or by a version before manifests)")
    try:
        manifest = json.loads(manifest_file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} is corrupted: {MANIFEST_FILE} is not JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint {path} is malformed: {MANIFEST_FILE} is not a splitpeft manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {manifest.get('version')!r}; "
                              f"this splitpeft reads version {FORMAT_VERSION}")
    for name in (STATE_FILE, TENSOR_FILE):
        entry = manifest["files"].get(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"checkpoint {path} is malformed: its manifest does not describe {name}")
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} has {size} bytes, "
                                  f"its manifest says {entry['bytes']} (truncated or extended)")
        if _digest(file) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: {name} does not match the SHA-256 in its manifest")
    if identity is not None and _completed(manifest.get("identity")) != identity:
        raise CheckpointError(f"checkpoint {path} is from a different run: "
                              f"{_differences(_completed(manifest.get('identity')), identity)}")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint {path} is malformed: {STATE_FILE} is not JSON ({error})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is malformed: {STATE_FILE} is not an object")
    return state


def read_state(path: Path, identity: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The (state, tensors) of a folder `write_state` wrote, verified against its manifest (and
    against `identity`, if given); CheckpointError names what is wrong."""
    state = _verified(path, identity)
    try:
        tensors = load_file(str(Path(path) / TENSOR_FILE))
    except Exception as error:  # safetensors raises its own error type for a malformed file
        raise CheckpointError(f"checkpoint {path} is malformed: {TENSOR_FILE} does not load ({error})") from None
    return state, tensors


def verify_checkpoint(path: Path, config: ExperimentConfig) -> int:
    """Check, without building anything, that `path` is an intact checkpoint of a run of `config`
    with a number of completed rounds `config` allows; returns that number."""
    state = _verified(path, run_identity(config))
    try:
        return _int(state.get("rounds_done"), "rounds_done", 0, config.federation.rounds)
    except _Malformed as error:
        raise CheckpointError(f"checkpoint {path} is malformed: {error}") from None


def checkpoint_extra(path: Path) -> dict[str, Any] | None:
    """The `extra` saved with the (verified) checkpoint in `path`, or None if there is none."""
    if not Path(path).is_dir():
        return None
    extra = _verified(path, None).get("extra", {})
    if not isinstance(extra, dict):
        raise CheckpointError(f"checkpoint {path} is malformed: 'extra' is not an object")
    return dict(extra)


def _round_to_json(record: RoundRecord) -> dict[str, Any]:
    entry = asdict(record)
    return entry


def _round_from_json(entry: dict[str, Any]) -> RoundRecord:
    devices = {device: DeviceRound(**stats) for device, stats in entry.pop("devices").items()}
    return RoundRecord(devices=devices, **entry)


# ------------------------------------------------------------------------------------ checks


class _Malformed(CheckpointError):
    """A field of a checkpoint out of range, of the wrong type, or naming what the run lacks
    (`load_checkpoint` adds which checkpoint)."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Malformed(what)


def _int(value: Any, what: str, low: int, high: float = math.inf) -> int:
    _need(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
          f"{what} is {value!r}, not an integer in {low}..{high}")
    return int(value)


def _number(value: Any, what: str, low: float = -math.inf) -> float:
    _need(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low,
          f"{what} is {value!r}, not a finite number >= {low}")
    return float(value)


def _mapping(value: Any, what: str, keys: set[str] | None = None) -> dict[str, Any]:
    _need(isinstance(value, dict), f"{what} is not an object")
    if keys is not None:
        _need(set(value) == keys, f"{what} has keys {sorted(value)}, expected {sorted(keys)}")
    return dict(value)


def _names(value: Any, what: str, allowed: set[str]) -> list[str]:
    _need(isinstance(value, list) and all(isinstance(v, str) for v in value), f"{what} is not a list of names")
    unknown = sorted(set(value) - allowed)
    _need(not unknown, f"{what} names modules this device does not hold: {unknown[:3]}")
    return list(value)


def _scores(value: Any, what: str) -> None:
    for name, score in _mapping(value, what).items():
        _number(score, f"{what}[{name!r}]")


def _steps(value: Any, what: str, most: int) -> None:
    for index, steps in _mapping(value, what).items():
        _need(index.isdigit(), f"{what} has key {index!r}, not a parameter index")
        _need(_number(steps, f"{what}[{index}]", 0) <= most, f"{what}[{index}] is {steps}, more than {most} steps")


def _check_flop_counts(value: Any, what: str, modules: set[str]) -> None:
    _need(isinstance(value, list), f"{what} is not a list")
    for entry in value:
        _need(isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], list) and len(entry[0]) in (3, 4),
              f"{what} has an entry that is not [[shape, killed, measure_killed, corrected], flops, adapter_flops]")
        (shape, killed, measure_killed, *corrected), flops, adapter_flops = entry
        if corrected:
            _names(corrected[0], f"{what} corrected", modules)
        _need(isinstance(shape, list) and len(shape) == 2, f"{what} has shape {shape!r}, not [batch, length]")
        for size in shape:
            _int(size, f"{what} shape", 1)
        _names(killed, f"{what} killed", modules)
        _need(isinstance(measure_killed, bool), f"{what} measure_killed is not true/false")
        _int(flops, f"{what} flops", 0)
        _int(adapter_flops, f"{what} adapter flops", 0, flops)


def _check_state(state: dict[str, Any], sim: Simulation) -> None:
    """Every field of `state` in range for `sim` (see `save_checkpoint` for the layout)."""
    config, fed = sim.config, sim.config.federation
    keys = {"model", "seed", "rounds_done", "rounds", "devices", "sessions", "last_weights", "planning", "extra"}
    _mapping(state, STATE_FILE)
    _need(set(state) in (keys, keys | {"aggregation"}),  # aggregation: absent before robust clipping kept a history
          f"{STATE_FILE} has keys {sorted(state)}, expected {sorted(keys)} and aggregation")
    if "aggregation" in state:
        _mapping(state["aggregation"], "aggregation")
    _need(state["model"] == sim.loaded.name and state["seed"] == config.seed,
          f"it is from model {state['model']!r} seed {state['seed']}, not {sim.loaded.name!r} seed {config.seed}")
    done = _int(state["rounds_done"], "rounds_done", 0, fed.rounds)
    rounds = state["rounds"]
    _need(isinstance(rounds, list) and len(rounds) == done, f"it records {len(rounds) if isinstance(rounds, list) else 'no'}"
          f" rounds, rounds_done says {done}")
    for index, entry in enumerate(rounds):
        _need(isinstance(entry, dict) and entry.get("round") == index, f"round record {index} is not round {index}")
    steps_most = done * fed.local_steps
    examples_most = steps_most * fed.batch_size
    devices = _mapping(state["devices"], "devices")
    _need(set(devices) == set(sim.device_ids), f"devices are {sorted(devices)}, this run has {sim.device_ids}")
    num_blocks = sim.backbone.num_blocks
    most_rank = max([config.lora.rank, config.hsplit.server_rank or 0, *config.hsplit.rank_set])
    for device_id, info in devices.items():
        where = f"devices[{device_id!r}]"
        info = _mapping(info, where)
        keys = {"split_layer", "ranks", "stream", "optimizer_steps", "killed", "kill_revive"}
        _need(set(info) in (keys, keys | {"flop_counts"}),  # flop_counts: absent before it was saved
              f"{where} has keys {sorted(info)}, expected {sorted(keys)} and flop_counts")
        split_layer = _int(info["split_layer"], f"{where}.split_layer", 0, num_blocks)
        try:
            sim.placement.device_blocks(num_blocks, split_layer)
        except ValueError as error:
            raise _Malformed(f"{where}.split_layer: {error}") from None
        ranks = _mapping(info["ranks"], f"{where}.ranks")
        unknown = sorted(set(ranks) - set(sim.ranks))
        _need(not unknown, f"{where}.ranks names modules the model does not adapt: {unknown[:3]}")
        for name, rank in ranks.items():
            _int(rank, f"{where}.ranks[{name!r}]", 0, most_rank)
        stream = info["stream"]
        _need(isinstance(stream, list) and len(stream) == 2, f"{where}.stream is not [epoch, cursor]")
        _int(stream[0], f"{where}.stream epoch", 0, examples_most + 1)
        _int(stream[1], f"{where}.stream cursor", 0)
        _steps(info["optimizer_steps"], f"{where}.optimizer_steps", steps_most)
        _names(info["killed"], f"{where}.killed", set(ranks))
        policy = info["kill_revive"]
        if policy is not None:
            _mapping(policy, f"{where}.kill_revive",
                     {"active", "scores", "grad_scores", "events", "step", "frozen_choice", "history"}
                     | ({"reference_score"} if "reference_score" in policy else set()))
            if policy.get("reference_score") is not None:
                _number(policy["reference_score"], f"{where}.kill_revive.reference_score", 0)
            _names(policy["active"], f"{where}.kill_revive.active", set(ranks))
            _scores(policy["scores"], f"{where}.kill_revive.scores")
            _scores(policy["grad_scores"], f"{where}.kill_revive.grad_scores")
            _need(isinstance(policy["events"], list), f"{where}.kill_revive.events is not a list")
            _int(policy["step"], f"{where}.kill_revive.step", 0, steps_most)
            _need(isinstance(policy["frozen_choice"], bool), f"{where}.kill_revive.frozen_choice is not true/false")
            history = policy["history"]
            _need(isinstance(history, list) and all(isinstance(h, list) and len(h) == 2 for h in history),
                  f"{where}.kill_revive.history is not a list of [step, active]")
            for step, active in history:
                _int(step, f"{where}.kill_revive.history step", 0, steps_most)
                _names(active, f"{where}.kill_revive.history", set(ranks))
        _check_flop_counts(info.get("flop_counts", []), f"{where}.flop_counts", set(ranks))
    sessions = _mapping(state["sessions"], "sessions")
    _need(set(sessions) <= set(sim.device_ids), f"sessions name devices this run lacks: {sorted(set(sessions) - set(sim.device_ids))}")
    for device_id, info in sessions.items():
        where = f"sessions[{device_id!r}]"
        info = _mapping(info, where)
        _need(set(info) in ({"optimizer_steps", "tokens"}, {"optimizer_steps", "tokens", "killed_moments"}),
              f"{where} has keys {sorted(info)}, expected optimizer_steps, tokens and (dlora) killed_moments")
        _steps(info["optimizer_steps"], f"sessions[{device_id!r}].optimizer_steps", steps_most)
        for name, pair in _mapping(info.get("killed_moments", {}), f"{where}.killed_moments").items():
            _names([name], f"{where}.killed_moments", set(sim.ranks))
            _need(isinstance(pair, list) and len(pair) == 2, f"{where}.killed_moments[{name!r}] is not [A's step, B's step]")
            for step in pair:
                _need(_number(step, f"{where}.killed_moments[{name!r}]", 0) <= steps_most,
                      f"{where}.killed_moments[{name!r}] counts {step} steps, more than {steps_most}")
        _int(info["tokens"], f"sessions[{device_id!r}].tokens", 0)
    for name, weights in _mapping(state["last_weights"], "last_weights").items():
        _need(name in sim.ranks, f"last_weights names {name!r}, which the model does not adapt")
        for holder, weight in _mapping(weights, f"last_weights[{name!r}]").items():
            _need(0 <= _number(weight, f"last_weights[{name!r}][{holder!r}]") <= 1 + 1e-9,
                  f"last_weights[{name!r}][{holder!r}] is {weight}, not a weight in 0..1")
    planning = state["planning"]
    _need((planning is None) == (sim.planning is None), "its planner state does not fit this run's planner")
    if planning is not None:
        _mapping(planning, "planning", {"tracker_scores", "planned_scores", "history", "probe_stream"})
        _scores(planning["tracker_scores"], "planning.tracker_scores")
        _scores(planning["planned_scores"], "planning.planned_scores")
        _need(isinstance(planning["history"], list), "planning.history is not a list")
        probe = planning["probe_stream"]
        _need(isinstance(probe, list) and len(probe) == 2, "planning.probe_stream is not [epoch, cursor]")
        _int(probe[0], "planning.probe_stream epoch", 0)
        _int(probe[1], "planning.probe_stream cursor", 0)
    _mapping(state["extra"], "extra")


def _check_tensors(tensors: dict[str, torch.Tensor], sim: Simulation) -> None:
    """Every tensor named for something the run holds, finite, floating point, of its shape."""
    shapes = {name: (w.B.shape[0], w.A.shape[1]) for name, w in sim.state.global_adapters.items()}  # (d_out, d_in)
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        _need(tensor.is_floating_point() and bool(torch.isfinite(tensor).all()), f"tensor {key} is not finite floating point")
        kind = key.split("/", 1)[0]
        if kind in ("global", "holder"):
            owner, name, part = key.rsplit("/", 2)
            _need(name in shapes and part in ("A", "B") and (kind == "holder") == (owner != "global"),
                  f"tensor {key} is not an adapter of this model")
            adapters.setdefault(f"{owner}/{name}", {})[part] = tensor
        elif kind == "merged":
            name = key[len("merged/"):]
            _need(name in shapes and tuple(tensor.shape) == shapes[name], f"tensor {key} is not a merged update of this model")
        elif kind == "robust":  # centered clipping's centre of a module: its last aggregate update (dA, dB)
            name, part = key[len("robust/"):].rsplit("/", 1)
            rank = sim.state.global_adapters[name].rank if name in shapes else 0
            expected = {"A": (rank, shapes[name][1]), "B": (shapes[name][0], rank)}.get(part) if rank else None
            _need(expected is not None and tuple(tensor.shape) == expected,
                  f"tensor {key} is not a robust aggregation centre of this model")
        elif kind == "killed":  # a dlora session's moments of a killed adapter it trains (shapes checked at restore)
            parts = key.split("/")
            _need(len(parts) == 5 and parts[2] in shapes and parts[3] in ("A", "B") and parts[4] in ("exp_avg", "exp_avg_sq"),
                  f"tensor {key} is not a killed adapter's moment of this model")
        else:
            _need(kind in ("opt", "session"), f"tensor {key} is not part of a checkpoint")
    for key, pair in adapters.items():
        _need(set(pair) == {"A", "B"}, f"adapter {key} lacks its A or B")
        d_out, d_in = shapes[key.rsplit("/", 1)[1]]
        A, B = pair["A"], pair["B"]
        _need(A.dim() == 2 and B.dim() == 2 and A.shape[1] == d_in and B.shape[0] == d_out
              and A.shape[0] == B.shape[1] >= 1, f"adapter {key} has A {list(A.shape)}, B {list(B.shape)}; "
              f"expected (r, {d_in}) and ({d_out}, r)")
    for name in shapes:
        _need(f"global/{name}" in adapters, f"it lacks the global adapter of {name}")


# ------------------------------------------------------------------------------------ restore


def load_checkpoint(sim: Simulation, path: Path) -> int:
    """Restore `sim` (built from the same config) to the checkpoint; returns the rounds done.

    Raises CheckpointError (one line) for a checkpoint that is missing, corrupted, malformed or
    from a different run; after one, `sim` is unusable."""
    path = Path(path)
    state, tensors = read_state(path, run_identity(sim.config))
    try:
        _check_state(state, sim)
        _check_tensors(tensors, sim)
        done = _restore(sim, state, tensors)
        sim.restored_from = path
        return done
    except _Malformed as error:
        raise CheckpointError(f"checkpoint {path} is malformed: {error}") from None
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:  # what the checks missed
        raise CheckpointError(f"checkpoint {path} is malformed: {type(error).__name__}: {error}") from None


def _restore(sim: Simulation, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> int:
    sim.state.global_adapters.update(_get_adapters(tensors, "global"))
    holders = {key.split("/")[1] if not key.startswith("holder/server/") else "server/" + key.split("/")[2]
               for key in tensors if key.startswith("holder/")}
    for holder in holders:
        sim.state.holder_state[holder] = _get_adapters(tensors, f"holder/{holder}")
    for key, delta in tensors.items():
        if key.startswith("merged/"):
            sim.state.merge(key[len("merged/"):], delta)
    sim.state.last_weights = state["last_weights"]
    load_tensors = getattr(sim.state.aggregator, "load_state_tensors", None)
    if load_tensors is not None:
        load_tensors({key[len("robust/"):]: t for key, t in tensors.items() if key.startswith("robust/")})
    load_aggregation = getattr(sim.state.aggregator, "load_state", None)
    if load_aggregation is not None:  # a checkpoint from before the history: the rounds, no history
        try:
            load_aggregation(state.get("aggregation", {"rounds": int(state["rounds_done"]), "history": {}}))
        except ValueError as error:
            raise _Malformed(str(error)) from None
    if sim.config.federation.noise_free_start == "warm":  # (run identity) every aggregation put the adapters in the merged weights
        sim.state.adapters_in_base = set(sim.state.last_weights)
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
        device.park()  # state again until its next round
    for device_id, info in state["sessions"].items():
        device = next(d for d in sim.devices if d.device_id == device_id)
        device.open_session(sim.channels[device_id])  # rebuilds the server half for this device
        device.park()
        session = sim.server.sessions[device_id]
        _restore_optimizer(session, f"session/{device_id}", info["optimizer_steps"], tensors)
        if "killed_moments" in info:
            shapes = {n: (w.A.shape, w.B.shape) for n, w in device.adapters().items()}
            _restore_killed_moments(session.step_state, f"killed/{device_id}", info["killed_moments"], tensors, shapes)
        session.park()
    for channel in sim.channels.values():
        channel.traffic.reset()  # the session set-up above is not part of any round
    sim.rounds = [_round_from_json(entry) for entry in state["rounds"]]
    return int(state["rounds_done"])
