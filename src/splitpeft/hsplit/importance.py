"""IWI, important-weight identification: which linears are worth adapting, per unit of cost.

Three steps, each a small function or class (DESIGN.md, "The algorithms"):

1. `probe_importance`: for every candidate weight W, the gradient-weight product over a few probe
   batches, ``g(W) = mean_batches mean_ij |W_ij * dL/dW_ij|`` with L the causal-LM loss of the
   whole model on the batch. It is the first-order estimate of how much the loss would change if
   W were perturbed in proportion to itself: large where adapting W can move the loss.
2. `normalised_scores`: g divided by the cost of adapting W at rank r, ``r (d_in + d_out)``
   (LoRA parameters = per-token adapter FLOPs / 2), so a small matrix that matters as much as a big
   one ranks above it.
3. `ImportanceTracker`: exponential smoothing of the scores across probes with a smoothing factor
   that grows as the scores settle, and `moved` / `relative_l1_change` to decide when the plan
   has to be re-made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel

from splitpeft.data.batching import Batch
from splitpeft.model.backbone import Backbone, share_frozen_copy
from splitpeft.model.loss import head_loss


def base_linear(model: nn.Module, name: str) -> nn.Module:
    """The frozen linear called `name` in `model`, looking through peft wrappers.

    `name` is a full module name as `target_module_names` gives it; a model wrapped by
    `get_peft_model` prefixes it with "base_model.model.", and a LoRA layer keeps the original
    linear as `base_layer`.
    """
    modules = dict(model.named_modules())
    module = modules.get(name) or modules.get(f"base_model.model.{name}")
    if module is None:
        raise KeyError(f"no module {name!r} in the model")
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear: nn.Linear stores W as (d_out, d_in), GPT-2's Conv1D as (d_in, d_out)."""
    weight = cast(torch.Tensor, module.weight)  # nn.Module.__getattr__ is typed `Tensor | Module`
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return int(weight.shape[0]), int(weight.shape[1])
    raise TypeError(f"{type(module).__name__} is not a linear layer")


def probe_importance(
    model: PreTrainedModel,
    backbone: Backbone,
    batches: Iterable[Batch],
    modules: list[str],
) -> dict[str, float]:
    """Gradient-weight importance g(W) = mean over batches of mean |W * dL/dW| for each module.

    L = causal_lm_loss(head(blocks(embed(ids), 0, L)), labels): the whole model, any adapters it
    carries included. The elementwise product does not depend on whether W is stored (d_out, d_in)
    or (d_in, d_out) (GPT-2 Conv1D), so both layouts give the same score.

    The probe runs on a `share_frozen_copy` of `model` in which each probed weight is replaced by
    a fresh leaf that *shares its storage* (no copy) and requires grad. The shared base keeps its
    own requires_grad flags untouched (so nothing changes for other parties using it, even
    mid-probe), and gradients are taken with `torch.autograd.grad`, so no `.grad` is ever left on
    any tensor. Dropout is off (eval mode) so the probe is deterministic.
    """
    if not modules:
        return {}
    probe_model = share_frozen_copy(model)
    probe_model.eval()
    probe_backbone = dataclasses.replace(backbone, model=probe_model)  # type: ignore[type-var]
    weights: list[nn.Parameter] = []
    for name in modules:
        linear = base_linear(probe_model, name)
        frozen = cast(torch.Tensor, linear.weight)  # nn.Module.__getattr__ is typed `Tensor | Module`
        leaf = nn.Parameter(frozen.detach(), requires_grad=True)  # same storage, own flag
        linear.weight = leaf
        weights.append(leaf)
    totals = torch.zeros(len(modules), dtype=torch.float64)
    count = 0
    for batch in batches:
        with torch.enable_grad():
            hidden = probe_backbone.blocks(probe_backbone.embed(batch.input_ids), 0, probe_backbone.num_blocks)
            loss = head_loss(probe_backbone.head, hidden, batch.labels)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
        for i, (weight, grad) in enumerate(zip(weights, grads)):
            if grad is not None:
                totals[i] += (weight.detach() * grad).abs().mean().double()
        count += 1
    if count == 0:
        raise ValueError("probe_importance needs at least one batch")
    return {name: float(total / count) for name, total in zip(modules, totals)}


def adaptation_cost(d_in: int, d_out: int, rank: int) -> int:
    """Cost of adapting a (d_in -> d_out) linear at rank r: r (d_in + d_out) parameters per module
    (and multiply-adds per token)."""
    return rank * (d_in + d_out)


def normalised_scores(
    raw: Mapping[str, float], shapes: Mapping[str, tuple[int, int]], rank: int
) -> dict[str, float]:
    """Resource-normalised importance: g(W) / (r (d_in + d_out)); `shapes` maps module -> (d_in, d_out)."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return {name: value / adaptation_cost(*shapes[name], rank) for name, value in raw.items()}


def relative_l1_change(new: Mapping[str, float], old: Mapping[str, float]) -> float:
    """||new - old||_1 / ||old||_1 over the union of modules (a missing score counts as 0).

    0 when both are empty; infinity when `old` is all zero and `new` is not.
    """
    names = set(new) | set(old)
    change = sum(abs(new.get(n, 0.0) - old.get(n, 0.0)) for n in names)
    norm = sum(abs(old.get(n, 0.0)) for n in names)
    if norm == 0.0:
        return 0.0 if change == 0.0 else float("inf")
    return change / norm


@dataclass
class TrackerStep:
    """One `ImportanceTracker.update`: the probe g_t, its fluctuation f_t, beta_t and the new s_t."""

    probe: dict[str, float]
    fluctuation: float
    beta: float
    scores: dict[str, float]


@dataclass
class ImportanceTracker:
    """Scores smoothed across probes, trusting the history more as the scores settle.

        f_t    = ||g_t - s_(t-1)||_1 / ||s_(t-1)||_1                         (fluctuation)
        beta_t = clip(beta_min + (beta_max - beta_min) (1 - min(1, f_t)), beta_min, beta_max)
        s_t    = beta_t s_(t-1) + (1 - beta_t) g_t

    The first update sets s_1 = g_1 (f_1 = inf, beta_1 = 0 is recorded). A large fluctuation
    (f >= 1) gives beta_min: the scores are still moving, so the new probe weighs most; as f -> 0
    beta -> beta_max and one noisy probe can no longer swing the plan. Modules new in g_t start at
    g_t; modules missing from g_t keep their score.
    """

    beta_min: float = 0.5
    beta_max: float = 0.95
    scores: dict[str, float] = field(default_factory=dict)
    history: list[TrackerStep] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta_min <= self.beta_max <= 1.0:
            raise ValueError(
                f"need 0 <= beta_min <= beta_max <= 1, got beta_min={self.beta_min}, beta_max={self.beta_max}"
            )

    def beta(self, fluctuation: float) -> float:
        """beta_t for a fluctuation f_t (see the class docstring)."""
        beta = self.beta_min + (self.beta_max - self.beta_min) * (1.0 - min(1.0, fluctuation))
        return min(max(beta, self.beta_min), self.beta_max)

    def update(self, probe: Mapping[str, float]) -> dict[str, float]:
        """Fold probe g_t into the scores; returns s_t (a copy)."""
        probe = dict(probe)
        if not self.scores:
            fluctuation, beta = float("inf"), 0.0
            self.scores = dict(probe)
        else:
            previous = self.scores
            common = {n: previous[n] for n in probe if n in previous}
            fluctuation = relative_l1_change({n: probe[n] for n in common}, common)
            beta = self.beta(fluctuation)
            self.scores = {
                **previous,
                **{n: (beta * previous[n] + (1.0 - beta) * g) if n in previous else g for n, g in probe.items()},
            }
        self.history.append(TrackerStep(probe, fluctuation, beta, dict(self.scores)))
        return dict(self.scores)
