"""The devices of a round in lockstep, so that the server can serve their steps as one pass
(`server.batch_devices`; the pass itself is `model/batched.py`).

One device after another, each runs until it sends a message across its channel: device 0 to its
first ACTIVATIONS, device 1 to its first ACTIVATIONS, ... Once every device is waiting (or done),
the server answers all the waiting messages as one wave (`SplitServer.handle_wave`), and the
devices go on, in the same order, to their next message. Each device runs in a thread of its own,
but only one thread runs at any time and always in that order, so a run is exactly as
deterministic as one device after another; with the same random draws (LoRA dropout 0, no noise
defence) it gives the same adapters, since each device's session is its own. A device that fails
drops only itself (its session is reset, so no wave waits for it).

`Lockstep` is the channels' endpoint: outside `run` it passes messages straight to the server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from splitpeft.parties.server import SplitServer
from splitpeft.transport.messages import Message, MessageError, error_message

T = TypeVar("T")


@dataclass
class _Task(Generic[T]):
    device_id: str
    work: Callable[[], T]
    go: threading.Event = field(default_factory=threading.Event)
    sent: Message | None = None    # the message it waits on a reply to
    reply: Message | None = None
    result: T | None = None
    error: BaseException | None = None
    thread: threading.Thread | None = None


class Lockstep:
    """Runs the round's devices in lockstep against `server` (see the module docstring)."""

    def __init__(self, server: SplitServer) -> None:
        self.server = server
        self._tasks: dict[str, _Task[object]] = {}
        self._yielded = threading.Event()
        self.waves: list[int] = []  # how many messages each wave of the last `run` answered

    # ------------------------------------------------------------------ the channels' endpoint

    def handle(self, device_id: str, message: Message) -> Message:
        task = self._tasks.get(device_id)
        if task is None or task.thread is not threading.current_thread():
            return self.server.handle(device_id, message)
        task.sent, task.reply = message, None
        task.go.clear()
        self._yielded.set()  # to the scheduler: this device waits
        task.go.wait()
        reply = task.reply
        assert reply is not None
        task.reply = None
        return reply

    def reject(self, device_id: str, error: Exception) -> None:
        self.server.reject(device_id, error)

    # ------------------------------------------------------------------ the scheduler

    def run(self, work: Sequence[tuple[str, Callable[[], T]]]) -> list[T]:
        """Run each `(device id, work)` in lockstep; returns their results in the given order.
        An exception escaping a device's work is raised once every device has finished."""
        tasks: list[_Task[T]] = [_Task(device_id, fn) for device_id, fn in work]
        self._tasks = {task.device_id: task for task in tasks}  # type: ignore[misc]
        self.waves = []
        try:
            runnable = list(tasks)
            while True:
                for task in runnable:
                    self._resume(task)
                sent = [(task, task.sent) for task in tasks if task.sent is not None]
                if not sent:
                    break
                waiting = [task for task, _ in sent]
                replies = self.server.handle_wave([(task.device_id, message) for task, message in sent])
                runnable = []
                for task, reply in zip(waiting, replies):
                    if reply is not None:
                        task.sent, task.reply = None, reply
                        runnable.append(task)
                if not runnable:  # nothing can move: refuse what waits rather than hang (a server bug)
                    for task in waiting:
                        error = MessageError("no reply: every device of the round waits on the others")
                        self.server.reject(task.device_id, error)
                        task.sent, task.reply = None, error_message(str(error))
                        runnable.append(task)
                self.waves.append(len(runnable))
        finally:
            self._tasks = {}
        for task in tasks:
            if task.error is not None:
                raise task.error
        return [task.result for task in tasks]  # type: ignore[misc]

    def _resume(self, task: _Task[T]) -> None:
        """Let `task` run until it sends its next message or finishes."""
        self._yielded.clear()
        if task.thread is None:
            task.thread = threading.Thread(target=self._body, args=(task,), name=f"lockstep-{task.device_id}",
                                           daemon=True)
            task.thread.start()
        else:
            task.go.set()
        self._yielded.wait()

    def _body(self, task: _Task[T]) -> None:
        try:
            task.result = task.work()
        except BaseException as error:  # raised by `run` in the scheduler's thread
            task.error = error
        finally:
            self._yielded.set()
