"""The server's half of a `dlora` step: remote adapter branches.

The server runs every frozen block (in the hybrid, blocks [k, L)) in a worker thread that pauses at every adapted linear whose
adapter is active on the device: a forward hook sends the linear's input (BRANCH_INPUTS, one
message per group of linears sharing an input) and adds the branch outputs the device sends
back; one autograd Function per group asks the device for dL/dx in backward. Autograd drives the
order, so any model family works without per-family code. Killed adapters (`KILL`) live here
and are added by the hook itself; with `kill_revive.server_trains_killed` the session also trains
them, with its own AdamW, from the gradients its backward reaches anyway (`step_killed`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, KeysView, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splitpeft.model.adapters import LoraWeights
from splitpeft.model.guards import gradient_problem
from splitpeft.placements.base import ServerSide
from splitpeft.transport.messages import Kind, Message, MessageError, Meta

log = logging.getLogger(__name__)


STEP_TIMEOUT_S = 600.0
KILLED_NORMS_TENSOR = "killed_grad_norms"  # STEP_DONE: the killed adapters' gradient norms, (n,) float32


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
            Message(Kind.BRANCH_INPUTS, {"x": x.detach()}, meta={Meta.CALL: call, Meta.MODULES: list(names)}),
            Kind.BRANCH_OUTPUTS,
        )
        outputs = []
        for name in names:
            d_out = session.out_features[name]
            outputs.append(reply.tensor(name, shape=(*x.shape[:-1], d_out), dtype=x.dtype, device=x.device).clone())
        ctx.session, ctx.names, ctx.call, ctx.x_shape, ctx.dtype, ctx.device = session, names, call, x.shape, x.dtype, x.device
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        session = ctx.session
        tensors = {}
        for name, grad in zip(ctx.names, grads):
            tensors[name] = grad if grad is not None else torch.zeros(*ctx.x_shape[:-1], session.out_features[name], dtype=ctx.dtype, device=ctx.device)
        input_grad = bool(ctx.needs_input_grad[0])
        reply = session.link.request(
            Message(Kind.BRANCH_GRADS, tensors,
                    meta={Meta.CALL: ctx.call, Meta.MODULES: list(ctx.names), Meta.INPUT_GRAD: input_grad}),
            Kind.BRANCH_INPUT_GRAD,
        )
        if not input_grad:
            return None, None, None, None
        return reply.tensor("grad", shape=tuple(ctx.x_shape), dtype=ctx.dtype, device=ctx.device), None, None, None


def own_thread_backward() -> torch.autograd.set_multithreading_enabled:
    """Run a backward that waits on a device on the calling thread (a session's worker).

    On an accelerator, autograd runs backward on one engine thread per device. A server backward
    that pauses in `RemoteBranches.backward` for a device's answer would hold that thread, and
    every other backward on the GPU would wait behind it: the in-process simulation's own device
    step (its branch backward, on the same GPU) forever, and over gRPC every other session's step
    until this device answers. With multithreaded backward off for this thread only, the pause
    holds only the session's own worker."""
    return torch.autograd.set_multithreading_enabled(False)


@dataclass
class DLoRASession:
    """Server-side state of one device's dlora training: which adapters are remote, which killed."""

    active: set[str]
    scales: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)  # as the device opened the session with
    in_features: dict[str, int] = field(default_factory=dict)
    out_features: dict[str, int] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    link: _Link = field(default_factory=_Link)
    worker: threading.Thread | None = None
    calls: int = 0
    cache: dict[tuple[str, int], dict[str, torch.Tensor]] = field(default_factory=dict)
    killed_grad_norms: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the session runs
    anchor: torch.Tensor = field(default_factory=lambda: torch.zeros((), requires_grad=True))
    _killed_params: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    wave: Any = None  # the shared pass of its current step (dlora/wave.py), if batched
    # `kill_revive.server_trains_killed`: the killed adapters train here, AdamW at the run's lr and
    # weight decay; their moments are kept by name while the session lives (a re-KILL after
    # aggregation keeps them, as the device keeps its own across rounds).
    train_killed: bool = False
    lr: float = 1e-3
    weight_decay: float = 0.0
    _killed_optimizer: torch.optim.AdamW | None = None
    _killed_moments: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def next_call(self) -> int:
        self.calls += 1
        return self.calls

    def begin_step(self) -> None:
        """Number this step's remote calls from 1 again: a call names a group within one step, so a
        message's size never depends on how many steps the session has lived (a session reopened
        from a checkpoint sends the bytes an uninterrupted one sends)."""
        self.calls = 0

    def hook(self, name: str) -> Callable[[torch.nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
        def add_branch(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            if name in self.killed:
                return (output + self.killed_branch(name, x)).to(output.dtype)
            if name not in self.active:
                return output
            key = (self.groups[name], id(x))
            if key not in self.cache:
                names = tuple(n for n, g in self.groups.items() if g == self.groups[name] and n in self.active)
                self.cache[key] = dict(zip(names, _RemoteGroup.apply(x, self.anchor, self, names)))
            return output + self.cache[key][name]

        return add_branch

    def killed_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """s B A x of killed adapter `name`, which the server holds and computes (fp32)."""
        a, b = self._killed_params[name]
        return self.scales[name] * (x.to(a.dtype) @ a.T) @ b.T

    @property
    def killed(self) -> KeysView[str]:
        """The adapters the device killed, which this session holds and computes."""
        return self._killed_params.keys()

    @property
    def tracks_killed(self) -> bool:
        """Whether this step's backward must reach the killed adapters (norms asked, or training them)."""
        return self.killed_grad_norms or (self.train_killed and bool(self._killed_params))

    def check_killed(self, weights: Mapping[str, LoraWeights]) -> None:
        """MessageError naming the first adapter of a KILL the server cannot take: one the device
        does not run here, or a pair whose shapes are not the module's at the session's rank, or
        not floating point. Nothing is changed before every adapter passed (an empty KILL changes
        nothing)."""
        for name, value in weights.items():
            if name not in self.active and name not in self._killed_params:
                raise MessageError(f"KILL of adapter {name[:120]!r}, which this session does not run")
            rank = self.ranks[name]
            a_shape, b_shape = (rank, self.in_features[name]), (self.out_features[name], rank)
            if tuple(value.A.shape) != a_shape or tuple(value.B.shape) != b_shape:
                raise MessageError(f"KILL of {name}: A{tuple(value.A.shape)} and B{tuple(value.B.shape)}, expected "
                                   f"A{a_shape} and B{b_shape} (rank {rank})")
            if not (value.A.is_floating_point() and value.B.is_floating_point()):
                raise MessageError(f"KILL of {name}: A and B must be floating point, not {value.A.dtype} and {value.B.dtype}")

    def set_killed(self, weights: dict[str, LoraWeights]) -> None:
        """Hold and compute `weights` (checked by `check_killed` where they come from a device)."""
        self._save_moments()
        for name, value in weights.items():
            self.active.discard(name)
            self._killed_params[name] = (value.A.to(self.device, copy=True), value.B.to(self.device, copy=True))
        self._rebuild_optimizer()

    def killed_weights(self, names: Sequence[str]) -> dict[str, LoraWeights]:
        """The killed adapters `names` as the server holds them now (trained here, or as handed)."""
        return {name: LoraWeights(*(p.detach().to("cpu", copy=True) for p in self._killed_params[name])) for name in names}

    def revive(self, names: Sequence[str]) -> dict[str, LoraWeights]:
        handed = self.killed_weights(names)
        self._save_moments()
        for name in names:
            self._killed_params.pop(name)
            self._killed_moments.pop(name, None)  # the device trains it again, with its own moments
            self.active.add(name)
        self._rebuild_optimizer()
        return handed

    def _save_moments(self) -> None:
        """Keep the AdamW state of every killed adapter by name, before its tensors are replaced."""
        optimizer = self._killed_optimizer
        if optimizer is None:
            return
        for name, params in self._killed_params.items():
            states = [optimizer.state.get(p) for p in params]
            if all(states):
                self._killed_moments[name] = [dict(state) for state in states if state is not None]

    def _rebuild_optimizer(self) -> None:
        """One AdamW over the killed adapters' tensors, with each one's saved moments."""
        if not self.train_killed:
            return
        params = [p for pair in self._killed_params.values() for p in pair]
        self._killed_optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay) if params else None
        if self._killed_optimizer is None:
            return
        for name, pair in self._killed_params.items():
            for p, state in zip(pair, self._killed_moments.get(name, [])):
                if state["exp_avg"].shape == p.shape:
                    self._killed_optimizer.state[p] = dict(state)

    def moments(self) -> dict[str, list[dict[str, Any]]]:
        """Each killed adapter's AdamW state ([A's, B's]: step, exp_avg, exp_avg_sq), as a
        checkpoint keeps it (`train_killed`; {} otherwise)."""
        self._save_moments()
        return {name: [dict(state) for state in states] for name, states in sorted(self._killed_moments.items())
                if name in self._killed_params}

    def load_moments(self, moments: dict[str, list[dict[str, Any]]]) -> None:
        """Take a checkpoint's `moments` for the adapters the device kills again at its next phase."""
        self._killed_moments = {name: [dict(state) for state in states] for name, states in moments.items()}
        self._rebuild_optimizer()

    def step_killed(self) -> None:
        """One AdamW step of the killed adapters from this step's gradients (`train_killed`), then
        drop the gradients. Gradients that are not finite or too large for AdamW's moments
        (`gradient_problem`) fail the step (MessageError) and change nothing."""
        if not self.train_killed or self._killed_optimizer is None:
            return
        named = [(f"{name}.{part}", p) for name, pair in self._killed_params.items() for part, p in zip("AB", pair)]
        problem = gradient_problem(named)
        if problem is not None:
            self._killed_optimizer.zero_grad(set_to_none=True)
            raise MessageError(f"killed adapters' step refused: {problem}")
        self._killed_optimizer.step()
        self._killed_optimizer.zero_grad(set_to_none=True)

    def killed_norms_tensor(self) -> tuple[list[str], torch.Tensor]:
        """The killed adapters' names, sorted, and the gradient norm sqrt(||dA||^2 + ||dB||^2) of each
        on this step (0 where backward never reached it) as one (n,) float32 tensor: how STEP_DONE
        carries them, so the frame's size depends on the killed set, never on the norms' digits (as
        JSON numbers would)."""
        names = sorted(self._killed_params)
        norms = []
        for name in names:
            squares = [(p.grad.float()**2).sum() for p in self._killed_params[name] if p.grad is not None]
            norms.append(torch.stack(squares).sum().sqrt() if squares else torch.zeros(()))
        return names, torch.stack(norms).float().cpu() if norms else torch.zeros(0)

    def killed_norms_reply(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """STEP_DONE's metadata and tensors for the killed adapters' gradient norms (empty where not asked)."""
        if not self.killed_grad_norms:
            return {}, {}
        names, norms = self.killed_norms_tensor()
        return {Meta.KILLED_GRAD_NORMS: names}, {KILLED_NORMS_TENSOR: norms}


def install_server_hooks(session: ServerSide, modules: Sequence[str], ranks: Mapping[str, int],
                         scales: dict[str, float]) -> DLoRASession:
    """Hook every adapted linear of the session's (adapter-free) model copy."""
    by_name = dict(session.model.named_modules())
    training = session.training
    state = DLoRASession(active=set(modules), scales=dict(scales), ranks={name: ranks[name] for name in modules},
                         groups=input_groups(modules), device=session.torch_device,
                         anchor=torch.zeros((), requires_grad=True, device=session.torch_device),
                         train_killed=training.train_killed, lr=training.lr, weight_decay=training.weight_decay)
    for name in modules:
        module = by_name[name]
        weight = module.weight
        conv1d = module.__class__.__name__ == "Conv1D"  # GPT-2's linears store the weight transposed
        state.out_features[name] = int(weight.shape[1] if conv1d else weight.shape[0])
        state.in_features[name] = int(weight.shape[0] if conv1d else weight.shape[1])
        module.register_forward_hook(state.hook(name))
    return state


def _server_worker(session: ServerSide, state: DLoRASession, hidden: torch.Tensor) -> None:
    """One dlora step of the server: forward to FINAL_HIDDEN, then backward on HEAD_GRADIENT.

    The last thing the worker does is put its final reply, so the device's next step never finds
    the previous one still cleaning up (the handler also joins the finished thread).
    """
    link = state.link
    track = state.tracks_killed
    state.begin_step()
    try:
        for a, b in state._killed_params.values():
            a.requires_grad_(track)
            b.requires_grad_(track)
            a.grad = b.grad = None
        backbone = session.backbone
        hybrid = session.split_layer > 0  # the device ran blocks [0, k) and needs dL/dh_k back
        if hybrid:
            hidden.requires_grad_()
        final = backbone.blocks(hidden, session.split_layer, backbone.num_blocks)  # (B, T, d)
        state.cache.clear()
        reply = link.request(Message(Kind.FINAL_HIDDEN, {"hidden": final.detach()}), Kind.HEAD_GRADIENT)
        grad = reply.tensor("grad", shape=final.shape, dtype=final.dtype, device=final.device)
        if final.requires_grad:
            with own_thread_backward():
                final.backward(grad)
        session.tokens += served_tokens(reply.meta.get(Meta.TOKENS, 0), hidden)
        meta, tensors = state.killed_norms_reply()  # the norms of this step's gradients, before they are used
        state.step_killed()
        if hybrid:
            tensors["grad"] = session.outgoing_grad(hidden)
        last = Message(Kind.STEP_DONE, tensors, meta=meta)
    except Exception as error:  # report to the device, never leave it waiting
        log.warning("dlora step for %s failed: %s", session.device_id, error)
        last = Message(Kind.ERROR, meta={Meta.ERROR: str(error)})
    finally:
        state.cache.clear()
        for a, b in state._killed_params.values():
            a.requires_grad_(False)
            b.requires_grad_(False)
    link.to_device.put(last)


def served_tokens(claimed: Any, hidden: torch.Tensor) -> int:
    """The tokens one dlora step counts for its device: the device's claim (the server never sees
    the labels), never more than the B x T positions of the activations `hidden` (B, T, d) the
    server computed for it. A claim that is not a non-negative integer fails the step."""
    if isinstance(claimed, bool) or not isinstance(claimed, int) or claimed < 0:
        raise MessageError(f"token count {claimed!r} is not a non-negative integer")
    return min(claimed, int(hidden.shape[0]) * int(hidden.shape[1]))


def abort_step(state: DLoRASession) -> None:
    """Unblock a worker waiting for a device that sent garbage (it ends with an error)."""
    if state.worker is not None and state.worker.is_alive():
        state.link.from_device.put(Message(Kind.ERROR, meta={Meta.ERROR: "step aborted"}))
        state.worker.join(timeout=10)
