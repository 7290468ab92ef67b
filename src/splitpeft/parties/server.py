"""The server: the frozen model, one session per device (its half of the split, its own
server-side adapters), and message dispatch that keeps serving others when one device misbehaves.

The server knows placements only through their interface (`placements/base.py`): a session's
placement answers each message (`server_step`), sets up what it needs when the session opens
(`open_server_session`) and drops a half-done step when a device sends garbage (`abort`).

A frame's size does not bound the work it asks for: a (1, 16384, d) ACTIVATIONS frame is small but
its attention costs T^2, and the logits of a server that holds the head are (B, T, V) floats. So
each step's batch B, sequence T and tokens B T are checked against `StepLimits` (the run's
federation.batch_size and data.max_length, which no honest device exceeds) before any compute.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel

from splitpeft.model.adapters import AdapterError, AdapterSet
from splitpeft.model.backbone import backbone_of
from splitpeft.model.batched import BatchedPass
from splitpeft.model.guards import gradient_problem
from splitpeft.model.loss import IGNORE_INDEX
from splitpeft.parties.frame_bounds import FrameBounds
from splitpeft.parties.party import DEFAULT_TRAINING, Party, Training
from splitpeft.parties.shells import ShellPool
from splitpeft.placements.base import Placement
from splitpeft.placements.registry import make_placement
from splitpeft.transport.messages import (
    Kind,
    Message,
    MessageError,
    Meta,
    error_message,
)

if TYPE_CHECKING:
    from splitpeft.config import ExperimentConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepLimits:
    """The most one training step may ask of the server: batch B, sequence T, tokens B T.

    Every tensor of an ACTIVATIONS message, hidden (B, T, d) and labels (B, T), is checked before
    the server runs anything. The server's step costs about B T (d^2 + T d) per block and, with the
    head, B T V for the logits (fp32, the largest tensor of the step): bounding B, T and B T bounds
    its time and memory, which `federation/preflight.py` predicts for the same B and T.
    """

    max_batch: int
    max_seq_len: int
    max_tokens: int

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> StepLimits:
        """Exactly what the run's devices send at most: federation.batch_size rows of at most
        data.max_length tokens (batches are padded to their longest row)."""
        batch, seq_len = config.federation.batch_size, config.data.max_length
        return cls(max_batch=batch, max_seq_len=seq_len, max_tokens=batch * seq_len)

    def check(self, message: Message) -> None:
        """Raise MessageError naming the limit if `message` asks for more than a step may."""
        for name, tensor in message.tensors.items():
            if tensor.dim() < 2:
                continue
            batch, seq_len = int(tensor.shape[0]), int(tensor.shape[1])
            where = f"{message.kind.name}.{name} of shape {tuple(tensor.shape)}"
            if batch > self.max_batch:
                raise MessageError(f"{where}: batch {batch} exceeds the server's limit of {self.max_batch} "
                                   "(federation.batch_size)")
            if seq_len > self.max_seq_len:
                raise MessageError(f"{where}: sequence length {seq_len} exceeds the server's limit of "
                                   f"{self.max_seq_len} (data.max_length)")
            if batch * seq_len > self.max_tokens:
                raise MessageError(f"{where}: {batch * seq_len} tokens exceed the server's limit of "
                                   f"{self.max_tokens} per step (federation.batch_size x data.max_length)")


class ServerSession(Party):
    """The server's half for one device: blocks [split_layer, L) (+ head) with their adapters."""

    def __init__(self, device_id: str, base: PreTrainedModel, placement: Placement, split_layer: int,
                 ranks: Mapping[str, int], training: Training = DEFAULT_TRAINING, *, pool: ShellPool | None = None) -> None:
        part = placement.server_part(backbone_of(base).num_blocks, split_layer)
        super().__init__(base, ranks, training, part=part, on_server=True, pool=pool)
        self.device_id = device_id
        self.placement = placement
        self.split_layer = split_layer
        config = base.config
        self.hidden_size = int(config.hidden_size if hasattr(config, "hidden_size") else config.n_embd)
        self.vocab_size = int(config.vocab_size)
        self.step_state: Any = None  # the placement's state between the messages of one step
        self.tokens = 0

    def check_labels(self, labels: torch.Tensor) -> None:
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= self.vocab_size))
        if bool(bad.any()):
            raise MessageError(f"labels outside the vocabulary (0..{self.vocab_size - 1}) or {IGNORE_INDEX}")

    def optimizer_step(self, tokens: int | None = None, loss: float | None = None) -> None:
        """Step the session's adapters; `tokens` (counted by the server) adds to its weight.

        A step whose `loss` (where the server computed one) or gradients are not finite, or whose
        gradients are too large for AdamW's moments to stay finite (`gradient_problem`), is not
        taken: its gradients are dropped, the adapters, moments and token count stay as they were,
        and MessageError tells the device why. (Under fp16 loss scaling, overflowed gradients are
        the scaler's to skip, as usual.)"""
        problem = None
        if loss is not None and not math.isfinite(loss):
            problem = f"the loss is {loss}"
        elif self.scaler is None:
            problem = gradient_problem(self.named_adapter_parameters())
        if problem is not None:
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            raise MessageError(f"server step rolled back: {problem}; the session keeps the state it had before it")
        if tokens is not None:
            self.tokens += tokens
        super().optimizer_step()


class StaleJob(MessageError):
    """A message a fenced server refuses (`SplitServer.fence`) because it does not belong to the
    round in progress (an OPEN_SESSION, or a step of a session not opened for it), so the device's
    session of this round, if any, is left as it is."""


class SplitServer:
    """Serves every device's split traffic through `handle(device_id, message)`.

    `server_ranks(blocks)` gives the server-side rank map of the adapted modules in `blocks`;
    `start_state(holder, ranks)` the adapters a holder starts the round with (the federation's
    global state). `limits` bound each step's work (`StepLimits.from_config`); None: unbounded.
    `warm`: every session takes noise-free's warm adapters (`WarmStart`); None: cold.
    `bounds` bound the norm of what enters a server step (`FrameBounds.from_config`); None: unbounded.
    `batch_devices`: steps of several devices offered together (`handle_wave`) run as one pass
    (None: on, see `ServerConfig.batch_devices`).
    """

    def __init__(self, base: PreTrainedModel, server_ranks: Callable[[range], Mapping[str, int]],
                 start_state: Callable[[str, dict[str, int]], AdapterSet], training: Training = DEFAULT_TRAINING, *,
                 num_blocks: int, limits: StepLimits | None = None, bounds: FrameBounds | None = None,
                 batch_devices: bool | None = False, pool: ShellPool | None = None) -> None:
        runtime = training.runtime
        self.base = base
        # Sessions borrow their shells from `pool` and park them when their device closes the
        # session (`parties/shells.py`), where the placement allows it; None: each keeps its own.
        self.pool = pool
        # One pass of the frozen model for the steps of many devices (`handle_wave`); not under
        # fp16 loss scaling (each session scales its own backward) or a quantized server base.
        # None (the config's default): on. Measured faster wherever it was measured, quiet, on
        # this project's 2-core CPU (bench/batched_server.py, 16 devices at block 2, B=1, T=128):
        # 1.71x one at a time in bf16, 1.48x in fp32 (an earlier 0.9x in fp32 was taken under load,
        # before the pass's overheads were cut); 4.2-5.0x on one H200. The main job's three devices,
        # cut at far-apart blocks, share little of it: 0.95-0.97x (BENCHMARKS.md).
        batchable = (batch_devices is not False and not runtime.loss_scaling and not runtime.gradient_checkpointing
                     and runtime.server_quantization() == "none")
        self.batched = BatchedPass(base, device=runtime.server_device, dtype=runtime.dtype) if batchable else None
        self.bounds = bounds
        self.training = training  # every session trains this way
        self.limits = limits
        self.runtime = runtime
        self.server_ranks = server_ranks
        self.start_state = start_state
        self.num_blocks = num_blocks
        self.sessions: dict[str, ServerSession] = {}
        self.rejected: list[tuple[str, str]] = []
        self.repaired: list[tuple[str, str]] = []  # (device, the non-finite tensor) of sessions reset
        self.opened: set[str] = set()  # devices that opened a session this round
        self.expected: set[str] = set()  # devices selected for this round (`begin_round`)
        self.finished: set[str] = set()  # devices that closed their session this round, or were refused
        self.closed: set[str] = set()  # devices that closed their session this round
        self.pass_sizes: list[int] = []  # devices served by each shared pass this round (`handle_wave`)
        # Deployment (`fence`): a session opens only for a job of the round in progress, by its tag
        self.fenced = False
        self.round_tag: str | None = None

    def begin_round(self, expected: Collection[str] = ()) -> None:
        """A new round: no session has trained yet; `expected` are the devices selected for it."""
        self.opened.clear()
        self.finished.clear()
        self.closed.clear()
        self.pass_sizes.clear()
        self.expected = set(expected)

    def fence(self, round_tag: str | None) -> None:
        """From now on (a deployment's server) a session opens only from a device expected this
        round that has not closed its session, whose OPEN_SESSION carries `round_tag`, the tag sent
        with this round's jobs, and steps come only from sessions opened so this round (None: no
        round in progress, nothing opens or steps). A job left over from an earlier round or an
        earlier start of the server (Flower may still deliver it after a restart, with the run's key
        and the device's token) cannot train on a session of this one; it is refused (`StaleJob`)
        without touching the device's session of this round."""
        self.fenced, self.round_tag = True, round_tag

    def refuses_stream(self, device_id: str, round_tag: str | None) -> str | None:
        """Why a fenced server refuses a new stream of `device_id` that names `round_tag` (its
        round job's), before it can replace the device's current stream; None: admitted (also
        when unfenced, or when the stream names no tag: its OPEN_SESSION is checked instead)."""
        if not self.fenced or round_tag is None:
            return None
        try:
            self._check_round(device_id, round_tag)
        except StaleJob as error:
            return str(error)
        return None

    def waiting_for(self) -> set[str]:
        """Devices that may still send a step this round: those expected (else those that opened
        a session) that have neither closed their session nor been refused."""
        return (self.expected or self.opened) - self.finished

    def handle(self, device_id: str, message: Message) -> Message:
        try:
            if message.kind == Kind.OPEN_SESSION:
                return self._open(device_id, message)
            session = self._checked(device_id, message)
            if message.kind == Kind.CLOSE_SESSION:
                self.finished.add(device_id)
                self.closed.add(device_id)
                session.placement.abort(session)  # a step it left half done: its wave no longer waits for it
                session.park()
                return Message(Kind.SESSION_CLOSED, meta={Meta.TOKENS: session.tokens})
            return session.placement.server_step(session, message)
        except (MessageError, AdapterError, ValueError) as error:
            return self._refused(device_id, error)

    def _refused(self, device_id: str, error: Exception) -> Message:
        """The ERROR reply to a refused message; the device's half-done step is dropped unless the
        message was not of its session of this round (`StaleJob`), which is left as it is."""
        if isinstance(error, StaleJob):
            log.warning("refused a message of %s: %s", device_id, error)
            self.rejected.append((device_id, str(error)))
        else:
            self.reject(device_id, error)
        return error_message(str(error))

    def _checked(self, device_id: str, message: Message) -> ServerSession:
        """`device_id`'s session, once `message` passed the step limits and frame bounds
        (MessageError otherwise): nothing is computed before this."""
        if self.fenced and (self.round_tag is None or device_id not in self.opened or device_id in self.closed):
            raise StaleJob(f"{message.kind.name} from {device_id}, which has no session of the round in progress: "
                           "an earlier round's job or one from an earlier start of the server")
        session = self.sessions.get(device_id)
        if session is None:
            raise MessageError(f"device {device_id!r} has no open session")
        if message.kind in (Kind.ACTIVATIONS, Kind.HEAD_GRADIENT):
            for name, tensor in message.tensors.items():
                if tensor.dim() >= 2 and tensor.shape[0] * tensor.shape[1] == 0:
                    raise MessageError(f"{message.kind.name}.{name} of shape {tuple(tensor.shape)}: a step needs at "
                                       "least one row of one token")
        if message.kind == Kind.ACTIVATIONS and self.limits is not None:
            self.limits.check(message)
        if self.bounds is not None:
            self.bounds.check(message, session.split_layer)
        return session

    def wave_key(self, device_id: str, message: Message) -> Hashable | None:
        """Which shared pass `message` can join (`Placement.wave_key`); None: it is served alone."""
        session = self.sessions.get(device_id)
        if self.batched is None or session is None or message.kind == Kind.OPEN_SESSION:
            return None
        return session.placement.wave_key(session, message)

    def handle_wave(self, items: Sequence[tuple[str, Message]]) -> list[Message | None]:
        """Replies to messages of several devices that arrived together (at most one each).

        With `batch_devices`, the steps among them that their placement can run together
        (`Placement.wave_key`: split's ACTIVATIONS, and the head gradients of a U-shaped forward
        run together) run as one pass of the frozen model (`parties/batched.py`); the rest, and a
        step alone in its group, are handled one at a time as by `handle`. A bad message is refused
        alone: the others of its wave are served. None: no reply yet (a head gradient whose forward
        pass still waits for another member's; dlora steps while another dlora pass holds the
        shared one): offer the message again with the next wave."""
        replies: list[Message | None] = [None] * len(items)
        groups: dict[Hashable, list[int]] = {}
        for index, (device_id, message) in enumerate(items):
            key = self.wave_key(device_id, message)
            if key is None:
                replies[index] = self.handle(device_id, message)
                continue
            try:
                self._checked(device_id, message)
            except (MessageError, AdapterError, ValueError) as error:
                replies[index] = self._refused(device_id, error)
                continue
            groups.setdefault(key, []).append(index)
        for indexes in groups.values():
            steps = [(self.sessions[items[i][0]], items[i][1]) for i in indexes]
            assert self.batched is not None
            if steps[0][1].kind == Kind.ACTIVATIONS and len(steps) == 1:
                session, message = steps[0]
                replies[indexes[0]] = self.handle(session.device_id, message)
                continue
            try:
                results = steps[0][0].placement.server_wave(self.batched, steps)
            except Exception as error:  # keep serving the other groups: this pass fails its own members
                log.exception("a shared pass of %d devices failed", len(steps))
                failed = MessageError(f"the server's shared pass failed: {type(error).__name__}: {error}")
                results = [failed] * len(steps)
            if steps[0][1].kind == Kind.ACTIVATIONS:
                self.pass_sizes.append(len(steps))
            for index, (session, _), result in zip(indexes, steps, results):
                if isinstance(result, Exception):
                    self.reject(session.device_id, result)
                    replies[index] = error_message(str(result))
                else:
                    replies[index] = result
        return replies

    OPEN_KEYS = frozenset({Meta.PLACEMENT, Meta.SPLIT_LAYER, Meta.LABELS_ON_DEVICE, Meta.RANKS, Meta.ROUND_TAG})

    def _open(self, device_id: str, message: Message) -> Message:
        meta = message.meta
        if self.fenced:  # first: a stale job's open, malformed or not, leaves this round's session alone
            self._check_round(device_id, meta.get(Meta.ROUND_TAG))
        unknown = sorted(set(meta) - self.OPEN_KEYS)
        if unknown or message.tensors:
            raise MessageError(f"OPEN_SESSION with unknown options {unknown[:3]} or tensors {sorted(message.tensors)[:3]}; "
                               f"it carries {', '.join(sorted(self.OPEN_KEYS))} and no tensor")
        split_layer, labels_on_device = meta.get(Meta.SPLIT_LAYER), meta.get(Meta.LABELS_ON_DEVICE, False)
        if not isinstance(split_layer, int) or isinstance(split_layer, bool) or not 0 <= split_layer <= self.num_blocks:
            raise MessageError(f"split_layer {split_layer!r} is out of range 0..{self.num_blocks}")
        if not isinstance(labels_on_device, bool):
            raise MessageError(f"labels_on_device must be true or false, not {labels_on_device!r}")
        placement = make_placement(str(meta.get(Meta.PLACEMENT)), labels_on_device=labels_on_device)
        placement.device_blocks(self.num_blocks, split_layer)  # ValueError (refused) where the placement has no such split
        existing = self.sessions.get(device_id)
        if existing is not None:
            existing.placement.abort(existing)  # a step it left half done: its wave no longer waits for it
        if existing is None or existing.split_layer != split_layer or existing.placement != placement:
            # the new session first, checked: one that is refused leaves the old one as it was
            session = ServerSession(
                device_id, self.base, placement, split_layer,
                self.server_ranks(placement.server_blocks(self.num_blocks, split_layer)), self.training,
                pool=self.pool if placement.parks_server_sessions else None,
            )
            try:
                placement.open_server_session(session, meta, self.server_ranks(range(self.num_blocks)))
            except BaseException:
                session.close()
                raise
            if existing is not None:
                existing.close()
            self.sessions[device_id] = session
        session = self.sessions[device_id]
        self.repair(device_id)
        session.load(self.start_state(f"server/{device_id}", session.ranks))
        session.tokens = 0
        self.opened.add(device_id)
        return Message(Kind.SESSION_READY, meta={Meta.SPLIT_LAYER: split_layer})

    def _check_round(self, device_id: str, tag: object) -> None:
        """A fenced server's OPEN_SESSION: only for the round in progress (see `fence`)."""
        if self.round_tag is None:
            raise StaleJob("no round is in progress on this server: the session belongs to an earlier round's "
                           "job or an earlier start of the server")
        if tag is None:
            raise StaleJob("OPEN_SESSION carries no round tag: the device runs a splitpeft older than this server's, "
                           "or the session is not a round job's")
        if tag != self.round_tag:
            raise StaleJob(f"round tag {str(tag)[:40]!r} is not this round's: the session belongs to an earlier "
                           "round's job or an earlier start of the server")
        if device_id not in self.expected:
            raise StaleJob(f"{device_id} is not selected for this round")
        if device_id in self.closed:
            raise StaleJob(f"{device_id} has already closed its session this round")

    def reject(self, device_id: str, error: Exception) -> None:
        """A message from `device_id` was refused: log it and drop its half-done step."""
        log.warning("rejected a message from %s: %s", device_id, error)
        self.rejected.append((device_id, str(error)))
        self.finished.add(device_id)
        self.reset_session(device_id)

    def repair(self, device_id: str) -> None:
        """If `device_id`'s session holds a non-finite adapter or moment (a step the guards did not
        stop), drop its optimiser state: its adapters are reloaded from the global state at every
        OPEN_SESSION, so the session starts over from the global state and its device is not
        banned. Listed in `repaired`."""
        session = self.sessions.get(device_id)
        bad = session.reset_if_nonfinite() if session is not None else None
        if bad is not None:
            log.warning("session of %s held a non-finite %s: reset from the global state", device_id, bad)
            self.repaired.append((device_id, bad))

    def repair_all(self) -> None:
        """`repair` every session (a round boundary, before a checkpoint)."""
        for device_id in sorted(self.sessions):
            self.repair(device_id)

    def reset_session(self, device_id: str) -> None:
        """Forget `device_id`'s half-done step (a bad message, or a lost device); its session
        reloads at its next OPEN_SESSION."""
        session = self.sessions.get(device_id)
        if session is None:
            return
        session.placement.abort(session)
        if session.is_parked:
            return  # parked between steps: nothing half-done, and no gradient held
        if session.optimizer is not None:
            session.optimizer.zero_grad(set_to_none=True)
        session.park()

    def session_copies(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, AdapterSet, int]]:
        """(holder, adapters, tokens trained this round) for every session opened this round and
        not in `exclude` (a device not selected this round keeps its session, idle)."""
        return [(f"server/{d}", s.adapters(), s.tokens) for d, s in sorted(self.sessions.items())
                if s.modules and d in self.opened and d not in exclude and (not self.expected or d in self.expected)]
