"""Federation on Flower's deployment engine: a ServerApp for the cloud, a ClientApp for devices.

Flower carries the federation (who is in a round, adapters down and up); split traffic of the
local phase goes over splitpeft's own gRPC stream (`transport.py`), since it is per batch and
latency-bound. One run::

    flower-superlink                           (cloud)      Flower's coordinator
    flwr run deploy/flower <connection>        (anywhere)   submits the ServerApp below
      ServerApp (cloud, started by the SuperLink):
        builds the federation's server side from the run config, serves split traffic on
        `split-address` (a token per device, optional TLS), asks every SuperNode which device it
        is, then each round sends each device its adapters and plan and waits for the uploads
    flower-supernode --node-config "device=0 split-server=HOST:PORT token-file=..."   (each device)
      ClientApp (device, one process per message): rebuilds its part of the model and its
        carry-over state (data position, AdamW moments, Kill-and-Revive) from its state folder,
        trains its local phase over the split stream, saves the state, uploads its adapters

What travels through Flower is splitpeft's own frames (the same bytes and the same validation as
every other channel) inside a uint8 array; nothing is pickled either way. A device that dies or
disconnects mid-round is dropped as soon as its split stream breaks (or at `round-timeout`), and
the round completes with the others. The server checkpoints after every round; `resume=true`
continues from the last completed one, and devices resume from the state they saved for it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shlex
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message as FlowerMessage, RecordDict
from flwr.common.constant import ErrorCode
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from . import adapters as lora
from .adapters import AdapterError
from .checkpoint import device_state, read_state, restore_device_state, write_state
from .config import ConfigError, ExperimentConfig, config_from_dict, dump_yaml, load_config
from .experiment import run_experiment
from .federation import DeviceResult, DeviceRound, RoundRecord, Simulation, fill_round_stats
from .messages import Kind, Message, MessageError, decode, encode
from .models import load_model
from .storage import atomic_folder
from .transport import GrpcChannel, GrpcSplitServer

log = logging.getLogger(__name__)

FRAME = "frame"


class DeploymentError(ValueError):
    """A run or node configuration that cannot work: missing keys, unreadable files, bad values."""


# ------------------------------------------------------------------------------------ settings


def _text(config: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = config.get(key, default)
    if value is None:
        raise DeploymentError(f"missing setting {key!r}")
    if not isinstance(value, str):
        raise DeploymentError(f"setting {key!r} must be a string, not {type(value).__name__}")
    return value


def _number(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise DeploymentError(f"setting {key!r} must be a non-negative number, not {value!r}")
    return float(value)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as error:
        raise DeploymentError(f"cannot read the {what} {path!r}: {error.strerror}") from None


def read_tokens(path: str) -> dict[str, str]:
    """A tokens file: JSON {"device-0": "<secret>", ...} (`splitpeft deploy-keys` writes one)."""
    try:
        tokens = json.loads(_read(path, "tokens file"))
    except json.JSONDecodeError as error:
        raise DeploymentError(f"tokens file {path!r} is not JSON: {error}") from None
    if not isinstance(tokens, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in tokens.items()):
        raise DeploymentError(f"tokens file {path!r} must map device ids to non-empty token strings")
    return tokens


def write_deployment_keys(folder: Path, num_devices: int, hosts: tuple[str, ...]) -> list[Path]:
    """A new folder with what a deployment needs: tokens.json (server), device-N.token (one per
    device), server-cert.pem / server-key.pem (self-signed for `hosts`; TLS of the split stream
    and of the SuperLink), device-N.node-key / .node-key.pub (an EC key pair per device for
    Flower's SuperNode authentication, OpenSSH format). Secrets are readable by their owner only.
    Returns the files written."""
    import secrets

    from .transport import self_signed_certificate

    if num_devices < 1:
        raise DeploymentError("--devices must be at least 1")
    if not hosts:
        raise DeploymentError("--hosts needs at least one name or IP")
    folder = Path(folder)
    if folder.exists():
        raise DeploymentError(f"{folder} exists; deploy-keys never overwrites keys")
    tokens = {f"device-{i}": secrets.token_urlsafe(32) for i in range(num_devices)}
    cert, key = self_signed_certificate(hosts, valid_days=365)
    files = {"tokens.json": json.dumps(tokens, indent=2).encode(), "server-cert.pem": cert, "server-key.pem": key,
             **{f"{device}.token": token.encode() for device, token in tokens.items()}}
    for device in tokens:
        files[f"{device}.node-key"], files[f"{device}.node-key.pub"] = node_key_pair()
    with atomic_folder(folder) as staging:
        for name, content in files.items():
            path = staging / name
            path.write_bytes(content)
            path.chmod(0o644 if name.endswith((".pub", "-cert.pem")) else 0o600)
    return [folder / name for name in files]


def node_key_pair() -> tuple[bytes, bytes]:
    """(private, public) P-384 key in OpenSSH format: `flower-supernode --auth-supernode-private-key`
    takes the first, `flwr supernode register` the second."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


@dataclass
class ServerSettings:
    """The ServerApp's run config ([tool.flwr.app.config] of deploy/flower, `flwr run --run-config`)."""

    config: ExperimentConfig
    out: Path
    checkpoint: Path
    resume: bool
    split_address: str
    tokens: dict[str, str]
    tls: tuple[bytes, bytes] | None
    join_timeout_s: float
    round_timeout_s: float
    rejoin_timeout_s: float

    KEYS = ("preset", "config-file", "overrides", "out", "checkpoint", "resume", "split-address",
            "tokens-file", "tls-cert", "tls-key", "join-timeout", "round-timeout", "rejoin-timeout")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> ServerSettings:
        unknown = sorted(set(run_config) - set(cls.KEYS))
        if unknown:
            raise DeploymentError(f"unknown run config keys {unknown}; known: {', '.join(cls.KEYS)}")
        config_file = _text(run_config, "config-file", "")
        overrides = shlex.split(_text(run_config, "overrides", ""))
        try:
            if config_file:
                config = load_config(config_file, overrides)
            else:
                config = load_config(overrides=overrides, preset=_text(run_config, "preset", "default"))
        except ConfigError as error:
            raise DeploymentError(f"experiment config: {error}") from None
        out = Path(_text(run_config, "out", "runs/flower")).expanduser().resolve()
        checkpoint = _text(run_config, "checkpoint", "")
        resume = run_config.get("resume", False)
        if not isinstance(resume, bool):
            raise DeploymentError(f"setting 'resume' must be true or false, not {resume!r}")
        cert, key = _text(run_config, "tls-cert", ""), _text(run_config, "tls-key", "")
        if bool(cert) != bool(key):
            raise DeploymentError("TLS needs both tls-cert and tls-key")
        tokens = read_tokens(_text(run_config, "tokens-file"))
        return cls(
            config=config, out=out,
            checkpoint=Path(checkpoint).expanduser().resolve() if checkpoint else out.with_name(out.name + ".checkpoint"),
            resume=resume, split_address=_text(run_config, "split-address", "0.0.0.0:9300"), tokens=tokens,
            tls=(_read(cert, "TLS certificate"), _read(key, "TLS key")) if cert else None,
            join_timeout_s=_number(run_config, "join-timeout", 120.0),
            round_timeout_s=_number(run_config, "round-timeout", 3600.0),
            rejoin_timeout_s=_number(run_config, "rejoin-timeout", 0.0),
        )


@dataclass
class NodeSettings:
    """A device's node config (`flower-supernode --node-config "device=0 split-server=..."`)."""

    device: int
    split_server: str
    token: str
    root_cert: bytes | None
    data_path: str | None
    state_dir: Path
    status_file: Path | None

    KEYS = ("device", "split-server", "token", "token-file", "root-cert", "data-path", "state-dir", "status-file")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        unknown = sorted(set(node_config) - set(cls.KEYS))
        if unknown:
            raise DeploymentError(f"unknown node config keys {unknown}; known: {', '.join(cls.KEYS)}")
        device = node_config.get("device")
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise DeploymentError(f"node config 'device' must be the device's index (0, 1, ...), not {device!r}")
        token = _text(node_config, "token", "")
        if not token:
            token = _read(_text(node_config, "token-file"), "token file").decode().strip()
        if not token:
            raise DeploymentError("the device's token is empty")
        cert = _text(node_config, "root-cert", "")
        status = _text(node_config, "status-file", "")
        return cls(
            device=device, split_server=_text(node_config, "split-server"), token=token,
            root_cert=_read(cert, "root certificate") if cert else None,
            data_path=_text(node_config, "data-path", "") or None,
            state_dir=Path(_text(node_config, "state-dir", "~/.cache/splitpeft/device-state")).expanduser(),
            status_file=Path(status).expanduser() if status else None,
        )


# ------------------------------------------------------------------------------------ frames in Flower records


def frame_array(frame: bytes) -> Array:
    return Array(np.frombuffer(frame, dtype=np.uint8))


def frame_of(record: ArrayRecord, max_bytes: int) -> Message:
    """The splitpeft message inside a Flower array record, validated like any frame."""
    if FRAME not in record:
        raise MessageError("the record carries no frame")
    array = record[FRAME]
    if array.dtype != "uint8" or len(array.shape) != 1:
        raise MessageError(f"a frame must be a flat uint8 array, not {array.dtype}{list(array.shape)}")
    return decode(array.numpy().tobytes(), max_bytes=max_bytes)


_ROUND_FIELDS = {f.name: f for f in dataclasses.fields(DeviceRound)}


def round_stats_from_json(text: str) -> DeviceRound:
    """A device's reported round statistics, checked field by field (they come from the wire)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise MessageError(f"round statistics are not JSON: {error}") from None
    if not isinstance(raw, dict):
        raise MessageError("round statistics must be a JSON object")
    unknown = sorted(set(raw) - set(_ROUND_FIELDS))
    if unknown:
        raise MessageError(f"unknown round statistics {unknown}")
    numbers = ("bytes_up", "bytes_down", "adapter_bytes_up", "adapter_bytes_down", "flops", "adapter_flops",
               "peak_memory_bytes", "tokens", "steps", "train_loss", "wall_s")
    for name in numbers:
        if name in raw and (isinstance(raw[name], bool) or not isinstance(raw[name], (int, float))):
            raise MessageError(f"round statistic {name!r} must be a number")
    return DeviceRound(**raw)


# ------------------------------------------------------------------------------------ server


QUERY_WAIT_S = 30.0  # how long a round start waits for newly connected nodes to say which device they are


class FlowerEngine:
    """Plays `run_experiment`'s rounds on Flower nodes (see the module docstring)."""

    def __init__(self, grid: Grid, settings: ServerSettings) -> None:
        self.grid = grid
        self.settings = settings
        self.nodes: dict[str, int] = {}  # device id -> Flower node id
        self.run_key = ""
        self.server: GrpcSplitServer | None = None
        self._asked: set[int] = set()  # nodes that were asked which device they are
        self._queries: dict[str, int] = {}  # id of each question not answered yet -> the node asked
        self._gone: set[str] = set()  # devices whose node seemed to die last round: may come back on a new node
        self._lost: set[str] = set()
        self._lost_guard = threading.Lock()

    # ---------------------------------------------------------------- Engine protocol

    def open(self, sim: Simulation, resumed: dict[str, Any] | None) -> dict[str, Any]:
        settings = self.settings
        missing = [d for d in sim.device_ids if d not in settings.tokens]
        if missing:
            raise DeploymentError(f"the tokens file has no token for {missing}")
        self.run_key = str((resumed or {}).get("run_key") or uuid.uuid4().hex)
        self.server = GrpcSplitServer(sim.server, settings.split_address, tokens=settings.tokens, tls=settings.tls,
                                      max_message_bytes=sim.config.transport.max_message_bytes)
        self.server.on_lost = self._on_lost
        self.server.start()
        self._discover(set(sim.device_ids), self.settings.join_timeout_s)
        return {"run_key": self.run_key}

    def play_round(self, sim: Simulation, on_device_done: Callable[[str], None]) -> RoundRecord:
        record = sim.begin_round()
        with self._lost_guard:
            self._lost.clear()
        for device_id in self._gone:  # ask again: a SuperNode restarted under node authentication keeps its id
            self._asked.discard(self.nodes.get(device_id, -1))
        self._discover(self._gone, self.settings.rejoin_timeout_s)  # restarted SuperNodes take their device back
        self._gone = set()
        online = set(self.grid.get_node_ids())
        outgoing: dict[str, FlowerMessage] = {}
        sent: dict[str, bytes] = {}
        for device in sim.selected_devices(record.round):
            node = self.nodes.get(device.device_id)
            if node is None or node not in online:
                sim.drop(record, device.device_id, "its Flower node is not connected")
                self._gone.add(device.device_id)
                continue
            frame = encode(sim.download_message(device))
            sent[device.device_id] = frame
            outgoing[device.device_id] = FlowerMessage(
                RecordDict({"download": self._download_record(sim, device, frame),
                            "round": self._round_record(sim, device)}),
                dst_node_id=node, message_type="train", group_id=str(record.round),
            )
        ids: dict[str, str] = dict(zip(self.grid.push_messages(list(outgoing.values())), outgoing))
        results: dict[str, DeviceResult] = {}
        deadline = time.monotonic() + self.settings.round_timeout_s
        while ids:
            for reply in self.grid.pull_messages(list(ids)):
                device_id = ids.pop(reply.metadata.reply_to_message_id, "")
                if not device_id:
                    continue
                if reply.has_error():
                    sim.drop(record, device_id, f"the device failed or is unreachable: {reply.error.reason}")
                    if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                        self._gone.add(device_id)
                    continue
                try:
                    result = self._result(sim, device_id, reply.content)
                except (MessageError, AdapterError) as error:
                    sim.drop(record, device_id, f"bad reply: {error}")
                    continue
                result.stats.adapter_bytes_down = len(sent[device_id])
                result.stats.bytes_down += len(sent[device_id])
                results[device_id] = result
                on_device_done(device_id)
            with self._lost_guard:
                lost = [d for d in ids.values() if d in self._lost]
            for device_id in lost:
                ids = {k: v for k, v in ids.items() if v != device_id}
                sim.drop(record, device_id, "its split stream broke mid-round (device died or disconnected)")
                self._gone.add(device_id)
            if ids and time.monotonic() > deadline:
                for device_id in ids.values():
                    sim.drop(record, device_id, f"no reply within round-timeout ({self.settings.round_timeout_s:.0f} s)")
                    self._gone.add(device_id)
                break
            if ids:
                time.sleep(0.2)
        return sim.finish_round(record, results)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    # ---------------------------------------------------------------- helpers

    def _on_lost(self, device_id: str) -> None:
        with self._lost_guard:
            self._lost.add(device_id)

    def _discover(self, awaited: set[str], wait_s: float) -> None:
        """Ask connected nodes not asked before which device they are; wait up to ``wait_s`` until
        every device in ``awaited`` is claimed (and up to QUERY_WAIT_S for new nodes' answers).
        Answers that come later are taken at the next call. A node claiming a device that already
        has one replaces it (a SuperNode restarted after a crash joins as a new node)."""
        claimed: set[str] = set()
        now = time.monotonic()
        deadline, answers_by = now + wait_s, now
        while True:
            fresh = [n for n in self.grid.get_node_ids() if n not in self._asked]
            if fresh:
                self._asked.update(fresh)
                queries = [FlowerMessage(RecordDict({}), dst_node_id=n, message_type="query") for n in fresh]
                self._queries.update(zip(self.grid.push_messages(queries), fresh))
                answers_by = time.monotonic() + QUERY_WAIT_S
            for reply in self.grid.pull_messages(list(self._queries)) if self._queries else []:
                node = self._queries.pop(reply.metadata.reply_to_message_id, None)
                if node is not None:
                    claimed |= self._claim(node, reply)
            now = time.monotonic()
            if now >= deadline and (now >= answers_by or not self._queries):
                break
            if awaited <= claimed and (now >= answers_by or not self._queries):
                break
            time.sleep(0.5)
        missing = sorted(awaited - claimed)
        if missing and wait_s > 0:
            log.warning("no node came for %s within %.0f s; rounds go on without them", missing, wait_s)

    def _claim(self, node: int, reply: FlowerMessage) -> set[str]:
        """The device `node`'s answer to "query" names, now mapped to it (empty if refused)."""
        if reply.has_error():
            log.warning("node %d could not say which device it is: %s", node, reply.error.reason)
            if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
                self._asked.discard(node)  # gone for now: ask again when it is back (same id under node auth)
            return set()
        return self._claim_device(node, reply.content)

    def _claim_device(self, node: int, content: RecordDict) -> set[str]:
        try:
            device_id = str(content.config_records["device"]["device"])
        except KeyError as error:
            log.warning("node %d answered without a device id (%s); ignored", node, error)
            return set()
        if device_id not in self.settings.tokens:
            log.warning("node %d claims unknown device %r; ignored", node, device_id)
            return set()
        if self.nodes.get(device_id) == node:
            log.info("%s is back on Flower node %d", device_id, node)
        elif device_id in self.nodes:
            log.warning("node %d claims %s, which was node %d; the newer node takes it", node, device_id, self.nodes[device_id])
        else:
            log.info("%s is Flower node %d", device_id, node)
        self.nodes[device_id] = node
        return {device_id}

    def _download_record(self, sim: Simulation, device: Any, frame: bytes) -> ArrayRecord:
        arrays = {FRAME: frame_array(frame)}
        deltas = {name: delta for name, delta in sim.merged.items() if name in device.ranks}
        if deltas:  # noise-free aggregation merged these into the frozen weights the device holds
            arrays["base"] = frame_array(encode(Message(Kind.BASE_DELTA, deltas)))
        return ArrayRecord(arrays)

    def _round_record(self, sim: Simulation, device: Any) -> ConfigRecord:
        return ConfigRecord({
            "config": dump_yaml(sim.config), "run-key": self.run_key, "round": len(sim.rounds),
            "device": device.device_id, "split-layer": device.split_layer, "ranks": json.dumps(device.ranks),
        })

    def _result(self, sim: Simulation, device_id: str, content: RecordDict) -> DeviceResult:
        """A device's reply, validated: its frame, its modules and ranks, its statistics."""
        if "upload" not in content.array_records or "stats" not in content.config_records:
            raise MessageError("the reply lacks its upload or its statistics")
        upload = frame_of(content.array_records["upload"], sim.config.transport.max_message_bytes).expect(Kind.ADAPTERS)
        if upload.meta.get("device") != device_id:
            raise MessageError(f"upload says device {upload.meta.get('device')!r}, expected {device_id}")
        uploaded = lora.from_tensors(upload.tensors)
        device = next(d for d in sim.devices if d.device_id == device_id)
        for name, weights in uploaded.items():
            if device.ranks.get(name) != weights.rank:
                raise MessageError(f"upload carries {name} at rank {weights.rank}, the plan says {device.ranks.get(name)}")
        stats = round_stats_from_json(str(content.config_records["stats"].get("stats", "")))
        return DeviceResult(uploaded, stats.tokens, stats)


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = ServerSettings.from_run_config(context.run_config)
    log.info("splitpeft ServerApp: %s, %d devices, %d rounds -> %s", settings.config.model.name,
             settings.config.federation.num_devices, settings.config.federation.rounds, settings.out)
    run_experiment(settings.config, settings.out, overwrite=True, progress=False, checkpoint=settings.checkpoint,
                   resume=settings.resume and settings.checkpoint.exists(), engine=FlowerEngine(grid, settings))


# ------------------------------------------------------------------------------------ device


client_app = ClientApp()


@client_app.query()
def _identify(message: FlowerMessage, context: Context) -> FlowerMessage:
    node = NodeSettings.from_node_config(context.node_config)
    return FlowerMessage(RecordDict({"device": ConfigRecord({"device": f"device-{node.device}"})}), reply_to=message)


@client_app.train()
def _train(message: FlowerMessage, context: Context) -> FlowerMessage:
    node = NodeSettings.from_node_config(context.node_config)
    round_info = message.content.config_records["round"]
    upload, stats = train_round(node, round_info, message.content.array_records["download"])
    return FlowerMessage(RecordDict({
        "upload": ArrayRecord({FRAME: frame_array(upload)}),
        "stats": ConfigRecord({"stats": json.dumps(dataclasses.asdict(stats))}),
    }), reply_to=message)


def train_round(node: NodeSettings, round_info: Mapping[str, Any], download: ArrayRecord) -> tuple[bytes, DeviceRound]:
    """One device round: rebuild, restore, download, train over the split stream, save, upload."""
    try:
        config = config_from_dict(_yaml_mapping(str(round_info["config"])))
        if node.data_path is not None:  # the device's own file: all of it is its training data
            config.data.path, config.data.partition = node.data_path, "whole"
        round_index, device_id = int(round_info["round"]), str(round_info["device"])
        split_layer, ranks = int(round_info["split-layer"]), {str(k): int(v) for k, v in json.loads(str(round_info["ranks"])).items()}
        run_key = str(round_info["run-key"])
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise DeploymentError(f"malformed round message: {error}") from None
    if device_id != f"device-{node.device}":
        raise DeploymentError(f"the server sent {device_id}'s round to device-{node.device}")
    config.hsplit.planner = "fixed"  # the plan comes from the server
    sim = Simulation(config, loaded=load_model(config.model.name, seed=config.seed), build_devices=False,
                     hold_out=node.data_path is None)
    max_bytes = config.transport.max_message_bytes
    if "base" in download:
        base = frame_of(ArrayRecord({FRAME: download["base"]}), max_bytes).expect(Kind.BASE_DELTA)
        for name, delta in base.tensors.items():
            if name not in ranks:
                raise MessageError(f"base delta for {name}, which this device does not hold")
            sim.merge(name, delta)
    device = sim.build_device(node.device, split_layer, ranks)
    store = DeviceStore(node.state_dir / run_key / device_id)
    restored = store.latest_before(round_index)
    if restored is not None:
        info, tensors = restored
        restore_device_state(device, info, tensors, "opt")
    adapters = frame_of(download, max_bytes).expect(Kind.ADAPTERS)
    device.load(lora.from_tensors(adapters.tensors))  # after the moments: load drops those of restarted adapters
    stats = DeviceRound()
    events_before = len(device.kill_revive.events) if device.kill_revive is not None else 0
    status = StatusFile(node.status_file, device_id, round_index)
    with GrpcChannel(device_id, node.split_server, token=node.token, root_cert_pem=node.root_cert,
                     compression=config.transport.compression, max_message_bytes=max_bytes,
                     tap=status.tap) as channel:
        device.open_session(channel)
        phase = device.local_phase(config.federation.local_steps, channel)
        device.close_session(channel)
        split_up, split_down = channel.traffic.bytes_up, channel.traffic.bytes_down
    fill_round_stats(stats, device, phase, events_before)
    upload = encode(Simulation.upload_message(device))
    stats.adapter_bytes_up = len(upload)
    stats.bytes_up, stats.bytes_down = split_up + len(upload), split_down
    saved: dict[str, torch.Tensor] = {}
    store.save(round_index, device_state(device, saved, "opt"), saved)
    status.done(stats)
    return upload, stats


def _yaml_mapping(text: str) -> dict[str, Any]:
    import yaml

    raw = yaml.safe_load(text)
    if not isinstance(raw, dict):
        raise ValueError("the experiment config must be a mapping")
    return raw


class DeviceStore:
    """A device's carry-over state after each round it finished, on its own disk (atomic writes).

    Round r starts from the state saved after the latest round before r that this device
    finished; rounds the server redoes after a crash therefore start where they started before.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _rounds(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(p.name.split("-")[1]) for p in self.folder.glob("round-*") if p.name.split("-")[1].isdigit())

    def latest_before(self, round_index: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        earlier = [r for r in self._rounds() if r < round_index]
        if not earlier:
            return None
        return read_state(self.folder / f"round-{earlier[-1]}")

    def save(self, round_index: int, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        write_state(self.folder / f"round-{round_index}", info, tensors)
        for old in self._rounds():
            if old < round_index - 1:  # keep the two newest: the server may redo the last round
                shutil.rmtree(self.folder / f"round-{old}", ignore_errors=True)


class StatusFile:
    """Optional JSON a device keeps current during a round: round, frames exchanged, phase."""

    def __init__(self, path: Path | None, device_id: str, round_index: int) -> None:
        self.path, self.device_id, self.round = path, device_id, round_index
        self.frames = 0
        self._write("training")

    def tap(self, _device_id: str, direction: str, _frame: bytes) -> None:
        if direction == "up":
            self.frames += 1
            self._write("training")

    def done(self, stats: DeviceRound) -> None:
        self._write("uploaded", loss=stats.train_loss, steps=stats.steps)

    def _write(self, phase: str, **extra: Any) -> None:
        if self.path is None:
            return
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text(json.dumps({"device": self.device_id, "round": self.round, "phase": phase,
                                         "frames": self.frames, "pid": os.getpid(), **extra}))
        os.replace(temporary, self.path)
