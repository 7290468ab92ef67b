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

Device waves (`federation.device_waves`): a device can also stop at its own compute. Its forward
to the cut becomes a request (`device_forward`); once every device waits, the requests of devices
that cut at the same block with the same ranks run as one pass of the devices' frozen part
(`DeviceWaves`, `model/batched.py`'s `DevicePass`), each device's rows through its own adapters,
and each gets its rows of the embedding and of the cut back, in the pass's graph. Its backward
from the cut is a request too (`device_backward`): the wave's backward runs once every member has
asked for it (or finished: a dropped device), as one `torch.autograd.backward` over every
member's roots, and each device then takes its own optimiser step. A device whose step's FLOPs
are still being counted (its meter sees a batch shape for the first time), that cuts at block 0,
or that is alone in its group computes alone, in its own thread, as without waves.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from splitpeft.model.adapters import ADAPTER_NAME
from splitpeft.model.batched import DevicePass, Member
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
    request: _Forward | _Backward | None = None  # a device-wave request it waits on
    answer: Any = None
    finished: bool = False


@dataclass
class _Forward:
    device: Any                 # a DeviceRuntime
    input_ids: torch.Tensor     # (B, T)

    def key(self) -> Hashable:
        """Devices with equal keys run as one wave: the same cut, ranks, dtype and place."""
        layers = self.device.shell.layers
        return (self.device.split_layer, tuple(sorted((n, layer.r[ADAPTER_NAME]) for n, layer in layers.items())),
                self.device.dtype, str(self.device.torch_device))


@dataclass
class _Backward:
    device: Any
    wave: _DeviceWave
    roots: list[tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class _DeviceWave:
    """One forward shared by several devices, until each has asked for its backward."""

    members: list[str]
    roots: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = field(default_factory=dict)


class DeviceWaves:
    """Runs the devices' forward and backward requests of one scheduler turn (module docstring)."""

    def __init__(self, device_pass: DevicePass) -> None:
        self.device_pass = device_pass
        self.sizes: list[int] = []  # how many devices each wave's forward served
        self._frozen = {p.untyped_storage().data_ptr() for p in device_pass.host.parameters() if p.device.type != "meta"}

    def serve(self, requests: Sequence[tuple[str, _Forward | _Backward]], finished: set[str]) -> dict[str, Any]:
        """Answers to the requests that can go on now (device id -> answer; an Exception is raised
        in that device's thread; None to a forward: compute alone). A backward waits until every
        member of its wave has asked, or finished."""
        answers: dict[str, Any] = {}
        groups: dict[Hashable, list[tuple[str, _Forward]]] = {}
        for device_id, request in requests:
            if isinstance(request, _Forward):
                groups.setdefault(request.key(), []).append((device_id, request))
        for group in groups.values():
            if len(group) == 1:
                answers[group[0][0]] = None
                continue
            try:
                answers.update(self._forward(group))
            except Exception as error:  # every member of the pass gets it (each drops itself)
                answers.update({device_id: error for device_id, _ in group})
        waves: dict[int, _DeviceWave] = {}
        for device_id, request in requests:
            if isinstance(request, _Backward):
                request.wave.roots[device_id] = request.roots
                waves[id(request.wave)] = request.wave
        for wave in waves.values():
            if all(m in wave.roots or m in finished for m in wave.members):
                tensors = [t for roots in wave.roots.values() for t, _ in roots]
                grads = [g for roots in wave.roots.values() for _, g in roots]
                try:
                    if tensors:
                        torch.autograd.backward(tensors, grads)
                    answer: Any = None
                except Exception as error:
                    answer = error
                answers.update({device_id: answer for device_id in wave.roots})
        return answers

    def _forward(self, group: list[tuple[str, _Forward]]) -> dict[str, Any]:
        members = [Member(request.device, request.input_ids, warm=request.device.wave_warm_factors())
                   for _, request in group]
        exclude = set(self._frozen)
        for _, request in group:
            exclude.update(p.untyped_storage().data_ptr() for p in request.device.parameters)
        saved: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in exclude:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outputs = self.device_pass.forward(members, members[0].session.split_layer)
        # each device is charged its share of what the pass saved, by its tokens
        total, tokens = sum(saved.values()), [request.input_ids.numel() for _, request in group]
        wave = _DeviceWave([device_id for device_id, _ in group])
        self.sizes.append(len(group))
        answers = {}
        for (device_id, request), (embedded, cut), count in zip(group, outputs, tokens):
            request.device.meter.charge_saved(total * count // max(1, sum(tokens)))
            answers[device_id] = (embedded, cut, wave)
        return answers


class Lockstep:
    """Runs the round's devices in lockstep against `server` (see the module docstring)."""

    def __init__(self, server: SplitServer, device_pass: DevicePass | None = None) -> None:
        self.server = server
        self.device_waves = DeviceWaves(device_pass) if device_pass is not None else None
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

    # ------------------------------------------------------------------ the devices' compute

    def device_forward(self, device: Any, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object] | None:
        """`device`'s (embedded, cut, wave) from a device wave, or None: it computes alone."""
        if (self.device_waves is None or device.split_layer == 0 or device.meter.counting
                or device.scaler is not None):
            return None
        return self._ask(device.device_id, _Forward(device, input_ids))

    def device_backward(self, device: Any, wave: object, roots: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Backward from `roots` (tensor, incoming gradient or None for a loss) of `device`'s part
        of `wave`, run with the other members' (module docstring)."""
        assert isinstance(wave, _DeviceWave)
        self._ask(device.device_id, _Backward(device, wave, roots))

    def _ask(self, device_id: str, request: _Forward | _Backward) -> Any:
        task = self._tasks.get(device_id)
        if task is None or task.thread is not threading.current_thread():
            if isinstance(request, _Backward):
                raise RuntimeError(f"{device_id}: a device-wave backward outside the round's lockstep")
            return None
        task.request, task.answer = request, None
        task.go.clear()
        self._yielded.set()
        task.go.wait()
        answer, task.answer = task.answer, None
        if isinstance(answer, BaseException):
            raise answer
        return answer

    # ------------------------------------------------------------------ the scheduler

    def run(self, work: Sequence[tuple[str, Callable[[], T]]]) -> list[T]:
        """Run each `(device id, work)` in lockstep; returns their results in the given order.
        An exception escaping a device's work is raised once every device has finished."""
        tasks: list[_Task[T]] = [_Task(device_id, fn) for device_id, fn in work]
        self._tasks = {task.device_id: task for task in tasks}  # type: ignore[misc]
        self.waves = []
        try:
            order = {id(task): index for index, task in enumerate(tasks)}
            runnable = list(tasks)
            while True:
                for task in runnable:
                    self._resume(task)
                runnable = []
                requests = {task.device_id: task.request for task in tasks if task.request is not None}
                asked = [task for task in tasks if task.device_id in requests]
                if asked:
                    assert self.device_waves is not None
                    answers = self.device_waves.serve(list(requests.items()),
                                                      finished={task.device_id for task in tasks if task.finished})
                    for task in asked:
                        if task.device_id in answers:
                            task.request, task.answer = None, answers[task.device_id]
                            runnable.append(task)
                sent = [(task, task.sent) for task in tasks if task.sent is not None]
                if not sent and not asked:
                    break
                waiting = [task for task, _ in sent]
                replies = self.server.handle_wave([(task.device_id, message) for task, message in sent]) if sent else []
                answered = 0
                for task, reply in zip(waiting, replies):
                    if reply is not None:
                        task.sent, task.reply = None, reply
                        runnable.append(task)
                        answered += 1
                if not runnable:  # nothing can move: refuse what waits rather than hang (a server bug)
                    for task in waiting:
                        error = MessageError("no reply: every device of the round waits on the others")
                        self.server.reject(task.device_id, error)
                        task.sent, task.reply = None, error_message(str(error))
                        runnable.append(task)
                        answered += 1
                    for task in asked:
                        if task.request is not None:
                            task.request, task.answer = None, RuntimeError("a device wave waits on devices that cannot go on")
                            runnable.append(task)
                if sent:
                    self.waves.append(answered)
                runnable.sort(key=lambda task: order[id(task)])
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
            task.finished = True
            self._yielded.set()
