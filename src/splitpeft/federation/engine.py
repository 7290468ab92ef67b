"""Engines play a federation's rounds for `experiment.run`: in this process (`InProcessEngine`),
or on Flower nodes (`deploy.server_app.FlowerEngine`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from splitpeft.federation.records import RoundRecord
from splitpeft.federation.simulation import Simulation


class Engine(Protocol):
    """Plays a federation's rounds for `run_experiment`."""

    def open(self, sim: Simulation, resumed: dict[str, Any] | None) -> dict[str, Any]:
        """Before the first round; `resumed` is what the checkpoint saved for it (None on a fresh
        run). Returns what to save with every checkpoint."""
        ...

    def play_round(self, sim: Simulation, on_device_done: Callable[[str], None]) -> RoundRecord: ...

    def close(self) -> None: ...


class InProcessEngine:
    """Every device trains in this process through its in-process channel."""

    def open(self, sim: Simulation, resumed: dict[str, Any] | None) -> dict[str, Any]:
        return {}

    def play_round(self, sim: Simulation, on_device_done: Callable[[str], None]) -> RoundRecord:
        return sim.run_round(on_device_done=on_device_done)

    def close(self) -> None:
        pass
