"""The federation's global state, kept by the server between rounds.

Per module and holder (a device "device-3" or a server session "server/device-3"): the adapter
that holder starts the next round with; the dense updates merged into the shared frozen weights
(noise-free aggregation); the token weights of the last aggregation. From these come the global
model (for evaluation) and the exported PEFT folder.

One round's aggregation: check every copy against what its holder was given this round (dtype,
shapes, rank, finiteness, token count) before any arithmetic; a device with a bad copy is dropped
with all its copies and its server session's, named in the report, never the run and never
another device. Then, per module, hand the good copies (fp32, each with the adapter its holder
started from) to the aggregator (robust policies included), merge its base delta into the frozen
weight, and keep each holder's next adapter.

Noise-free's warm start (`Aggregate.adapters_in_base`): the merged weights hold the whole
aggregate, and each holder trains against them minus its own adapter's product (`Party.load`
derives that residual from the adapter it is given). The global model is then the merged weights
alone, and a checkpoint of the holders' adapters and the merged deltas restores every holder's
frozen weight exactly, with nothing per holder stored beside them.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from transformers import PreTrainedModel

from splitpeft.aggregation.base import (
    AdapterCopy,
    AggregationError,
    Aggregator,
    Clip,
    as_fp32,
    checked_upload,
    per_tensor,
    token_weights,
)
from splitpeft.model import adapters as lora
from splitpeft.model.adapters import AdapterSet, LoraWeights
from splitpeft.model.backbone import share_frozen_copy
from splitpeft.model.runtime import stochastic_round

log = logging.getLogger(__name__)


SERVER_HOLDER = "server/"  # a server session's holder name: "server/<device>"


def device_of(holder: str) -> str:
    """The device a holder stands for: itself, or the device whose server session it is."""
    return holder.removeprefix(SERVER_HOLDER)


@dataclass
class AggregationReport:
    """What one round's aggregation refused or changed."""

    rejected: list[str] = field(default_factory=list)      # one line per refused copy: module, holder, why
    dropped: dict[str, str] = field(default_factory=dict)  # device -> why all its copies were left out
    clipped: list[Clip] = field(default_factory=list)      # updates a robust policy scaled down


def initial_adapters(base: torch.nn.Module, ranks: Mapping[str, int], alpha: float, seed: int,
                     rslora: bool = False) -> AdapterSet:
    """Fresh LoRA weights for every module (peft's init: A random, B = 0) from `seed`."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = lora.inject(share_frozen_copy(base), ranks, alpha, rslora=rslora)  # type: ignore[arg-type]
    torch.random.set_rng_state(state)
    return lora.read_adapters(model)


def factorise(delta: torch.Tensor, alpha: float, tolerance: float = 1e-6, rslora: bool = False) -> LoraWeights:
    """A LoRA pair with s B A == delta (d_out, d_in), s = lora.scale(alpha, r, rslora), r = numerical rank of delta."""
    u, singular, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    rank = max(1, int((singular > tolerance * singular[0].clamp(min=1e-30)).sum()))
    root = singular[:rank].sqrt() / lora.scale(alpha, rank, rslora) ** 0.5
    return LoraWeights((root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float())


def _frozen_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The weight of module `name` (nn.Module.__getattr__ is typed `Tensor | Module`)."""
    return cast(torch.Tensor, model.get_submodule(name).weight)


def merge_delta(model: PreTrainedModel, name: str, delta: torch.Tensor) -> None:
    """W += delta (d_out, d_in) in `model`'s frozen weight of module `name`; a bf16 / fp16 W
    takes the sum computed in fp32 and rounded stochastically (`stochastic_round`), which every
    holder of W does alike."""
    weight = _frozen_weight(model, name)
    if weight.device.type == "meta":  # a party that does not hold this block
        return
    add_to_weight(weight, delta.T if lora.is_fan_in_fan_out(model) else delta, name)


def add_to_weight(weight: torch.Tensor, delta: torch.Tensor, name: str) -> None:
    """weight += delta in place: exact to fp32 for an fp32 weight, stochastically rounded (unbiased)
    into a lower-precision one, where nearest rounding would drop every change below half a unit."""
    delta = delta.to(weight.device)
    with torch.no_grad():
        if weight.dtype in (torch.float32, torch.float64):
            weight.add_(delta)
        else:
            weight.copy_(stochastic_round(weight.float() + delta.float(), weight.dtype, name))


class GlobalState:
    """Adapters per holder, merged updates, and the aggregation that moves them forward.

    `base` is the server's frozen model (its weights are shared with every party's copy, so a
    merge is seen by all); `ranks` the adapted modules at the configured rank.
    """

    def __init__(self, base: PreTrainedModel, modules: list[str], *, rank: int, alpha: float, seed: int,
                 aggregator: Aggregator, mirrors: list[PreTrainedModel] | None = None, rslora: bool = False) -> None:
        self.base = base
        self.mirrors = mirrors or []  # other copies of the frozen weights a merge must reach
        self.ranks = {name: rank for name in modules}
        self.alpha = alpha
        self.rslora = rslora
        self.seed = seed
        self.aggregator = aggregator
        self.global_adapters = initial_adapters(base, self.ranks, alpha, seed, rslora)
        self._initial_by_rank = {rank: self.global_adapters}
        self.holder_state: dict[str, AdapterSet] = defaultdict(dict)
        self.last_weights: dict[str, dict[str, float]] = {}  # module -> holder -> p_h of the last aggregation
        self.merged: dict[str, torch.Tensor] = {}  # sum of deltas merged into each frozen weight
        # Modules whose last aggregation put the holders' adapters inside the merged weight (warm start)
        self.adapters_in_base: set[str] = set()
        # What each holder was given this round: its upload is checked against it (modules, ranks)
        # and its update measured from it. Cleared by `aggregate`.
        self.given: dict[str, AdapterSet] = {}
        # What the last aggregation changed (`federation/workers.py` sends it to the processes
        # that train the devices): the deltas merged into the frozen weights, in order, and the
        # holders whose adapters it wrote.
        self.round_merges: list[tuple[str, torch.Tensor]] = []
        self.updated_holders: set[str] = set()

    def start_state(self, holder: str, ranks: Mapping[str, int]) -> AdapterSet:
        """What `holder` starts the round with: its aggregated adapters, else the initial ones.

        Remembered as what `holder` was given this round (`given`)."""
        state = self.holder_state.get(holder, {})
        start = {}
        for name, rank in ranks.items():
            if name in state and state[name].rank == rank:
                start[name] = state[name]
            elif self.global_adapters[name].rank == rank:
                start[name] = self.global_adapters[name]
            else:
                if rank not in self._initial_by_rank:
                    self._initial_by_rank[rank] = initial_adapters(
                        self.base, {n: rank for n in self.ranks}, self.alpha, self.seed, self.rslora)
                start[name] = self._initial_by_rank[rank][name]
        self.given[holder] = start
        return start

    def check_upload(self, name: str, copy: AdapterCopy, norms: tuple[float, float] | None = None) -> AdapterCopy:
        """`copy` in fp32 with the adapter its holder started from, once it proves to be module
        `name` at the rank its holder was given, of the module's (d_out, d_in), finite and sane."""
        start = self.given.get(copy.holder, {}).get(name)
        if start is None:
            raise AggregationError(f"{name} from {copy.holder}: this holder was not given {name} this round")
        initial = self.global_adapters[name]
        return checked_upload(name, copy, rank=start.rank, d_in=initial.A.shape[1], d_out=initial.B.shape[0],
                              norms=norms, start=LoraWeights(as_fp32(start.A), as_fp32(start.B)))

    def aggregate(self, copies: Mapping[str, list[AdapterCopy]]) -> AggregationReport:
        """Next round's adapters per holder from this round's copies (module -> copies).

        First every copy is checked (`check_upload`); a device with any bad copy (its own or its
        server session's) loses all of them this round. Then each module's good copies are
        aggregated; the robust policies in the aggregator may clip some (reported)."""
        report = AggregationReport()
        self.round_merges, self.updated_holders = [], set()
        checked: dict[str, list[AdapterCopy]] = defaultdict(list)
        for name, module_copies in copies.items():
            seen: set[str] = set()
            norms = _fp32_norms(module_copies)
            for candidate, candidate_norms in zip(module_copies, norms):
                try:
                    if candidate.holder in seen:
                        raise AggregationError(f"{name} from {candidate.holder}: more than one copy")
                    seen.add(candidate.holder)
                    checked[name].append(self.check_upload(name, candidate, candidate_norms))
                except AggregationError as error:
                    device = device_of(candidate.holder)
                    log.warning("dropping %s's uploads this round: %s", device, error)
                    report.rejected.append(str(error))
                    report.dropped.setdefault(device, str(error))
        for name, module_copies in checked.items():
            good = [c for c in module_copies if device_of(c.holder) not in report.dropped]
            if not good:
                continue
            result = self.aggregator.aggregate(name, good)
            if result.base_delta is not None:
                self.merge(name, result.base_delta)
                self.round_merges.append((name, result.base_delta))
            for holder, weights in result.adapters.items():
                self.holder_state[holder][name] = weights
            self.updated_holders.update(result.adapters)
            self.last_weights[name] = dict(zip((c.holder for c in good), token_weights(good)))
            if result.adapters_in_base:
                self.adapters_in_base.add(name)
            else:
                self.adapters_in_base.discard(name)
            if self.aggregator.shared_adapter:
                self.global_adapters[name] = next(iter(result.adapters.values()))
            report.clipped += result.clipped
        finish_round = getattr(self.aggregator, "finish_round", None)
        if finish_round is not None:  # a policy with state across rounds (robust clipping's history)
            finish_round()
        self.given.clear()
        return report

    def merge(self, name: str, delta: torch.Tensor) -> None:
        """W += delta (d_out, d_in) in the shared frozen weight, so every holder sees it."""
        for model in (self.base, *self.mirrors):
            merge_delta(model, name, delta)
        self.merged[name] = self.merged[name] + delta if name in self.merged else delta.clone()

    def global_delta(self, name: str) -> torch.Tensor | None:
        """The global model's adapter update of `name` beyond what is merged: sum_h p_h s_h B_h A_h
        (None where nothing is beyond it: no aggregation yet, or a warm start, whose adapters
        are inside the merged weight)."""
        weights = self.last_weights.get(name)
        if not weights or name in self.adapters_in_base:
            return None
        total = torch.zeros(())
        for holder, p in weights.items():
            adapter = self.holder_state[holder][name]
            total = total + p * lora.scale(self.alpha, adapter.rank, self.rslora) * (adapter.B @ adapter.A)
        return total

    def homogeneous(self) -> bool:
        """One shared adapter per module and nothing merged: the global model is base + LoRA."""
        return self.aggregator.shared_adapter and not self.merged

    def global_model(self) -> torch.nn.Module:
        """The current global model: base (with merged updates) + the global adapter updates.

        Homogeneous: the base with peft LoRA layers holding the global adapters; otherwise a copy
        whose frozen weights include the dense global updates.
        """
        if self.homogeneous():
            model = lora.inject(share_frozen_copy(self.base), self.ranks, self.alpha, rslora=self.rslora)
            lora.write_adapters(model, self.global_adapters)
        else:
            model = copy.deepcopy(self.base)
            with torch.no_grad():
                for name in self.ranks:
                    delta = self.global_delta(name)
                    if delta is not None:
                        merge_delta(model, name, delta)
        model.eval()
        return model

    def export(self, path: Path, merged: bool = False) -> None:
        """Write the global model as a PEFT adapter folder relative to the original base weights.

        Heterogeneous or merged updates are factorised exactly: delta = U S V^T at its numerical
        rank, B = U sqrt(S) / sqrt(s), A = sqrt(S) V^T / sqrt(s) with s = lora.scale(alpha, rank).
        """
        if self.homogeneous():
            lora.export_peft(self.base, self.global_adapters, self.alpha, path, merged=merged, rslora=self.rslora)
            return
        original = copy.deepcopy(self.base)
        factors = {}
        with torch.no_grad():
            for name in self.ranks:
                delta = self.global_delta(name)
                merged_delta = self.merged.get(name)
                if merged_delta is not None:
                    weight = _frozen_weight(original, name)
                    weight.sub_(merged_delta.T if lora.is_fan_in_fan_out(original) else merged_delta)
                parts = [t for t in (merged_delta, delta) if t is not None]
                if parts:
                    factors[name] = factorise(sum(parts[1:], parts[0]), self.alpha, rslora=self.rslora)
        if not factors:
            factors = dict(self.global_adapters)
        lora.export_peft(original, factors, self.alpha, path, merged=merged, rslora=self.rslora)


def _fp32_norms(copies: Sequence[AdapterCopy]) -> list[tuple[float, float] | None]:
    """|A| and |B| in fp32 of every copy whose A and B are floating tensors, batched by shape
    (`per_tensor`); None for the others, which `check_copy` refuses before any arithmetic."""
    good = [i for i, c in enumerate(copies)
            if all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in c.weights)]
    a_norms = per_tensor([as_fp32(copies[i].weights.A) for i in good], "norm32")
    b_norms = per_tensor([as_fp32(copies[i].weights.B) for i in good], "norm32")
    norms: list[tuple[float, float] | None] = [None] * len(copies)
    for i, a, b in zip(good, a_norms, b_norms):
        norms[i] = (a, b)
    return norms
