"""The server: the frozen model, one session per device (its half of the split, its own
server-side adapters), and message dispatch that keeps serving others when one device misbehaves."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from transformers import PreTrainedModel

from .adapters import AdapterError, AdapterSet
from .messages import Kind, Message, MessageError, error_message
from .dlora import DLoRASession, abort_step, install_server_hooks
from .party import Party
from .placement import Placement, make_placement

log = logging.getLogger(__name__)


class ServerSession(Party):
    """The server's half for one device: blocks [split_layer, L) (+ head) with their adapters."""

    def __init__(self, device_id: str, base: PreTrainedModel, placement: Placement, split_layer: int,
                 ranks: Mapping[str, int], *, alpha: float, dropout: float, lr: float) -> None:
        super().__init__(base, ranks, alpha=alpha, dropout=dropout, lr=lr)
        self.device_id = device_id
        self.placement = placement
        self.split_layer = split_layer
        self.hidden_size = int(self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.n_embd)
        self.vocab_size = int(self.model.config.vocab_size)
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.dlora: DLoRASession | None = None
        self.tokens = 0

    def check_labels(self, labels: torch.Tensor) -> None:
        bad = (labels != -100) & ((labels < 0) | (labels >= self.vocab_size))
        if bool(bad.any()):
            raise MessageError(f"labels outside the vocabulary (0..{self.vocab_size - 1}) or -100")

    def optimizer_step(self, tokens: int | None) -> None:
        if tokens is not None:
            self.tokens += tokens
        super().optimizer_step()


class SplitServer:
    """Serves every device's split traffic through `handle(device_id, message)`.

    `server_ranks(split_layer)` gives the server-side rank map for a device's split point;
    `global_adapters` is the federation's current state, loaded into each session at round start.
    """

    def __init__(self, base: PreTrainedModel, server_ranks: Callable[[int], Mapping[str, int]], *,
                 alpha: float, dropout: float, lr: float, num_blocks: int) -> None:
        self.base = base
        self.server_ranks = server_ranks
        self.alpha, self.dropout, self.lr = alpha, dropout, lr
        self.num_blocks = num_blocks
        self.sessions: dict[str, ServerSession] = {}
        self.global_adapters: AdapterSet = {}
        # holder name, {module: rank} -> the adapters that holder starts the round with
        self.start_state: Callable[[str, dict[str, int]], AdapterSet] = (
            lambda holder, ranks: {name: self.global_adapters[name] for name in ranks})
        self.rejected: list[tuple[str, str]] = []
        self.opened: set[str] = set()  # devices that opened a session this round

    def begin_round(self, global_adapters: AdapterSet) -> None:
        """A new round: the global state sessions start from; no session has trained yet."""
        self.global_adapters = global_adapters
        self.opened.clear()

    def handle(self, device_id: str, message: Message) -> Message:
        try:
            if message.kind == Kind.OPEN_SESSION:
                return self._open(device_id, message)
            session = self.sessions.get(device_id)
            if session is None:
                raise MessageError(f"device {device_id!r} has no open session")
            if message.kind == Kind.CLOSE_SESSION:
                return Message(Kind.SESSION_CLOSED, meta={"tokens": session.tokens})
            return session.placement.server_step(session, message)
        except (MessageError, AdapterError, ValueError) as error:
            log.warning("rejected %s message from %s: %s", message.kind.name, device_id, error)
            self.rejected.append((device_id, str(error)))
            self._reset(device_id)
            return error_message(str(error))

    def _open(self, device_id: str, message: Message) -> Message:
        meta = message.meta
        split_layer = meta.get("split_layer")
        if not isinstance(split_layer, int) or not 0 <= split_layer <= self.num_blocks:
            raise MessageError(f"split_layer {split_layer!r} is out of range 0..{self.num_blocks}")
        placement = make_placement(str(meta.get("placement")), labels_on_device=bool(meta.get("labels_on_device")))
        existing = self.sessions.get(device_id)
        if existing is None or existing.split_layer != split_layer or existing.placement != placement:
            dlora = placement.name == "dlora"
            session = ServerSession(
                device_id, self.base, placement, split_layer, {} if dlora else self.server_ranks(split_layer),
                alpha=self.alpha, dropout=self.dropout, lr=self.lr,
            )
            if dlora:
                session.dlora = install_server_hooks(session, *self._remote_modules(meta))
            self.sessions[device_id] = session
        session = self.sessions[device_id]
        session.load(self.start_state(f"server/{device_id}", session.ranks))
        session.tokens = 0
        self.opened.add(device_id)
        return Message(Kind.SESSION_READY, meta={"split_layer": split_layer})

    def _remote_modules(self, meta: dict[str, Any]) -> tuple[list[str], dict[str, float]]:
        """The adapters a dlora device runs (validated against the model's adaptable linears)."""
        ranks = meta.get("ranks")
        allowed = self.server_ranks(0)
        if not isinstance(ranks, dict) or not ranks:
            raise MessageError("OPEN_SESSION for dlora needs the device's adapter ranks")
        unknown = [name for name in ranks if name not in allowed]
        if unknown:
            raise MessageError(f"unknown adapted modules: {unknown[:3]}")
        if not all(isinstance(r, int) and 0 < r <= 4096 for r in ranks.values()):
            raise MessageError("adapter ranks must be integers in 1..4096")
        return sorted(ranks), {name: self.alpha / r for name, r in ranks.items()}

    def reject(self, device_id: str, error: Exception) -> None:
        log.warning("rejected a message from %s: %s", device_id, error)
        self.rejected.append((device_id, str(error)))
        self._reset(device_id)

    def _reset(self, device_id: str) -> None:
        """Drop any half-done step of `device_id` so its next step starts clean."""
        session = self.sessions.get(device_id)
        if session is None:
            return
        session.pending = None
        if session.dlora is not None:
            abort_step(session.dlora)
        if session.optimizer is not None:
            session.optimizer.zero_grad(set_to_none=True)

    def session_copies(self, exclude: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, AdapterSet, int]]:
        """(holder, adapters, tokens trained this round) for every session opened this round and
        not in `exclude` (a device not selected this round keeps its session, idle)."""
        return [(f"server/{d}", s.adapters(), s.tokens) for d, s in sorted(self.sessions.items())
                if s.modules and d in self.opened and d not in exclude]

    def reset_session(self, device_id: str) -> None:
        """Forget a lost device's half-done step; its session reloads at its next OPEN_SESSION."""
        self._reset(device_id)
