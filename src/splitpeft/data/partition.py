"""Held-out split and partitions across devices: grouped by meaning representation (no MR in
both train and held-out), IID, Dirichlet non-IID over a field, or "whole" (every device all)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from splitpeft.data.examples import MISSING_FIELD_VALUE, Example

# --------------------------------------------------------------------------------------------
# Held-out split and device partitions
# --------------------------------------------------------------------------------------------


def _rng(seed: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(seed)


def split_by_group(
    examples: Sequence[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split into (train, eval) so that no group is in both (evaluation on unseen inputs).

    ``round(eval_fraction * n_groups)`` randomly chosen groups go to eval; order within each part
    follows the input. Deterministic given ``seed``.

    Raises:
        ValueError: ``eval_fraction`` outside (0, 1) or a part would be empty.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    groups = list(dict.fromkeys(ex.group for ex in examples))
    n_eval = round(eval_fraction * len(groups))
    if n_eval < 1 or n_eval >= len(groups):
        raise ValueError(
            f"eval_fraction={eval_fraction} of {len(groups)} groups leaves "
            f"{'eval' if n_eval < 1 else 'train'} empty"
        )
    order = _rng(seed).permutation(len(groups))
    eval_groups = {groups[i] for i in order[:n_eval]}
    train = [ex for ex in examples if ex.group not in eval_groups]
    held_out = [ex for ex in examples if ex.group in eval_groups]
    return train, held_out


def partition(
    examples: Sequence[Example],
    n_devices: int,
    scheme: Literal["iid", "dirichlet", "whole"],
    *,
    alpha: float = 0.5,
    field: str | None = None,
    seed: int = 0,
) -> list[list[Example]]:
    """Share examples among ``n_devices`` devices.

    - ``"iid"``: shuffle, then deal round-robin (sizes differ by at most one).
    - ``"whole"``: every device gets all examples (a real device with its own data file).
    - ``"dirichlet"``: for each value v of ``fields[field]`` (missing -> ``"<none>"``), draw
      p ~ Dir(alpha * 1_n) and give device i a share p_i of v's examples. Small alpha -> each
      value concentrates on few devices (label skew). Empty devices then take one example from
      the largest device until every device has one.

    Deterministic given ``seed``.

    Raises:
        ValueError: unknown scheme, ``n_devices < 1``, fewer examples than devices,
            ``alpha <= 0``, or ``field`` missing for ``"dirichlet"``.
    """
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    if scheme == "whole":
        if not examples:
            raise ValueError("no examples to train on")
        return [list(examples) for _ in range(n_devices)]
    if scheme not in ("iid", "dirichlet"):
        raise ValueError(f"unknown partition scheme {scheme!r}; expected 'iid', 'dirichlet' or 'whole'")
    if len(examples) < n_devices:
        raise ValueError(f"cannot give {n_devices} devices an example each from {len(examples)} examples")
    rng = _rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(examples))
        return [[examples[i] for i in order[d::n_devices]] for d in range(n_devices)]

    if field is None:
        raise ValueError("partition scheme 'dirichlet' needs field= (e.g. 'food' or 'type')")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    by_value: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_value.setdefault(ex.fields.get(field, MISSING_FIELD_VALUE), []).append(i)
    shards: list[list[int]] = [[] for _ in range(n_devices)]
    for value in sorted(by_value):  # sorted: draws must not depend on input order of values
        indices = np.array(by_value[value])[rng.permutation(len(by_value[value]))]
        proportions = rng.dirichlet(np.full(n_devices, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(indices)).round().astype(int)
        for device, part in enumerate(np.split(indices, cuts)):
            shards[device].extend(int(i) for i in part)
    for device in range(n_devices):
        if not shards[device]:
            largest = max(range(n_devices), key=lambda d: len(shards[d]))
            shards[device].append(shards[largest].pop())
    return [[examples[i] for i in sorted(shard)] for shard in shards]
