"""Engines play a federation's rounds for `experiment.run`: in this process (`InProcessEngine`),
or on Flower nodes (`deploy.server_app.FlowerEngine`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from splitpeft.federation.records import RoundRecord
from splitpeft.federation.simulation import Simulation
from splitpeft.federation.workers import WorkerPool


class Engine(Protocol):
    """Plays a federation's rounds for `run_experiment`."""

    def open(self, sim: Simulation, resumed: dict[str, Any] | None) -> dict[str, Any]:
        """Before the first round; `resumed` is what the checkpoint saved for it (None on a fresh
        run). Returns what to save with every checkpoint."""
        ...

    def play_round(self, sim: Simulation, on_device_done: Callable[[str], None]) -> RoundRecord: ...

    def close(self) -> None: ...


class InProcessEngine:
    """Every device trains through its in-process channel: in this process, or with
    `federation.workers` > 1 in that many worker processes (`federation/workers.py`), which this
    engine starts at `open` and stops at `close`."""

    def __init__(self) -> None:
        self.sim: Simulation | None = None

    def open(self, sim: Simulation, resumed: dict[str, Any] | None) -> dict[str, Any]:
        count = min(sim.config.federation.workers, len(sim.devices))
        if count > 1:
            sim.workers = WorkerPool(sim.config, count, resume_from=sim.restored_from)
            self.sim = sim
        return {}

    def play_round(self, sim: Simulation, on_device_done: Callable[[str], None]) -> RoundRecord:
        return sim.run_round(on_device_done=on_device_done)

    def close(self) -> None:
        if self.sim is not None and self.sim.workers is not None:
            self.sim.workers.close()
            self.sim.workers = None
        self.sim = None
