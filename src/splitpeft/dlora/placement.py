"""The `dlora` placement (DLoRA): the server runs every frozen block, the device keeps its data,
the embedding, the head, the loss, and computes every *active* adapter branch.

Per step (B, T tokens; d_in / d_out of each adapted linear)::

    device                                   server
    embed(ids) ---- ACTIVATIONS (B,T,d) ---> blocks 0..L-1, frozen; at each adapted linear group
               <--- BRANCH_INPUTS x (B,T,d_in) --  (linears sharing an input share one message)
    s B A x    ---- BRANCH_OUTPUTS (B,T,d_out) each ->  y = W x + branch
               <--- FINAL_HIDDEN (B,T,d) -------
    head, loss ---- HEAD_GRADIENT (B,T,d) -->  backward through the blocks; at each group:
               <--- BRANCH_GRADS (B,T,d_out) each
    backward   ---- BRANCH_INPUT_GRAD (B,T,d_in) ->
               <--- STEP_DONE ------------------
    optimiser step on the active adapters

Killed adapters (Kill and Revive) are frozen and handed to the server (KILL), which adds their
branch itself from then on: they cost the device no compute and no traffic. REVIVE hands them back.

The server's half runs in a worker thread that pauses at every remote branch: autograd drives the
order (forward hooks on the adapted linears; one autograd Function per input group whose backward
asks the device), so any model family works without per-family code. The device-side branch is
computed by hand from peft's own lora_A / lora_B modules, because peft's layer needs the frozen
base linear, which the device does not hold.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from splitpeft.config import ExperimentConfig, failed_checks
from splitpeft.data.batching import Batch
from splitpeft.dlora.remote import (
    KILLED_NORMS_TENSOR,
    STEP_TIMEOUT_S,
    DLoRASession,
    _Link,
    _server_worker,
    abort_step,
    input_groups,
    install_server_hooks,
)
from splitpeft.dlora.wave import DLoRAWave
from splitpeft.model.adapters import (
    AdapterError,
    from_tensors,
    lora_branch,
    lora_layers,
    read_adapters,
    to_tensors,
    write_adapters,
)
from splitpeft.model.adapters import scale as lora_scale
from splitpeft.model.loss import head_loss
from splitpeft.model.parts import Part
from splitpeft.placements.base import DeviceSide, ServerSide, backward_from_cut, freeze_locally
from splitpeft.transport.channel import Channel
from splitpeft.transport.messages import Kind, Message, MessageError, Meta

if TYPE_CHECKING:
    from splitpeft.hsplit.memory import ModelShapes
    from splitpeft.model.batched import BatchedPass


@dataclass
class DLoRAPlacement:
    """Cloud-device placement of DLoRA; `kill_revive` (a KillRevive policy) may be attached by the device."""

    name: str = field(default="dlora", init=False)
    parks_server_sessions: bool = field(default=False, init=False)  # its sessions' models carry the device's branch hooks
    steps_in_device_waves: bool = field(default=False, init=False)
    plans_splits: bool = field(default=False, init=False)
    server_trains_adapters: bool = field(default=False, init=False)

    def fixed_split(self, config: ExperimentConfig) -> int:
        return config.placement.dlora_device_blocks  # the hybrid's blocks on the device (0 as published)

    def config_problems(self, config: ExperimentConfig) -> list[str]:
        return failed_checks([
            (config.federation.noise_free_start == "cold",
             "federation.noise_free_start=warm: under dlora the server runs every device's frozen blocks on its one "
             "shared copy, which cannot hold a per-device residual; use cold"),
            (config.runtime.dtype != "fp16", "runtime.dtype=fp16: dlora's remote branches have no loss scaling; use bf16"),
            (config.privacy.nopeek_weight == 0 or config.hsplit.plans_per_device() or config.placement.dlora_device_blocks > 0,
             "privacy.nopeek_weight trains device adapters before the cut: needs placement.split_layer >= 1 "
             "(split) or placement.dlora_device_blocks >= 1 (dlora)"),
        ])

    def block_problems(self, config: ExperimentConfig, num_blocks: int) -> list[str]:
        k = config.placement.dlora_device_blocks
        return failed_checks([(k < num_blocks, f"placement.dlora_device_blocks {k} is out of range: {config.model.name} has "
                                               f"{num_blocks} blocks, so dlora's hybrid keeps 0..{num_blocks - 1} of them")])

    def step_frame_width(self, shapes: ModelShapes) -> int:
        """d at the cut (the embeddings), or wider: a linear group's d_in or the sum of its d_out."""
        groups: dict[str, list[str]] = {}
        for name, group in input_groups(list(shapes.modules)).items():
            groups.setdefault(group, []).append(name)
        width = shapes.hidden_size
        for members in groups.values():
            width = max(width, shapes.modules[members[0]][0], sum(shapes.modules[m][1] for m in members))
        return width

    def sends_labels(self) -> bool:
        return False

    def exposure_name(self) -> str | None:
        return "dlora"

    def device_blocks(self, num_blocks: int, split_layer: int) -> range:
        if not 0 <= split_layer < num_blocks:
            raise ValueError(f"dlora's hybrid keeps blocks [0, k) on the device: k = {split_layer} must be in 0..{num_blocks - 1}")
        return range(0, num_blocks)  # the device owns every block's adapters ...

    def server_blocks(self, num_blocks: int, split_layer: int) -> range:
        return range(0)  # the server trains no adapters of its own; it runs the killed ones

    def server_part(self, num_blocks: int, split_layer: int) -> Part:
        return Part(range(split_layer, num_blocks), embedding=False, head=False)  # the device embeds

    def device_part(self, num_blocks: int, split_layer: int) -> Part:
        # ... but only the frozen weights of the blocks it runs itself: none in DLoRA as published,
        # [0, k) in the hybrid (k = placement.dlora_device_blocks).
        return Part(range(split_layer), embedding=True, head=True)

    def killed_on_device(self, device: DeviceSide, names: Collection[str]) -> list[str]:
        """The hybrid's own blocks [0, k) stay on the device, killed or not; the rest the server runs."""
        own = tuple(device.backbone.block_prefix(j) for j in range(device.split_layer))
        return sorted(n for n in names if n.startswith(own)) if own else []

    def device_keeps_head(self) -> bool:
        return True

    def uses_server(self) -> bool:
        return True

    # ------------------------------------------------------------------ device side

    def device_step(self, device: DeviceSide, batch: Batch, channel: Channel) -> float:
        backbone, meter = device.backbone, device.meter
        layers = lora_layers(device.model)
        with meter.compute():
            embedded = backbone.embed(batch.input_ids)  # (B, T, d); frozen, so no graph is kept
            # The hybrid runs its own blocks [0, k) first (k = 0: the embeddings themselves).
            cut = device.defence.release(backbone.blocks(embedded, 0, device.split_layer))  # (B, T, d)
        reply = channel.exchange(Message(Kind.ACTIVATIONS, {"hidden": cut.detach()},
                                         meta={Meta.KILLED_GRAD_NORMS: device.measure_killed}))
        pending: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        while reply.kind == Kind.BRANCH_INPUTS:
            names = [str(n) for n in reply.meta.get(Meta.MODULES, [])]
            unknown = [n for n in names if n not in layers or n in device.killed]
            if unknown:
                raise MessageError(f"server asked for adapters this device does not run: {unknown[:3]}")
            x = reply.tensor("x", shape=(*embedded.shape[:2], None), dtype=embedded.dtype, device=embedded.device).requires_grad_()
            with meter.compute(adapters=True):
                outputs = {name: lora_branch(layers[name], x) for name in names}  # (B, T, d_out) each
            pending[int(reply.meta[Meta.CALL])] = (x, outputs)
            reply = channel.exchange(Message(Kind.BRANCH_OUTPUTS, {n: o.detach() for n, o in outputs.items()},
                                             meta={Meta.CALL: reply.meta[Meta.CALL]}))
        reply.expect(Kind.FINAL_HIDDEN)
        final = reply.tensor("hidden", shape=embedded.shape, dtype=embedded.dtype, device=embedded.device).requires_grad_()
        with meter.compute():
            loss = head_loss(backbone.head, final, batch.labels)
            loss.backward()
        assert final.grad is not None  # the head's backward reached it
        reply = channel.exchange(Message(Kind.HEAD_GRADIENT, {"grad": device.defence.release_gradient(final.grad)},
                                         meta={Meta.TOKENS: batch.completion_tokens}))
        while reply.kind == Kind.BRANCH_GRADS:
            call = int(reply.meta.get(Meta.CALL, -1))
            if call not in pending:
                raise MessageError(f"BRANCH_GRADS for unknown call {call}")
            x, outputs = pending.pop(call)
            grads = [reply.tensor(n, shape=o.shape, dtype=o.dtype, device=o.device) for n, o in outputs.items()]
            with meter.compute(adapters=True):
                torch.autograd.backward(list(outputs.values()), grads)
            # The first block's input needs no gradient (the embedding is frozen): send none.
            up: dict[str, torch.Tensor] = {}
            if reply.meta.get(Meta.INPUT_GRAD, True):
                assert x.grad is not None  # every branch output depends on x
                up["grad"] = x.grad
            reply = channel.exchange(Message(Kind.BRANCH_INPUT_GRAD, up, meta={Meta.CALL: call}))
        reply.expect(Kind.STEP_DONE)
        named = reply.meta.get(Meta.KILLED_GRAD_NORMS)
        if named is not None:
            if not isinstance(named, list) or not all(isinstance(n, str) and n in device.killed for n in named):
                raise MessageError("STEP_DONE names gradient norms of adapters this device has not killed")
            norms = reply.tensor(KILLED_NORMS_TENSOR, shape=(len(named),), dtype=torch.float32)
            device.grad_norms.update(zip(named, norms.tolist()))
        if cut.requires_grad:  # the hybrid: the server's gradient for h_k, into blocks [0, k) (metered there)
            grad = reply.tensor("grad", shape=cut.shape, dtype=cut.dtype, device=cut.device)
            backward_from_cut(device, embedded, cut, grad, batch)
        with meter.compute():
            device.optimizer_step()
        return loss.item()

    def apply_kill_revive(self, device: DeviceSide, channel: Channel, kill: list[str], revive: list[str]) -> None:
        """Hand killed adapters (frozen) to the server; take revived ones back from it."""
        own = set(self.killed_on_device(device, [*kill, *revive]))  # the hybrid's blocks [0, k): local
        handed = [n for n in kill if n not in own]
        taken = [n for n in revive if n not in own]
        if handed:
            weights = read_adapters(device.model, handed)
            channel.exchange(Message(Kind.KILL, to_tensors(weights))).expect(Kind.SESSION_READY)
        if taken:
            taken_from_server(device, channel, taken, keep_killed=False)
        freeze_locally(device, kill, revive)

    def collect_killed(self, device: DeviceSide, channel: Channel) -> list[str]:
        """With `kill_revive.server_trains_killed`, fetch the killed adapters the server trained
        this phase (REVIVE with KEEP_KILLED: they stay killed there) into the device's model."""
        if not device.training.train_killed:
            return []
        own = set(self.killed_on_device(device, device.killed))  # the hybrid's blocks [0, k): frozen here
        names = sorted(n for n in device.killed if n not in own)
        if names:
            taken_from_server(device, channel, names, keep_killed=True)
        return names

    # ------------------------------------------------------------------ server side

    def open_server_session(self, session: ServerSide, meta: Mapping[str, Any], adaptable: Collection[str]) -> None:
        """Hook the adapters the device runs (its OPEN_SESSION's ranks, checked against the
        model's adaptable linears) into the session's adapter-free model copy."""
        ranks = meta.get(Meta.RANKS)
        if not isinstance(ranks, dict) or not ranks:
            raise MessageError("OPEN_SESSION for dlora needs the device's adapter ranks")
        unknown = [name for name in ranks if name not in adaptable]
        if unknown:
            raise MessageError(f"unknown adapted modules: {unknown[:3]}")
        if not all(isinstance(r, int) and not isinstance(r, bool) and 0 < r <= 4096 for r in ranks.values()):
            raise MessageError("adapter ranks must be integers in 1..4096")
        alpha = session.alpha  # the server's own setting, never the device's word
        own = tuple(session.backbone.block_prefix(j) for j in range(session.split_layer))  # the hybrid's, on the device
        remote = sorted(name for name in ranks if not (own and name.startswith(own)))
        session.step_state = install_server_hooks(
            session, remote, ranks, {name: lora_scale(alpha, ranks[name], session.rslora) for name in remote})

    def abort(self, session: ServerSide) -> None:
        state = session.step_state
        if state is None:
            return
        if state.wave is not None:
            state.wave.drop(session.device_id)
        else:
            abort_step(state)

    # ------------------------------------------------------------------ server side, many devices at once

    def wave_key(self, session: ServerSide, message: Message) -> Hashable | None:
        """ACTIVATIONS of sessions with no step in progress start one shared pass (`dlora/wave.py`);
        every later message of such a step goes to its pass; KILL / REVIVE are served alone."""
        state: DLoRASession | None = session.step_state
        if state is None:
            return None
        if state.wave is not None:
            return ("dlora", id(state.wave))
        if message.kind == Kind.ACTIVATIONS and (state.worker is None or not state.worker.is_alive()):
            return ("dlora", "forward")
        return None

    def server_wave(self, batched: BatchedPass, steps: Sequence[tuple[ServerSide, Message]]) -> list[Message | Exception | None]:
        if steps[0][1].kind == Kind.ACTIVATIONS and steps[0][0].step_state.wave is None:
            results: list[Message | Exception | None] = [None] * len(steps)
            if batched.in_use:
                # Another pass's forward holds the shared one: these devices fell out of step with
                # it (one served a KILL or REVIVE alone). No reply yet: they offer these steps
                # again and start the next pass once that forward has ended.
                return results
            starting = []
            for i, (session, message) in enumerate(steps):
                state: DLoRASession = session.step_state
                try:
                    hidden = message.tensor("hidden", shape=(None, None, session.hidden_size), dtype=session.dtype,
                                            device=session.torch_device)
                except MessageError as error:
                    results[i] = error
                    continue
                state.killed_grad_norms = bool(message.meta.get(Meta.KILLED_GRAD_NORMS, False)) and bool(state.killed)
                starting.append((session, state, message, hidden))
            if starting:
                _, first = DLoRAWave.start(batched, starting)
                for i, (session, _) in enumerate(steps):
                    if session.device_id in first:
                        results[i] = first[session.device_id]
            return results
        wave: DLoRAWave = steps[0][0].step_state.wave
        replies = wave.deliver({session.device_id: message for session, message in steps})
        return [replies[session.device_id] for session, _ in steps]

    def server_step(self, session: ServerSide, message: Message) -> Message:
        state: DLoRASession = session.step_state
        if message.kind == Kind.KILL:
            weights = from_tensors(message.tensors)
            state.check_killed(weights)
            state.set_killed(weights)
            return Message(Kind.SESSION_READY, meta={Meta.KILLED: sorted(state.killed)})
        if message.kind == Kind.REVIVE:
            names = message.meta.get(Meta.MODULES, [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise MessageError("REVIVE's modules must be a list of adapter names")
            if len(set(names)) != len(names):
                raise MessageError(f"REVIVE names an adapter twice: {sorted(n for n in set(names) if names.count(n) > 1)[:3]}")
            missing = [n for n in names if n not in state.killed]
            if missing:
                raise MessageError(f"cannot revive adapters that are not killed: {missing[:3]}")
            if message.meta.get(Meta.KEEP_KILLED, False) is True:
                return Message(Kind.REVIVE, to_tensors(state.killed_weights(names)))
            return Message(Kind.REVIVE, to_tensors(state.revive(names)))
        if message.kind == Kind.ACTIVATIONS:
            if state.worker is not None:
                state.worker.join(timeout=1.0)  # the previous step has replied; let its thread end
                if state.worker.is_alive():
                    raise MessageError("a dlora step is already in progress")
            hidden = message.tensor("hidden", shape=(None, None, session.hidden_size), dtype=session.dtype, device=session.torch_device)
            state.killed_grad_norms = bool(message.meta.get(Meta.KILLED_GRAD_NORMS, False)) and bool(state.killed)
            state.link = _Link()
            state.worker = threading.Thread(target=_server_worker, args=(session, state, hidden), daemon=True)
            state.worker.start()
        elif state.worker is None or not state.worker.is_alive():
            raise MessageError(f"unexpected {message.kind.name}: no dlora step in progress")
        else:
            state.link.from_device.put(message)
        try:
            return state.link.to_device.get(timeout=STEP_TIMEOUT_S)
        except queue.Empty:
            raise MessageError("server step did not produce a reply in time") from None


def taken_from_server(device: DeviceSide, channel: Channel, names: list[str], *, keep_killed: bool) -> None:
    """Ask the server for the killed adapters `names` (REVIVE; with `keep_killed` they stay killed
    there) and write them into the device's model, once they are exactly those adapters, at the
    model's shapes, and finite: a server's bad answer is a MessageError and changes nothing."""
    meta: dict[str, Any] = {Meta.MODULES: list(names)}
    if keep_killed:
        meta[Meta.KEEP_KILLED] = True
    reply = channel.exchange(Message(Kind.REVIVE, meta=meta)).expect(Kind.REVIVE)
    returned = from_tensors(reply.tensors)
    if sorted(returned) != sorted(names):
        raise MessageError("server returned other adapters than the ones asked for")
    for name, weights in returned.items():
        if not (bool(torch.isfinite(weights.A).all()) and bool(torch.isfinite(weights.B).all())):
            raise MessageError(f"server returned {name} with NaN or Inf")
    try:
        write_adapters(device.model, returned)  # checks every shape before writing any
    except AdapterError as error:
        raise MessageError(f"server returned adapters not the device's: {error}") from error
