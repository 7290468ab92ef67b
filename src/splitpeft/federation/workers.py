"""Devices in parallel: `federation.workers` processes train a round's devices (issue 23).

Each worker is a process (started with `spawn`) that builds its own copy of the run's
`Simulation` from the config: the same seed, model, data, plans and initial adapters. It trains
only the devices whose index mod `workers` is its own, each through its own server sessions, so
the state of those devices and sessions (adapters, AdamW moments, data position, Kill and Revive)
stays in that process for the whole run. This process, the coordinator, selects, plans and
aggregates::

    coordinator                                         worker w: devices w, w + N, w + 2N, ...
    begin_round: re-plan, select ─── round ───────▶     re-plan; its selected devices train, one after
                                                        another (or in lockstep with a batched server)
                                 ◀── result ──────     uploads, statistics, its sessions' copies and the
                                                        tokens they counted, what each holder was given
    finish_round: aggregate, in device order
                                 ─── state ───────▶     its holders' new adapters, the global ones, the
                                                        deltas merged into the frozen weights

Aggregation sees the same copies in the same order as with workers=1, so the adapters are equal to
float rounding (a worker runs on fewer threads, which can change the last bits of a product) as long
as every device draws its own randomness: LoRA dropout 0 and no noise defence (those draw from the
process's generator, so their draws depend on which devices shared a process). Each worker gets an
equal share of the machine's CPU threads.

Messages on a worker's pipe are a JSON header and one flat buffer per dtype; nothing is pickled. A worker
that dies or answers out of turn stops the run with `WorkerError` naming it; the round is neither
recorded nor checkpointed. Checkpoints gather every worker's parties (`party_state`), and a resumed
run's workers restore the checkpoint themselves.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from splitpeft.config import ExperimentConfig, config_from_dict, dump_yaml
from splitpeft.federation.records import DeviceResult, DeviceRound, RoundRecord
from splitpeft.federation.state import device_of
from splitpeft.model import adapters as lora
from splitpeft.model.adapters import AdapterSet
from splitpeft.model.runtime import limit_malloc_arenas, release_freed_memory

if TYPE_CHECKING:
    from splitpeft.federation.simulation import Simulation

log = logging.getLogger(__name__)

SEP = "|"  # between a holder (or device) and a tensor's own name in a blob; no id or module name holds it


class WorkerError(RuntimeError):
    """A worker process died, or answered with an error: the run stops, this round unrecorded."""


@dataclass
class ServedRound:
    """What the server side did in a round, gathered from the workers (`Simulation.finish_round`
    reads it where it would read its own server)."""

    tokens: dict[str, int] = field(default_factory=dict)  # device -> tokens its session counted (opened this round)
    copies: list[tuple[str, AdapterSet]] = field(default_factory=list)  # (server/<device>, its session's adapters)
    given: dict[str, dict[str, int]] = field(default_factory=dict)  # holder -> module -> the rank it was given
    rejected: list[tuple[str, str]] = field(default_factory=list)
    pass_sizes: list[int] = field(default_factory=list)
    device_waves: list[int] = field(default_factory=list)  # sizes of the devices' shared passes (device_waves)
    dropped: list[dict[str, str]] = field(default_factory=list)  # devices that failed mid-round, and why
    repaired: list[str] = field(default_factory=list)  # parties reset for a non-finite state


# ------------------------------------------------------------------------------------ the pipe


def send(conn: Connection, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
    """`header` (JSON) and `tensors`, packed into one flat buffer per dtype; the header lists each
    tensor's name, dtype, shape and offset (in elements)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    index = []
    sizes: dict[torch.dtype, int] = {}
    for key, tensor in (tensors or {}).items():
        flat = tensor.detach().cpu().reshape(-1)
        offset = sizes.get(flat.dtype, 0)
        index.append([key, str(flat.dtype).removeprefix("torch."), list(tensor.shape), offset])
        by_dtype.setdefault(flat.dtype, []).append(flat)
        sizes[flat.dtype] = offset + flat.numel()
    dtypes = list(by_dtype)
    conn.send_bytes(json.dumps({**header, "tensors": index, "dtypes": [str(d).removeprefix("torch.") for d in dtypes]}).encode())
    for dtype in dtypes:
        conn.send_bytes(torch.cat(by_dtype[dtype]).view(torch.uint8).numpy().tobytes())


def receive(conn: Connection) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    header = json.loads(conn.recv_bytes())
    buffers = {}
    for name in header.pop("dtypes"):
        dtype = getattr(torch, name)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"not a dtype: {name!r}")
        buffers[name] = torch.frombuffer(bytearray(conn.recv_bytes()), dtype=torch.uint8).view(dtype)
    tensors = {}
    for key, dtype, shape, offset in header.pop("tensors"):
        count = int(torch.Size(shape).numel())
        tensors[key] = buffers[dtype][offset: offset + count].view(shape)
    return header, tensors


def put_adapters(tensors: dict[str, torch.Tensor], holder: str, adapters: AdapterSet) -> None:
    """`holder`'s adapters into a blob's `tensors`, as "<holder>|<module>.A" and ".B"."""
    tensors.update({f"{holder}{SEP}{key}": value for key, value in lora.to_tensors(adapters).items()})


def adapters_by_holder(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, AdapterSet]:
    """The adapters `put_adapters` wrote under `prefix`, by holder."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            holder, name = key[len(prefix):].split(SEP, 1)
            grouped.setdefault(holder, {})[name] = value
    return {holder: lora.from_tensors(flat) for holder, flat in grouped.items()}


def owner(device_index: int, workers: int) -> int:
    """The worker that holds device `device_index`."""
    return device_index % workers


# ------------------------------------------------------------------------------------ coordinator


class WorkerPool:
    """The coordinator's handle on `count` worker processes (see the module docstring)."""

    def __init__(self, config: ExperimentConfig, count: int, *, resume_from: Path | None = None) -> None:
        self.count = count
        threads = max(1, torch.get_num_threads() // count)
        context = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.processes: list[Any] = []
        text = dump_yaml(config)
        for index in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=worker_main, name=f"splitpeft-worker-{index}", daemon=True,
                                      args=(theirs, text, index, count, threads, str(resume_from or "")))
            process.start()
            theirs.close()
            self.conns.append(ours)
            self.processes.append(process)
        for index in range(count):  # each builds its Simulation; wait until all are ready
            self._answer(index, "ready")
        self.resets: list[list[str]] = [[] for _ in range(count)]  # sessions to reset before the next round

    def _dead(self, index: int, error: BaseException) -> WorkerError:
        process = self.processes[index]
        process.join(timeout=5)
        return WorkerError(f"worker {index} (pid {process.pid}) exited with code {process.exitcode} "
                           f"({type(error).__name__}); the run stops, this round is not recorded")

    def _send(self, index: int, header: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> None:
        try:
            send(self.conns[index], header, tensors)
        except OSError as error:  # a broken pipe: the worker is gone
            raise self._dead(index, error) from None

    def _answer(self, index: int, expected: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        try:
            header, tensors = receive(self.conns[index])
        except (EOFError, OSError) as error:
            raise self._dead(index, error) from None
        if header.get("op") == "error":
            raise WorkerError(f"worker {index} failed: {header.get('error')}")
        if header.get("op") != expected:
            raise WorkerError(f"worker {index} answered {header.get('op')!r}, expected {expected!r}")
        return header, tensors

    def _ready(self) -> Iterator[int]:
        """Every worker's index, each once, as its answer arrives: one that has sent is read while
        the others still work (the order of the answers does not matter)."""
        waiting = dict(enumerate(self.conns))
        while waiting:
            for conn in wait(list(waiting.values())):
                index = next(i for i, c in waiting.items() if c is conn)
                del waiting[index]
                yield index

    def run_round(self, sim: Simulation, record: RoundRecord, device_ids: list[str],
                  plans: dict[str, tuple[int, dict[str, int]]] | None) -> tuple[dict[str, DeviceResult], ServedRound]:
        """Train `device_ids` (this round's selected devices) on their workers; their results in
        the order of `device_ids`, and what their server sessions did."""
        shares: list[list[str]] = [[] for _ in range(self.count)]
        for device_id in device_ids:
            shares[owner(sim.device_index[device_id], self.count)].append(device_id)
        for index in range(self.count):
            self._send(index, {"op": "round", "round": record.round, "devices": shares[index], "resets": self.resets[index],
                        "plans": plans})
            self.resets[index] = []
        served = ServedRound()
        by_device: dict[str, DeviceResult] = {}
        for index in self._ready():
            header, tensors = self._answer(index, "result")
            uploads = adapters_by_holder(tensors, "up/")
            for device_id, raw in header["results"].items():
                stats = DeviceRound(**raw["stats"])
                by_device[device_id] = DeviceResult(uploads.get(device_id, {}), int(raw["tokens"]), stats)
            served.tokens.update(header["tokens"])
            served.copies += adapters_by_holder(tensors, "session/").items()
            served.given.update(header["given"])
            served.rejected += [(d, e) for d, e in header["rejected"]]
            served.pass_sizes += header["pass_sizes"]
            served.device_waves += header["device_waves"]
            served.dropped += header["dropped"]
            served.repaired += header["repaired"]
        served.copies.sort(key=lambda item: item[0])  # as SplitServer.session_copies orders them
        return {d: by_device[d] for d in device_ids if d in by_device}, served

    def reset_later(self, sim: Simulation, device_id: str) -> None:
        """Reset `device_id`'s server session (a late device) before its worker's next round."""
        self.resets[owner(sim.device_index[device_id], self.count)].append(device_id)

    def share_state(self, sim: Simulation) -> None:
        """After an aggregation: each worker gets the global adapters, its holders' new adapters
        and the deltas merged into the frozen weights (in order), so that its copy of the state
        is the coordinator's."""
        state = sim.state
        common: dict[str, torch.Tensor] = {}
        put_adapters(common, "global/all", state.global_adapters)
        merges = [name for name, _ in state.round_merges]
        common.update({f"merge{SEP}{i}": delta for i, (_, delta) in enumerate(state.round_merges)})
        for index in range(self.count):
            tensors = dict(common)
            shared: dict[str, list[str]] = {}  # holder -> modules whose adapter is the global one (fedavg gives all the same)
            for holder in sorted(state.updated_holders):
                if owner(sim.device_index[device_of(holder)], self.count) != index:
                    continue
                own = {}
                for name, weights in state.holder_state[holder].items():
                    if weights is state.global_adapters.get(name):
                        shared.setdefault(holder, []).append(name)
                    else:
                        own[name] = weights
                put_adapters(tensors, f"holder/{holder}", own)
            self._send(index, {"op": "state", "merges": merges, "shared": shared,
                        "adapters_in_base": sorted(state.adapters_in_base)}, tensors)
        for index in range(self.count):
            self._answer(index, "ok")

    def party_state(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
        """Every worker's devices and server sessions as a checkpoint holds them."""
        devices: dict[str, Any] = {}
        sessions: dict[str, Any] = {}
        tensors: dict[str, torch.Tensor] = {}
        for index in range(self.count):
            self._send(index, {"op": "parties"})
        for index in range(self.count):
            header, part = self._answer(index, "parties")
            devices.update(header["devices"])
            sessions.update(header["sessions"])
            tensors.update(part)
        return devices, sessions, tensors

    def close(self) -> None:
        for conn in self.conns:
            try:
                send(conn, {"op": "stop"})
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        for conn in self.conns:
            conn.close()
        self.conns, self.processes = [], []


# ------------------------------------------------------------------------------------ worker


def worker_main(conn: Connection, config_text: str, index: int, count: int, threads: int, resume_from: str) -> None:
    """A worker process: build the run's Simulation, then answer the coordinator until "stop"."""
    import signal

    import yaml

    # A stop (Ctrl-C reaches the whole process group) is the coordinator's to handle: it abandons
    # the round and stops its workers (`WorkerPool.close`).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format=f"worker {index}: %(name)s %(levelname)s %(message)s")
    try:
        from splitpeft.federation.simulation import Simulation

        config = config_from_dict(yaml.safe_load(config_text))
        config.federation.workers = 1  # this process trains its devices itself
        limit_malloc_arenas(config.runtime.malloc_arenas)
        sim = Simulation(config)
        sim.worker_devices = {d for d in sim.device_ids if owner(sim.device_index[d], count) == index}
        if resume_from:
            from splitpeft.federation.checkpoint import load_checkpoint

            load_checkpoint(sim, Path(resume_from))
        send(conn, {"op": "ready", "pid": os.getpid()})
    except Exception as error:  # the coordinator names it
        send(conn, {"op": "error", "error": f"{type(error).__name__}: {error}"})
        return
    while True:
        try:
            header, tensors = receive(conn)
        except (EOFError, OSError):
            return  # the coordinator is gone
        op = header["op"]
        try:
            if op == "stop":
                sim.close()
                return
            if op == "round":
                reply, blob = train_share(sim, header)
                send(conn, reply, blob)
                if config.runtime.release_memory_each_round:
                    release_freed_memory()
            elif op == "state":
                apply_state(sim, header, tensors)
                send(conn, {"op": "ok"})
            elif op == "parties":
                from splitpeft.federation.checkpoint import party_state

                devices, sessions, blob = party_state(sim, sorted(sim.worker_devices))
                send(conn, {"op": "parties", "devices": devices, "sessions": sessions}, blob)
            else:
                send(conn, {"op": "error", "error": f"unknown request {op!r}"})
        except Exception as error:
            log.exception("worker %d failed on %r", index, op)
            send(conn, {"op": "error", "error": f"{type(error).__name__}: {error}"})


def train_share(sim: Simulation, header: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Train this worker's share of a round; what the coordinator's `finish_round` needs of it."""
    plans = header.get("plans")
    if plans:
        sim.replan({d: (int(split), {n: int(r) for n, r in ranks.items()}) for d, (split, ranks) in plans.items()})
    for device_id in header["resets"]:
        sim.server.reset_session(device_id)
    record = RoundRecord(round=int(header["round"]), devices={})
    selected = [sim.devices[sim.device_index[d]] for d in header["devices"]]
    sim.server.begin_round(expected=[d.device_id for d in selected])
    results = sim.train_devices(record, selected)
    tensors: dict[str, torch.Tensor] = {}
    reply: dict[str, Any] = {"op": "result", "results": {}, "tokens": {}}
    for device_id, result in results.items():
        put_adapters(tensors, f"up/{device_id}", result.uploaded)
        reply["results"][device_id] = {"tokens": result.tokens, "stats": asdict(result.stats)}
    server = sim.server
    reply["tokens"] = {d: s.tokens for d, s in server.sessions.items() if d in server.opened}
    for holder, adapters, _ in server.session_copies(exclude={entry["device"] for entry in record.dropped}):
        put_adapters(tensors, f"session/{holder}", adapters)
    reply["given"] = {holder: {name: weights.rank for name, weights in given.items()} for holder, given in sim.state.given.items()}
    reply["rejected"] = [list(item) for item in server.rejected]
    reply["pass_sizes"] = list(server.pass_sizes)
    reply["device_waves"] = list(record.device_waves)
    reply["dropped"] = record.dropped
    sim.repair_parties(record, [d for d in sim.devices if d.device_id in sim.worker_devices])
    reply["repaired"] = record.repaired
    server.rejected.clear()
    sim.state.given.clear()
    return reply, tensors


def apply_state(sim: Simulation, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The coordinator's aggregation, as it changed this worker's copy of the state."""
    state = sim.state
    state.global_adapters.update(adapters_by_holder(tensors, "global/").get("all", {}))
    for holder, adapters in adapters_by_holder(tensors, "holder/").items():
        state.holder_state[holder].update(adapters)
    for holder, names in header["shared"].items():
        state.holder_state[holder].update({name: state.global_adapters[name] for name in names})
    for i, name in enumerate(header["merges"]):
        state.merge(name, tensors[f"merge{SEP}{i}"])
    state.adapters_in_base = set(header["adapters_in_base"])
