"""Held-out evaluation of a causal LM: completion perplexity and E2E generation metrics.

Works on any Hugging Face causal LM (a ``transformers.PreTrainedModel`` or a ``peft.PeftModel``
around one) with its tokenizer; nothing here knows about placements or adapters, so the same
numbers are quoted for every placement and baseline.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from splitpeft.experiment.metrics import e2e_metrics, group_references
from splitpeft.model.loss import IGNORE_INDEX


class EncodedExampleLike(Protocol):
    """A tokenised example: ``labels`` equals ``input_ids`` on completion tokens, -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]


class ExampleLike(Protocol):
    """A text example; ``group`` identifies the input (E2E: the MR) shared by its references.

    Read-only members, so frozen dataclasses such as `splitpeft.data.examples.Example` fit.
    """

    @property
    def prompt(self) -> str: ...
    @property
    def completion(self) -> str: ...
    @property
    def group(self) -> str: ...


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    # Dropout off for evaluation, but hand the model back in the mode we found it.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def perplexity(model: Any, items: Sequence[EncodedExampleLike], batch_size: int, pad_id: int) -> float:
    """Completion perplexity ``exp(sum_t NLL_t / n_tokens)`` over all labelled tokens of ``items``.

    Token-weighted: every completion token counts once, whatever example it belongs to. The
    logit at position ``t`` predicts the label at ``t + 1``. Batches are right-padded with
    ``pad_id``; the attention mask marks real positions by length (not by ``!= pad_id``,
    since the pad id is often the eos id, which also appears inside sequences).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(items) == 0:
        raise ValueError("perplexity needs at least one item")
    for item in items:
        if len(item.input_ids) != len(item.labels):
            raise ValueError("each item needs input_ids and labels of the same length")
    device = _model_device(model)
    # Similar lengths together waste less compute on padding; the sum is order-independent.
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    nll_sum, n_tokens = 0.0, 0
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = [items[i] for i in order[start : start + batch_size]]
            seq_len = max(len(item.input_ids) for item in batch)
            input_ids = torch.full((len(batch), seq_len), pad_id, dtype=torch.long)  # (B, T)
            labels = torch.full((len(batch), seq_len), IGNORE_INDEX, dtype=torch.long)  # (B, T)
            attention_mask = torch.zeros((len(batch), seq_len), dtype=torch.long)  # (B, T)
            for row, item in enumerate(batch):
                n = len(item.input_ids)
                input_ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
                labels[row, :n] = torch.tensor(item.labels, dtype=torch.long)
                attention_mask[row, :n] = 1
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits  # (B, T, V)
            shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
            shift_labels = labels[:, 1:].to(device)  # (B, T-1)
            nll_sum += F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            ).item()
            n_tokens += int((shift_labels != IGNORE_INDEX).sum().item())
    if n_tokens == 0:
        raise ValueError("no completion tokens (labels != -100 after the first position) to score")
    return math.exp(nll_sum / n_tokens)


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 40,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """Deterministic continuation of each prompt (greedy, or beam search if ``num_beams > 1``).

    ``length_penalty`` (beam search only) ranks finished beams by ``sum log p / length**length_penalty``;
    ``no_repeat_ngram_size > 0`` bans any n-gram of that size from occurring twice in an output
    (prompt included, as Hugging Face counts it). The E2E literature decodes with both (SplitLoRA:
    10 beams, length penalty 0.8, no-repeat-ngram 4).

    Prompts are tokenised without special tokens (the training format adds none) and
    left-padded so that every row's next token sits at the same position. Returns only the
    generated text, stripped and cut at the first newline; generation stops at eos.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs an eos token to stop generation")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
    # Beam-only options are passed only to beam search: greedy decoding would warn about them.
    beam_options = {"length_penalty": length_penalty} if num_beams > 1 else {}
    device = _model_device(model)
    saved_padding_side, saved_pad_token = tokenizer.padding_side, tokenizer.pad_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # only for padding; masked out anyway
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    outputs: list[str] = []
    try:
        tokenizer.padding_side = "left"
        with _eval_mode(model):
            for start in starts:
                batch = list(prompts[start : start + batch_size])
                enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
                input_ids = enc["input_ids"].to(device)  # (B, T)
                generated = model.generate(
                    input_ids=input_ids,
                    attention_mask=enc["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    no_repeat_ngram_size=no_repeat_ngram_size,
                    **beam_options,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )  # (B, T + new)
                new_tokens = generated[:, input_ids.shape[1] :]
                for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
                    outputs.append(text.strip().split("\n", 1)[0].strip())
    finally:
        tokenizer.padding_side = saved_padding_side
        tokenizer.pad_token = saved_pad_token
    return outputs


def evaluate_generation(
    model: Any,
    tokenizer: Any,
    examples: Sequence[ExampleLike],
    *,
    max_new_tokens: int = 40,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    limit_groups: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    meteor: bool = True,
) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Generate one output per group and score it against all of the group's completions.

    Groups (E2E: one per MR) keep first-seen order; ``limit_groups`` keeps the first N. The
    prompt of a group is that of its first example; decoding options are :func:`generate`'s. Returns :func:`e2e_metrics` and one sample
    ``{"group", "prompt", "hypothesis", "references"}`` per group.
    """
    if limit_groups is not None and limit_groups < 1:
        raise ValueError(f"limit_groups must be >= 1 or None, got {limit_groups}")
    groups, references = group_references(
        [ex.group for ex in examples], [ex.completion.strip() for ex in examples]
    )
    prompt_of: dict[str, str] = {}
    for ex in examples:
        prompt_of.setdefault(ex.group, ex.prompt)
    if limit_groups is not None:
        groups, references = groups[:limit_groups], references[:limit_groups]
    prompts = [prompt_of[g] for g in groups]
    hypotheses = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        batch_size=batch_size,
        progress=progress,
    )
    scores = e2e_metrics(hypotheses, references, meteor=meteor)
    samples = [
        {"group": g, "prompt": p, "hypothesis": h, "references": refs}
        for g, p, h, refs in zip(groups, prompts, hypotheses, references)
    ]
    return scores, samples
