"""One dlora step of several devices through one pass of the server's frozen blocks
(`server.batch_devices`; the pass is `model/batched.py`, the one-device step `dlora/remote.py`).

Each device's messages are exactly those of its own step (ACTIVATIONS, then BRANCH_INPUTS /
BRANCH_OUTPUTS per remote input group, FINAL_HIDDEN / HEAD_GRADIENT, BRANCH_GRADS /
BRANCH_INPUT_GRAD in backward, STEP_DONE), so the device side does not change. On the server one
worker thread runs the frozen blocks once for every member's rows; at each input group it asks
every member that runs an adapter of the group for its branch outputs on its own rows (one message
each, all at once) and waits for all of them; killed adapters are added on the server for the
rows of the member that killed them; backward asks each member for dL/dx of its rows.

`DLoRAWave.deliver` hands the worker the messages of one wave and returns, for each, the next
message the worker has for that device, or None where it has none yet (the device waits for the
next wave: e.g. a member with no active adapter in a group). A member that sends garbage is
refused alone: its branches count as zero from then on and it gets no more requests.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from splitpeft.dlora.remote import STEP_TIMEOUT_S, DLoRASession, own_thread_backward, served_tokens
from splitpeft.model.batched import BatchedPass, Member, by_member
from splitpeft.placements.base import ServerSide
from splitpeft.transport.messages import Kind, Message, MessageError, Meta

log = logging.getLogger(__name__)


@dataclass
class _Peer:
    """One member of a dlora wave: its session, its dlora state, what it sent and is sent."""

    session: ServerSide
    state: DLoRASession
    member: Member
    outbox: Message | None = None       # the next message for the device
    inbox: Message | None = None        # the device's answer the worker waits for
    delivered: Message | None = None    # the last message handed over (a re-offered one is not taken twice)
    failed: str | None = None           # why it was refused; it then gets no more requests
    tokens: int = 0


@dataclass
class DLoRAWave:
    """The server's side of one dlora step shared by several sessions (see the module docstring)."""

    batched: BatchedPass
    peers: dict[str, _Peer]
    cond: threading.Condition = field(default_factory=threading.Condition)
    waiting_on: set[str] = field(default_factory=set)
    done: bool = False
    worker: threading.Thread | None = None
    holding: bool = True  # it holds `batched` (acquired in `start`) until its forward ends

    @classmethod
    def start(cls, batched: BatchedPass, steps: Sequence[tuple[ServerSide, DLoRASession, Message, torch.Tensor]]
              ) -> tuple[DLoRAWave, dict[str, Message | Exception | None]]:
        """Start the pass for the ACTIVATIONS of several sessions; returns it and each device's first reply."""
        peers = {session.device_id: _Peer(session, state, Member(session, hidden), delivered=message)
                 for session, state, message, hidden in steps}
        wave = cls(batched.acquire(), peers)  # its own pass: it outlives this call (`BatchedPass.acquire`)
        for peer in peers.values():
            peer.state.wave = wave
            peer.state.begin_step()
        wave.worker = threading.Thread(target=wave._run, name="dlora-wave", daemon=True)
        wave.worker.start()
        return wave, wave.deliver({device_id: peer.delivered for device_id, peer in peers.items()
                                   if peer.delivered is not None})

    # ------------------------------------------------------------------ the server's side

    def deliver(self, messages: dict[str, Message]) -> dict[str, Message | Exception | None]:
        """Hand the worker each device's message; the reply each device gets now (None: later)."""
        with self.cond:
            for device_id, message in messages.items():
                peer = self.peers[device_id]
                if peer.delivered is not message and peer.failed is None:
                    peer.delivered, peer.inbox = message, message
            self.cond.notify_all()
            if not self.cond.wait_for(self._settled, timeout=STEP_TIMEOUT_S):
                raise MessageError("the server's dlora pass did not settle in time")
            replies: dict[str, Message | Exception | None] = {}
            for device_id in messages:
                peer = self.peers[device_id]
                if peer.failed is not None and peer.outbox is None:
                    replies[device_id] = MessageError(peer.failed)
                else:
                    replies[device_id], peer.outbox = peer.outbox, None
            return replies

    def _settled(self) -> bool:
        """The worker finished, or waits on devices that have not all answered."""
        if self.done:
            return True
        live = {d for d in self.waiting_on if self.peers[d].failed is None}
        return bool(self.waiting_on) and any(self.peers[d].inbox is None for d in live)

    def drop(self, device_id: str, reason: str = "step aborted") -> None:
        """A member's step was aborted (a bad frame, a lost device): the others go on without it."""
        with self.cond:
            peer = self.peers.get(device_id)
            if peer is not None and peer.failed is None:
                peer.failed = reason
                peer.state.wave = None
            self.cond.notify_all()

    # ------------------------------------------------------------------ the worker

    def exchange(self, requests: dict[str, Message], *expected: Kind) -> dict[str, Message]:
        """Send each device its request and wait for all answers (members refused meanwhile are left out)."""
        with self.cond:
            requests = {d: m for d, m in requests.items() if self.peers[d].failed is None}
            for device_id, message in requests.items():
                self.peers[device_id].outbox = message
            self.waiting_on = set(requests)
            self.cond.notify_all()
            answered = self.cond.wait_for(
                lambda: all(self.peers[d].inbox is not None or self.peers[d].failed is not None for d in requests),
                timeout=STEP_TIMEOUT_S)
            self.waiting_on = set()
            replies = {}
            for device_id in requests:
                peer = self.peers[device_id]
                reply, peer.inbox = peer.inbox, None
                if peer.failed is not None:
                    continue
                if not answered or reply is None:
                    peer.failed = "device did not answer within the step timeout"
                    continue
                try:
                    replies[device_id] = reply.expect(*expected)
                except MessageError as error:
                    peer.failed = str(error)
            return replies

    def _live(self) -> list[_Peer]:
        return [p for p in self.peers.values() if p.failed is None]

    def _joined(self) -> tuple[list[_Peer], list[Member]]:
        """The peers whose rows are in the pass so far, and their members, in row order."""
        members = list(self.batched.joined())
        by_member_id = {id(p.member): p for p in self.peers.values()}
        return [by_member_id[id(m)] for m in members], members

    def _release(self) -> None:
        """Give the shared pass back, once (another wave may hold it by the time this one ends)."""
        if self.holding:
            self.holding = False
            self.batched.release()

    def _run(self) -> None:
        try:
            self._step()
        except Exception as error:  # never leave a device waiting
            log.warning("dlora pass failed: %s", error)
            with self.cond:
                for peer in self._live():
                    peer.failed = f"server step failed: {error}"
        finally:
            self._release()
            with self.cond:
                for peer in self.peers.values():
                    # The graph's remote-branch nodes hold this wave (`_RemoteWaveGroup`'s ctx), and
                    # the wave held each member's output, whose graph holds those nodes: a cycle
                    # through autograd's C++ edges that Python's collector cannot see, which kept
                    # every step's graph alive (about 3 GB a round on the papers' KR runs).
                    peer.member.final = None
                    peer.state.wave = None
                    peer.state.cache.clear()
                    for a, b in peer.state._killed_params.values():
                        a.requires_grad_(False)
                        b.requires_grad_(False)
                self.done = True
                self.cond.notify_all()

    def _step(self) -> None:
        for peer in self.peers.values():
            track = peer.state.tracks_killed
            for a, b in peer.state._killed_params.values():
                a.requires_grad_(track)
                b.requires_grad_(track)
                a.grad = b.grad = None
            if peer.session.split_layer > 0:  # the hybrid: the device needs dL/dh_k back
                peer.member.hidden.requires_grad_()
        members = [peer.member for peer in self.peers.values()]
        names = sorted({n for peer in self.peers.values() for n in (*peer.state.active, *peer.state.killed)})
        hooks = {name: self._hook(name) for name in names}
        self._anchor = torch.zeros((), requires_grad=True, device=members[0].hidden.device)
        self._cache: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        try:
            self.batched.forward(members, extra_hooks=hooks)
        finally:
            self._release()  # the pass's rows are done with: the rest is this wave's graph and devices
        self._cache.clear()
        replies = self.exchange({p.session.device_id: Message(Kind.FINAL_HIDDEN, {"hidden": p.member.final.detach()})
                                 for p in self._live() if p.member.final is not None}, Kind.HEAD_GRADIENT)
        finals, grads = [], []
        for peer in self._live():
            reply, final = replies.get(peer.session.device_id), peer.member.final
            if reply is None or final is None:
                continue
            try:
                grad = reply.tensor("grad", shape=final.shape, dtype=final.dtype, device=final.device)
                peer.tokens = served_tokens(reply.meta.get(Meta.TOKENS, 0), peer.member.hidden)
            except MessageError as error:
                peer.failed = str(error)
                continue
            finals.append(final)
            grads.append(grad)
        if any(f.requires_grad for f in finals):
            with own_thread_backward():  # pauses for the members' devices: never on autograd's GPU thread
                torch.autograd.backward(finals, grads)
        done = {}
        for peer in self._live():
            session, state = peer.session, peer.state
            meta, tensors = state.killed_norms_reply()  # the norms of this step's gradients, before they are used
            try:
                state.step_killed()
            except MessageError as error:
                peer.failed = str(error)
                continue
            session.tokens += peer.tokens
            if session.split_layer > 0:
                tensors["grad"] = session.outgoing_grad(peer.member.hidden)
            done[session.device_id] = Message(Kind.STEP_DONE, tensors, meta=meta)
        with self.cond:
            for device_id, message in done.items():
                self.peers[device_id].outbox = message

    def _hook(self, name: str) -> Callable[[torch.nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
        """Add, on each member's rows, its remote branch of `name` (asked of the device with the
        rest of its input group) or, killed, the branch the server holds for it."""
        def add_branches(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            peers, members = self._joined()
            group = next((p.state.groups[name] for p in peers if name in p.state.groups), None)
            remote: dict[str, torch.Tensor] = {}
            if group is not None and any(name in p.state.active for p in peers):
                key = (group, id(x))
                if key not in self._cache:
                    self._cache[key] = self._remote_group(x, group, peers, members)
                remote = self._cache[key]
            pieces = []
            for peer, xs, out in zip(peers, by_member(x, members), by_member(remote.get(name, output), members)):
                if name in peer.state._killed_params:
                    pieces.append(peer.state.killed_branch(name, xs).to(output.dtype))
                elif name in remote and name in peer.state.active:
                    pieces.append(out)
                else:
                    pieces.append(xs.new_zeros((*xs.shape[:-1], output.shape[-1])))
            return output + torch.cat(pieces)
        return add_branches

    def _remote_group(self, x: torch.Tensor, group: str, peers: list[_Peer], members: list[Member]) -> dict[str, torch.Tensor]:
        names = tuple(sorted({n for p in peers for n, g in p.state.groups.items() if g == group and n in p.state.active}))
        outputs = _RemoteWaveGroup.apply(x, self._anchor, self, (group, names, peers, members))
        return dict(zip(names, outputs))


class _RemoteWaveGroup(torch.autograd.Function):
    """Branch outputs of one input group for every member, each computed on its own device from
    its own rows; backward asks each for dL/dx of its rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, wave: DLoRAWave,
                which: tuple[str, tuple[str, ...], list[_Peer], list[Member]]) -> tuple[torch.Tensor, ...]:
        # `anchor` requires grad, so backward reaches the devices even where x needs no gradient
        group, names, peers, members = which
        asks: dict[str, tuple[int, list[str]]] = {}
        requests = {}
        for peer, member, xs in zip(peers, members, by_member(x, members)):
            own = [n for n in names if n in peer.state.active and peer.state.groups.get(n) == group]
            if own and peer.failed is None:
                call = peer.state.next_call()
                asks[peer.session.device_id] = (call, own)
                # the member's own positions: the wave pads every member to its longest sequence
                requests[peer.session.device_id] = Message(Kind.BRANCH_INPUTS, {"x": xs[:, : member.seq_len].detach()},
                                                           meta={Meta.CALL: call, Meta.MODULES: own})
        replies = wave.exchange(requests, Kind.BRANCH_OUTPUTS)
        outputs = []
        for name in names:
            d_out = peers[0].state.out_features[name]
            pieces = []
            for peer, member, xs in zip(peers, members, by_member(x, members)):
                reply = replies.get(peer.session.device_id)
                value = None
                if reply is not None and name in asks[peer.session.device_id][1]:
                    try:
                        value = reply.tensor(name, shape=(xs.shape[0], member.seq_len, d_out), dtype=x.dtype, device=x.device)
                        value = F.pad(value.clone(), (0, 0, 0, xs.shape[1] - member.seq_len))  # zeros where the wave padded
                    except MessageError as error:
                        wave.drop(peer.session.device_id, str(error))
                pieces.append(value if value is not None else xs.new_zeros((*xs.shape[:-1], d_out)))
            outputs.append(torch.cat(pieces))
        ctx.wave, ctx.names, ctx.asks, ctx.peers, ctx.members = wave, names, asks, peers, members
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        wave: DLoRAWave = ctx.wave
        peers, members = ctx.peers, ctx.members
        input_grad = bool(ctx.needs_input_grad[0])
        split = [by_member(g, members) if g is not None else None for g in grads]
        requests = {}
        for index, peer in enumerate(peers):
            ask = ctx.asks.get(peer.session.device_id)
            if ask is None:
                continue
            call, own = ask
            tensors = {}
            member = members[index]
            for name, pieces in zip(ctx.names, split):
                if name in own:
                    rows = member.rows.stop - member.rows.start
                    tensors[name] = pieces[index][:, : member.seq_len] if pieces is not None else torch.zeros(
                        rows, member.seq_len, peer.state.out_features[name], dtype=ctx.dtype, device=member.hidden.device)
            requests[peer.session.device_id] = Message(Kind.BRANCH_GRADS, tensors, meta={
                Meta.CALL: call, Meta.MODULES: own, Meta.INPUT_GRAD: input_grad})
        replies = wave.exchange(requests, Kind.BRANCH_INPUT_GRAD)
        if not input_grad:
            return None, None, None, None
        input_grads = []
        for peer, member in zip(peers, members):
            rows = member.rows.stop - member.rows.start
            reply = replies.get(peer.session.device_id)
            value = None
            if reply is not None:
                try:
                    value = reply.tensor("grad", shape=(rows, member.seq_len, ctx.shape[-1]), dtype=ctx.dtype,
                                         device=member.hidden.device)
                    value = F.pad(value, (0, 0, 0, ctx.shape[1] - member.seq_len))  # no gradient at padded positions
                except MessageError as error:
                    wave.drop(peer.session.device_id, str(error))
            input_grads.append(value if value is not None else
                               torch.zeros(rows, *ctx.shape[1:], dtype=ctx.dtype, device=member.hidden.device))
        return torch.cat(input_grads), None, None, None
