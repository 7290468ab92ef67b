"""Federation on Flower's deployment engine: a ServerApp for the cloud, a ClientApp for devices.

Flower carries the federation (who is in a round, adapters down and up); split traffic of the
local phase goes over splitpeft's own gRPC stream (`transport.py`), since it is per batch and
latency-bound. One run::

    flower-superlink                           (cloud)      Flower's coordinator
    flwr run deploy/flower <connection>        (anywhere)   submits the ServerApp below
      ServerApp (cloud, started by the SuperLink):
        builds the federation's server side from the run config, serves split traffic on
        `split-address` (a token per device, optional TLS), challenges every SuperNode to prove
        which device it is (an HMAC of a fresh challenge keyed by that device's token; a node's
        word alone counts for nothing), then each round sends each device its adapters and plan
        and waits for the uploads, accepting only a device's whose authenticated split session
        trained this round
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
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.app import Message as FlowerMessage
from flwr.clientapp import ClientApp

from splitpeft.config import ExperimentConfig, config_from_dict
from splitpeft.data.batching import encode as encode_examples
from splitpeft.data.sources import load_examples
from splitpeft.deploy.keys import DeploymentError, identity_proof
from splitpeft.deploy.records import FRAME, frame_array, frame_of
from splitpeft.deploy.settings import NodeSettings
from splitpeft.federation.checkpoint import (
    device_state,
    read_state,
    restore_device_state,
    write_state,
)
from splitpeft.federation.fleet import (
    build_device,
    device_examples,
    device_stream,
    seed_everything,
)
from splitpeft.federation.records import (
    DeviceRound,
    fill_round_stats,
)
from splitpeft.federation.state import merge_delta
from splitpeft.model import adapters as lora
from splitpeft.model.backbone import Backbone
from splitpeft.model.loading import load_model_part
from splitpeft.model.parts import Part, quantize_blocks
from splitpeft.model.runtime import resolve_runtime
from splitpeft.parties.device import DeviceRuntime
from splitpeft.placements.registry import placement_of
from splitpeft.storage import recover
from splitpeft.transport.grpc import GrpcChannel
from splitpeft.transport.messages import Kind, MessageError, encode

# ------------------------------------------------------------------------------------ device


client_app = ClientApp()
RUN_KEY = re.compile(r"[0-9a-f]{32}")  # the server's uuid4().hex
# a saved round's folder, or a sibling its atomic write left (storage.atomic_folder)
_ROUND_NAME = re.compile(r"\.?round-(\d+)(?:\.splitpeft-[0-9a-f]{16}\.(?:lock|old|partial))?")


@client_app.query()
def _identify(message: FlowerMessage, context: Context) -> FlowerMessage:
    node = NodeSettings.of_context(context.node_config, context.run_config)
    device_id = f"device-{node.device}"
    try:
        challenge = str(message.content.config_records["challenge"]["challenge"])
    except KeyError:
        raise DeploymentError("the server's identity query carries no challenge") from None
    proof = identity_proof(node.token, challenge, int(context.node_id), device_id)
    return FlowerMessage(RecordDict({"device": ConfigRecord({"device": device_id, "proof": proof})}), reply_to=message)


@client_app.train()
def _train(message: FlowerMessage, context: Context) -> FlowerMessage:
    node = NodeSettings.of_context(context.node_config, context.run_config)
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
        round_index, device_id = int(round_info["round"]), str(round_info["device"])
        split_layer, ranks = int(round_info["split-layer"]), {str(k): int(v) for k, v in json.loads(str(round_info["ranks"])).items()}
        run_key = str(round_info["run-key"])
        round_tag = str(round_info["round-tag"]) if "round-tag" in round_info else None  # a server that fences sessions
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise DeploymentError(f"malformed round message: {error}") from None
    if not RUN_KEY.fullmatch(run_key):  # it names a folder under state-dir: never a path of the server's choosing
        raise DeploymentError(f"malformed round message: run key {run_key[:80]!r} is not 32 hexadecimal digits")
    if device_id != f"device-{node.device}":
        raise DeploymentError(f"the server sent {device_id}'s round to device-{node.device}")
    device = build_own_device(config, node, split_layer, ranks)
    max_bytes = config.transport.max_message_bytes
    if "base" in download:
        base = frame_of(ArrayRecord({FRAME: download["base"]}), max_bytes).expect(Kind.BASE_DELTA)
        for name, delta in base.tensors.items():
            if name not in ranks:
                raise MessageError(f"base delta for {name}, which this device does not hold")
            merge_delta(device.model, name, delta)  # the frozen weights are shared with the base
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
                     tap=status.tap, round_tag=round_tag) as channel:
        device.open_session(channel)
        phase = device.local_phase(config.federation.local_steps, channel)
        device.close_session(channel)
        split_up, split_down = channel.traffic.bytes_up, channel.traffic.bytes_down
    fill_round_stats(stats, device, phase, events_before)
    upload = encode(device.upload_message())
    stats.adapter_bytes_up = len(upload)
    stats.bytes_up, stats.bytes_down = split_up + len(upload), split_down
    saved: dict[str, torch.Tensor] = {}
    store.save(round_index, device_state(device, saved, "opt"), saved)
    status.done(stats)
    return upload, stats


def build_own_device(config: ExperimentConfig, node: NodeSettings, split_layer: int, ranks: dict[str, int]) -> DeviceRuntime:
    """This device alone: its part of the model (read from the model's safetensors files: the
    embedding, blocks [0, split_layer) and the head if it keeps the labels; never a block it does
    not run), its own shard (or its own data file, all of it training data), its runtime at the
    server's plan. No server state, no other device's data."""
    seed_everything(config.seed)
    runtime = resolve_runtime(config.runtime)
    placement = placement_of(config)

    def own_part(backbone: Backbone) -> Part:
        return placement.device_part(backbone.num_blocks, split_layer)

    loaded = load_model_part(config.model.name, own_part, seed=config.seed, dtype=runtime.dtype, device=runtime.device_device)
    quantize_blocks(loaded.model, range(split_layer), runtime.device_quantization(), runtime.dtype)
    if node.data_path is not None:  # the device's own file: all of it is its training data
        examples = load_examples(config.data.source, node.data_path, limit=config.data.limit, seed=config.seed)
    else:
        num_devices = config.federation.num_devices if placement.uses_server() else 1
        examples = device_examples(config, num_devices)[1][node.device]
    pad_id = int(loaded.tokenizer.pad_token_id)
    items = encode_examples(examples, loaded.tokenizer, config.data.max_length)
    return build_device(config, loaded.model, placement, node.device, device_stream(config, items, node.device, pad_id),
                        split_layer, ranks, runtime=runtime)


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
        """The rounds saved here, after finishing any save a kill left half done (a round whose
        folder is only in its writer's `.old` sibling is found again, not skipped)."""
        if not self.folder.is_dir():
            return []
        named = {int(found.group(1)) for name in os.listdir(self.folder) if (found := _ROUND_NAME.fullmatch(name))}
        for round_index in named:
            recover(self.folder / f"round-{round_index}")
        return sorted(r for r in named if (self.folder / f"round-{r}").is_dir())

    def latest_before(self, round_index: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        earlier = [r for r in self._rounds() if r < round_index]
        if not earlier:
            return None
        return read_state(self.folder / f"round-{earlier[-1]}")

    def save(self, round_index: int, info: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        write_state(self.folder / f"round-{round_index}", info, tensors)
        # keep the two newest this device saved (not rounds r-1 and r: a device sampled in rounds 0
        # and 2 needs round 0's state if the server redoes round 2); the server redoes at most the
        # round after its last checkpoint, so the older of the two is the most a redo reaches back
        for old in self._rounds()[:-2]:
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
