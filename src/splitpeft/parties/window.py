"""The network server's batched pass: the split steps that arrive within `server.batch_window_ms`
are served as one wave (`SplitServer.handle_wave`, `model/batched.py`).

Each device's stream has a thread of its own in the gRPC server, which calls `handle` and blocks
until its reply. A message that can join a shared pass (`SplitServer.wave_key`: split's ACTIVATIONS
and HEAD_GRADIENT, every message of a dlora step) waits in the window; the first to arrive in an
empty window leads it: it waits until the window closes (`window_s` after it arrived, or sooner,
once every device that may still send a step this round has one waiting, `SplitServer.waiting_for`), serves everything waiting as one wave,
and wakes the others with their replies. A message the wave cannot answer yet (a U-shaped head
gradient whose forward pass still waits for another member's) stays for the next window; a member
whose device is lost is dropped from its wave (its session is reset), so no one waits for it.
Every other message (OPEN_SESSION, CLOSE_SESSION, KILL, REVIVE) is served at once. One lock holds the
server: the server's work happens one wave or message at a time, as with `serialize`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from splitpeft.parties.server import SplitServer
from splitpeft.transport.messages import Message, error_message

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    device_id: str
    message: Message
    reply: Message | None = None


class BatchWindow:
    """The endpoint a network split server serves (see the module docstring); `server` must have
    its batched pass on (`SplitServer.batched`)."""

    def __init__(self, server: SplitServer, window_s: float) -> None:
        if server.batched is None:
            raise ValueError("BatchWindow needs a SplitServer with batch_devices on")
        self.server = server
        self.window_s = window_s
        self._lock = threading.Condition()
        self._waiting: list[_Waiting] = []
        self._leader = False
        self.waves: list[int] = []  # how many messages each wave answered

    def handle(self, device_id: str, message: Message) -> Message:
        entry = _Waiting(device_id, message)
        with self._lock:
            if self.server.wave_key(device_id, message) is None:
                return self.server.handle(device_id, message)
            self._waiting.append(entry)
            self._lock.notify_all()  # a leader waiting for the window to fill may close it now
            while entry.reply is None:
                if not self._leader:
                    self._lead()
                else:
                    self._lock.wait()
        return entry.reply

    def refuses_stream(self, device_id: str, round_tag: str | None) -> str | None:
        return self.server.refuses_stream(device_id, round_tag)

    def reject(self, device_id: str, error: Exception) -> None:
        with self._lock:
            self.server.reject(device_id, error)
            self._lock.notify_all()  # a wave that waited for this device may be answerable now

    def _lead(self) -> None:
        """Hold the window open, then serve what waits in it (called and returning with the lock held)."""
        self._leader = True
        try:
            closes = time.monotonic() + self.window_s
            while not self._full() and (left := closes - time.monotonic()) > 0:
                self._lock.wait(left)
            batch, self._waiting = self._waiting, []
            try:
                replies: list[Message | None] = self.server.handle_wave([(w.device_id, w.message) for w in batch])
            except Exception as error:  # never leave a waiting device without a reply
                log.exception("a wave of %d messages failed", len(batch))
                replies = [error_message(f"the server's wave failed: {type(error).__name__}: {error}")] * len(batch)
                for entry in batch:
                    self.server.reject(entry.device_id, error)
            answered = 0
            for entry, reply in zip(batch, replies):
                if reply is None:
                    self._waiting.append(entry)  # offered again with the next window
                else:
                    entry.reply = reply
                    answered += 1
            self.waves.append(answered)
            if not answered:  # what waits needs a message that has not come: let it arrive first
                self._lock.wait(self.window_s)
        finally:
            self._leader = False
            self._lock.notify_all()

    def _full(self) -> bool:
        """Every device that may still send a step this round has one waiting: nothing more can join."""
        return self.server.waiting_for() <= {w.device_id for w in self._waiting}
