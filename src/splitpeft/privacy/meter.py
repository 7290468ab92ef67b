"""The privacy meter: an honest-but-curious server played against a device's own traffic.

The server follows the protocol and keeps everything it sees. It also knows the frozen base model,
the adapters (it aggregates them every round), the defence's mechanism (sigma and C, not the noise
itself) and public text of the task's kind (the *auxiliary* text). The meter:

1. `capture`s, for the device's private examples, exactly what crosses the cut at split k for the
   run's placement (`Exposure`): the cut activations after the device's defence and the wire's
   compression; plain split's label tensor; U-shaped split's and dlora's head gradient, with the
   final hidden states the server sent down. The same functions produce the server's own copy of
   that traffic on the auxiliary text, on which the attackers train.
2. Runs every attacker (`privacy/attackers.py`) that the traffic exposes, and scores its
   reconstruction of the private tokens (`privacy/scoring.py`): token accuracy over every real
   token of the private text, and ROUGE-L F on token ids.
3. A placement's *leakage* is the strongest reconstruction: the strongest activation attacker's
   guesses, overwritten by the label or head-gradient attacker's where those make one (they
   recover the completion tokens exactly, but only those), or any attacker alone where that does
   better (under noise, the head-gradient inversion guesses worse than the activations do).

Chance is the best constant guess (the most frequent auxiliary token).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from transformers import PreTrainedModel

from splitpeft.data.batching import Batch, EncodedExample, collate
from splitpeft.defences.cut import Defence
from splitpeft.model.backbone import backbone_of
from splitpeft.model.loss import head_loss
from splitpeft.placements.base import Placement
from splitpeft.privacy.attackers import CutBatch, ServerKnowledge, make_attacker
from splitpeft.privacy.scoring import Score, chance_accuracy, score
from splitpeft.transport.compression import compress, decompress
from splitpeft.transport.messages import Kind, Message

log = logging.getLogger(__name__)

ACTIVATION_ATTACKERS = ("embedding_nn", "linear", "learned", "search", "bisr")  # read the cut activations
SIDE_ATTACKERS = ("labels", "gradient")                       # read the labels / the head gradient


@dataclass(frozen=True)
class Exposure:
    """What one placement at split k shows the server each step."""

    placement: str         # the placement's `exposure_name` (split: plain, split_u: U-shaped, dlora)
    split_layer: int
    labels: bool           # the label tensor goes up (plain split)
    head_gradient: bool    # the head gradient goes up, the final hidden states come down

    @property
    def label(self) -> str:
        return f"{self.placement}@{self.split_layer}"


def exposure_of(placement: Placement, split_layer: int) -> Exposure | None:
    """What a device of `placement` at `split_layer` shows the server: the label tensor where it
    sends labels, the head gradient where it keeps the head and talks to a server; None where
    nothing crosses a cut (the placement has no `exposure_name`)."""
    name = placement.exposure_name()
    if name is None:
        return None
    return Exposure(name, split_layer, labels=placement.sends_labels(),
                    head_gradient=placement.device_keeps_head() and placement.uses_server())


@dataclass
class MeterSettings:
    attackers: Sequence[str] = ("embedding_nn", "linear", "learned", *SIDE_ATTACKERS)  # search on request: slow
    batch_size: int = 8
    seed: int = 0
    learned_steps: int = 300
    learned_patience: int = 0                               # 0: exactly learned_steps; else until it flattens
    compression: str = "none"                               # transport.compression of the run
    search_candidates: int = 16                             # the search attacker's settings (privacy.search_*)
    search_lm_candidates: int = 8
    search_beam: int = 1
    bisr_steps: int = 100                                   # the optimisation attacker's (privacy.bisr_*)
    bisr_lr: float = 0.0005
    defence: Defence = field(default_factory=Defence)       # its noise seed is replaced per use


def _wire(name: str, tensor: torch.Tensor, compression: str) -> torch.Tensor:
    """`tensor` as the receiver gets it after the wire's compression (fp32, CPU)."""
    message = decompress(compress(Message(Kind.ACTIVATIONS, {name: tensor.detach()}), compression))
    return message.tensors[name].float().cpu()


def _batches(examples: Sequence[EncodedExample], batch_size: int, pad_id: int) -> Iterator[Batch]:
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_id)


@torch.no_grad()
def capture(model: PreTrainedModel, examples: Sequence[EncodedExample], exposure: Exposure, defence: Defence,
            *, pad_id: int, batch_size: int = 8, compression: str = "none") -> list[tuple[CutBatch, torch.Tensor]]:
    """What the server sees of `examples` under `exposure`, batch by batch, with the true input ids
    (B, T) of each batch (for scoring and for training attackers on auxiliary text).

    The device side is the model's own computation with the device's `defence` (the same calls as
    the placements' `device_step`); the server side recomputes the rest of the model from what it
    received, as in training.
    """
    return [(capture_batch(model, batch, exposure, defence, compression=compression), batch.input_ids.cpu())
            for batch in _batches(examples, batch_size, pad_id)]


@torch.no_grad()
def capture_batch(model: PreTrainedModel, batch: Batch, exposure: Exposure, defence: Defence, *,
                  compression: str = "none") -> CutBatch:
    """What the server sees of one `batch` under `exposure` (see `capture`)."""
    backbone = backbone_of(model)
    parameter = next(model.parameters())
    batch = batch.to(parameter.device)
    cut = defence.release(backbone.blocks(backbone.embed(batch.input_ids), 0, exposure.split_layer))  # (B, T, d)
    hidden = _wire("hidden", cut, compression)
    seen = CutBatch(hidden=hidden, mask=batch.token_mask().cpu())
    if exposure.labels:
        seen.labels = batch.labels.cpu()
    if exposure.head_gradient:
        final = backbone.blocks(hidden.to(parameter.device, cut.dtype), exposure.split_layer, backbone.num_blocks)
        final = _wire("hidden", final, compression).to(parameter.device, cut.dtype)
        with torch.enable_grad():
            leaf = final.detach().requires_grad_()
            (grad,) = torch.autograd.grad(head_loss(backbone.head, leaf, batch.labels), leaf)
        seen.final_hidden = final.float().cpu()
        seen.head_grad = _wire("grad", defence.release_gradient(grad), compression)
    return seen


def _seeded(defence: Defence, seed: int) -> Defence:
    return replace(defence, seed=seed, _generators={})


def _overlay(base: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    return torch.where(top >= 0, top, base)


def measure(model: PreTrainedModel, aux: Sequence[EncodedExample],
            cases: Sequence[tuple[Exposure, Sequence[EncodedExample]]], settings: MeterSettings, *,
            pad_id: int, server_model: PreTrainedModel | None = None) -> dict[str, Any]:
    """Every attacker of `settings` against each case's traffic (an exposure, and the private
    examples of the devices with it), trained on the same exposure's traffic on the `aux`
    examples. Returns the report section: {"chance_token_accuracy", "rows": per (exposure,
    attacker), "leakage": per exposure (combined), ...}.

    `model` computes the devices' traffic; `server_model` is what the server knows and makes its
    own traffic on the auxiliary text with (default `model`: the server aggregated the adapters).
    They differ where the devices keep adapters the server never sees."""
    model.eval()
    server_model = model if server_model is None else server_model
    server_model.eval()
    knowledge = ServerKnowledge.of(server_model)
    rows: list[dict[str, Any]] = []
    leakage: list[dict[str, Any]] = []
    chance: float | None = None
    fitted: dict[tuple[int, str], Any] = {}  # activation attackers depend only on the depth
    # Without noise, every exposure at one depth shows the same states of the same private
    # examples: an activation attacker's reconstruction is made once per depth.
    reconstructed: dict[tuple[int, str, int, bool], list[torch.Tensor]] = {}
    aux_by_depth: dict[int | tuple[int, str], list[tuple[CutBatch, torch.Tensor]]] = {}  # (k, "clean"): before noise
    # The learned inverter draws its own noise every step (noise augmentation) on the clipped
    # states before the noise: the server can add the mechanism's noise itself.
    augment = _augments(settings) and "learned" in settings.attackers
    for exposure, private in cases:
        # The server's copy of the mechanism uses its own noise; the device's is seeded apart. Every
        # attacker fits on the states alone, so the aux traffic skips the rest of the model and the
        # head gradient, and is captured once per depth.
        k = exposure.split_layer
        states_only = Exposure(exposure.placement, k, labels=False, head_gradient=False)
        if k not in aux_by_depth:
            aux_by_depth[k] = capture(
                server_model, aux, states_only, _seeded(settings.defence, settings.seed + 1), pad_id=pad_id,
                batch_size=settings.batch_size, compression=settings.compression)
        if augment and (k, "clean") not in aux_by_depth:
            aux_by_depth[(k, "clean")] = capture(
                server_model, aux, states_only, replace(_seeded(settings.defence, settings.seed + 1), noise_multiplier=0.0),
                pad_id=pad_id, batch_size=settings.batch_size)
        aux_seen = aux_by_depth[k]
        private_seen = capture(model, private, exposure, _seeded(settings.defence, settings.seed + 2), pad_id=pad_id,
                               batch_size=settings.batch_size, compression=settings.compression)
        truths = [ids for _, ids in private_seen]
        masks = [seen.mask for seen, _ in private_seen]
        if chance is None:
            chance = chance_accuracy(torch.cat([i.reshape(-1) for _, i in aux_seen]),
                                     torch.cat([s.mask.reshape(-1) for s, _ in aux_seen]),
                                     torch.cat([t.reshape(-1) for t in truths]), torch.cat([m.reshape(-1) for m in masks]))
        guesses: dict[str, list[torch.Tensor]] = {}
        for name in settings.attackers:
            if not all(_applies(name, seen) for seen, _ in private_seen):
                continue
            key = (exposure.split_layer, name)
            attacker = fitted.get(key) if name in ACTIVATION_ATTACKERS else None
            if attacker is None:
                attacker = make_attacker(name, knowledge, seed=settings.seed, **_options(name, exposure, settings))
                if not attacker.applies(private_seen[0][0]):
                    log.info("privacy: %s does not apply to %s (%s)", name, exposure.label, knowledge.model_type)
                    continue
                attacker.fit(aux_by_depth[(k, "clean")] if name == "learned" and augment else aux_seen)
                if name in ACTIVATION_ATTACKERS:
                    fitted[key] = attacker
            key_made = (exposure.split_layer, name, id(private), name == "search" and exposure.head_gradient)  # search weighs it
            if name in ACTIVATION_ATTACKERS and not settings.defence.noisy and key_made in reconstructed:
                guesses[name] = reconstructed[key_made]
            else:
                guesses[name] = [attacker.reconstruct(seen) for seen, _ in private_seen]
                if name in ACTIVATION_ATTACKERS:
                    reconstructed[key_made] = guesses[name]
            result = score(guesses[name], truths, masks)
            rows.append({"placement": exposure.placement, "split_layer": exposure.split_layer, "labels": exposure.labels,
                         "attacker": name, **_score_fields(result)})
            if hasattr(attacker, "fit_report"):
                rows[-1]["fit"] = attacker.fit_report()
        leakage.append(_combined(exposure, guesses, truths, masks))
        log.info("privacy: %s leaks %.3f of tokens", exposure.label, leakage[-1]["token_accuracy"])
    return {"chance_token_accuracy": chance, "rows": rows, "leakage": leakage,
            "private_examples": sum(len(p) for p in {id(p): p for _, p in cases}.values()), "aux_examples": len(aux), "defence": settings.defence.describe(),
            "compression": settings.compression, "attackers": list(settings.attackers)}


def _options(name: str, exposure: Exposure, settings: MeterSettings) -> dict[str, Any]:
    """An attacker's settings from the meter's: the learned inverter's steps; the search's depth,
    candidates and beam, and the defence's clipping (the server knows the mechanism)."""
    if name == "learned":
        noise = settings.defence.noise_multiplier * settings.defence.clip_norm if _augments(settings) else 0.0
        return {"steps": settings.learned_steps, "patience": settings.learned_patience, "noise_std": noise}
    if name == "bisr":
        return {"split_layer": exposure.split_layer, "steps": settings.bisr_steps, "lr": settings.bisr_lr,
                "clip_norm": settings.defence.clip_norm}
    if name == "search":
        return {"split_layer": exposure.split_layer, "candidates": settings.search_candidates,
                "lm_candidates": settings.search_lm_candidates, "beam": settings.search_beam,
                "clip_norm": settings.defence.clip_norm, "noise_multiplier": settings.defence.noise_multiplier,
                "gradient_clip_norm": settings.defence.gradient_clip_norm}
    return {}


def _augments(settings: MeterSettings) -> bool:
    """The learned inverter trains with fresh noise per step: the defence noises the states, and the
    wire does not compress them (its compression of noisy states is not redrawn per step)."""
    defence = settings.defence
    return defence.noisy and defence.clip_norm > 0 and settings.compression == "none"


def _applies(name: str, seen: CutBatch) -> bool:
    if name == "labels":
        return seen.labels is not None
    if name == "gradient":
        return seen.head_grad is not None
    return True


def _score_fields(result: Score) -> dict[str, float]:
    return {"token_accuracy": result.token_accuracy, "rouge_l_f": result.rouge_l_f}


def _combined(exposure: Exposure, guesses: dict[str, list[torch.Tensor]], truths: list[torch.Tensor],
              masks: list[torch.Tensor]) -> dict[str, Any]:
    """The exposure's leakage: the strongest of each activation attacker's guesses with the side
    channels' (labels or head gradient) on top, and of every attacker alone."""
    sides = [name for name in SIDE_ATTACKERS if name in guesses]
    alone = {name: score(guessed, truths, masks) for name, guessed in guesses.items()}
    activation = [name for name in ACTIVATION_ATTACKERS if name in guesses]
    best_name = max(activation, key=lambda name: alone[name].token_accuracy) if activation else None
    # Each activation attacker with the side channels on top (the side channels alone without
    # one): the attacker weakest alone may combine best, its errors sitting where a side channel
    # is exact. Under noise a side channel's guesses can be worse than the activation attacker's
    # on the same positions, so every attacker alone counts too. The first strongest wins.
    options: list[tuple[list[str], Score]] = []
    bases: list[str | None] = [*activation] or [None]
    for name in bases:
        combined = guesses[name] if name is not None else [torch.full_like(t, -1) for t in truths]
        for side in sides:
            combined = [_overlay(base, top) for base, top in zip(combined, guesses[side])]
        options.append(([name, *sides] if name is not None else list(sides), score(combined, truths, masks)))
    options += [([name], result) for name, result in alone.items()]
    used, result = max(options, key=lambda option: option[1].token_accuracy)
    return {"placement": exposure.placement, "split_layer": exposure.split_layer, "labels": exposure.labels, "attackers": used,
            "strongest_activation_attacker": best_name, **_score_fields(result)}


def releases_per_example(steps: int, batch_size: int, examples: int) -> int:
    """How many times each of a device's examples crosses the cut: its epochs, rounded up."""
    return math.ceil(steps * batch_size / max(1, examples))
