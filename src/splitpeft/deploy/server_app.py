"""The Flower ServerApp: plays the federation's rounds on SuperNodes (`FlowerEngine`), serving
split traffic on splitpeft's own gRPC stream beside Flower; see deploy/client_app.py for the
whole run."""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from splitpeft.config import dump_yaml
from splitpeft.deploy.keys import DeploymentError, proof_matches
from splitpeft.deploy.records import FRAME, frame_array, frame_of, round_stats_from_json
from splitpeft.deploy.settings import ServerSettings
from splitpeft.experiment.run import RunFolderError, run_experiment
from splitpeft.federation.checkpoint import CheckpointError
from splitpeft.federation.records import (
    DeviceResult,
    RoundRecord,
)
from splitpeft.federation.simulation import Simulation
from splitpeft.model.adapters import AdapterError
from splitpeft.parties.window import BatchWindow
from splitpeft.transport.grpc import GrpcSplitServer
from splitpeft.transport.messages import Kind, Message, MessageError, Meta, encode

log = logging.getLogger(__name__)


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
        self._challenges: dict[int, str] = {}  # node -> the fresh challenge it must answer with a proof
        self._gone: set[str] = set()  # devices whose node seemed to die last round: may come back on a new node
        self._lost: set[str] = set()
        self._lost_guard = threading.Lock()

    # ---------------------------------------------------------------- Engine protocol

    def open(self, sim: Simulation, resumed: dict[str, Any] | None) -> dict[str, Any]:
        check_deployable(sim)
        settings = self.settings
        missing = [d for d in sim.device_ids if d not in settings.tokens]
        if missing:
            raise DeploymentError(f"the tokens file has no token for {missing}")
        self.run_key = str((resumed or {}).get("run_key") or uuid.uuid4().hex)
        # With the batched pass, the split steps arriving within server.batch_window_ms run as one
        # wave; the window serialises the server's work itself.
        batched = sim.server.batched is not None
        endpoint = BatchWindow(sim.server, sim.config.server.batch_window_ms / 1000) if batched else sim.server
        self.server = GrpcSplitServer(endpoint, settings.split_address, tokens=settings.tokens, tls=settings.tls,
                                      serialize=not batched, max_message_bytes=sim.config.transport.max_message_bytes,
                                      idle_timeout_s=sim.config.transport.idle_timeout_s,
                                      step_timeout_s=sim.config.transport.step_timeout_s)
        self.server.on_lost = self._on_lost
        sim.server.fence(None)  # no session opens until a round's jobs are out (a restarted server's old jobs)
        self.server.start()
        self._discover(set(sim.device_ids), self.settings.join_timeout_s)
        return {"run_key": self.run_key}

    def play_round(self, sim: Simulation, on_device_done: Callable[[str], None]) -> RoundRecord:
        record = sim.begin_round()
        round_tag = uuid.uuid4().hex  # this round of this start of the server: its jobs' sessions alone open
        sim.server.fence(round_tag)
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
            if node is None:  # never claimed: new nodes are asked at every round start, no waiting for it
                sim.drop(record, device.device_id,
                         "no Flower node has proved to be this device (none connected, or its token proof failed)")
                continue
            if node not in online:
                sim.drop(record, device.device_id, "its Flower node is not connected")
                self._gone.add(device.device_id)
                continue
            frame = encode(sim.download_message(device))
            sent[device.device_id] = frame
            outgoing[device.device_id] = FlowerMessage(
                RecordDict({"download": self._download_record(sim, device, frame),
                            "round": self._round_record(sim, device, round_tag)}),
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
        sim.server.fence(None)
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
                self._challenges.update({n: secrets.token_hex(16) for n in fresh})
                queries = [FlowerMessage(RecordDict({"challenge": ConfigRecord({"challenge": self._challenges[n]})}),
                                         dst_node_id=n, message_type="query") for n in fresh]
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
        """Map `node` to the device it proves to be: its answer names a device and carries
        `identity_proof` keyed by that device's token over this node's challenge. A node's word
        alone is never enough, and a node is one device."""
        try:
            device_id = str(content.config_records["device"]["device"])
            proof = str(content.config_records["device"]["proof"])
        except KeyError as error:
            log.warning("node %d answered without a device id and proof (%s); ignored", node, error)
            return set()
        if device_id not in self.settings.tokens:
            log.warning("node %d claims unknown device %r; ignored", node, device_id)
            return set()
        challenge = self._challenges.get(node)
        if challenge is None or not proof_matches(self.settings.tokens[device_id], challenge, node, device_id, proof):
            log.warning("node %d claims %s without proving it holds its token; ignored", node, device_id)
            return set()
        other = next((d for d, n in self.nodes.items() if n == node and d != device_id), None)
        if other is not None:
            log.warning("node %d, already %s, also claims %s; ignored (a node is one device)", node, other, device_id)
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
        deltas = {name: delta for name, delta in sim.state.merged.items() if name in device.ranks}
        if deltas:  # noise-free aggregation merged these into the frozen weights the device holds
            arrays["base"] = frame_array(encode(Message(Kind.BASE_DELTA, deltas)))
        return ArrayRecord(arrays)

    def _round_record(self, sim: Simulation, device: Any, round_tag: str) -> ConfigRecord:
        return ConfigRecord({
            "config": dump_yaml(sim.config), "run-key": self.run_key, "round": len(sim.rounds), "round-tag": round_tag,
            "device": device.device_id, "split-layer": device.split_layer, "ranks": json.dumps(device.ranks),
        })

    def _result(self, sim: Simulation, device_id: str, content: RecordDict) -> DeviceResult:
        """A device's reply, validated: its frame, its modules and ranks, its statistics."""
        if "upload" not in content.array_records or "stats" not in content.config_records:
            raise MessageError("the reply lacks its upload or its statistics")
        upload = frame_of(content.array_records["upload"], sim.config.transport.max_message_bytes).expect(Kind.ADAPTERS)
        if upload.meta.get(Meta.DEVICE) != device_id:
            raise MessageError(f"upload says device {upload.meta.get('device')!r}, expected {device_id}")
        uploaded = sim.uploaded(device_id, upload)
        device = next(d for d in sim.devices if d.device_id == device_id)
        if sim.placement.uses_server():  # the reply must come from the session this device trained on
            session = sim.server.sessions.get(device_id)
            if device_id not in sim.server.opened or session is None:
                raise MessageError(f"{device_id} replied, but no split session authenticated as {device_id} trained this round")
            if session.split_layer != device.split_layer:
                raise MessageError(f"{device_id} trained at split {session.split_layer}, the plan says {device.split_layer}")
        for name, weights in uploaded.items():
            if device.ranks.get(name) != weights.rank:
                raise MessageError(f"upload carries {name} at rank {weights.rank}, the plan says {device.ranks.get(name)}")
        stats = round_stats_from_json(str(content.config_records["stats"].get("stats", "")))
        return DeviceResult(uploaded, stats.tokens, stats)


def check_deployable(sim: Simulation) -> None:
    """DeploymentError for the settings that only simulate a fleet. Real devices are online or not,
    and they are slow or not. The simulated deadline and over-selection would rank them by the
    FLOPs and bytes each reports about itself, and no such report is to be trusted. A deployment
    cuts slow or silent devices by its own clock (transport.step_timeout_s, transport.idle_timeout_s).
    federation.workers spreads simulated devices over processes; a deployment's devices are its
    SuperNodes."""
    fed = sim.config.federation
    simulated = [key for key, on in (("federation.round_deadline_s", fed.round_deadline_s is not None),
                                     ("federation.over_select", fed.over_select > 1),
                                     ("fleet.availability or a trace's availability", bool((sim.availability < 1).any())))
                 if on]
    if fed.workers > 1:
        simulated.append("federation.workers")
    if simulated:
        raise DeploymentError(f"{', '.join(simulated)} only simulate a fleet; a deployment's devices are real, and "
                              "its own clock cuts slow ones (transport.step_timeout_s, transport.idle_timeout_s)")


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = ServerSettings.from_run_config(context.run_config)
    log.info("splitpeft ServerApp: %s, %d devices, %d rounds -> %s", settings.config.model.name,
             settings.config.federation.num_devices, settings.config.federation.rounds, settings.out)
    try:  # resume=true without an intact checkpoint of this run is refused, never a silent start over
        run_experiment(settings.config, settings.out, overwrite=settings.overwrite, progress=False, checkpoint=settings.checkpoint,
                       resume=settings.resume, engine=FlowerEngine(grid, settings))
    except (CheckpointError, RunFolderError) as error:
        log.error("splitpeft ServerApp refuses to run: %s", error)
        raise
