"""Attackers of the privacy meter: an honest-but-curious server that recovers a device's private
tokens from the split-learning traffic it legitimately sees.

What the server sees of one batch is a `CutBatch` (the activations at the cut, and, depending on
the placement, the labels or the head gradient the device sends); what it knows besides is the
frozen base model (`ServerKnowledge`). An attacker is a named policy behind one interface
(`Attacker`: `applies`, `fit`, `reconstruct`), chosen by name with `make_attacker`:

    embedding_nn  nearest token embedding to the state          (any cut; exact at k = 0, dlora)
    linear        ridge regression state -> token embedding      (trained on aux traffic)
    learned       small bidirectional transformer inverter       (trained on aux traffic)
    gradient      analytic inversion of dL/d(final hidden)       (U-shaped split, dlora)
    labels        the label tensor itself                        (plain split)
    search        known-weights search: candidates checked by    (any cut; LLaMA family and GPT-2)
                  running the device's own blocks on them

Every reconstruction is (B, T) int64 token ids, -1 where the attacker makes no guess; scoring is
in `privacy/scoring.py`. Written by hand: no library implements these inversions.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from splitpeft.model.backbone import GPT2Backbone, LlamaBackbone, backbone_of
from splitpeft.model.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from transformers import PreTrainedModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model

NO_GUESS = -1

# Largest (rows x V) block of scores materialised at once: 2^23 fp32 values = 32 MiB.
_BLOCK_ELEMENTS = 1 << 23

Metric = Literal["l2", "cosine"]


# --------------------------------------------------------------------------------------------
# What the server sees and knows
# --------------------------------------------------------------------------------------------


@dataclass
class CutBatch:
    """What the server saw of one batch of a device's private text (CPU tensors, fp32).

    hidden:       (B, T, d) activations received at the cut (k = 0: token embeddings as the
                  model's `embed()` returns them, including GPT-2's position embeddings).
    mask:         (B, T) bool, True at real token positions (False on padding).
    labels:       (B, T) int64 label tensor the device sent (plain split): completion token ids at
                  their own positions (not shifted), IGNORE_INDEX on prompt and padding; None where
                  the placement sends no labels.
    head_grad:    (B, T, d) dL/d(final hidden states) the device sent back (U-shaped split,
                  dlora); None otherwise.
    final_hidden: (B, T, d) the final hidden states (before the final norm) the server computed
                  and sent down in the same step; None otherwise.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor | None = None
    head_grad: torch.Tensor | None = None
    final_hidden: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.hidden.dim() != 3:
            raise ValueError(f"hidden must be (B, T, d), got {tuple(self.hidden.shape)}")
        batch_shape = tuple(self.hidden.shape[:2])
        if tuple(self.mask.shape) != batch_shape or self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool {batch_shape} tensor, got {self.mask.dtype} {tuple(self.mask.shape)}")
        if self.labels is not None and tuple(self.labels.shape) != batch_shape:
            raise ValueError(f"labels must be {batch_shape}, got {tuple(self.labels.shape)}")
        for name in ("head_grad", "final_hidden"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape[:2]) != batch_shape:
                raise ValueError(f"{name} must be (B, T, d) with (B, T) = {batch_shape}, got {tuple(value.shape)}")


@dataclass
class ServerKnowledge:
    """What the server knows besides the traffic: the frozen base model (CPU fp32 copies).

    token_embeddings:    (V, d) input embedding matrix E.
    position_embeddings: (P, d) learned absolute position embeddings (GPT-2 wpe), None for rotary
                         models.
    final_norm:          the model's final norm (RMSNorm with `.weight` and `.variance_epsilon` /
                         `.eps`, or nn.LayerNorm for GPT-2).
    lm_head_weight:      (V, d) W with logits = final_norm(h) @ W^T (no bias).
    model:               the model itself (frozen base with the adapters the server aggregated): every
                         round starts from those, so the server can run the device's blocks on any
                         guess (`search`); None where only the tensors above are known.
    """

    token_embeddings: torch.Tensor
    position_embeddings: torch.Tensor | None
    final_norm: nn.Module
    lm_head_weight: torch.Tensor
    model: PreTrainedModel | None = None  # the device-side function itself: base + aggregated adapters (`search`)

    @property
    def model_type(self) -> str:
        return "no model" if self.model is None else str(self.model.config.model_type)

    @classmethod
    def of(cls, model: PreTrainedModel) -> ServerKnowledge:
        """The frozen base of a transformers causal LM, detached and copied to CPU fp32."""
        backbone = backbone_of(model)
        norm, head = backbone.head_modules()
        positions = None
        if isinstance(backbone, GPT2Backbone):
            positions = _weight_copy(cast("GPT2Model", model.transformer).wpe)
        final_norm = copy.deepcopy(norm).to(device="cpu", dtype=torch.float32).requires_grad_(False)
        return cls(
            token_embeddings=_weight_copy(model.get_input_embeddings()),
            position_embeddings=positions,
            final_norm=final_norm.eval(),
            lm_head_weight=_weight_copy(head),
            model=model,
        )


def _weight_copy(module: nn.Module) -> torch.Tensor:
    """`module.weight`, detached and copied to CPU fp32."""
    weight = module.weight
    assert isinstance(weight, torch.Tensor), f"{type(module).__name__}.weight is not a tensor"
    return weight.detach().to(device="cpu", dtype=torch.float32).clone()


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class Attacker(Protocol):
    """A way for the server to guess a device's tokens from the traffic of one batch."""

    name: ClassVar[str]

    def applies(self, batch: CutBatch) -> bool:
        """Whether this traffic exposes what the attacker needs."""
        ...

    def fit(self, aux: Sequence[tuple[CutBatch, torch.Tensor]]) -> None:
        """Train on auxiliary (public) traffic with its true input ids (B, T) int64; a no-op for
        attackers that need no training."""
        ...

    def reconstruct(self, batch: CutBatch) -> torch.Tensor:
        """(B, T) int64 guessed token id at each position, -1 where it makes no guess."""
        ...


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def nearest_rows(queries: torch.Tensor, table: torch.Tensor, metric: Metric = "l2", count: int | None = None) -> torch.Tensor:
    """Index of the row of `table` (V, d) nearest to each query (n, d) -> (n,) int64; with
    `count`, the `count` nearest rows of each, nearest first -> (n, min(count, V)).

    l2:     argmin_v ||x - e_v||^2 = argmin_v ||e_v||^2 - 2 x . e_v
    cosine: argmax_v x . e_v / ||e_v||

    Computed in blocks of queries so that at most ~2^23 scores exist at once.
    """
    table = table.to(queries.dtype)
    if metric == "l2":
        offset = table.pow(2).sum(dim=1)  # (V,)
        weight = 2.0
    elif metric == "cosine":
        table = F.normalize(table, dim=1)
        offset, weight = torch.zeros(table.shape[0], dtype=table.dtype), 1.0
    else:
        raise ValueError(f"unknown metric {metric!r}; choose from l2, cosine")
    block = max(1, _BLOCK_ELEMENTS // table.shape[0])
    found = []
    for part in queries.split(block):
        scores = offset - weight * (part @ table.T)  # (n_b, V): lower is nearer
        found.append(scores.argmin(dim=1) if count is None
                     else scores.topk(min(count, table.shape[0]), dim=1, largest=False).indices)
    if found:
        return torch.cat(found)
    return torch.empty((0,) if count is None else (0, min(count, table.shape[0])), dtype=torch.long)


def _place(mask: torch.Tensor, guesses: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: `guesses` (n,) at the n True positions of `mask`, NO_GUESS elsewhere."""
    placed = torch.full(mask.shape, NO_GUESS, dtype=torch.long)
    placed[mask] = guesses
    return placed


def _without_positions(hidden: torch.Tensor, knowledge: ServerKnowledge) -> torch.Tensor:
    """hidden (B, T, d) minus the learned position embeddings P[:T] (GPT-2), as fp32; unchanged
    for rotary models. Exact removal at k = 0; deeper, the residual stream still carries P_t."""
    states = hidden.float()
    if knowledge.position_embeddings is not None:
        states = states - knowledge.position_embeddings[: states.shape[1]]
    return states


def _check_aux(aux: Sequence[tuple[CutBatch, torch.Tensor]], attacker: str) -> None:
    if not aux:
        raise ValueError(f"{attacker} needs auxiliary traffic to fit on; got none")
    for index, (batch, ids) in enumerate(aux):
        if ids.shape != batch.mask.shape:
            raise ValueError(f"aux batch {index}: ids {tuple(ids.shape)} do not match mask {tuple(batch.mask.shape)}")


def _column_statistics(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (1 for a constant column) of states (n, d) -> (d,), (d,).

    Hidden states of LLMs carry a few dimensions hundreds of times larger than the rest;
    standardising lets every dimension speak."""
    mean = states.mean(dim=0)
    std = states.std(dim=0)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


# --------------------------------------------------------------------------------------------
# Policies
# --------------------------------------------------------------------------------------------


class EmbeddingNearest:
    """Nearest token embedding: guess_t = argmin_v ||(x_t - P_t) - E_v||_2 (`metric` = "l2") or
    argmax_v cos(x_t - P_t, E_v) ("cosine"), with P_t the learned position embedding at t (GPT-2;
    0 for rotary models).

    At the cut k = 0 (and the embeddings dlora's device sends) x_t - P_t = E_{y_t} exactly, so the
    guess is exact up to duplicate rows of E; deeper, the residual stream still carries the token
    embedding, and this measures how much of it survives (tiny random models: ~all of it, k = 4
    scores 0.998; SmolLM2 at k = 3: none, 0.000, as a few huge dimensions dominate the distance,
    which is why `linear` standardises). Needs no training; applies to any cut.
    """

    name: ClassVar[str] = "embedding_nn"

    def __init__(self, knowledge: ServerKnowledge, *, seed: int = 0, metric: Metric = "l2"):
        self.knowledge = knowledge
        self.metric: Metric = metric

    def applies(self, batch: CutBatch) -> bool:
        return True

    def fit(self, aux: Sequence[tuple[CutBatch, torch.Tensor]]) -> None:
        return None

    def reconstruct(self, batch: CutBatch) -> torch.Tensor:
        states = _without_positions(batch.hidden, self.knowledge)[batch.mask]  # (n, d)
        return _place(batch.mask, nearest_rows(states, self.knowledge.token_embeddings, self.metric))


class LinearInverter:
    """Ridge regression from the state to the embedding of its token, then the nearest embedding.

    Features: the state standardised with aux column statistics, and a bias column,
        x~ = [(x - mu) / sigma, 1]                      (d + 1,)
    Fit in closed form (float64) on the n real aux positions, X~ (n, d + 1), Y = E[y] (n, d):
        A = (X~^T X~ + lambda D)^-1 X~^T Y              (d + 1, d),  D = diag(1, ..., 1, 0)
        lambda = ridge * trace(X^T X) / d               (X standardised: trace / d = n)
    so the bias is not shrunk. The state is taken minus P_t where the model has learned positions
    (GPT-2), as for `embedding_nn`: a linear map cannot remove a term that depends on t.
    Guess: the row of E nearest x~ A by L2 (`metric`; "cosine" is the alternative). L2 is kept:
    on tiny-llama it scores 1.000 / 0.999 at k = 2 / 4 where cosine scores 0.994 / 0.992 (the
    regression also recovers each embedding's norm); tiny-gpt2 and SmolLM2 (k = 0, 3) tie at 1.000.
    """

    name: ClassVar[str] = "linear"

    def __init__(self, knowledge: ServerKnowledge, *, seed: int = 0, ridge: float = 1e-3, metric: Metric = "l2"):
        if ridge < 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        self.knowledge = knowledge
        self.ridge = ridge
        self.metric: Metric = metric
        self.mean: torch.Tensor | None = None  # (d,)
        self.std: torch.Tensor | None = None  # (d,)
        self.weight: torch.Tensor | None = None  # (d + 1, d) float64

    def applies(self, batch: CutBatch) -> bool:
        return True

    def _states(self, batch: CutBatch) -> torch.Tensor:
        """The real positions' states minus their position embeddings (n, d) float64."""
        return _without_positions(batch.hidden, self.knowledge)[batch.mask].double()

    def _features(self, states: torch.Tensor) -> torch.Tensor:
        assert self.mean is not None and self.std is not None
        standard = (states.double() - self.mean) / self.std  # (n, d)
        return torch.cat([standard, torch.ones(len(standard), 1, dtype=standard.dtype)], dim=1)  # (n, d + 1)

    def fit(self, aux: Sequence[tuple[CutBatch, torch.Tensor]]) -> None:
        _check_aux(aux, self.name)
        states = torch.cat([self._states(batch) for batch, _ in aux])  # (n, d)
        targets = torch.cat([ids[batch.mask] for batch, ids in aux])  # (n,)
        self.mean, self.std = _column_statistics(states)
        features = self._features(states)  # (n, d + 1)
        d = states.shape[1]
        gram = features.T @ features  # (d + 1, d + 1)
        shrink = self.ridge * torch.diagonal(gram)[:d].sum() / d
        gram[range(d), range(d)] += shrink
        embedded = self.knowledge.token_embeddings.double()[targets]  # (n, d)
        self.weight = torch.linalg.solve(gram, features.T @ embedded)

    def reconstruct(self, batch: CutBatch) -> torch.Tensor:
        if self.weight is None:
            raise RuntimeError("linear attacker: call fit(aux) first")
        predicted = self._features(self._states(batch)) @ self.weight  # (n, d)
        return _place(batch.mask, nearest_rows(predicted, self.knowledge.token_embeddings.double(), self.metric))


class _Inverter(nn.Module):
    """states (B, T, d) -> predicted token embeddings (B, T, d):
    standardise -> LayerNorm(d) -> Linear(d, width) + position embedding -> bidirectional
    TransformerEncoder -> Linear(width, d)."""

    mean: torch.Tensor  # (d,) aux column statistics (buffers)
    std: torch.Tensor  # (d,)

    def __init__(self, d: int, width: int, layers: int, heads: int, max_positions: int, dropout: float):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("std", torch.ones(d))
        self.norm = nn.LayerNorm(d)
        self.embed = nn.Linear(d, width)
        self.position = nn.Embedding(max_positions, width)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, d)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.norm((states - self.mean) / self.std)  # (B, T, d)
        positions = torch.arange(states.shape[1])
        x = self.embed(x) + self.position(positions)  # (B, T, width)
        x = self.encoder(x, src_key_padding_mask=~mask)  # (B, T, width)
        return self.out(x)  # (B, T, d)


class LearnedInverter:
    """A small learned inverter trained on aux traffic (a bidirectional model sees the whole
    sequence of states, so it can also use context the nearest-neighbour attackers ignore).

        z = Linear(width, d)(Encoder(Linear(d, width)(LayerNorm((x - mu) / sigma)) + pos))   (B, T, d)
        logits = z E^T / rms(E)                                                              (B, T, V)
        loss = cross-entropy(logits, y) over real positions

    mu, sigma: aux column statistics (as `linear`; hidden states have a few huge dimensions).
    Encoder: `layers` (2) bidirectional nn.TransformerEncoder layers, 4 heads, feed-forward
    4 x width, dropout 0.1; E is the frozen token embedding, so the output layer has no V x width
    parameters; dividing by its RMS only starts training at a useful logit scale (random-init
    rows of norm ~0.1 give logits ~0 until the output layer grows ~10x: 150 steps on tiny-llama
    at width 64 reach 0.67 without it, 0.99 with it). AdamW (lr 1e-3) on `batch_size` aux
    sequences drawn with replacement per step. When V > `negatives`, the softmax of a step runs
    over the batch's true tokens and `negatives` uniformly drawn ones (a sampled softmax: the full
    (n, V) product costs ~170 GFLOP per step for SmolLM2); prediction always uses all of E.

    **Trained until its validation accuracy flattens**: with `patience` > 0, a `validation` share
    of the aux sequences (at least one) is held out; every `eval_every` steps the token accuracy on
    them is measured, and training stops once `patience` measurements in a row gained less than
    `min_gain` over the best so far, or at `steps`; the best weights are kept. `curve` holds
    (step, validation accuracy), `stopped_at` the step it stopped at (`fit_report`).
    `patience` = 0 trains exactly `steps` steps on every sequence.

    **Noise augmentation**: with `noise_std` > 0, `fit` takes the aux states *before* the noise
    (clipped as the device clips them) and every step draws fresh N(0, noise_std^2) noise on its
    batch, so the inverter sees as many noise draws as it trains steps (the validation states get
    one fixed draw); with 0 it trains on the states as given (already noised, if they are).

    Cost: SmolLM2 (d = 576, V = 49152), 256 aux sequences of <= 96 tokens, 300 steps: ~60 s on
    2 CPU threads, 0.99 token accuracy at k = 3.

    Seeded from `seed` (initial weights, dropout, the draws, the noise) inside
    `torch.random.fork_rng`, so two fits give identical reconstructions and the caller's random
    state is untouched.
    """

    name: ClassVar[str] = "learned"

    def __init__(self, knowledge: ServerKnowledge, *, seed: int = 0, steps: int = 300, batch_size: int = 16,
                 width: int = 256, layers: int = 2, heads: int = 4, lr: float = 1e-3, dropout: float = 0.1,
                 negatives: int = 4096, max_positions: int = 2048, patience: int = 0, eval_every: int = 50,
                 min_gain: float = 0.005, validation: float = 0.1, noise_std: float = 0.0):
        if steps < 1 or batch_size < 1 or eval_every < 1 or patience < 0:
            raise ValueError(f"steps, batch_size and eval_every must be >= 1 and patience >= 0, got {steps}, "
                             f"{batch_size}, {eval_every}, {patience}")
        if not 0 < validation < 1 or noise_std < 0:
            raise ValueError(f"validation must be in (0, 1) and noise_std >= 0, got {validation}, {noise_std}")
        self.knowledge = knowledge
        self.seed = seed
        self.steps, self.batch_size, self.lr, self.negatives = steps, batch_size, lr, negatives
        self.width, self.layers, self.heads, self.dropout = width, layers, heads, dropout
        self.max_positions = max_positions
        self.patience, self.eval_every, self.min_gain, self.validation = patience, eval_every, min_gain, validation
        self.noise_std = noise_std
        self.model: _Inverter | None = None
        self.losses: list[float] = []  # training loss per step
        self.curve: list[tuple[int, float]] = []  # (step, validation token accuracy)
        self.stopped_at = 0

    def applies(self, batch: CutBatch) -> bool:
        return True

    def fit(self, aux: Sequence[tuple[CutBatch, torch.Tensor]]) -> None:
        _check_aux(aux, self.name)
        length = max(batch.hidden.shape[1] for batch, _ in aux)
        states = torch.cat([F.pad(b.hidden.float(), (0, 0, 0, length - b.hidden.shape[1])) for b, _ in aux])  # (R, T, d)
        masks = torch.cat([F.pad(b.mask, (0, length - b.mask.shape[1])) for b, _ in aux])  # (R, T)
        ids = torch.cat([F.pad(i, (0, length - i.shape[1]), value=0) for _, i in aux])  # (R, T)
        embeddings = self._output_embeddings()  # (V, d)
        vocab = embeddings.shape[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            draws = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(len(states), generator=draws) if self.patience > 0 else torch.arange(len(states))
            held = max(1, round(self.validation * len(states))) if self.patience > 0 and len(states) >= 4 else 0
            train, valid = order[held:], order[:held]
            valid_states = self._noised(states[valid], draws)
            model = _Inverter(states.shape[2], width=self.width, layers=self.layers, heads=self.heads,
                              max_positions=self.max_positions, dropout=self.dropout)
            self._check_length(length, model)
            model.mean, model.std = _column_statistics(self._noised(states[train], draws)[masks[train]])
            optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr)
            self.losses, self.curve, self.stopped_at = [], [], self.steps
            best, best_state, flat = -1.0, None, 0
            for step in range(1, self.steps + 1):
                model.train()
                rows = train[torch.randint(len(train), (self.batch_size,), generator=draws)]
                mask = masks[rows]
                span = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1  # drop all-padding columns
                mask = mask[:, :span]
                predicted = model(self._noised(states[rows, :span], draws), mask)[mask]  # (n, d)
                targets = ids[rows, :span][mask]  # (n,)
                if vocab > self.negatives + len(targets):
                    candidates = torch.cat([targets, torch.randint(vocab, (self.negatives,), generator=draws)]).unique()
                    logits = predicted @ embeddings[candidates].T  # (n, C)
                    targets = torch.searchsorted(candidates, targets)
                else:
                    logits = predicted @ embeddings.T  # (n, V)
                loss = F.cross_entropy(logits, targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                self.losses.append(loss.item())
                if held and (step % self.eval_every == 0 or step == self.steps):
                    model.eval()
                    accuracy = self._accuracy(model, valid_states, masks[valid], ids[valid])
                    self.curve.append((step, accuracy))
                    if accuracy >= best + self.min_gain or best_state is None:
                        flat = 0
                    else:
                        flat += 1
                    if accuracy > best:
                        best, best_state = accuracy, copy.deepcopy(model.state_dict())
                    if flat >= self.patience:
                        self.stopped_at = step
                        break
            if best_state is not None:
                model.load_state_dict(best_state)
        self.model = model.eval()

    def _noised(self, states: torch.Tensor, draws: torch.Generator) -> torch.Tensor:
        """`states` with a fresh N(0, noise_std^2) draw per entry (as is without noise)."""
        if self.noise_std <= 0:
            return states
        return states + self.noise_std * torch.randn(states.shape, generator=draws)

    def _accuracy(self, model: _Inverter, states: torch.Tensor, masks: torch.Tensor, ids: torch.Tensor) -> float:
        """Token accuracy of `model` on held-out (states, masks, ids) over every real position."""
        with torch.no_grad():
            guesses = self._guesses(model, states, masks)
        return float((guesses == ids[masks]).float().mean()) if masks.any() else 0.0

    def fit_report(self) -> dict[str, object]:
        """How training went: the step it stopped at, and the validation curve."""
        return {"stopped_at": self.stopped_at, "validation_curve": [[s, round(a, 4)] for s, a in self.curve],
                "noise_augmented": self.noise_std > 0}

    def _output_embeddings(self) -> torch.Tensor:
        """E / rms(E) (V, d), the frozen output matrix."""
        embeddings = self.knowledge.token_embeddings
        return embeddings / embeddings.pow(2).mean().sqrt()

    @staticmethod
    def _check_length(length: int, model: _Inverter) -> None:
        if length > model.position.num_embeddings:
            raise ValueError(f"sequences of {length} positions exceed max_positions={model.position.num_embeddings}")

    def _guesses(self, model: _Inverter, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(n,) the nearest output row to each real position's prediction."""
        predicted = model(states.float(), mask)[mask]  # (n, d)
        embeddings = self._output_embeddings()
        block = max(1, _BLOCK_ELEMENTS // embeddings.shape[0])
        guesses = [(part @ embeddings.T).argmax(dim=1) for part in predicted.split(block)]
        return torch.cat(guesses) if guesses else torch.empty(0, dtype=torch.long)

    def reconstruct(self, batch: CutBatch) -> torch.Tensor:
        if self.model is None:
            raise RuntimeError("learned attacker: call fit(aux) first")
        self._check_length(batch.hidden.shape[1], self.model)
        with torch.no_grad():
            return _place(batch.mask, self._guesses(self.model, batch.hidden, batch.mask))


class GradientInverter:
    """Analytic recovery of the labels from the head gradient (BiSR-style, exact here).

    The device's loss is the mean next-token cross-entropy over the N labelled (shifted) positions
    of the batch, so the gradient it returns for the final hidden state h_t (d,) whose next label
    is y = labels[t + 1] is
        g_t = J_t^T W^T (p_t - e_y) / N,   p_t = softmax(W norm(h_t))  (V,),  W (V, d)
    with J_t the Jacobian of the final norm at h_t; rows with no label are exactly 0, so N = the
    number of rows of the batch with g_t != 0.

    RMSNorm, norm(x) = gamma * x / r, r = sqrt(mean(x^2) + eps), x^ = x / r:
        J^T c = (1/r) (I - x^ x^^T / d) (gamma * c)
    LayerNorm, norm(x) = gamma * (x - mean(x)) / s + beta, x^ = (x - mean(x)) / s:
        J^T c = (1/s) (I - 1 1^T / d - x^ x^^T / d) (gamma * c)
    Either way gamma * W[y] = q + (something in U), with
        q = gamma * (W^T p_t) - N r g_t   (r -> s for LayerNorm),   U = span{x^} (+ span{1} for LayerNorm)
    so the guess is y = argmin_v || P_perp (gamma * W[v] - q) ||^2 = ||a_v - q||^2 - ||Q^T (a_v - q)||^2,
    a_v = gamma * W[v], Q (d, m) an orthonormal basis of U: a few (V, d) products per row, in blocks
    of rows so that memory stays small. The guess goes to position t + 1 (the label's own
    position); every other position gets -1.

    Measured: 100% of label positions on tiny-llama and tiny-gpt2 (also with the gradient rounded
    to bf16 or fp16 on the wire) and on SmolLM2 at k = 3 (~7 s for 64 sequences on 2 threads).
    """

    name: ClassVar[str] = "gradient"

    def __init__(self, knowledge: ServerKnowledge, *, seed: int = 0):
        self.knowledge = knowledge

    def applies(self, batch: CutBatch) -> bool:
        return batch.head_grad is not None and batch.final_hidden is not None

    def fit(self, aux: Sequence[tuple[CutBatch, torch.Tensor]]) -> None:
        return None

    def _gamma(self) -> torch.Tensor:
        """The final norm's gain gamma (d,) (ones for a norm without one)."""
        weight = getattr(self.knowledge.final_norm, "weight", None)
        return weight.detach().float() if isinstance(weight, torch.Tensor) else torch.ones(self.knowledge.lm_head_weight.shape[1])

    def _geometry(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For final hidden states (n, d): the norm's scale r or s (n,), and Q (n, d, m)."""
        norm = self.knowledge.final_norm
        d = hidden.shape[1]
        if isinstance(norm, nn.LayerNorm):
            centred = hidden - hidden.mean(dim=1, keepdim=True)
            scale = torch.sqrt(centred.pow(2).mean(dim=1) + norm.eps)  # (n,)
            ones = torch.full_like(centred, d**-0.5)  # x^ has zero mean, so it is orthogonal to 1
            basis = torch.stack([F.normalize(centred, dim=1), ones], dim=2)  # (n, d, 2)
        else:
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
            if eps is None:
                raise ValueError(f"gradient attacker: unsupported final norm {type(norm).__name__}")
            scale = torch.sqrt(hidden.pow(2).mean(dim=1) + float(eps))  # (n,)
            basis = F.normalize(hidden, dim=1).unsqueeze(2)  # (n, d, 1)
        return scale, basis

    def reconstruct(self, batch: CutBatch) -> torch.Tensor:
        assert batch.head_grad is not None and batch.final_hidden is not None, "gradient attacker needs head_grad and final_hidden"
        grads = batch.head_grad.float().flatten(0, 1)  # (B*T, d)
        hidden = batch.final_hidden.float().flatten(0, 1)  # (B*T, d)
        rows = (grads.norm(dim=1) > 0).nonzero().squeeze(1)  # (N,) flat indices b * T + t of labelled rows
        count = len(rows)
        length = batch.mask.shape[1]
        rows = rows[rows % length < length - 1]  # a last position has no next label (never nonzero from the real loss)
        guesses = torch.full(batch.mask.shape, NO_GUESS, dtype=torch.long)
        if len(rows) == 0:
            return guesses
        head = self.knowledge.lm_head_weight  # (V, d)
        gamma = self._gamma()
        candidates = head * gamma  # (V, d) a_v
        sizes = candidates.pow(2).sum(dim=1)  # (V,)
        block = max(1, _BLOCK_ELEMENTS // (4 * head.shape[0]))
        found = []
        with torch.no_grad():
            for part in rows.split(block):
                h, g = hidden[part], grads[part]  # (n, d)
                scale, basis = self._geometry(h)
                probabilities = torch.softmax(self.knowledge.final_norm(h) @ head.T, dim=1)  # (n, V)
                q = gamma * (probabilities @ head) - count * scale[:, None] * g  # (n, d)
                along = torch.einsum("vd,ndm->vnm", candidates, basis) - torch.einsum("nd,ndm->nm", q, basis)  # (V, n, m)
                residual = sizes[:, None] - 2 * candidates @ q.T - along.pow(2).sum(dim=2)  # (V, n) up to ||q||^2
                found.append(residual.argmin(dim=0))
        labelled = rows + 1  # the label of row t sits at t + 1, in the same sequence
        flat = guesses.view(-1)
        flat[labelled] = torch.cat(found)
        return guesses


class LabelReader:
    """The plain split sends the label tensor itself: guess_t = labels_t where labels_t != -100
    (the completion tokens), -1 elsewhere (the prompt is not in the labels)."""

    name: ClassVar[str] = "labels"

    def __init__(self, knowledge: ServerKnowledge, *, seed: int = 0):
        self.knowledge = knowledge

    def applies(self, batch: CutBatch) -> bool:
        return batch.labels is not None

    def fit(self, aux: Sequence[tuple[CutBatch, torch.Tensor]]) -> None:
        return None

    def reconstruct(self, batch: CutBatch) -> torch.Tensor:
        assert batch.labels is not None, "labels attacker needs the label tensor"
        labels = batch.labels.long()
        return torch.where(labels != IGNORE_INDEX, labels, torch.full_like(labels, NO_GUESS))


# --------------------------------------------------------------------------------------------
# Registry
class HeadGradientEvidence:
    """What U-shaped split's (or dlora's) head gradient says about each next token, for the search
    to weigh beside the states: a Gaussian likelihood of the observed gradient row under each
    candidate label.

    From `GradientInverter`: the gradient row of position t whose next label is y is
        g_t(y) = lambda u_t(y),   u_t(y) = J_t^T W^T (p_t - e_y) = (1/r) P_t (q_t - a_y)
    with q_t = gamma * (W^T p_t), a_y = gamma * W[y], P_t the projector off span{x^_t} (and 1
    for LayerNorm), r (or s) the final norm's scale, and lambda = c / N: N the batch's labelled
    positions, c <= 1 the defence's clipping factor, both unknown to the server, but the clipped
    row's norm is at most C_g (`gradient_clip_norm`). The evidence of candidate y is the least
    squared distance of the observed row to lambda u_t(y) over 0 <= lambda <= C_g / ||u_t(y)||
    (no upper bound without clipping):
        lambda* = clamp(<g, u> / ||u||^2, 0, C_g / ||u||),   e_t(y) = ||g - lambda* u||^2
    0 for the true label without noise; under N(0, (sigma C_g)^2) noise per entry, e / (d (sigma
    C_g)^2) is its negative log-likelihood up to constants. Rows without a label (the prompt)
    carry only noise: every candidate explains them about equally. `residual(t, tokens)` gives
    e_t for candidates of token t + 1; `proposals` (B, T, m) the m tokens of least e_t per row
    over the whole vocabulary.
    """

    def __init__(self, knowledge: ServerKnowledge, batch: CutBatch, proposals: int, gradient_clip_norm: float = 0.0):
        assert batch.head_grad is not None and batch.final_hidden is not None
        inverter = GradientInverter(knowledge)
        grads = batch.head_grad.float()  # (B, T, d)
        rows, length, d = grads.shape
        self.g = grads.reshape(-1, d)  # (n, d)
        hidden = batch.final_hidden.float().reshape(-1, d)  # (n, d)
        scale, self.basis = inverter._geometry(hidden)  # (n,), (n, d, m)
        self.inverse_scale = 1.0 / scale  # (n,)
        self.clip = gradient_clip_norm
        head = knowledge.lm_head_weight  # (V, d)
        gamma = inverter._gamma()
        self.a = head * gamma  # (V, d)
        self.shape = (rows, length)
        block = max(1, _BLOCK_ELEMENTS // (4 * head.shape[0]))
        qs, top = [], []
        with torch.no_grad():
            for part in torch.arange(len(hidden)).split(block):
                probabilities = torch.softmax(knowledge.final_norm(hidden[part]) @ head.T, dim=1)  # (n, V)
                q = gamma * (probabilities @ head)  # (n, d)
                qs.append(q)
                top.append(self._all_residuals(part, q).topk(proposals, dim=0, largest=False).indices.T)  # (n, m)
        self.q = torch.cat(qs)  # (n, d)
        self.proposals = torch.cat(top).view(rows, length, -1)

    def _all_residuals(self, part: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """e (V, n) of every token for rows `part` (n,) with their q (n, d)."""
        g, basis, inv = self.g[part], self.basis[part], self.inverse_scale[part]  # (n, d), (n, d, m), (n,)
        pg = g - torch.einsum("ndm,nm->nd", basis, torch.einsum("ndm,nd->nm", basis, g))  # P g (n, d)
        along_q = torch.einsum("ndm,nd->nm", basis, q)  # (n, m)
        along_a = torch.einsum("vd,ndm->vnm", self.a, basis)  # (V, n, m)
        # <g, u> = <P g, q - a> / r ;  ||u||^2 = (||q - a||^2 - ||Q^T (q - a)||^2) / r^2
        dot = ((pg * q).sum(dim=1)[None, :] - self.a @ pg.T) * inv[None, :]  # (V, n)
        size = (q.pow(2).sum(dim=1)[None, :] - 2 * self.a @ q.T + self.a.pow(2).sum(dim=1)[:, None]
                - (along_q[None] - along_a).pow(2).sum(dim=2)) * inv[None, :] ** 2  # (V, n)
        return self._residual(g.pow(2).sum(dim=1)[None, :], dot, size.clamp_min(1e-30))

    def _residual(self, g2: torch.Tensor, dot: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        """||g - lambda* u||^2 from ||g||^2, <g, u>, ||u||^2 (broadcast alike)."""
        scale = (dot / size).clamp_min(0.0)
        if self.clip > 0:
            scale = torch.minimum(scale, self.clip / size.sqrt())
        return (g2 - 2 * scale * dot + scale.pow(2) * size).clamp_min(0.0)

    def residual(self, t: int, tokens: torch.Tensor) -> torch.Tensor:
        """(B, n) e_t(y) of each candidate y (B, n) for token t + 1 (row t of each sequence)."""
        rows, length = self.shape
        index = torch.arange(rows) * length + t  # (B,) flat rows
        g, basis, inv, q = self.g[index], self.basis[index], self.inverse_scale[index], self.q[index]
        diff = q.unsqueeze(1) - self.a[tokens]  # (B, n, d)
        along = torch.einsum("bnd,bdm->bnm", diff, basis)
        size = (diff.pow(2).sum(dim=2) - along.pow(2).sum(dim=2)) * inv[:, None] ** 2  # (B, n)
        pg = g - torch.einsum("bdm,bm->bd", basis, torch.einsum("bdm,bd->bm", basis, g))  # (B, d)
        dot = torch.einsum("bnd,bd->bn", diff, pg) * inv[:, None]
        return self._residual(g.pow(2).sum(dim=1)[:, None], dot, size.clamp_min(1e-30))


class SearchInverter:
    """Known-weights search: the server knows the device-side function (public base + the adapters
    it aggregated), so it can check any guess of the private text exactly.

    Left to right over each sequence's real positions t: every hypothesis (a decoded prefix; `beam`
    of them) proposes candidates for token t, the `candidates` tokens the `linear` attacker (fitted
    on aux traffic) ranks nearest to the observed state at t and the `lm_candidates` tokens the
    model itself ranks likeliest after the prefix; each is run through the device's blocks
    [0, k) on top of its hypothesis's prefix (cached: one token per candidate and block) and scored
    by the squared distance of its state at t to the observed one, the negative log-likelihood
    under Gaussian noise up to a constant (the state first clipped as the device's defence clips,
    `clip_norm`). The `beam` best prefixes (summed distances) go on. Without noise the right
    token reproduces the state exactly (distance ~0), so the search fails only where the right
    token is among no hypothesis's candidates. Needs `knowledge.model` (LLaMA family or GPT-2:
    a key-value cache per block; GPT-2's learned positions enter with each candidate's embedding).

    **With the head gradient** (U-shaped split, dlora: the batch has `head_grad` and
    `final_hidden`), the states and the gradient are searched jointly (`use_gradient`): the
    candidates of token t + 1 also include the `candidates` tokens that best explain gradient row t
    (`HeadGradientEvidence`), and each candidate's score is the sum of negative log-likelihoods
        ||s - s_obs||^2 / v_s + e_t(y) / v_g,
    v_s = d (sigma C)^2 and v_g = d (sigma C_g)^2 the noise the mechanism adds to a state and to a
    gradient row (`noise_multiplier`, `clip_norm`, `gradient_clip_norm`; the server knows the
    mechanism), or a tiny floor where that tensor is sent clean (its right token explains it
    exactly). Under noise on both, neither alone identifies the token; together each counts by
    how much noise it carries.
    """

    name: ClassVar[str] = "search"

    def __init__(self, knowledge: ServerKnowledge, *, seed: int = 0, split_layer: int = 0, candidates: int = 16,
                 lm_candidates: int = 8, beam: int = 1, clip_norm: float = 0.0, noise_multiplier: float = 0.0,
                 gradient_clip_norm: float = 0.0, use_gradient: bool = True):
        if candidates < 1 or lm_candidates < 0 or beam < 1 or split_layer < 0:
            raise ValueError(f"search needs candidates >= 1, lm_candidates >= 0, beam >= 1 and split_layer >= 0; got "
                             f"{candidates}, {lm_candidates}, {beam}, {split_layer}")
        self.knowledge = knowledge
        self.split_layer = split_layer
        self.candidates, self.lm_candidates, self.beam = candidates, lm_candidates, beam
        self.clip_norm, self.noise_multiplier, self.use_gradient = clip_norm, noise_multiplier, use_gradient
        self.gradient_clip_norm = gradient_clip_norm
        self.proposer = LinearInverter(knowledge, seed=seed)

    def applies(self, batch: CutBatch) -> bool:
        model = self.knowledge.model
        return model is not None and isinstance(backbone_of(model), (LlamaBackbone, GPT2Backbone))

    def fit(self, aux: Sequence[tuple[CutBatch, torch.Tensor]]) -> None:
        self.proposer.fit(aux)

    def _ranked(self, states: torch.Tensor) -> torch.Tensor:
        """The proposer's `candidates` nearest tokens to each state (n, d) -> (n, candidates)."""
        assert self.proposer.weight is not None
        predicted = self.proposer._features(_without_positions(states.unsqueeze(0), self.knowledge)[0]) @ self.proposer.weight
        return nearest_rows(predicted, self.knowledge.token_embeddings.to(predicted.dtype), count=self.candidates)

    @torch.no_grad()
    def reconstruct(self, batch: CutBatch) -> torch.Tensor:
        if self.proposer.weight is None:
            raise RuntimeError("search attacker: call fit(aux) first")
        if not self.applies(batch):
            raise RuntimeError("search attacker: needs the model (knowledge.model), of the LLaMA family or GPT-2")
        lengths = batch.mask.sum(dim=1)  # (B,)
        if not bool((batch.mask == (torch.arange(batch.mask.shape[1]) < lengths.unsqueeze(1))).all()):
            raise ValueError("search attacker: real positions must come first (right padding)")
        guesses = torch.full(batch.mask.shape, NO_GUESS, dtype=torch.long)
        if int(lengths.max()) > 0:
            evidence = (HeadGradientEvidence(self.knowledge, batch, self.candidates, self.gradient_clip_norm)
                        if self.use_gradient
                        and batch.head_grad is not None and batch.final_hidden is not None else None)
            found = self._search(batch.hidden.float(), lengths, evidence)  # (B, T_max)
            guesses[batch.mask] = found[batch.mask[:, : found.shape[1]]]
        return guesses

    def _search(self, observed: torch.Tensor, lengths: torch.Tensor,
                evidence: HeadGradientEvidence | None = None) -> torch.Tensor:
        """The likeliest token ids (B, T) behind the observed states (B, T, d) of sequences with
        `lengths` real positions, searched together (one batched pass per position and block),
        weighing the head gradient's `evidence` where given."""
        from transformers import DynamicCache

        model = self.knowledge.model
        assert model is not None
        backbone = backbone_of(model)
        assert isinstance(backbone, (LlamaBackbone, GPT2Backbone))
        device = next(model.parameters()).device
        rows, steps = observed.shape[0], int(lengths.max())
        ranked = self._ranked(observed[:, :steps].reshape(-1, observed.shape[2])).view(rows, steps, -1)  # (B, T, m)
        # Blocks [0, k) keep their keys and values in `cache`, copied once per option at each
        # position; blocks [k, L) in `upper`, which only follows the kept hypotheses.
        cache, upper_cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
        hypotheses = 1
        prefixes = torch.zeros(rows, 1, 0, dtype=torch.long)  # (B, h, t)
        scores = torch.zeros(rows, 1, dtype=torch.float64)  # (B, h) summed distances
        proposals: torch.Tensor | None = None  # (B, h, lm_candidates): the model's next tokens per prefix
        k = self.split_layer
        d = observed.shape[2]
        # the states' noise variance per candidate (sum over d entries); without noise a floor
        # that lets the states decide wherever they can
        state_variance = (d * (self.noise_multiplier * self.clip_norm) ** 2 if self.noise_multiplier > 0
                          and self.clip_norm > 0 else 1e-9 * float(observed.pow(2).sum(dim=2).mean()) + 1e-30)
        gradient_variance = 1.0
        if evidence is not None:
            gradient_variance = (d * (self.noise_multiplier * self.gradient_clip_norm) ** 2
                                 if self.noise_multiplier > 0 and self.gradient_clip_norm > 0
                                 else 1e-9 * float(evidence.g.pow(2).sum(dim=1).max()) + 1e-30)
        for t in range(steps):
            options = ranked[:, t].unsqueeze(1).expand(rows, hypotheses, -1)  # (B, h, m)
            if evidence is not None and t > 0:
                options = torch.cat([options, evidence.proposals[:, t - 1].unsqueeze(1).expand(rows, hypotheses, -1)],
                                    dim=2)
            if proposals is not None:
                options = torch.cat([options, proposals], dim=2)
            width = options.shape[2]
            cache.batch_repeat_interleave(width)  # each hypothesis's rows once per option (empty at t = 0)
            lower = backbone.embed_at(options.reshape(-1, 1).to(device), t)  # (B h width, 1, d)
            if k > 0:
                lower = backbone.next_blocks(lower, 0, k, cache, t)
            states = lower[:, 0].float().cpu()
            if self.clip_norm > 0:
                states = states * (self.clip_norm / states.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
            distance = (states.view(rows, hypotheses * width, -1) - observed[:, t].unsqueeze(1)).pow(2).sum(dim=2)
            if evidence is not None:
                distance = distance / state_variance
                if t > 0:
                    distance = distance + evidence.residual(t - 1, options.reshape(rows, -1)) / gradient_variance
            distance = torch.where((t < lengths).unsqueeze(1), distance.double(), 0.0)  # ended sequences: any
            total = scores.repeat_interleave(width, dim=1) + distance  # (B, h width)
            kept = min(self.beam, hypotheses * width)
            keep = total.topk(kept, dim=1, largest=False).indices  # (B, h'), best first
            flat = (keep + torch.arange(rows).unsqueeze(1) * hypotheses * width).reshape(-1)  # rows of the cache
            cache.batch_select_indices(flat.to(device))
            upper_cache.batch_select_indices((flat // width).to(device))  # the kept hypotheses' parents
            parents = torch.gather(prefixes, 1, (keep // width).unsqueeze(2).expand(-1, -1, prefixes.shape[2]))
            chosen = torch.gather(options.reshape(rows, -1), 1, keep)  # (B, h')
            prefixes = torch.cat([parents, chosen.unsqueeze(2)], dim=2)
            scores = torch.gather(total, 1, keep)
            hypotheses = kept
            if self.lm_candidates > 0 and t + 1 < steps:
                # the kept tokens on through blocks [k, L) (their cache rows follow the prefixes'), then
                # the head: the model's likeliest next tokens after each prefix
                upper = backbone.next_blocks(lower[flat.to(lower.device)], k, backbone.num_blocks, upper_cache, t)
                logits = backbone.head(upper)[:, 0].float()  # (B h', V)
                proposals = logits.topk(self.lm_candidates, dim=1).indices.cpu().view(rows, hypotheses, -1)
        return prefixes[:, 0]


class OptimisationInverter:
    """BiSR-style optimisation: soft inputs optimised so that the device's blocks reproduce what
    the server observed. The server knows the device-side function (public base + the adapters it
    aggregated), so it can run blocks [0, k) on any input and follow the gradient back.

    The inputs z (B, T, d) start from the `linear` attacker's predicted token embeddings (fitted on
    aux traffic) and take `steps` Adam steps (`lr`) on the mean over real positions of
    (1 - cos(s_t, o_t)) + `l2_weight` ||s_t - o_t||^2 / ||o_t||^2, s = blocks [0, k)(z) (first
    clipped as the device's defence clips, `clip_norm`), o the observed states: under Gaussian noise
    the L2 term is the negative log-likelihood up to a constant, which is why this is the attacker
    to use under noise. Each position's z is then projected to its nearest token embedding. Every
    position is optimised at once (a state depends on its prefix, and the prefix's inputs are
    optimised too). Needs `knowledge.model`.
    """

    name: ClassVar[str] = "bisr"

    def __init__(self, knowledge: ServerKnowledge, *, seed: int = 0, split_layer: int = 0, steps: int = 100,
                 lr: float = 0.0005, l2_weight: float = 1.0, clip_norm: float = 0.0):
        if steps < 0 or not lr > 0 or l2_weight < 0 or split_layer < 0:
            raise ValueError(f"bisr needs steps >= 0, lr > 0, l2_weight >= 0 and split_layer >= 0; got "
                             f"{steps}, {lr}, {l2_weight}, {split_layer}")
        self.knowledge = knowledge
        self.split_layer = split_layer
        self.steps, self.lr, self.l2_weight, self.clip_norm = steps, lr, l2_weight, clip_norm
        self.seed = seed
        self.proposer = LinearInverter(knowledge, seed=seed)

    def applies(self, batch: CutBatch) -> bool:
        return self.knowledge.model is not None

    def fit(self, aux: Sequence[tuple[CutBatch, torch.Tensor]]) -> None:
        self.proposer.fit(aux)

    def reconstruct(self, batch: CutBatch) -> torch.Tensor:
        if self.proposer.weight is None:
            raise RuntimeError("bisr attacker: call fit(aux) first")
        model = self.knowledge.model
        if model is None:
            raise RuntimeError("bisr attacker: needs the model (knowledge.model)")
        backbone = backbone_of(model)
        parameter = next(model.parameters())
        observed = batch.hidden.float()  # (B, T, d)
        mask = batch.mask
        with torch.no_grad():
            flat = _without_positions(observed, self.knowledge).reshape(-1, observed.shape[2])  # (B T, d)
            start = (self.proposer._features(flat) @ self.proposer.weight).view(observed.shape)  # float64
            if self.knowledge.position_embeddings is not None:  # the blocks' input carries GPT-2's positions
                start = start + self.knowledge.position_embeddings[: observed.shape[1]].to(start.dtype)
        inputs = start.to(parameter.device, parameter.dtype).clone().requires_grad_(True)
        target = observed.to(parameter.device)
        weights = mask.to(parameter.device, torch.float32)
        optimizer = torch.optim.Adam([inputs], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                states = backbone.blocks(inputs, 0, self.split_layer).float()
                if self.clip_norm > 0:
                    states = states * (self.clip_norm / states.norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
                cosine = F.cosine_similarity(states, target, dim=-1)  # (B, T)
                l2 = (states - target).pow(2).sum(dim=-1) / target.pow(2).sum(dim=-1).clamp_min(1e-12)
                loss = ((1 - cosine + self.l2_weight * l2) * weights).sum() / weights.sum().clamp_min(1.0)
                (grad,) = torch.autograd.grad(loss, [inputs])  # the model's own gradients are never touched
                inputs.grad = grad
                optimizer.step()
        found = _without_positions(inputs.detach().float().cpu(), self.knowledge)
        guesses = nearest_rows(found[mask], self.knowledge.token_embeddings.to(found.dtype))
        return _place(mask, guesses)


# --------------------------------------------------------------------------------------------

# name -> constructor (knowledge, *, seed, **settings)
ATTACKERS: dict[str, Callable[..., Attacker]] = {
    cls.name: cls
    for cls in (EmbeddingNearest, LinearInverter, LearnedInverter, GradientInverter, LabelReader, SearchInverter,
                OptimisationInverter)
}


def make_attacker(name: str, knowledge: ServerKnowledge, *, seed: int = 0, **settings: object) -> Attacker:
    """The attacker called `name` on `knowledge`, seeded with `seed`, with its `settings`
    (e.g. `steps=150` for learned); ValueError naming the choices for an unknown name or setting."""
    if name not in ATTACKERS:
        raise ValueError(f"unknown attacker {name!r}; choose from {', '.join(ATTACKERS)}")
    constructor = ATTACKERS[name]
    accepted = [p for p in inspect.signature(constructor).parameters if p not in ("knowledge", "seed")]
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise ValueError(f"attacker {name!r} has no setting {', '.join(unknown)}; settings: {', '.join(accepted) or 'none'}")
    return constructor(knowledge, seed=seed, **settings)
