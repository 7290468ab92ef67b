"""Federation in simulation: N virtual devices with their own shards, one server, rounds.

One round, readable top to bottom in `Simulation.run_round`:

1. each device downloads the global adapters of the modules it holds (an ADAPTERS message);
2. it opens its session on the server (the server loads its half's adapters from the global
   state) and trains `local_steps` batches through its channel;
3. it uploads its adapters (an ADAPTERS message);
4. for every module, all copies (devices and server sessions holding it) are checked and
   aggregated, weighted by the tokens each trained on as the server counted them, into the next
   global state (`federation/state.py`).

Every message is encoded as on the wire, so the bytes in the report are real sizes. The fleet
comes from `federation/fleet.py`, plans from `hsplit/planning.py`; `begin_round`,
`finish_round` and `drop` are the hooks a remote engine (Flower) plays the same round with, so
what `finish_round` refuses (a round with fewer than `federation.min_devices` completed devices:
`RoundError`) is refused in every engine.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitpeft.aggregation.base import AdapterCopy
from splitpeft.aggregation.registry import make_aggregator
from splitpeft.aggregation.robust import AdamTrustRegion
from splitpeft.config import ExperimentConfig
from splitpeft.data.batching import EncodedExample, encode
from splitpeft.federation.fleet import (
    adapted_modules,
    build_device,
    device_examples,
    device_ids,
    device_stream,
    fleet_profiles,
    modules_in,
    seed_everything,
    training_of,
)
from splitpeft.federation.lockstep import Lockstep
from splitpeft.federation.preflight import check_against_model, check_held_out
from splitpeft.federation.records import (
    DeviceResult,
    DeviceRound,
    RoundRecord,
    fill_round_stats,
)
from splitpeft.federation.state import GlobalState, device_of
from splitpeft.federation.workers import ServedRound, WorkerPool
from splitpeft.hsplit.budget import StepTime, round_time_s, simulated_round_s
from splitpeft.hsplit.memory import ModelShapes, frozen_bytes, server_flops_per_step
from splitpeft.hsplit.planning import Planning, PlanOptions, make_planner
from splitpeft.model import adapters as lora
from splitpeft.model.adapters import AdapterSet
from splitpeft.model.backbone import backbone_of
from splitpeft.model.batched import DevicePass
from splitpeft.model.loading import LoadedModel, load_model
from splitpeft.model.parts import Part, quantize_blocks, view_part
from splitpeft.model.runtime import machine_info, resolve_runtime
from splitpeft.parties.device import DeviceRuntime
from splitpeft.parties.frame_bounds import FrameBounds
from splitpeft.parties.server import SplitServer, StepLimits
from splitpeft.parties.shells import ShellPool
from splitpeft.placements.registry import placement_of
from splitpeft.transport.channel import InProcessChannel, Tap
from splitpeft.transport.messages import Kind, Message, MessageError, Meta

log = logging.getLogger(__name__)


STRAGGLER = "straggler"  # how a device dropped for missing the round's deadline is named in `dropped`


class RoundError(RuntimeError):
    """A round in which fewer than `federation.min_devices` devices completed: the run stops there,
    and the round is neither recorded nor checkpointed."""


class Simulation:
    """Builds model, data, devices, server and channels from a config; `run_round` trains."""

    def __init__(self, config: ExperimentConfig, *, tap: Tap | None = None, loaded: LoadedModel | None = None) -> None:
        self.config = config
        seed_everything(config.seed)
        self.runtime = runtime = resolve_runtime(config.runtime)
        log.info("runtime: %s on the server (%s), devices on %s; %s", runtime.dtype_name, runtime.server_device,
                 runtime.device_device, runtime.dtype_reason)
        self.loaded = loaded or load_model(config.model.name, seed=config.seed, dtype=runtime.dtype, device=runtime.server_device)
        self.placement = placement_of(config)  # built once; everything below asks it
        check_against_model(config, self.loaded.model, self.placement)  # ranks, split, frame sizes, memory: before any work
        base, tokenizer = self.loaded.model, self.loaded.tokenizer
        self.backbone = backbone_of(base)
        num_blocks = self.backbone.num_blocks
        whole = Part.whole(num_blocks)
        if any(p.device != runtime.server_device or (p.is_floating_point() and p.dtype != runtime.dtype)
               for p in base.parameters()):
            base = view_part(base, whole, device=runtime.server_device, dtype=runtime.dtype)
            self.loaded = LoadedModel(base, tokenizer, self.loaded.name)
        # The devices' frozen weights: the server's own tensors when they run on the same torch
        # device in the same precision (shared, as in memory), else one converted copy they share.
        same_side = runtime.device_device == runtime.server_device and runtime.device_quantization() == runtime.server_quantization()
        self.device_base = base if same_side else view_part(base, whole, device=runtime.device_device)
        quantize_blocks(base, range(num_blocks), runtime.server_quantization(), runtime.dtype)
        if not same_side:
            quantize_blocks(self.device_base, range(num_blocks), runtime.device_quantization(), runtime.dtype)
        fed = config.federation
        self.placement.device_blocks(num_blocks, self.placement.fixed_split(config))  # range check before any work

        # Without a server (centralized) one party trains on the pooled data of all devices.
        num_devices = fed.num_devices if self.placement.uses_server() else 1
        if num_devices < fed.num_devices:
            log.info("%s placement: one party trains on the pooled data of all %d devices",
                     self.placement.name, fed.num_devices)
        train, shards, self.held_out = device_examples(config, num_devices)
        self.pad_id = int(tokenizer.pad_token_id)
        self.held_out_encoded: list[EncodedExample] = encode(self.held_out, tokenizer, config.data.max_length)
        check_held_out(config, base, tokenizer, self.held_out, self.held_out_encoded)  # warns, before training

        modules = adapted_modules(config, self.backbone)
        self.ranks = {name: config.lora.rank for name in modules}
        self.server_rank = config.hsplit.server_rank or config.lora.rank  # the server sessions' adapters
        server_ranks = dict.fromkeys(modules, self.server_rank)
        self.state = GlobalState(base, modules, rank=config.lora.rank, alpha=config.lora.alpha, rslora=config.lora.rslora,
                                 seed=config.seed,
                                 aggregator=make_aggregator(fed.aggregator, seed=config.seed, robust=config.robust,
                                                            noise_free_start=fed.noise_free_start,
                                                            noise_free_factors=fed.noise_free_factors,
                                                            trust=AdamTrustRegion(fed.lr, fed.local_steps)),
                                 mirrors=[] if same_side else [self.device_base])
        # Devices and server sessions are state between rounds; they borrow their models from
        # these pools while they train (`parties/shells.py`).
        self.device_pool = ShellPool(self.device_base, memory_bytes=fed.state_memory_bytes, spill_dir=fed.spill_dir)
        self.session_pool = ShellPool(base, memory_bytes=fed.state_memory_bytes, spill_dir=fed.spill_dir)
        self.server = SplitServer(
            base, lambda blocks: modules_in(server_ranks, self.backbone, blocks), self.state.start_state,
            training_of(config, runtime), num_blocks=num_blocks, limits=StepLimits.from_config(config),
            bounds=FrameBounds.from_config(config, base), batch_devices=config.server.batch_devices,
            pool=self.session_pool,
        )
        # With a batched server pass or device waves the round's devices run in lockstep
        # (`federation/lockstep.py`).
        device_pass = None
        if fed.device_waves and not self.placement.steps_in_device_waves:
            log.info("federation.device_waves: placement %s steps its devices alone", self.placement.name)
        elif fed.device_waves:
            if runtime.loss_scaling or runtime.gradient_checkpointing:
                log.info("federation.device_waves: off under fp16 loss scaling or gradient checkpointing "
                         "(each device then steps alone)")
            else:
                device_pass = DevicePass(self.device_base, device=runtime.device_device, dtype=runtime.dtype)
        self.lockstep = (Lockstep(self.server, device_pass)
                         if self.server.batched is not None or device_pass is not None else None)
        if config.data.partition == "whole":  # every device trains on all of it: encode once
            encoded = [encode(train, tokenizer, config.data.max_length)] * len(shards)
        else:
            encoded = [encode(shard, tokenizer, config.data.max_length) for shard in shards]
        self.streams = [device_stream(config, items, index, self.pad_id) for index, items in enumerate(encoded)]
        self.train_examples, self.device_encoded = train, encoded  # the privacy audit reads them
        self.device_ids = device_ids(len(shards))
        self.profiles = fleet_profiles(config, self.device_ids)
        # P(online) per device and round: the fleet's (fleet.availability, a trace), else always
        self.availability = (np.array([p.availability for p in self.profiles]) if self.profiles is not None
                             else np.ones(len(self.device_ids)))
        self.device_index = {d: i for i, d in enumerate(self.device_ids)}
        self.rounds: list[RoundRecord] = []
        planner = make_planner(config)
        self.planning: Planning | None = None
        plans = {}
        if not planner.uses_budgets and self.placement.plans_splits:
            PlanOptions.from_config(config).check_fixed_split(self.placement.fixed_split(config))  # the privacy floor
        if planner.uses_budgets:
            if self.profiles is None:
                raise ValueError(f"hsplit.planner={planner.name} needs fleet budgets")
            self.planning = Planning(planner, config, base, self.profiles,
                                     encode(train, tokenizer, config.data.max_length), self.pad_id)
            plans = self.planning.plan()
        self.devices: list[DeviceRuntime] = [
            self.build_device(i, *plans.get(d, (None, None))) for i, d in enumerate(self.device_ids)]
        self.channels = {
            d: InProcessChannel(d, self.lockstep or self.server, tap=tap, compression=config.transport.compression,
                                max_message_bytes=config.transport.max_message_bytes)
            for d in self.device_ids
        }
        self.shard_sizes = {d: len(s) for d, s in zip(self.device_ids, shards)}
        # Worker processes that train the devices (`federation.workers`, started by the engine), and
        # the plans a round's start made, which they re-plan with; None: devices train here.
        self.workers: WorkerPool | None = None
        self.new_plans: dict[str, tuple[int, dict[str, int]]] | None = None
        self.restored_from: Path | None = None  # the checkpoint this run was resumed from
        self.worker_devices: set[str] = set(self.device_ids)  # those this process trains (a worker: its own)

    def build_device(self, index: int, split_layer: int | None = None, ranks: dict[str, int] | None = None) -> DeviceRuntime:
        """Device `index` with its plan (split point, ranks), or the config's fixed ones."""
        split_layer = self.placement.fixed_split(self.config) if split_layer is None else split_layer
        if ranks is None:
            ranks = modules_in(self.ranks, self.backbone, self.placement.device_blocks(self.backbone.num_blocks, split_layer))
        return build_device(self.config, self.device_base, self.placement, index, self.streams[index], split_layer, ranks,
                            runtime=self.runtime, pool=self.device_pool)

    def replan(self, plans: dict[str, tuple[int, dict[str, int]]]) -> list[str]:
        """Rebuild the devices whose split point or ranks changed; returns their ids."""
        changed = []
        for index, device in enumerate(self.devices):
            split_layer, ranks = plans[device.device_id]
            if split_layer != device.split_layer or ranks != device.ranks:
                device.close()
                self.devices[index] = self.build_device(index, split_layer, ranks)
                changed.append(device.device_id)
        return changed

    # ------------------------------------------------------------------ one round

    def run_round(self, on_device_done: Callable[[str], None] | None = None) -> RoundRecord:
        """One round: the selected devices train here, or on `self.workers` (`federation.workers`)."""
        record = self.begin_round()
        selected = self.selected_devices(record.round)
        served = None
        if self.workers is not None:
            results, served = self.workers.run_round(self, record, [d.device_id for d in selected], self.new_plans)
            record.dropped += served.dropped
        else:
            results = self.train_devices(record, selected)
        if on_device_done is not None:
            for device_id in results:
                on_device_done(device_id)
        return self.finish_round(record, results, served)

    def train_devices(self, record: RoundRecord, selected: list[DeviceRuntime]) -> dict[str, DeviceResult]:
        """`selected` train their local phases here (in lockstep with a batched server pass); the
        results of those that finished, in their order."""
        if self.lockstep is not None and len(selected) > 1:
            shared = self.lockstep.device_waves
            if shared is not None:
                shared.sizes = []
            for device in selected:
                device.waves = self.lockstep if shared is not None else None
            try:
                outcomes = self.lockstep.run([(device.device_id, partial(self._train_in_process, device, record))
                                              for device in selected])
            finally:
                for device in selected:
                    device.waves = None
            record.device_waves = list(shared.sizes) if shared is not None else []
        else:
            outcomes = [self._train_in_process(device, record) for device in selected]
        return {device.device_id: result for device, result in zip(selected, outcomes) if result is not None}

    def begin_round(self) -> RoundRecord:
        """Open round `len(rounds)`: re-plan if the scores moved, clear the server's round."""
        record = RoundRecord(round=len(self.rounds), devices={})
        self._round_start = time.perf_counter()
        self.new_plans = None
        if self.planning is not None and self.rounds:
            plans = self.planning.update(len(self.rounds))
            record.replanned = self.replan(plans) if plans is not None else []
            self.new_plans = plans if record.replanned else None
        record.selected = [device.device_id for device in self.selected_devices(record.round)]
        drawn = self._online(record.round)
        record.online = None if drawn is None else len(drawn[0])
        self.server.begin_round(expected=record.selected)
        return record

    def selected_devices(self, round_index: int) -> list[DeviceRuntime]:
        """The devices that train in round `round_index`: all, or `federation.devices_per_round`
        of them drawn without replacement from a generator seeded by (seed, round), so a resumed
        or distributed run picks the same ones.

        With a fleet whose devices are not always online (`fleet.availability`, a trace), each
        device is online with its probability (drawn per round, seeded), and the draw is among the
        online ones: ceil(devices_per_round x `federation.over_select`) of them, or all."""
        fed = self.config.federation
        drawn = self._online(round_index)
        if drawn is not None:
            online, draws = drawn
            count = len(online) if fed.devices_per_round is None else math.ceil(fed.devices_per_round * fed.over_select)
            picked = online if count >= len(online) else np.sort(draws.choice(online, size=count, replace=False))
            return [self.devices[int(i)] for i in picked]
        wanted = fed.devices_per_round
        if wanted is None or wanted >= len(self.devices):
            return list(self.devices)
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + round_index)
        chosen = sorted(torch.randperm(len(self.devices), generator=generator)[:wanted].tolist())
        return [self.devices[i] for i in chosen]

    def _online(self, round_index: int) -> tuple[np.ndarray, np.random.Generator] | None:
        """The indexes of the devices online in round `round_index`, each with its probability
        (seeded by (seed, round)), and the generator the round's selection continues with; None
        where every device is always online and nothing is over-selected (the selection then draws
        as it always has)."""
        if not bool((self.availability < 1).any()) and self.config.federation.over_select <= 1:
            return None
        draws = np.random.default_rng([self.config.seed, round_index, 29])
        return np.flatnonzero(draws.random(len(self.devices)) < self.availability), draws

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
            received = channel.send(self.download_message(device), "down")
            device.load(lora.from_tensors(received.tensors))
            stats.adapter_bytes_down = channel.traffic.bytes_down - before[1]
            device.open_session(channel)
            phase = device.local_phase(self.config.federation.local_steps, channel)
            device.close_session(channel)
            up_before = channel.traffic.bytes_up
            uploaded = self.uploaded(device.device_id, channel.send(device.upload_message(), "up"))
            stats.adapter_bytes_up = channel.traffic.bytes_up - up_before
        except (ConnectionError, MessageError, lora.AdapterError) as error:  # a malformed upload drops its device alone
            self.drop(record, device.device_id, str(error))
            device.meter.reset_round()
            device.park()
            return None
        fill_round_stats(stats, device, phase, events_before)
        device.park()  # the device is state again until its next round
        stats.bytes_up = channel.traffic.bytes_up - before[0]
        stats.bytes_down = channel.traffic.bytes_down - before[1]
        return DeviceResult(uploaded, phase.tokens, stats)

    def counted_tokens(self, device_id: str, claimed: int, served: ServedRound | None = None) -> int:
        """The tokens `device_id` trained on this round, as the server counted them: its claim
        (`claimed`, the device's word) never beyond what its server session counted from the
        split traffic it served (`split`: the labelled positions it computed the loss on;
        U-shaped: B x T of the activations it trained on; `dlora`: each step's claim bounded by
        that step's B x T). 0 (refused by the aggregation) for a bad claim or a device the server
        did not serve this round. `centralized`: no server, the one party is this process."""
        if not self.placement.uses_server():
            return claimed
        if served is not None:  # counted by the session on its worker (`federation.workers`)
            counted = served.tokens.get(device_id)
        else:
            session = self.server.sessions.get(device_id)
            counted = session.tokens if session is not None and device_id in self.server.opened else None
        if counted is None or isinstance(claimed, bool) or not isinstance(claimed, int) or claimed <= 0:
            return 0
        return min(claimed, counted)

    def finish_round(self, record: RoundRecord, results: dict[str, DeviceResult],
                     served: ServedRound | None = None) -> RoundRecord:
        """Aggregate the devices' uploads with their server sessions' adapters; close the round.

        Every copy weighs the tokens its device trained on as the server counted them
        (`counted_tokens`): a server session trained on its device's batches, so it weighs the same.
        RoundError (`check_completed`) if fewer than `federation.min_devices` devices trained, before
        any aggregation, or had their upload accepted, after it; the round is then not recorded.
        `served`: what the server sessions did, where they live on worker processes
        (`federation.workers`) instead of in `self.server`."""
        self.check_completed(record, list(results))
        copies: dict[str, list[AdapterCopy]] = defaultdict(list)
        for device_id, result in results.items():
            if self.profiles is not None:
                profile = self.profiles[self.device_index[device_id]]
                result.stats.simulated_s = simulated_round_s(
                    profile, result.stats.flops, result.stats.bytes_up, result.stats.bytes_down)
                result.stats.simulated_server_s = self.simulated_server_s(device_id, result.stats.steps)
            result.stats.tokens = self.counted_tokens(device_id, result.tokens, served)
            record.devices[device_id] = result.stats
        for device_id, reason in self.late_devices(results).items():
            del results[device_id]
            record.dropped.append({"device": device_id, "error": reason})
            if self.workers is not None:
                self.workers.reset_later(self, device_id)
            else:
                self.server.reset_session(device_id)
        for device_id, result in results.items():
            for name, weights in result.uploaded.items():
                copies[name].append(self._copy(device_id, weights, result.stats.tokens))
        dropped = {entry["device"] for entry in record.dropped}
        if served is not None:  # what each holder was given on its worker, as this state gives it
            for holder, ranks in served.given.items():
                self.state.start_state(holder, ranks)
            session_copies = [(holder, adapters) for holder, adapters in served.copies if device_of(holder) not in dropped]
        else:
            session_copies = [(holder, adapters) for holder, adapters, _ in self.server.session_copies(exclude=dropped)]
        for holder, adapters in session_copies:
            device = record.devices.get(device_of(holder))
            for name, weights in adapters.items():
                copies[name].append(self._copy(holder, weights, device.tokens if device is not None else 0))
        outcome = self.state.aggregate(copies)
        rejected = self.server.rejected + (served.rejected if served is not None else [])
        record.rejected = outcome.rejected + [f"{device}: {error}" for device, error in rejected]
        record.server_passes = list(served.pass_sizes if served is not None else self.server.pass_sizes)
        if served is not None:
            record.device_waves = list(served.device_waves)
        record.dropped += [{"device": device, "error": f"upload rejected: {error}"} for device, error in outcome.dropped.items()]
        record.clipped = [clip.describe() for clip in outcome.clipped]
        self.server.rejected.clear()
        dropped = {entry["device"] for entry in record.dropped}
        record.completed = [device for device in record.devices if device not in dropped]
        self.check_completed(record, record.completed)
        if served is not None:  # the workers repaired their parties; they take on the new state
            record.repaired = served.repaired
            assert self.workers is not None
            self.workers.share_state(self)
        else:
            self.repair_parties(record)
        if self.profiles is not None:
            kept = [record.devices[d] for d in record.completed]
            record.simulated_round_s = round_time_s([
                StepTime(s.simulated_s or 0.0, 0.0, s.simulated_server_s or 0.0) for s in kept])
            if any(entry["error"].startswith(STRAGGLER) for entry in record.dropped):
                record.simulated_round_s = max(record.simulated_round_s, self.config.federation.round_deadline_s or 0.0)
        record.wall_s = time.perf_counter() - self._round_start
        self.rounds.append(record)
        return record

    def late_devices(self, results: Mapping[str, DeviceResult]) -> dict[str, str]:
        """Devices whose update the round does not wait for, and why: a simulated round
        (`DeviceRound.simulated_s + simulated_server_s`) beyond `federation.round_deadline_s`
        (a straggler), or, with `federation.over_select` > 1, beyond the devices_per_round that
        finished first (over-selected). Needs the fleet's budgets (simulated times)."""
        fed = self.config.federation
        if self.profiles is None or (fed.round_deadline_s is None and fed.over_select <= 1):
            return {}
        took = {d: (r.stats.simulated_s or 0.0) + (r.stats.simulated_server_s or 0.0) for d, r in results.items()}
        late = {}
        if fed.round_deadline_s is not None:
            late = {d: f"{STRAGGLER}: simulated round {s:.3g} s > federation.round_deadline_s {fed.round_deadline_s:g} s"
                    for d, s in took.items() if s > fed.round_deadline_s}
        if fed.over_select > 1 and fed.devices_per_round is not None:
            in_time = sorted((s, d) for d, s in took.items() if d not in late)
            for s, d in in_time[fed.devices_per_round:]:
                late[d] = (f"over-selected: the round kept the {fed.devices_per_round} devices that finished first; "
                           f"this one took {s:.3g} s (simulated)")
        return late

    def check_completed(self, record: RoundRecord, completed: list[str]) -> None:
        """RoundError, one line with every dropped device's reason, if fewer than
        `federation.min_devices` of the round's selected devices (all of them if fewer were
        selected: centralized has one party) are in `completed`. Without it a run whose devices
        all failed ends with the untrained model and exit status 0."""
        if not record.selected:
            raise RoundError(f"round {record.round + 1}: no device was online to select (fleet.availability or the "
                             "trace's availability); the run stops, this round is not checkpointed")
        needed = min(self.config.federation.min_devices, len(record.selected))
        if len(completed) >= needed:
            return
        reasons = "; ".join(f"{entry['device']}: {_clipped(entry['error'])}" for entry in record.dropped)
        raise RoundError(
            f"round {record.round + 1}: {len(completed)} of {len(record.selected)} devices completed, fewer than "
            f"federation.min_devices {self.config.federation.min_devices} ({reasons or 'no device was dropped'}); "
            "the run stops, this round is not checkpointed")

    def repair_parties(self, record: RoundRecord, devices: list[DeviceRuntime] | None = None) -> None:
        """Nothing non-finite outlives a round: a server session or a device whose adapters or
        AdamW moments went non-finite (a step the guards did not stop, or a device's own diverging
        training) drops its optimiser state and restarts from the global state at its next round;
        it is listed in the round's `repaired`, and never banned. `devices`: those to check (a
        worker's own, `federation.workers`), else all."""
        self.server.repair_all()
        repaired = [f"server/{device}: {tensor}" for device, tensor in self.server.repaired]
        self.server.repaired.clear()
        for device in self.devices if devices is None else devices:
            bad = device.reset_if_nonfinite()
            if bad is not None:
                log.warning("%s held a non-finite %s: its optimiser state is reset", device.device_id, bad)
                repaired.append(f"{device.device_id}: {bad}")
        record.repaired = repaired

    @cached_property
    def shapes(self) -> ModelShapes:
        """The model's shapes as the devices run it (the memory and FLOP models' input)."""
        if self.planning is not None:
            return self.planning.shapes
        return ModelShapes.from_config(self.loaded.model.config, dtype=self.runtime.dtype,
                                       quantization=self.runtime.device_quantization(),
                                       target_modules=self.config.lora.target_modules,
                                       device=self.runtime.device_device)

    def simulated_server_s(self, device_id: str, steps: int) -> float:
        """The server's simulated time for `steps` of `device_id`'s split at its current plan: the
        memory model's FLOPs (`server_flops_per_step`, at the configured batch and length) over
        `fleet.server_flops_per_s`. 0 without a server (centralized). dlora: the server runs every
        block from the device's k on, the adapter branches aside."""
        if not self.placement.uses_server():
            return 0.0
        device = self.devices[self.device_index[device_id]]
        on_device = self.placement.device_keeps_head()
        rank = self.server_rank if self.placement.server_trains_adapters else 0
        flops = server_flops_per_step(self.shapes, device.split_layer, rank, self.config.federation.batch_size,
                                      self.config.data.max_length, on_device)
        return steps * flops / self.config.fleet.server_flops_per_s

    def _copy(self, holder: str, weights: lora.LoraWeights, tokens: int) -> AdapterCopy:
        """`holder`'s copy of a module, scaled alpha / r or alpha / sqrt(r) (r = its rank as uploaded, checked later)."""
        rank = weights.A.shape[0] if weights.A.dim() == 2 else 0
        s = lora.scale(self.config.lora.alpha, rank, self.config.lora.rslora) if rank > 0 else float("nan")
        return AdapterCopy(holder, weights, tokens, scale=s)

    def download_message(self, device: DeviceRuntime) -> Message:
        """The ADAPTERS message that starts `device`'s round: its modules' adapters."""
        return Message(Kind.ADAPTERS, lora.to_tensors(self.state.start_state(device.device_id, device.ranks)),
                       meta={Meta.ROUND: len(self.rounds)})

    def uploaded(self, device_id: str, upload: Message) -> AdapterSet:
        """`device_id`'s ADAPTERS upload as adapters: its tensors, and each module it names as still at
        the value this round gave it (`Meta.UNCHANGED`: killed adapters under `kill_revive.upload_killed`)
        at that value, which the server holds. MessageError for a module named that this round did not
        give the device, named twice, or sent as well."""
        adapters = lora.from_tensors(upload.tensors)
        named = upload.meta.get(Meta.UNCHANGED, [])
        if not isinstance(named, list) or not all(isinstance(name, str) for name in named):
            raise MessageError(f"{device_id}'s upload: {Meta.UNCHANGED!r} must be a list of module names")
        if len(set(named)) != len(named):
            raise MessageError(f"{device_id}'s upload names a module unchanged more than once")
        given = self.state.given.get(device_id, {})
        for name in named:
            if name not in given:
                raise MessageError(f"{device_id}'s upload names {name[:200]!r} unchanged, which this round did not give it")
            if name in adapters:
                raise MessageError(f"{device_id}'s upload names {name!r} unchanged and sends it as well")
            adapters[name] = given[name]
        return adapters

    def close(self) -> None:
        """Remove what the parked parties spilled to disk (the pools' own folders)."""
        self.device_pool.close()
        self.session_pool.close()

    # ------------------------------------------------------------------ the global model

    def global_model(self) -> torch.nn.Module:
        return self.state.global_model()

    def export(self, path: Path, merged: bool = False) -> None:
        self.state.export(path, merged=merged)

    def info(self) -> dict[str, Any]:
        plans = self.planning.describe() if self.planning is not None else None
        num_blocks = self.backbone.num_blocks
        shapes = self.shapes
        return {
            "plans": plans,
            "model": self.loaded.name,
            "num_blocks": num_blocks,
            "adapted_modules": len(self.ranks),
            "adapter_parameters": sum(w.A.numel() + w.B.numel() for w in self.state.global_adapters.values()),
            "devices": {
                d.device_id: {
                    "split_layer": d.split_layer if self.placement.uses_server() else num_blocks,
                    "train_examples": self.shard_sizes[d.device_id],
                    "adapted_modules": len(d.modules),
                    "resident_bytes": d.resident_bytes(),
                    "predicted_resident_bytes": frozen_bytes(shapes, len(d.part.blocks), d.part.head),
                }
                for d in self.devices
            },
            "held_out_examples": len(self.held_out),
            "runtime": {"server_device": str(self.runtime.server_device), "device_device": str(self.runtime.device_device),
                        "dtype": self.runtime.dtype_name, "dtype_reason": self.runtime.dtype_reason,
                        "base_quantization": self.runtime.quantization,
                        "gradient_checkpointing": self.runtime.gradient_checkpointing},
            "machine": machine_info(self.runtime),
        }


def _clipped(text: str, limit: int = 200) -> str:
    """`text` on one line, at most `limit` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def start_state_of(adapters: AdapterSet) -> Callable[[str, dict[str, int]], AdapterSet]:
    """A `SplitServer.start_state` that serves the same `adapters` to every holder (benchmarks, tests)."""
    return lambda holder, ranks: {name: adapters[name] for name in ranks}
