"""How much of the private text an attacker recovered: token accuracy and ROUGE-L on token ids,
against the chance of always guessing the most frequent token.

Every function takes guesses (B, T) int64 (-1 = no guess, see `privacy/attackers.py`), the true
input ids (B, T) int64 and the mask (B, T) bool of real positions; only real positions count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rouge_score import rouge_scorer


@dataclass
class Score:
    """What an attacker recovered over many batches."""

    token_accuracy: float  # correct guesses / real positions, pooled over positions
    rouge_l_f: float  # mean ROUGE-L F1 on token ids, pooled over sequences


class _IdTokenizer:
    """rouge-score's tokenizer interface for strings of space-separated token ids: its default
    tokenizer would also split them that way, but says nothing about keeping ids intact."""

    def tokenize(self, text: str) -> list[str]:
        return text.split()


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_IdTokenizer())


def _correct_and_real(guess: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    if not guess.shape == truth.shape == mask.shape:
        raise ValueError(f"guess {tuple(guess.shape)}, truth {tuple(truth.shape)} and mask {tuple(mask.shape)} differ")
    return int(((guess == truth) & mask).sum()), int(mask.sum())


def token_accuracy(guess: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    """Correct guesses / real positions = sum_t [mask_t and guess_t == truth_t] / sum_t mask_t
    (a -1, no guess, counts as wrong; 0.0 when there is no real position)."""
    correct, real = _correct_and_real(guess, truth, mask)
    return correct / real if real else 0.0


def _rouge_l_each(guess: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """ROUGE-L F1 of each sequence with at least one real position."""
    _correct_and_real(guess, truth, mask)
    scores = []
    for row_guess, row_truth, row_mask in zip(guess.tolist(), truth.tolist(), mask.tolist()):
        reference = [t for t, real in zip(row_truth, row_mask) if real]
        if not reference:
            continue
        guessed = [g for g, real in zip(row_guess, row_mask) if real and g >= 0]
        if not guessed:
            scores.append(0.0)
            continue
        result = _SCORER.score(" ".join(map(str, reference)), " ".join(map(str, guessed)))
        scores.append(float(result["rougeL"].fmeasure))
    return scores


def rouge_l_f(guess: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over sequences of ROUGE-L F1 (beta = 1) of the guessed token sequence (real positions,
    -1 dropped) against the true one (real positions), on token ids, not words:
        P = LCS / len(guess),  R = LCS / len(truth),  F = 2 P R / (P + R)
    0 for a sequence with no guess; sequences without real positions are left out (0.0 if none
    remain). LCS by rouge-score (the sequences are written as space-separated ids)."""
    scores = _rouge_l_each(guess, truth, mask)
    return sum(scores) / len(scores) if scores else 0.0


def chance_accuracy(aux_ids: torch.Tensor, aux_mask: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    """Token accuracy of always guessing the most frequent token of the aux text (aux_ids at
    aux_mask): the floor every attacker should clear."""
    values, counts = aux_ids[aux_mask].unique(return_counts=True)
    if len(values) == 0:
        raise ValueError("chance_accuracy needs at least one real aux position")
    top = values[counts.argmax()]
    return token_accuracy(torch.full_like(truth, int(top)), truth, mask)


def score(guesses: Sequence[torch.Tensor], truths: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> Score:
    """Score over many batches: accuracy pooled over all real positions, ROUGE-L averaged over all
    sequences (each batch's guess, truth and mask (B_i, T_i))."""
    if not len(guesses) == len(truths) == len(masks):
        raise ValueError(f"{len(guesses)} guesses, {len(truths)} truths and {len(masks)} masks")
    correct = real = 0
    rouges: list[float] = []
    for guess, truth, mask in zip(guesses, truths, masks):
        c, r = _correct_and_real(guess, truth, mask)
        correct, real = correct + c, real + r
        rouges.extend(_rouge_l_each(guess, truth, mask))
    return Score(token_accuracy=correct / real if real else 0.0, rouge_l_f=sum(rouges) / len(rouges) if rouges else 0.0)
