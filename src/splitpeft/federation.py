"""Federation in simulation: N virtual devices with their own shards, one server, rounds.

One round, readable top to bottom in `Simulation.run_round`:

1. each device downloads the global adapters of the modules it holds (an ADAPTERS message);
2. it opens its session on the server (the server loads its half's adapters from the global
   state) and trains `local_steps` batches through its channel;
3. it uploads its adapters (an ADAPTERS message);
4. for every module, all copies (devices and server sessions holding it) are aggregated,
   weighted by the tokens each trained on, into the next global state.

Every message is encoded as on the wire, so the bytes in the report are real sizes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import adapters as lora
from .adapters import AdapterSet, LoraWeights
from .aggregation import AdapterCopy, AggregationError, FedAvg, check_copy, make_aggregator, token_weights
from .channel import InProcessChannel, Tap
from .config import ExperimentConfig
from .data import BatchStream, EncodedExample, encode, load_examples, partition, split_by_group
from .devices import DeviceRuntime, LocalPhase
from .importance import ImportanceTracker, normalised_scores, probe_importance
from .killrevive import KillReviveSettings
from .planner import DevicePlan, DeviceProfile, ModelShapes, fleet_preset, plan_fleet, predict_peak_bytes, simulated_step_s
from .messages import Kind, Message, MessageError
from .models import LoadedModel, backbone_of, load_model, share_frozen_copy
from .placement import make_placement
from .server import SplitServer

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def initial_adapters(base: torch.nn.Module, ranks: dict[str, int], alpha: float, seed: int) -> AdapterSet:
    """Fresh LoRA weights for every module (peft's init: A random, B = 0) from `seed`."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = lora.inject(share_frozen_copy(base), ranks, alpha)  # type: ignore[arg-type]
    torch.random.set_rng_state(state)
    return lora.read_adapters(model)


@dataclass
class DeviceRound:
    bytes_up: int = 0
    bytes_down: int = 0
    adapter_bytes_up: int = 0
    adapter_bytes_down: int = 0
    flops: int = 0
    adapter_flops: int = 0  # dlora: FLOPs of the adapter branches alone (part of `flops`)
    peak_memory_bytes: int = 0
    tokens: int = 0
    steps: int = 0
    train_loss: float = float("nan")
    losses: list[float] = field(default_factory=list)
    step_flops: list[int] = field(default_factory=list)
    step_bytes_up: list[int] = field(default_factory=list)
    step_bytes_down: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    kr_events: list[dict[str, Any]] = field(default_factory=list)
    active_adapters: int | None = None
    simulated_s: float | None = None  # flops / device compute + bytes / device link


@dataclass
class RoundRecord:
    round: int
    devices: dict[str, DeviceRound]
    eval_perplexity: float | None = None
    rejected: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    replanned: list[str] = field(default_factory=list)
    dropped: list[dict[str, str]] = field(default_factory=list)  # devices lost mid-round, and why
    selected: list[str] = field(default_factory=list)  # devices asked to train this round


@dataclass
class DeviceResult:
    """A device's finished round as the server receives it."""

    uploaded: AdapterSet
    tokens: int
    stats: DeviceRound


def fill_round_stats(stats: DeviceRound, device: DeviceRuntime, phase: LocalPhase, events_before: int) -> None:
    """Copy a finished local phase and the device's meters into `stats` (resets the meters)."""
    if device.kill_revive is not None:
        stats.kr_events = device.kill_revive.events[events_before:]
        stats.active_adapters = len(device.kill_revive.active)
    stats.adapter_flops = device.meter.adapter_flops
    device.meter.adapter_flops = 0
    stats.flops, stats.peak_memory_bytes = device.meter.take_round()
    stats.tokens, stats.steps, stats.losses = phase.tokens, len(phase.losses), phase.losses
    stats.step_flops, stats.step_bytes_up, stats.step_bytes_down = phase.step_flops, phase.step_bytes_up, phase.step_bytes_down
    stats.train_loss = float(np.mean(phase.losses))
    stats.wall_s = phase.wall_s


class Simulation:
    """Builds model, data, devices, server and channels from a config; `run_round` trains."""

    def __init__(self, config: ExperimentConfig, *, tap: Tap | None = None, loaded: LoadedModel | None = None,
                 build_devices: bool = True, hold_out: bool = True) -> None:
        """`build_devices=False`: no device runtimes (a real device builds only its own, `build_device`).
        `hold_out=False`: no held-out split, every example trains (a real device's own data; it
        never evaluates)."""
        self.config = config
        seed_everything(config.seed)
        self.loaded = loaded or load_model(config.model.name, seed=config.seed)
        base, tokenizer = self.loaded.model, self.loaded.tokenizer
        self.backbone = backbone_of(base)
        num_blocks = self.backbone.num_blocks
        placement_cfg, fed = config.placement, config.federation
        self.placement = make_placement(placement_cfg.placement, labels_on_device=placement_cfg.labels_on_device)
        self.placement.device_blocks(num_blocks, placement_cfg.split_layer)  # range check before any work

        examples = load_examples(config.data.source, config.data.path, limit=config.data.limit, seed=config.seed)
        train, self.held_out = split_by_group(examples, config.data.eval_fraction, config.seed) if hold_out else (examples, [])
        num_devices = 1 if self.placement.name == "centralized" else fed.num_devices
        if self.placement.name == "centralized" and fed.num_devices > 1:
            log.info("centralized placement: one party trains on the pooled data of all %d devices", fed.num_devices)
        shards = partition(
            train, num_devices, config.data.partition,
            alpha=config.data.dirichlet_alpha, field=config.data.partition_field, seed=config.seed,
        )
        self.pad_id = int(tokenizer.pad_token_id)
        self.held_out_encoded: list[EncodedExample] = encode(self.held_out, tokenizer, config.data.max_length)

        targets = config.lora.target_modules or list(self.backbone.default_target_modules)
        self.ranks = {
            name: config.lora.rank
            for name in lora.target_module_names(self.backbone, targets, range(num_blocks))
        }
        if not self.ranks:
            raise ValueError(f"lora.target_modules {targets} match no module of {config.model.name}")
        self.global_adapters = initial_adapters(base, self.ranks, config.lora.alpha, config.seed)
        self._initial_by_rank = {config.lora.rank: self.global_adapters}
        self.aggregator = make_aggregator(fed.aggregator, seed=config.seed)
        # Per holder ("device-3", "server/device-3"): the adapters it starts the next round with,
        # and the token weights of the last aggregation (for the global model).
        self.holder_state: dict[str, AdapterSet] = defaultdict(dict)
        self.last_weights: dict[str, dict[str, float]] = {}
        self.merged: dict[str, torch.Tensor] = {}  # sum of deltas merged into each frozen weight

        def ranks_in(blocks: range) -> dict[str, int]:
            prefixes = tuple(self.backbone.block_prefix(j) for j in blocks)
            return {n: r for n, r in self.ranks.items() if n.startswith(prefixes)}

        self.server = SplitServer(
            base, lambda k: ranks_in(range(k, num_blocks)),
            alpha=config.lora.alpha, dropout=config.lora.dropout, lr=fed.lr, num_blocks=num_blocks,
        )
        self.server.start_state = self.start_state
        self.ranks_in = ranks_in
        encoded = ([encode(train, tokenizer, config.data.max_length)] * len(shards) if config.data.partition == "whole"
                   else [encode(shard, tokenizer, config.data.max_length) for shard in shards])  # "whole": encode once
        self.streams = [BatchStream(items, fed.batch_size, self.pad_id, config.seed + index)
                        for index, items in enumerate(encoded)]
        self.device_ids = [f"device-{index}" for index in range(len(shards))]
        self.profiles = self._profiles()
        self.rounds: list[RoundRecord] = []
        self.planning = Planning(self, train) if config.hsplit.planner != "fixed" else None
        plans = self.planning.plan() if self.planning is not None else {}
        self.devices: list[DeviceRuntime] = [
            self.build_device(i, *plans.get(d, (None, None))) for i, d in enumerate(self.device_ids)] if build_devices else []
        self.channels = {
            d: InProcessChannel(d, self.server, tap=tap, compression=config.transport.compression,
                                max_message_bytes=config.transport.max_message_bytes)
            for d in self.device_ids
        }
        self.tap = tap
        self.shard_sizes = {d: len(s) for d, s in zip(self.device_ids, shards)}

    def _profiles(self) -> list[DeviceProfile] | None:
        """Each device's budget, from per-device lists or a range spread evenly over the fleet."""
        fleet, n = self.config.fleet, len(self.device_ids)
        if fleet.memory_bytes is not None:
            budgets = [int(b) for b in fleet.memory_bytes]
        elif fleet.memory_range is not None:
            budgets = [p.memory_bytes for p in fleet_preset(n, (fleet.memory_range[0], fleet.memory_range[1]), 1.0, 1.0)]
        else:
            return None

        def each(value: float | list[float]) -> list[float]:
            return list(value) if isinstance(value, list) else [value] * n

        return [DeviceProfile(d, b, f, w) for d, b, f, w in
                zip(self.device_ids, budgets, each(fleet.flops_per_s), each(fleet.bandwidth_bytes_per_s))]

    def build_device(self, index: int, split_layer: int | None = None, ranks: dict[str, int] | None = None) -> DeviceRuntime:
        """Device `index` with its plan (split point, ranks), or the config's fixed ones."""
        config = self.config
        split_layer = config.placement.split_layer if split_layer is None else split_layer
        if ranks is None:
            ranks = self.ranks_in(self.placement.device_blocks(self.backbone.num_blocks, split_layer))
        device = DeviceRuntime(
            self.device_ids[index], self.loaded.model, self.placement, split_layer, ranks, self.streams[index],
            alpha=config.lora.alpha, dropout=config.lora.dropout, lr=config.federation.lr, count_flops=config.count_flops,
        )
        if config.kill_revive.enabled:
            settings = dataclasses.asdict(config.kill_revive)
            settings.pop("enabled")
            device.attach_kill_revive(KillReviveSettings(**settings), seed=config.seed + index)
        return device

    def replan(self, plans: dict[str, tuple[int, dict[str, int]]]) -> list[str]:
        """Rebuild the devices whose split point or ranks changed; returns their ids."""
        changed = []
        for index, device in enumerate(self.devices):
            split_layer, ranks = plans[device.device_id]
            if split_layer != device.split_layer or ranks != device.ranks:
                self.devices[index] = self.build_device(index, split_layer, ranks)
                changed.append(device.device_id)
        return changed

    # ------------------------------------------------------------------ one round

    def run_round(self, on_device_done: Callable[[str], None] | None = None) -> RoundRecord:
        record = self.begin_round()
        results: dict[str, DeviceResult] = {}
        for device in self.selected_devices(record.round):
            result = self._train_in_process(device, record)
            if result is not None:
                results[device.device_id] = result
                if on_device_done is not None:
                    on_device_done(device.device_id)
        return self.finish_round(record, results)

    def begin_round(self) -> RoundRecord:
        """Open round `len(rounds)`: re-plan if planning, hand the server the global state."""
        record = RoundRecord(round=len(self.rounds), devices={})
        self._round_start = time.perf_counter()
        if self.planning is not None and self.rounds:
            record.replanned = self.planning.update()
        self.server.begin_round(self.global_adapters)
        record.selected = [device.device_id for device in self.selected_devices(record.round)]
        return record

    def selected_devices(self, round_index: int) -> list[DeviceRuntime]:
        """The devices that train in round `round_index`: all, or `federation.devices_per_round`
        of them drawn without replacement from a generator seeded by (seed, round), so a resumed
        or distributed run picks the same ones."""
        wanted = self.config.federation.devices_per_round
        if wanted is None or wanted >= len(self.devices):
            return list(self.devices)
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + round_index)
        chosen = sorted(torch.randperm(len(self.devices), generator=generator)[:wanted].tolist())
        return [self.devices[i] for i in chosen]

    def drop(self, record: RoundRecord, device_id: str, error: str) -> None:
        """A device that died or disconnected mid-round: its partial update (and its server
        session's) is discarded; the round completes with the others."""
        log.warning("dropping %s from round %d: %s", device_id, record.round, error)
        record.dropped.append({"device": device_id, "error": error})
        self.server.reset_session(device_id)

    def _train_in_process(self, device: DeviceRuntime, record: RoundRecord) -> DeviceResult | None:
        """One device's round through its channel (download, session, local phase, upload)."""
        channel = self.channels[device.device_id]
        before = (channel.traffic.bytes_up, channel.traffic.bytes_down)
        stats = DeviceRound()
        events_before = len(device.kill_revive.events) if device.kill_revive is not None else 0
        try:
            stats.adapter_bytes_down = self._download(device, channel)
            device.open_session(channel)
            phase = device.local_phase(self.config.federation.local_steps, channel)
            device.close_session(channel)
            uploaded, stats.adapter_bytes_up = self._upload(device, channel)
        except (ConnectionError, MessageError) as error:
            self.drop(record, device.device_id, str(error))
            device.meter.take_round()
            device.meter.adapter_flops = 0
            return None
        fill_round_stats(stats, device, phase, events_before)
        stats.bytes_up = channel.traffic.bytes_up - before[0]
        stats.bytes_down = channel.traffic.bytes_down - before[1]
        return DeviceResult(uploaded, phase.tokens, stats)

    def finish_round(self, record: RoundRecord, results: dict[str, DeviceResult]) -> RoundRecord:
        """Aggregate the devices' uploads with their server sessions' adapters; close the round."""
        alpha = self.config.lora.alpha
        copies: dict[str, list[AdapterCopy]] = defaultdict(list)
        for device_id, result in results.items():
            if self.profiles is not None:
                profile = self.profiles[self.device_ids.index(device_id)]
                result.stats.simulated_s = simulated_step_s(
                    profile, result.stats.flops, result.stats.bytes_up + result.stats.bytes_down)
            record.devices[device_id] = result.stats
            for name, weights in result.uploaded.items():
                copies[name].append(AdapterCopy(device_id, weights, result.tokens, scale=alpha / weights.rank))
        dropped = {entry["device"] for entry in record.dropped}
        for holder, adapters, tokens in self.server.session_copies(exclude=dropped):
            for name, weights in adapters.items():
                copies[name].append(AdapterCopy(holder, weights, tokens, scale=alpha / weights.rank))
        record.rejected = self._aggregate(copies)
        record.rejected += [f"{device}: {error}" for device, error in self.server.rejected]
        self.server.rejected.clear()
        record.wall_s = time.perf_counter() - self._round_start
        self.rounds.append(record)
        return record

    def download_message(self, device: DeviceRuntime) -> Message:
        """The ADAPTERS message that starts `device`'s round: its modules' adapters."""
        return Message(Kind.ADAPTERS, lora.to_tensors(self.start_state(device.device_id, device.ranks)),
                       meta={"round": len(self.rounds)})

    @staticmethod
    def upload_message(device: DeviceRuntime) -> Message:
        """The device's trained adapters (killed ones did not change and stay home)."""
        trained = {n: w for n, w in device.adapters().items() if n not in device.killed}
        return Message(Kind.ADAPTERS, lora.to_tensors(trained), meta={"device": device.device_id})

    def start_state(self, holder: str, ranks: dict[str, int]) -> AdapterSet:
        """What `holder` starts the round with: its aggregated adapters, else the initial ones."""
        state = self.holder_state.get(holder, {})
        start = {}
        for name, rank in ranks.items():
            if name in state and state[name].rank == rank:
                start[name] = state[name]
            elif self.global_adapters[name].rank == rank:
                start[name] = self.global_adapters[name]
            else:
                if rank not in self._initial_by_rank:
                    self._initial_by_rank[rank] = initial_adapters(
                        self.loaded.model, {n: rank for n in self.ranks}, self.config.lora.alpha, self.config.seed)
                start[name] = self._initial_by_rank[rank][name]
        return start

    def _download(self, device: DeviceRuntime, channel: InProcessChannel) -> int:
        """Send the device its modules' adapters for this round; returns the bytes sent."""
        before = channel.traffic.bytes_down
        received = channel.send(self.download_message(device), "down")
        device.load(lora.from_tensors(received.tensors))
        return channel.traffic.bytes_down - before

    def _upload(self, device: DeviceRuntime, channel: InProcessChannel) -> tuple[AdapterSet, int]:
        before = channel.traffic.bytes_up
        received = channel.send(self.upload_message(device), "up")
        return lora.from_tensors(received.tensors), channel.traffic.bytes_up - before

    def _aggregate(self, copies: dict[str, list[AdapterCopy]]) -> list[str]:
        """Next round's adapters per holder; a poisoned copy is dropped (and reported), the others count."""
        rejected = []
        for name, module_copies in copies.items():
            good = []
            for copy in module_copies:
                try:
                    check_copy(name, copy)
                    good.append(copy)
                except AggregationError as error:
                    log.warning("dropping an adapter upload: %s", error)
                    rejected.append(str(error))
            if not good:
                continue
            result = self.aggregator.aggregate(name, good)
            if result.base_delta is not None:
                self.merge(name, result.base_delta)
            for holder, weights in result.adapters.items():
                self.holder_state[holder][name] = weights
            self.last_weights[name] = dict(zip((c.holder for c in good), token_weights(good)))
            if isinstance(self.aggregator, FedAvg):
                self.global_adapters[name] = next(iter(result.adapters.values()))
        return rejected

    def merge(self, name: str, delta: torch.Tensor) -> None:
        """W += delta (d_out, d_in) in the shared frozen weight, so every holder sees it."""
        module = self.loaded.model.get_submodule(name)
        with torch.no_grad():
            if lora.is_fan_in_fan_out(self.loaded.model):  # GPT-2 Conv1D stores (d_in, d_out)
                module.weight.add_(delta.T)
            else:
                module.weight.add_(delta)
        self.merged[name] = self.merged.get(name, 0) + delta

    def global_delta(self, name: str) -> torch.Tensor | None:
        """The global model's adapter update of `name` beyond what is merged: sum_h p_h s_h B_h A_h."""
        weights = self.last_weights.get(name)
        if not weights:
            return None
        scale = self.config.lora.alpha
        return sum(p * (scale / self.holder_state[h][name].rank) * (self.holder_state[h][name].B @ self.holder_state[h][name].A)
                   for h, p in weights.items())  # type: ignore[return-value]

    # ------------------------------------------------------------------ models for evaluation

    def _homogeneous(self) -> bool:
        return isinstance(self.aggregator, FedAvg) and not self.merged

    def global_model(self) -> torch.nn.Module:
        """The current global model: base (with merged updates) + the global adapter updates.

        With FedAvg (one shared adapter per module) it is the base with peft LoRA layers holding the
        global adapters; otherwise a copy whose frozen weights include the dense global updates.
        """
        if self._homogeneous():
            model = lora.inject(share_frozen_copy(self.loaded.model), self.ranks, self.config.lora.alpha)
            lora.write_adapters(model, self.global_adapters)
        else:
            model = copy.deepcopy(self.loaded.model)
            with torch.no_grad():
                for name in self.ranks:
                    delta = self.global_delta(name)
                    if delta is not None:
                        weight = model.get_submodule(name).weight
                        weight.add_(delta.T if lora.is_fan_in_fan_out(model) else delta)
        model.eval()
        return model

    def export(self, path: Path, merged: bool = False) -> None:
        """Write the global model as a PEFT adapter folder relative to the original base weights.

        Heterogeneous or merged updates are factorised exactly: delta = U S V^T at its numerical
        rank, B = U sqrt(S) / sqrt(s), A = sqrt(S) V^T / sqrt(s) with s = alpha / rank.
        """
        alpha = self.config.lora.alpha
        if self._homogeneous():
            lora.export_peft(self.loaded.model, self.global_adapters, alpha, path, merged=merged)
            return
        original = copy.deepcopy(self.loaded.model)
        factors = {}
        with torch.no_grad():
            for name in self.ranks:
                delta = self.global_delta(name)
                total = self.merged.get(name, 0) + (delta if delta is not None else 0)
                if name in self.merged:
                    weight = original.get_submodule(name).weight
                    weight.sub_(self.merged[name].T if lora.is_fan_in_fan_out(original) else self.merged[name])
                if not torch.is_tensor(total):
                    continue
                factors[name] = factorise(total, alpha)
        if not factors:
            factors = {n: w for n, w in self.global_adapters.items()}
        lora.export_peft(original, factors, alpha, path, merged=merged)

    def info(self) -> dict[str, Any]:
        plans = self.planning.describe() if self.planning is not None else None
        return {
            "plans": plans,
            "model": self.loaded.name,
            "num_blocks": self.backbone.num_blocks,
            "adapted_modules": len(self.ranks),
            "adapter_parameters": sum(w.A.numel() + w.B.numel() for w in self.global_adapters.values()),
            "devices": {
                d.device_id: {
                    "split_layer": d.split_layer if self.placement.name != "centralized" else self.backbone.num_blocks,
                    "train_examples": self.shard_sizes[d.device_id],
                    "adapted_modules": len(d.modules),
                }
                for d in self.devices
            },
            "held_out_examples": len(self.held_out),
        }


class Planning:
    """HSplitLoRA's configuration loop: IWI scores -> per-device split points and ranks.

    `armsc`: each round a probe of `hsplit.probe_batches` batches updates the smoothed scores;
    when they moved more than `hsplit.replan_threshold` since the current plan, every device is
    planned again (ARMSC) and the devices whose plan changed are rebuilt.
    `budget_rank` (HetLoRA): the fixed split, and per device the largest rank of the rank set
    whose predicted peak fits its budget, on every adapted module.
    """

    def __init__(self, sim: Simulation, train: list[Any]) -> None:
        self.sim = sim
        config = sim.config
        if sim.profiles is None:
            raise ValueError(f"hsplit.planner={config.hsplit.planner} needs fleet budgets")
        if sim.placement.name != "split":
            raise ValueError(f"hsplit.planner={config.hsplit.planner} plans split points: use placement.placement=split")
        targets = config.lora.target_modules or list(sim.backbone.default_target_modules)
        self.shapes = ModelShapes.from_model(sim.loaded.model, targets)
        self.options = dict(
            batch_size=config.federation.batch_size, seq_len=config.data.max_length,
            labels_on_device=config.placement.labels_on_device,
        )
        self.tracker = ImportanceTracker()
        self.probe_stream = BatchStream(encode(train, sim.loaded.tokenizer, config.data.max_length),
                                        config.federation.batch_size, sim.pad_id, config.seed + 10_000)
        self.plans: list[DevicePlan] = []
        self.planned_scores: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []

    def probe(self) -> dict[str, float]:
        """One IWI probe folded into the tracker; returns the resource-normalised scores."""
        sim = self.sim
        batches = [self.probe_stream.next() for _ in range(sim.config.hsplit.probe_batches)]
        raw = probe_importance(sim.loaded.model, sim.backbone, batches, sorted(sim.ranks))
        shapes = {name: self.shapes.modules[name] for name in raw}
        self.tracker.update(normalised_scores(raw, shapes, sim.config.lora.rank))
        self.history.append({"round": len(sim.rounds), "scores": dict(self.tracker.scores)})
        return dict(self.tracker.scores)

    def plan(self) -> dict[str, tuple[int, dict[str, int]]]:
        config = self.sim.config
        if config.hsplit.planner == "budget_rank":
            self.plans = [self._budget_rank(profile) for profile in self.sim.profiles or []]
        else:
            scores = self.probe()
            self.plans = plan_fleet(self.sim.profiles or [], self.shapes, scores, rank_set=tuple(config.hsplit.rank_set),
                                    max_split=config.hsplit.max_split, **self.options)
            self.planned_scores = scores
        return {p.device: (p.split_layer, dict(p.ranks)) for p in self.plans}

    def update(self) -> list[str]:
        """Re-probe (armsc); re-plan and rebuild devices when the scores moved past the threshold."""
        if self.sim.config.hsplit.planner != "armsc":
            return []
        self.probe()
        if self.tracker.moved(self.planned_scores) <= self.sim.config.hsplit.replan_threshold:
            return []
        return self.sim.replan(self.plan())

    def _budget_rank(self, profile: DeviceProfile) -> DevicePlan:
        sim, k = self.sim, self.sim.config.placement.split_layer
        modules = sim.ranks_in(range(k))
        for rank in sorted((r for r in sim.config.hsplit.rank_set if r > 0), reverse=True):
            ranks = {name: rank for name in modules}
            peak = predict_peak_bytes(self.shapes, k, ranks, **self.options)
            if peak <= profile.memory_bytes:
                return DevicePlan(profile.name, k, ranks, peak, 0.0, profile.memory_bytes)
        raise ValueError(f"{profile.name}: a budget of {profile.memory_bytes} bytes fits no rank at split {k}")

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for plan in self.plans:
            histogram: dict[int, int] = defaultdict(int)
            for rank in plan.ranks.values():
                histogram[rank] += 1
            rows.append({
                "device": plan.device, "budget_bytes": plan.budget_bytes, "split_layer": plan.split_layer,
                "adapted_modules": len(plan.ranks), "ranks": dict(sorted(histogram.items())),
                "predicted_peak_bytes": plan.predicted_peak_bytes, "flops_per_step": plan.flops_per_step,
            })
        return rows


def factorise(delta: torch.Tensor, alpha: float, tolerance: float = 1e-6) -> LoraWeights:
    """A LoRA pair with s B A == delta (d_out, d_in), s = alpha / r, r = numerical rank of delta."""
    u, singular, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = max(1, int((singular > tolerance * singular[0].clamp(min=1e-30)).sum()))
    root = singular[:rank].sqrt() / (alpha / rank) ** 0.5
    return LoraWeights((root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float())


def adapters_equal(a: dict[str, LoraWeights], b: dict[str, LoraWeights], rtol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(
        torch.allclose(a[n].A, b[n].A, rtol=rtol, atol=1e-7) and torch.allclose(a[n].B, b[n].B, rtol=rtol, atol=1e-7)
        for n in a
    )

