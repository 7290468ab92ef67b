"""Tokenisation and batches: prompt + completion + eos with loss on the completion only, padded
batches (B, T), and a seeded, resumable stream of batches per device."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from splitpeft.data.examples import Example
from splitpeft.model.loss import IGNORE_INDEX

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Tokenisation and batching
# --------------------------------------------------------------------------------------------


@dataclass
class EncodedExample:
    """Token ids of prompt + completion + eos; ``labels`` is ``-100`` on prompt tokens."""

    input_ids: list[int]
    labels: list[int]


# Characters a window of text is given per token it must yield, and the tokens it must yield beyond
# those kept (see `bounded_token_ids`). Ordinary text runs 3-5 characters a token.
WINDOW_CHARS_PER_TOKEN = 16
WINDOW_MARGIN_TOKENS = 8


def bounded_token_ids(tokenizer: Any, text: str, max_tokens: int | None, keep: Literal["start", "end"]) -> list[int]:
    """At most ``max_tokens`` token ids of ``text`` (no special tokens): its first ones
    (``keep="start"``) or its last ones (``keep="end"``); all of them if ``max_tokens`` is None.

    Tokenising a 1 MB string takes seconds (a model keeps a few hundred of its ~300,000 ids), so
    only a window at the kept end is tokenised: ``16 * max_tokens + 64`` characters, doubled while
    it yields fewer than ``max_tokens + 8`` ids and the text goes on. A text that fits the window
    (every ordinary example) is tokenised whole; otherwise the ids differ from the whole text's
    only where the window cuts a word, at least 8 tokens beyond those kept.
    """
    if max_tokens is not None and max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0 or None, got {max_tokens}")
    if max_tokens == 0:
        return []
    window = len(text) if max_tokens is None else WINDOW_CHARS_PER_TOKEN * max_tokens + 64
    while True:
        cut = len(text) > window
        piece = (text[-window:] if keep == "end" else text[:window]) if cut else text
        ids = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if max_tokens is None:
            return ids
        if not cut or len(ids) >= max_tokens + WINDOW_MARGIN_TOKENS:
            return ids[-max_tokens:] if keep == "end" else ids[:max_tokens]
        window *= 2


def encode(examples: Iterable[Example], tokenizer: Any, max_length: int) -> list[EncodedExample]:
    """Tokenise examples for causal-LM training with loss on the completion only.

    ``input_ids = prompt_ids + completion_ids + [eos]`` (no BOS, no other special tokens);
    ``labels = [-100] * len(prompt_ids) + completion_ids + [eos]``. Past ``max_length``, tokens are
    dropped from the left of the prompt first, then from the end of the completion; examples left
    without completion tokens are skipped (the count is logged). Each text is tokenised only as far
    as ``max_length`` tokens of it can be kept (`bounded_token_ids`), so a huge one costs no more
    than an ordinary one.

    Args:
        tokenizer: a Hugging Face tokenizer (callable, with ``eos_token_id``).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError("tokenizer has no eos_token_id; set tokenizer.eos_token")
    encoded: list[EncodedExample] = []
    skipped = 0
    for ex in examples:
        prompt_ids = bounded_token_ids(tokenizer, ex.prompt, max_length, keep="end")
        completion_ids = bounded_token_ids(tokenizer, ex.completion, max_length, keep="start") + [eos_id]
        overflow = len(prompt_ids) + len(completion_ids) - max_length
        if overflow > 0:
            from_prompt = min(overflow, len(prompt_ids))
            prompt_ids = prompt_ids[from_prompt:]
            completion_ids = completion_ids[: len(completion_ids) - (overflow - from_prompt)]
        if not completion_ids:
            skipped += 1
            continue
        encoded.append(
            EncodedExample(
                input_ids=prompt_ids + completion_ids,
                labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
            )
        )
    if skipped:
        logger.warning("encode: skipped %d example(s) with no completion token within max_length=%d",
                       skipped, max_length)
    return encoded


@dataclass
class Batch:
    """Right-padded batch. ``input_ids``, ``labels``: (B, T) long; labels unshifted, -100 = no loss."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        """The batch on `device` (itself when already there)."""
        if self.input_ids.device == device:
            return self
        return Batch(self.input_ids.to(device), self.labels.to(device))

    @property
    def completion_tokens(self) -> int:
        """Positions that contribute to the loss after the shift: ``(labels[:, 1:] != -100).sum()``."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def tokens(self) -> int:
        """Non-pad tokens.

        Every row ends with a labelled token (the eos, or the last kept completion token) followed
        only by padding, so a row's length is 1 + the index of its last label != -100. Counting it
        this way stays right when ``pad_id`` is also a real token (e.g. GPT-2's eos).
        """
        return int(self.lengths().sum()) if self.labels.numel() else 0

    def lengths(self) -> torch.Tensor:
        """(B,) non-pad tokens of each row: 1 + the index of its last label != -100 (see `tokens`)."""
        labelled = self.labels != IGNORE_INDEX  # (B, T)
        positions = torch.arange(1, self.labels.shape[1] + 1, device=self.labels.device)  # (T,)
        return (labelled * positions).amax(dim=1)

    def token_mask(self) -> torch.Tensor:
        """(B, T) bool: True on real tokens, False on padding."""
        positions = torch.arange(self.labels.shape[1], device=self.labels.device)  # (T,)
        return positions[None, :] < self.lengths()[:, None]


def collate(items: Sequence[EncodedExample], pad_id: int) -> Batch:
    """Stack examples into a (B, T) batch, T = longest item; pad ``input_ids`` with ``pad_id`` and
    ``labels`` with -100 on the right (attention is causal, so no attention mask is needed)."""
    if not items:
        raise ValueError("collate needs at least one example")
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, item in enumerate(items):
        if len(item.input_ids) != len(item.labels):
            raise ValueError(f"item {row}: input_ids and labels differ in length")
        input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, : len(item.labels)] = torch.tensor(item.labels, dtype=torch.long)
    return Batch(input_ids=input_ids, labels=labels)


class BatchStream:
    """Endless, reproducible stream of batches over one device's examples.

    Each epoch visits the examples in the order ``np.random.default_rng([seed, epoch])``
    permutes them, in batches of ``min(batch_size, n)`` (a short tail is dropped, and reappears in
    later epochs' shuffles). Global RNG state is never used, so a stream depends on its seed only.
    """

    def __init__(self, items: Sequence[EncodedExample], batch_size: int, pad_id: int, seed: int):
        if not items:
            raise ValueError("BatchStream needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.items = list(items)
        self.batch_size = min(batch_size, len(self.items))
        self.pad_id = pad_id
        self.seed = seed
        self.epoch = 0
        self._order = self._permutation(0)
        self._cursor = 0

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, examples of it consumed): where the stream stands, for checkpoints."""
        return self.epoch, self._cursor

    def seek(self, epoch: int, cursor: int) -> None:
        """Continue from `position` (epoch, cursor) as if the batches before it had been drawn."""
        if epoch < 0 or not 0 <= cursor <= len(self.items):
            raise ValueError(f"stream position ({epoch}, {cursor}) is out of range")
        self.epoch, self._order, self._cursor = epoch, self._permutation(epoch), cursor

    def next(self) -> Batch:
        """The next batch; starts a freshly shuffled epoch when the current one runs out."""
        if self._cursor + self.batch_size > len(self._order):
            self.epoch += 1
            self._order = self._permutation(self.epoch)
            self._cursor = 0
        chosen = self._order[self._cursor : self._cursor + self.batch_size]
        self._cursor += self.batch_size
        return collate([self.items[i] for i in chosen], self.pad_id)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next()


def iterate_batches(items: Sequence[EncodedExample], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """One pass over ``items`` in order, in batches of ``batch_size`` (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield collate(items[start : start + batch_size], pad_id)
