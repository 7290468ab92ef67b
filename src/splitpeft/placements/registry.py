"""The placements by name (`placement.placement`): the one place their names are listed. A new
placement is its class (the `Placement` protocol, `placements/base.py`) plus one line here."""

from __future__ import annotations

from collections.abc import Callable

from splitpeft.config import ExperimentConfig
from splitpeft.dlora.placement import DLoRAPlacement
from splitpeft.placements.base import Placement
from splitpeft.placements.centralized import CentralizedPlacement
from splitpeft.placements.split import SplitPlacement

# name -> constructor taking `labels_on_device` (only split has a U-shaped variant)
REGISTRY: dict[str, Callable[[bool], Placement]] = {
    "split": lambda labels_on_device: SplitPlacement(labels_on_device=labels_on_device),
    "dlora": lambda labels_on_device: DLoRAPlacement(),
    "centralized": lambda labels_on_device: CentralizedPlacement(),
}
PLACEMENTS = tuple(REGISTRY)


def make_placement(name: str, *, labels_on_device: bool = True) -> Placement:
    if name not in REGISTRY:
        raise ValueError(f"unknown placement {name!r}; choose from {', '.join(PLACEMENTS)}")
    return REGISTRY[name](labels_on_device)


def placement_of(config: ExperimentConfig) -> Placement:
    """The config's placement (`placement.placement`, with `placement.labels_on_device`)."""
    return make_placement(config.placement.placement, labels_on_device=config.placement.labels_on_device)
