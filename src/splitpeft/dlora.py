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

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .adapters import ADAPTER_NAME, LoraWeights, from_tensors, lora_layers, read_adapters, to_tensors, write_adapters
from .channel import Channel
from .data import Batch
from .messages import Kind, Message, MessageError, finite
from .placement import causal_lm_loss, freeze_locally

if TYPE_CHECKING:
    from .devices import DeviceRuntime
    from .server import ServerSession

log = logging.getLogger(__name__)

STEP_TIMEOUT_S = 600.0


def input_groups(module_names: Sequence[str]) -> dict[str, str]:
    """Module -> group key; linears of one block that read the same input share a group.

    LLaMA family: {q, k, v} read the attention input, {gate, up} the MLP input; o and down read
    their own. GPT-2's four linears each read a different tensor.
    """
    shared = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
    groups = {}
    for name in module_names:
        parent, leaf = name.rsplit(".", 1)
        block = parent.rsplit(".", 1)[0] if leaf in shared else parent
        groups[name] = f"{block}:{shared.get(leaf, leaf)}"
    return groups


def branch(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """The LoRA branch s * B A x of a peft layer, without its base linear: (..., d_in) -> (..., d_out)."""
    a, b = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
    return b(a(layer.lora_dropout[ADAPTER_NAME](x))) * layer.scaling[ADAPTER_NAME]


# ------------------------------------------------------------------------------------ server side


class _Link:
    """The server worker's line to the device: put a request, wait for the device's next message."""

    def __init__(self) -> None:
        self.to_device: queue.Queue[Message] = queue.Queue()
        self.from_device: queue.Queue[Message] = queue.Queue()

    def request(self, message: Message, *expected: Kind) -> Message:
        self.to_device.put(message)
        try:
            reply = self.from_device.get(timeout=STEP_TIMEOUT_S)
        except queue.Empty:
            raise MessageError("device did not answer within the step timeout") from None
        return reply.expect(*expected)


class _RemoteGroup(torch.autograd.Function):
    """Branch outputs of one input group, computed on the device; backward asks it for dL/dx."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, session: DLoRASession,
                names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
        # `anchor` is a scalar that requires grad: it makes the outputs part of the graph even
        # when x does not need a gradient (the first block's input), so backward reaches the device.
        call = session.next_call()
        reply = session.link.request(
            Message(Kind.BRANCH_INPUTS, {"x": x.detach()}, meta={"call": call, "modules": list(names)}),
            Kind.BRANCH_OUTPUTS,
        )
        outputs = []
        for name in names:
            d_out = session.out_features[name]
            outputs.append(reply.tensor(name, shape=(*x.shape[:-1], d_out), dtype=x.dtype).clone())
        ctx.session, ctx.names, ctx.call, ctx.x_shape = session, names, call, x.shape
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        session = ctx.session
        tensors = {}
        for name, grad in zip(ctx.names, grads):
            tensors[name] = grad if grad is not None else torch.zeros(*ctx.x_shape[:-1], session.out_features[name])
        input_grad = bool(ctx.needs_input_grad[0])
        reply = session.link.request(
            Message(Kind.BRANCH_GRADS, tensors,
                    meta={"call": ctx.call, "modules": list(ctx.names), "input_grad": input_grad}),
            Kind.BRANCH_INPUT_GRAD,
        )
        if not input_grad:
            return None, None, None, None
        return reply.tensor("grad", shape=tuple(ctx.x_shape), dtype=tensors[ctx.names[0]].dtype), None, None, None


@dataclass
class DLoRASession:
    """Server-side state of one device's dlora training: which adapters are remote, which killed."""

    active: set[str]
    killed: dict[str, LoraWeights] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)
    out_features: dict[str, int] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    link: _Link = field(default_factory=_Link)
    worker: threading.Thread | None = None
    calls: int = 0
    cache: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    killed_grad_norms: bool = False
    anchor: torch.Tensor = field(default_factory=lambda: torch.zeros((), requires_grad=True))
    _killed_params: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def next_call(self) -> int:
        self.calls += 1
        return self.calls

    def hook(self, name: str) -> Callable[[torch.nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
        def add_branch(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if name in self.killed:
                a, b = self._killed_params[name]
                return output + self.scales[name] * (x @ a.T) @ b.T
            if name not in self.active:
                return output
            key = (self.groups[name], id(x))
            if key not in self.cache:
                names = tuple(n for n, g in self.groups.items() if g == self.groups[name] and n in self.active)
                self.cache[key] = dict(zip(names, _RemoteGroup.apply(x, self.anchor, self, names)))
            return output + self.cache[key][name]

        return add_branch

    def set_killed(self, weights: dict[str, LoraWeights]) -> None:
        for name, value in weights.items():
            self.killed[name] = value
            self.active.discard(name)
            self._killed_params[name] = (value.A.clone(), value.B.clone())

    def revive(self, names: Sequence[str]) -> dict[str, LoraWeights]:
        handed = {}
        for name in names:
            handed[name] = self.killed.pop(name)
            self._killed_params.pop(name)
            self.active.add(name)
        return handed

    def killed_norms(self) -> dict[str, float]:
        return {
            name: float(torch.sqrt(sum((p.grad**2).sum() for p in params if p.grad is not None)))
            for name, params in self._killed_params.items()
        }


def install_server_hooks(session: ServerSession, modules: Sequence[str], scales: dict[str, float]) -> DLoRASession:
    """Hook every adapted linear of the session's (adapter-free) model copy."""
    by_name = dict(session.model.named_modules())
    state = DLoRASession(active=set(modules), scales=dict(scales), groups=input_groups(modules))
    for name in modules:
        module = by_name[name]
        weight = module.weight
        state.out_features[name] = int(weight.shape[1] if module.__class__.__name__ == "Conv1D" else weight.shape[0])
        module.register_forward_hook(state.hook(name))
    return state


def _server_worker(session: ServerSession, state: DLoRASession, hidden: torch.Tensor) -> None:
    """One dlora step of the server: forward to FINAL_HIDDEN, then backward on HEAD_GRADIENT.

    The last thing the worker does is put its final reply, so the device's next step never finds
    the previous one still cleaning up (the handler also joins the finished thread).
    """
    link = state.link
    track = state.killed_grad_norms
    try:
        for a, b in state._killed_params.values():
            a.requires_grad_(track)
            b.requires_grad_(track)
            a.grad = b.grad = None
        backbone = session.backbone
        final = backbone.blocks(hidden, 0, backbone.num_blocks)  # (B, T, d)
        state.cache.clear()
        reply = link.request(Message(Kind.FINAL_HIDDEN, {"hidden": final.detach()}), Kind.HEAD_GRADIENT)
        grad = reply.tensor("grad", shape=final.shape, dtype=final.dtype)
        if final.requires_grad:
            final.backward(grad)
        session.tokens += int(reply.meta.get("tokens", 0))
        meta: dict[str, Any] = {"killed_grad_norms": state.killed_norms()} if track else {}
        last = Message(Kind.STEP_DONE, meta=meta)
    except Exception as error:  # report to the device, never leave it waiting
        log.warning("dlora step for %s failed: %s", session.device_id, error)
        last = Message(Kind.ERROR, meta={"error": str(error)})
    finally:
        state.cache.clear()
        for a, b in state._killed_params.values():
            a.requires_grad_(False)
            b.requires_grad_(False)
    link.to_device.put(last)


@dataclass
class DLoRAPlacement:
    """Cloud-device placement of DLoRA; `kill_revive` (a KillRevive policy) may be attached by the device."""

    name: str = field(default="dlora", init=False)

    def device_blocks(self, num_blocks: int, split_layer: int) -> range:
        return range(0, num_blocks)  # the device owns every block's adapters ...

    def device_holds_blocks(self) -> bool:
        return False  # ... but none of the blocks' frozen weights

    def device_keeps_head(self) -> bool:
        return True

    def uses_server(self) -> bool:
        return True

    # ------------------------------------------------------------------ device side

    def device_step(self, device: DeviceRuntime, batch: Batch, channel: Channel) -> float:
        backbone, meter = device.backbone, device.meter
        layers = lora_layers(device.model)
        with meter.compute():
            embedded = backbone.embed(batch.input_ids)  # (B, T, d); frozen, so no graph is kept
        reply = channel.exchange(Message(Kind.ACTIVATIONS, {"hidden": embedded.detach()},
                                         meta={"killed_grad_norms": device.measure_killed}))
        pending: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        while reply.kind == Kind.BRANCH_INPUTS:
            names = [str(n) for n in reply.meta.get("modules", [])]
            unknown = [n for n in names if n not in layers or n in device.killed]
            if unknown:
                raise MessageError(f"server asked for adapters this device does not run: {unknown[:3]}")
            x = reply.tensor("x", shape=(*embedded.shape[:2], None), dtype=embedded.dtype).requires_grad_()
            with meter.compute(adapters=True):
                outputs = {name: branch(layers[name], x) for name in names}  # (B, T, d_out) each
            pending[int(reply.meta["call"])] = (x, outputs)
            reply = channel.exchange(Message(Kind.BRANCH_OUTPUTS, {n: o.detach() for n, o in outputs.items()},
                                             meta={"call": reply.meta["call"]}))
        reply.expect(Kind.FINAL_HIDDEN)
        final = reply.tensor("hidden", shape=embedded.shape, dtype=embedded.dtype).requires_grad_()
        with meter.compute():
            loss = causal_lm_loss(backbone.head(final), batch.labels)
            loss.backward()
        reply = channel.exchange(Message(Kind.HEAD_GRADIENT, {"grad": final.grad},
                                         meta={"loss": finite(loss.item()), "tokens": batch.completion_tokens}))
        while reply.kind == Kind.BRANCH_GRADS:
            call = int(reply.meta.get("call", -1))
            if call not in pending:
                raise MessageError(f"BRANCH_GRADS for unknown call {call}")
            x, outputs = pending.pop(call)
            grads = [reply.tensor(n, shape=o.shape, dtype=o.dtype) for n, o in outputs.items()]
            with meter.compute(adapters=True):
                torch.autograd.backward(list(outputs.values()), grads)
            # The first block's input needs no gradient (the embedding is frozen): send none.
            up = {"grad": x.grad} if reply.meta.get("input_grad", True) else {}
            reply = channel.exchange(Message(Kind.BRANCH_INPUT_GRAD, up, meta={"call": call}))
        reply.expect(Kind.STEP_DONE)
        device.last_step_meta = reply.meta
        norms = reply.meta.get("killed_grad_norms")
        if isinstance(norms, dict):
            device.grad_norms.update({str(n): float(v) for n, v in norms.items()})
        with meter.compute():
            device.optimizer_step()
        return loss.item()

    def apply_kill_revive(self, device: DeviceRuntime, channel: Channel, kill: list[str], revive: list[str]) -> None:
        """Hand killed adapters (frozen) to the server; take revived ones back from it."""
        if kill:
            weights = read_adapters(device.model, kill)
            channel.exchange(Message(Kind.KILL, to_tensors(weights))).expect(Kind.SESSION_READY)
        if revive:
            reply = channel.exchange(Message(Kind.REVIVE, meta={"modules": list(revive)})).expect(Kind.REVIVE)
            returned = from_tensors(reply.tensors)
            if sorted(returned) != sorted(revive):
                raise MessageError("server returned other adapters than the ones revived")
            write_adapters(device.model, returned)
        freeze_locally(device, kill, revive)

    # ------------------------------------------------------------------ server side

    def server_step(self, session: ServerSession, message: Message) -> Message:
        state: DLoRASession = session.dlora
        if message.kind == Kind.KILL:
            state.set_killed(from_tensors(message.tensors))
            return Message(Kind.SESSION_READY, meta={"killed": sorted(state.killed)})
        if message.kind == Kind.REVIVE:
            names = [str(n) for n in message.meta.get("modules", [])]
            missing = [n for n in names if n not in state.killed]
            if missing:
                raise MessageError(f"cannot revive adapters that are not killed: {missing[:3]}")
            return Message(Kind.REVIVE, to_tensors(state.revive(names)))
        if message.kind == Kind.ACTIVATIONS:
            if state.worker is not None:
                state.worker.join(timeout=1.0)  # the previous step has replied; let its thread end
                if state.worker.is_alive():
                    raise MessageError("a dlora step is already in progress")
            hidden = message.tensor("hidden", shape=(None, None, session.hidden_size), dtype=torch.float32)
            state.killed_grad_norms = bool(message.meta.get("killed_grad_norms", False)) and bool(state.killed)
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


def abort_step(state: DLoRASession) -> None:
    """Unblock a worker waiting for a device that sent garbage (it ends with an error)."""
    if state.worker is not None and state.worker.is_alive():
        state.link.from_device.put(Message(Kind.ERROR, meta={"error": "step aborted"}))
        state.worker.join(timeout=10)

