"""Aggregators: how the copies of one module's adapter, trained by different holders in a round,
become the next round's adapters. Named policies behind one interface, chosen by config.

A copy is (holder, A_i (r_i, d_in), B_i (d_out, r_i), weight w_i, scale s_i = alpha / r_i); its
dense update is s_i B_i A_i (d_out, d_in). Weights are the tokens each holder trained on,
normalised to p_i = w_i / sum w. An aggregator returns the adapter each holder starts the next
round with (at that holder's rank) and, where the policy merges into the frozen weight, the dense
delta to add to it.

Policies (DESIGN.md, "NAA"): `noise_free` (exact stacked aggregate merged into the frozen weight;
fresh adapters, or warm ones whose product each holder subtracts from its own frozen weight), and the baselines `fedavg`, `zero_pad` (HetLoRA) and `svd` (FlexLoRA); robust
variants (update clipping, coordinate-wise trimmed mean and median) in `aggregation/robust.py`.

Every copy is checked before any arithmetic on it (`check_copy`; the federation's state also checks
it against what the holder was given, `checked_upload`): a copy that fails names its own holder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from splitpeft.model.adapters import LoraWeights

MAX_ADAPTER_NORM = 1e4


class AggregationError(ValueError):
    """Copies that cannot be aggregated (rank or shape mismatch, NaN/Inf, absurd norm)."""


@dataclass(frozen=True)
class AdapterCopy:
    holder: str
    weights: LoraWeights
    tokens: int
    scale: float = 1.0  # alpha / r of this copy: its dense update is scale * B @ A
    # The adapter the holder started the round with (same rank): its update is what it added to
    # it. None: measured from zero (A0 = 0, B0 = 0).
    start: LoraWeights | None = None
    # Set by `checked_upload` on the fp32 copy it returns (and kept by `replace`): `check_copy`
    # has passed on exactly these tensors, so the aggregators' own checks do not redo it.
    checked: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Clip:
    """One holder's update of one module, scaled down by `factor` (< 1) before aggregation.

    `norm` is the update's size and `limit` what it was allowed (clip_factor x the module's
    median); `on` says what was measured: "BA" (the dense update s B A - s B0 A0) or "A" / "B"
    (the factor updates, for aggregators that average A and B separately)."""

    holder: str
    module: str
    factor: float
    norm: float
    limit: float
    on: str

    def describe(self) -> dict[str, str | float]:
        return {"holder": self.holder, "module": self.module, "factor": self.factor, "on": self.on,
                "norm": self.norm, "limit": self.limit}


@dataclass
class Aggregate:
    """One module's aggregation: each holder's next adapter and what is merged into the frozen weight.

    `adapters_in_base` (noise_free's warm start): `base_delta` already holds the adapters'
    products, so holder h trains against its own frozen weight W + base_delta - s_h B_h A_h (W the
    shared frozen weight before this merge, (A_h, B_h) = adapters[h]) and computes exactly
    W + base_delta. The residual is derived from the adapter by the holder itself (`Party.load`),
    never sent. False: every holder trains against W + base_delta (plus its adapter)."""

    adapters: dict[str, LoraWeights]           # holder -> adapter for the next round
    base_delta: torch.Tensor | None = None      # (d_out, d_in) merged into the frozen weight
    clipped: list[Clip] = field(default_factory=list)  # updates a robust policy scaled down
    adapters_in_base: bool = False              # the adapters' products are inside base_delta (warm start)


class Aggregator(Protocol):
    name: str
    # True: every holder gets the same adapter back (the global model is base + that adapter);
    # False: holders' adapters differ, or updates are merged into the frozen weights.
    shared_adapter: bool
    # True: A and B are combined separately (fedavg, zero_pad, trimmed mean, median), so a holder
    # moves the result through its A and B updates; False: only each copy's product s B A counts.
    averages_factors: bool
    # True: holders may restart warm from the aggregate (federation.noise_free_start=warm, its factors
    # and moments options); False: only cold restarts (noise_free's options do not apply)
    warm_restarts: bool

    def aggregate(self, module: str, copies: Sequence[AdapterCopy]) -> Aggregate: ...


Reduction = Literal["max_abs", "norm", "norm32"]


def per_tensor(values: Sequence[torch.Tensor], reduce: Reduction) -> list[float]:
    """`reduce` of each tensor: its largest |x|, its norm in float64 ("norm") or in its own dtype
    ("norm32"); see `per_tensor_reductions`."""
    return per_tensor_reductions(values, (reduce,))[reduce]


def per_tensor_reductions(values: Sequence[torch.Tensor], reductions: Sequence[Reduction],
                          minus: Sequence[torch.Tensor] | None = None) -> dict[str, list[float]]:
    """Each of `reductions` of each tensor of `values` (less the same-shaped `minus` one, if
    given). One subtraction and one batched reduction per group of equal shapes and dtypes (a
    fleet's copies of a module mostly share one): the same numbers as reducing each tensor alone,
    without a Python-level call per copy."""
    results: dict[str, list[float]] = {reduce: [0.0] * len(values) for reduce in reductions}
    groups: dict[tuple[tuple[int, ...], torch.dtype, torch.device, torch.dtype | None], list[int]] = {}
    for i, value in enumerate(values):
        key = (tuple(value.shape), value.dtype, value.device, None if minus is None else minus[i].dtype)
        groups.setdefault(key, []).append(i)
    for (shape, _, device, _), indexes in groups.items():
        if math.prod(shape) == 0:
            continue
        stacked = torch.stack([values[i] for i in indexes])
        if minus is not None:
            stacked = stacked - torch.stack([minus[i] for i in indexes]).to(device)
        stacked = stacked.reshape(len(indexes), -1)
        for reduce in reductions:
            if reduce == "norm":
                reduced = torch.linalg.vector_norm(stacked.double(), dim=1)
            elif reduce == "norm32":
                reduced = torch.linalg.vector_norm(stacked, dim=1)
            elif reduce == "max_abs":
                reduced = stacked.abs().amax(dim=1)
            else:
                raise ValueError(f"unknown reduction {reduce!r}")
            for i, value in zip(indexes, reduced.tolist()):
                results[reduce][i] = float(value)
    return results


def check_copy(module: str, copy: AdapterCopy, norms: tuple[float, float] | None = None) -> None:
    """Reject a copy that is not a finite, sane LoRA pair (a poisoned or broken upload).

    Nothing is computed on a tensor before its type and dtype are known to be a floating one.
    `norms`: |A| and |B| in fp32 already computed for many copies at once (`per_tensor`)."""
    if copy.checked:
        return
    a, b = copy.weights
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise AggregationError(f"{module} from {copy.holder}: A and B must be tensors")
    for name, value in (("A", a), ("B", b)):
        if not value.is_floating_point():
            raise AggregationError(f"{module} from {copy.holder}: {name} has dtype {value.dtype}, not a floating one")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
        raise AggregationError(f"{module} from {copy.holder}: A{tuple(a.shape)} B{tuple(b.shape)} is not a LoRA pair")
    check_values(module, copy, norms)


def check_values(module: str, copy: AdapterCopy, norms: tuple[float, float] | None = None) -> None:
    """The checks of `check_copy` on a copy whose A and B are known to be a floating LoRA pair:
    finite and within the norm cap, a sane token count and a positive scale."""
    for index, (name, value) in enumerate(zip("AB", copy.weights)):
        # finite and within the cap only if every entry is finite
        norm = norms[index] if norms is not None else float(value.float().norm())
        if not norm <= MAX_ADAPTER_NORM:
            if not bool(torch.isfinite(value).all()):
                raise AggregationError(f"{module} from {copy.holder}: {name} contains NaN or Inf")
            raise AggregationError(f"{module} from {copy.holder}: |{name}| = {norm:.3g} exceeds {MAX_ADAPTER_NORM:g}")
    check_tokens(module, copy)
    if not (isinstance(copy.scale, (int, float)) and math.isfinite(copy.scale) and copy.scale > 0):
        raise AggregationError(f"{module} from {copy.holder}: scale {copy.scale!r} is not a positive number")


def as_fp32(value: torch.Tensor) -> torch.Tensor:
    """`value` detached in fp32 on the CPU, where the coordinator aggregates (a copy trained on a
    GPU in an in-process simulation arrives there; the adapters it started from are on the CPU):
    itself when it already is (no call into torch per tensor, which a fleet's tens of thousands of
    copies a round would pay for)."""
    if value.dtype == torch.float32 and not value.requires_grad and value.device.type == "cpu":
        return value
    return value.detach().to("cpu", torch.float32)


def check_tokens(module: str, copy: AdapterCopy) -> None:
    """A token count is a non-negative integer (a bool, a float, NaN or Inf is not)."""
    tokens = copy.tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise AggregationError(f"{module} from {copy.holder}: token count {tokens!r} is not a non-negative integer")


def checked_upload(module: str, copy: AdapterCopy, *, rank: int, d_in: int, d_out: int,
                   norms: tuple[float, float] | None = None, start: LoraWeights | None = None) -> AdapterCopy:
    """`copy` as an fp32 copy once it proves to be what its holder was given to train: floating
    A (rank, d_in) and B (d_out, rank), finite, within the norm cap, trained on a positive integer
    number of tokens. Raises AggregationError naming the holder otherwise. `start`: the adapter
    the holder started from, which the returned copy carries (default: the copy's own).

    Every check happens before any arithmetic that a wrong dtype or shape could break, and against
    the module's own (d_out, d_in) and the holder's rank, never against another holder's copy."""
    a, b = copy.weights
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise AggregationError(f"{module} from {copy.holder}: A and B must be tensors")
    for name, value, shape in (("A", a, (rank, d_in)), ("B", b, (d_out, rank))):
        if not value.is_floating_point():
            raise AggregationError(f"{module} from {copy.holder}: {name} has dtype {value.dtype}, not a floating one")
        if tuple(value.shape) != shape:
            raise AggregationError(
                f"{module} from {copy.holder}: {name} has shape {tuple(value.shape)}, expected {shape} "
                f"(rank {rank}, d_in {d_in}, d_out {d_out})")
    tokens = copy.tokens
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise AggregationError(f"{module} from {copy.holder}: token count {tokens!r} is not a positive integer")
    if rank == 0:
        raise AggregationError(f"{module} from {copy.holder}: A{tuple(a.shape)} B{tuple(b.shape)} is not a LoRA pair")
    # fp32 after the dtype check: a float64 beyond fp32's range becomes inf and fails below.
    converted = AdapterCopy(copy.holder, LoraWeights(as_fp32(a), as_fp32(b)), tokens, copy.scale,
                            copy.start if start is None else start, checked=True)
    check_values(module, converted, norms)  # raises before the copy, marked checked, is seen
    return converted


def check_copies(module: str, copies: Sequence[AdapterCopy]) -> tuple[int, int]:
    """Validate every copy and that all adapt the same (d_out, d_in) weight; return (d_out, d_in).

    Ranks may differ. Each holder may appear once: the result is keyed by holder.
    """
    if not copies:
        raise AggregationError(f"{module}: nothing to aggregate")
    for copy in copies:
        check_copy(module, copy)
    first = copies[0]
    d_out, d_in = first.weights.B.shape[0], first.weights.A.shape[1]
    seen: set[str] = set()
    for copy in copies:
        a, b = copy.weights
        if (b.shape[0], a.shape[1]) != (d_out, d_in):
            raise AggregationError(
                f"{module} from {copy.holder}: adapts a ({b.shape[0]}, {a.shape[1]}) weight but "
                f"{first.holder} adapts ({d_out}, {d_in}) (d_out, d_in)"
            )
        if copy.holder in seen:
            raise AggregationError(f"{module}: {copy.holder} sent more than one copy")
        seen.add(copy.holder)
    return d_out, d_in


def token_weights(copies: Sequence[AdapterCopy]) -> list[float]:
    """p_i = tokens_i / sum tokens (uniform when no copy trained on any token).

    Integer division of Python ints: exact for any count, never an overflow or a NaN."""
    total = sum(c.tokens for c in copies)
    if total == 0:
        return [1.0 / len(copies)] * len(copies)
    return [c.tokens / total for c in copies]
