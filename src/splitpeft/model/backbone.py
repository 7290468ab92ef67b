"""The backbone view of a causal LM: embedding, blocks [a, b), final norm + head, for every
supported family (LLaMA, Qwen2, Mistral, SmolLM, GPT-2), so each party runs just its part.

`Backbone.blocks(hidden, a, b)` runs blocks [a, b) on hidden states (B, T, d) -> (B, T, d)
with the family's own masks and position embeddings; running [0, k) then [k, L) equals the
Hugging Face forward (tested at every cut). Every family fact (block prefix, head modules,
default LoRA targets, GPT-2's Conv1D and position table, the context) lives here."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import nn
from transformers import (
    PreTrainedModel,
)
from transformers.masking_utils import create_causal_mask

if TYPE_CHECKING:
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model

LLAMA_FAMILY = ("llama", "qwen2", "mistral")


SUPPORTED_MODEL_TYPES = (*LLAMA_FAMILY, "gpt2")


class ModelError(ValueError):
    """A model name, folder or architecture that splitpeft cannot load."""


# --------------------------------------------------------------------------- backbones


class Backbone(Protocol):
    """Family-specific access to a causal LM's embedding, blocks and head."""

    model: PreTrainedModel
    default_target_modules: tuple[str, ...]

    @property
    def num_blocks(self) -> int: ...

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def blocks(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor: ...

    def head(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def block_prefix(self, index: int) -> str: ...

    def head_modules(self) -> list[nn.Module]: ...


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T)


@dataclass
class LlamaBackbone:
    """LLaMA, Qwen2, Mistral, SmolLM: `model.embed_tokens`, `model.layers`, `model.norm`, `lm_head`."""

    model: PreTrainedModel
    default_target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )

    @property
    def num_blocks(self) -> int:
        return len(self.model.model.layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids)  # (B, T, d)

    def blocks(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if start >= end:
            return hidden
        inner = self.model.model
        positions = _positions(hidden)
        # Rotary tables and the causal mask depend only on positions, so either side can rebuild
        # them locally: nothing but the hidden states has to cross the cut.
        rotary = inner.rotary_emb(hidden, position_ids=positions)
        mask = create_causal_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=None,
            past_key_values=None, position_ids=positions,
        )
        for layer in inner.layers[start:end]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self.model.model.norm(hidden))  # (B, T, V)

    def next_blocks(self, hidden: torch.Tensor, start: int, end: int, cache: Any, position: int) -> torch.Tensor:
        """Blocks [start, end) on one new token per row, (N, 1, d) at `position`, attending to what
        `cache` (a transformers DynamicCache over every block, N rows) holds of the earlier
        positions, which it then also holds of this one (the privacy meter's known-weights search)."""
        inner = self.model.model
        positions = torch.full((hidden.shape[0], 1), position, dtype=torch.long, device=hidden.device)
        rotary = inner.rotary_emb(hidden, position_ids=positions)
        for layer in inner.layers[start:end]:  # one query per row: it attends to every cached position
            hidden = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions,
                           past_key_values=cache, use_cache=True)
        return hidden

    def embed_at(self, input_ids: torch.Tensor, position: int) -> torch.Tensor:
        """(N, 1) token ids at `position` -> (N, 1, d) (rotary positions enter in the blocks)."""
        return self.embed(input_ids)

    def block_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def head_modules(self) -> list[nn.Module]:
        return [self.model.model.norm, self.model.lm_head]


@dataclass
class GPT2Backbone:
    """GPT-2: `transformer.wte` + `transformer.wpe`, `transformer.h`, `transformer.ln_f`, `lm_head`."""

    model: PreTrainedModel
    default_target_modules: tuple[str, ...] = ("c_attn", "c_proj", "c_fc")

    @property
    def _transformer(self) -> GPT2Model:
        # nn.Module.__getattr__ is typed `Tensor | Module`; the GPT-2 LM's `transformer` is a GPT2Model.
        return cast("GPT2Model", self.model.transformer)

    @property
    def num_blocks(self) -> int:
        return len(self._transformer.h)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        inner = self._transformer
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        return inner.drop(inner.wte(input_ids) + inner.wpe(positions))  # (B, T, d)

    def blocks(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        if start >= end:
            return hidden
        positions = _positions(hidden)
        mask = create_causal_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=None,
            past_key_values=None, position_ids=positions,
        )
        for block in self._transformer.h[start:end]:
            hidden = block(hidden, None, mask, position_ids=positions)
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(self._transformer.ln_f(hidden))

    def embed_at(self, input_ids: torch.Tensor, position: int) -> torch.Tensor:
        """(N, 1) token ids at `position` -> (N, 1, d): the token's and that position's embedding."""
        inner = self._transformer
        positions = torch.full_like(input_ids, position)
        return inner.drop(inner.wte(input_ids) + inner.wpe(positions))

    def next_blocks(self, hidden: torch.Tensor, start: int, end: int, cache: Any, position: int) -> torch.Tensor:
        """As `LlamaBackbone.next_blocks`: blocks [start, end) on one new token per row (N, 1, d),
        attending to the earlier positions `cache` holds (positions entered with `embed_at`)."""
        for block in self._transformer.h[start:end]:
            hidden = block(hidden, past_key_values=cache, attention_mask=None, use_cache=True)
        return hidden

    def block_prefix(self, index: int) -> str:
        return f"transformer.h.{index}."

    def head_modules(self) -> list[nn.Module]:
        return [self._transformer.ln_f, self.model.lm_head]


def backbone_of(model: PreTrainedModel) -> Backbone:
    """The backbone view for `model`; raises ModelError for an unsupported architecture."""
    model_type = model.config.model_type
    if model_type in LLAMA_FAMILY:
        return LlamaBackbone(model)
    if model_type == "gpt2":
        return GPT2Backbone(model)
    raise ModelError(
        f"model type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def context_length(model: object) -> int | None:
    """Positions the model was built for: ``max_position_embeddings`` (GPT-2's ``n_positions``), or
    None if its config names none. Past it a learned position table (GPT-2) has no row (an
    IndexError) and rotary models run on positions they never saw."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def share_frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A structural copy of `model` whose parameters are the *same* tensors (no memory cost).

    Every party (each device, each server session) gets its own copy to inject its own adapters
    into, while the frozen base weights exist once in memory.
    """
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)
