"""Held-out evaluation of a causal LM: completion perplexity and E2E generation metrics.

Works on any Hugging Face causal LM (a ``transformers.PreTrainedModel`` or a ``peft.PeftModel``
around one) with its tokenizer; nothing here knows about placements or adapters, so the same
numbers are quoted for every placement and baseline.

Nothing a held-out example holds can stop an evaluation: what the model sees stays within its
context (`context_length`; a longer prompt keeps its end, a longer scored sequence its last
positions), a huge text is tokenised only as far as it can be kept, and generation can be given a
time bound per prompt.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from splitpeft.data.batching import bounded_token_ids
from splitpeft.experiment.metrics import e2e_metrics, group_references
from splitpeft.model.backbone import context_length
from splitpeft.model.loss import IGNORE_INDEX

log = logging.getLogger(__name__)


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


@dataclass
class _Encoded:
    """An `EncodedExampleLike` cut to the model's context."""

    input_ids: list[int]
    labels: list[int]


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


def prompt_budget(context: int | None, max_new_tokens: int) -> int | None:
    """Prompt tokens generation can keep: the context less ``max_new_tokens`` (None: no context,
    no bound). ValueError if the context cannot hold the new tokens and one prompt token."""
    if context is None:
        return None
    if max_new_tokens >= context:
        raise ValueError(f"eval.max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                         f"{context} positions")
    return context - max_new_tokens


class PhaseProgress:
    """Progress of one evaluation phase: a bar where stderr is a terminal; elsewhere (a log file, CI)
    a plain line every `every_s` seconds; in both, one closing line with the count and the rate."""

    def __init__(self, phase: str, total: int, unit: str, *, enabled: bool, every_s: float = 30.0) -> None:
        self.phase, self.total, self.unit, self.enabled, self.every_s = phase, total, unit, enabled, every_s
        self.done, self.started = 0, time.perf_counter()
        self.last = self.started
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=phase, unit=unit, leave=False)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            print(f"{self.phase}: {self.done}/{self.total} {self.unit}, {self._rate()}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            print(f"{self.phase}: {self.done} {self.unit} in {time.perf_counter() - self.started:.1f} s ({self._rate()})",
                  file=sys.stderr, flush=True)

    def _rate(self) -> str:
        return f"{self.done / max(time.perf_counter() - self.started, 1e-9):.2f} {self.unit}/s"


def perplexity(model: Any, items: Sequence[EncodedExampleLike], batch_size: int, pad_id: int, *,
               progress: bool = False) -> float:
    """Completion perplexity ``exp(sum_t NLL_t / n_tokens)`` over all labelled tokens of ``items``.

    Token-weighted: every completion token counts once, whatever example it belongs to. The
    logit at position ``t`` predicts the label at ``t + 1``. Batches are right-padded with
    ``pad_id``; the attention mask marks real positions by length (not by ``!= pad_id``,
    since the pad id is often the eos id, which also appears inside sequences). An item longer
    than the model's context (`context_length`) is scored on its last ``context`` positions.
    ``progress``: a `PhaseProgress` over the examples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(items) == 0:
        raise ValueError("perplexity needs at least one item")
    for item in items:
        if len(item.input_ids) != len(item.labels):
            raise ValueError("each item needs input_ids and labels of the same length")
    device = _model_device(model)
    context = context_length(model)
    if context is not None and any(len(item.input_ids) > context for item in items):
        items = [_Encoded(item.input_ids[-context:], item.labels[-context:]) for item in items]
    # Similar lengths together waste less compute on padding; the sum is order-independent.
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    nll_sum, n_tokens = 0.0, 0
    lines = PhaseProgress("perplexity", len(items), "examples", enabled=progress)
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
            lines.advance(len(batch))
    lines.close()
    if n_tokens == 0:
        raise ValueError("no completion tokens (labels != -100 after the first position) to score")
    return math.exp(nll_sum / n_tokens)


@dataclass(frozen=True)
class Generated:
    """One prompt's output: ``text``; ``truncated``: the prompt lost its beginning to fit the
    context; ``cut``: the time bound stopped its batch before eos or ``max_new_tokens``."""

    text: str
    truncated: bool = False
    cut: bool = False


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], **options: Any) -> list[str]:
    """The texts of :func:`generate_outputs` (same options)."""
    return [output.text for output in generate_outputs(model, tokenizer, prompts, **options)]


def generate_outputs(
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
    max_s_per_prompt: float | None = None,
) -> list[Generated]:
    """Deterministic continuation of each prompt (greedy, or beam search if ``num_beams > 1``).

    ``length_penalty`` (beam search only) ranks finished beams by ``sum log p / length**length_penalty``;
    ``no_repeat_ngram_size > 0`` bans any n-gram of that size from occurring twice in an output
    (prompt included, as Hugging Face counts it). The E2E literature decodes with both (SplitLoRA:
    10 beams, length penalty 0.8, no-repeat-ngram 4).

    Prompts are tokenised without special tokens (the training format adds none), each to at most
    the model's context less ``max_new_tokens`` tokens, keeping its end (the part next to what is
    generated), and left-padded so that every row's next token sits at the same position.
    ``max_s_per_prompt`` bounds a batch of n prompts to n x that many seconds (Hugging Face's
    ``max_time``; None = no bound). Returns, per prompt, only the generated text, stripped and cut
    at the first newline; generation stops at eos.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer needs an eos token to stop generation")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
    if max_s_per_prompt is not None and not max_s_per_prompt > 0:
        raise ValueError(f"max_s_per_prompt must be > 0 or None, got {max_s_per_prompt}")
    budget = prompt_budget(context_length(model), max_new_tokens)
    # Beam-only options are passed only to beam search: greedy decoding would warn about them.
    beam_options = {"length_penalty": length_penalty} if num_beams > 1 else {}
    device = _model_device(model)
    eos_id = int(tokenizer.eos_token_id)
    pad_id = eos_id if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)  # masked out anyway
    lines = PhaseProgress("generation", len(prompts), "prompts", enabled=progress)
    outputs: list[Generated] = []
    with _eval_mode(model), _contiguous_head_input(model):
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            # One token more than the budget tells a prompt that had to lose its beginning.
            ids = [bounded_token_ids(tokenizer, p, None if budget is None else budget + 1, keep="end") for p in batch]
            truncated = [budget is not None and len(row) > budget for row in ids]
            ids = [row[-budget:] if budget is not None and len(row) > budget else row for row in ids]
            width = max(len(row) for row in ids)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T), left-padded
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
            for row, row_ids in enumerate(ids):
                if row_ids:
                    input_ids[row, width - len(row_ids) :] = torch.tensor(row_ids, dtype=torch.long)
                    attention_mask[row, width - len(row_ids) :] = 1
            time_options = {} if max_s_per_prompt is None else {"max_time": max_s_per_prompt * len(batch)}
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                no_repeat_ngram_size=no_repeat_ngram_size,
                **beam_options,
                **time_options,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )  # (B, T + new)
            new_tokens = generated[:, width:]  # (B, new)
            # Stopped early with a row that met no eos: only the clock stops a batch there.
            cut = new_tokens.shape[1] < max_new_tokens and not bool((new_tokens == eos_id).any(dim=1).all())
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for text, was_truncated in zip(texts, truncated):
                outputs.append(Generated(text.strip().split("\n", 1)[0].strip(), was_truncated, cut))
            lines.advance(len(batch))
    lines.close()
    return outputs


@contextmanager
def _contiguous_head_input(model: Any) -> Iterator[None]:
    """The output layer's input made contiguous while generating. Hugging Face's generation asks for
    the last position's logits only (`logits_to_keep`), a (B, 1, d) slice of the prompt's (B, T, d)
    hidden states; torch's linear cannot fold that strided slice into one matrix product, so it ran
    a batched product against B copies of the output weight (with a 49k vocabulary: B x 28 M
    values copied, 1.7 s of a 7.7 s batch of 8 on this CPU). Copying the (B, 1, d) slice is free
    beside that, and the values are the same."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Module):
        yield
        return

    def contiguous(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)

    handle = head.register_forward_pre_hook(contiguous)
    try:
        yield
    finally:
        handle.remove()


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
    max_s_per_prompt: float | None = None,
) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Generate one output per group and score it against all of the group's completions.

    Groups (E2E: one per MR) keep first-seen order; ``limit_groups`` keeps the first N. The
    prompt of a group is that of its first example; decoding options are :func:`generate_outputs`'.
    Returns :func:`e2e_metrics` and one sample ``{"group", "prompt", "hypothesis", "references",
    "prompt_truncated", "cut"}`` per group (a sample's prompt is shown to 2,000 characters).
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
    outputs = generate_outputs(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        batch_size=batch_size,
        progress=progress,
        max_s_per_prompt=max_s_per_prompt,
    )
    truncated, cut = sum(o.truncated for o in outputs), sum(o.cut for o in outputs)
    if truncated:  # info: `federation.preflight.check_held_out` warned of these before training
        log.info("generation: %d of %d prompts were longer than the model's context less eval.max_new_tokens "
                 "and lost their beginning", truncated, len(outputs))
    if cut:
        log.warning("generation: %d of %d outputs were cut short by the time bound (eval.max_generation_s_per_prompt) and are "
                    "scored as they stood", cut, len(outputs))
    scores = e2e_metrics([o.text for o in outputs], references, meteor=meteor)
    samples = [
        {"group": g, "prompt": _shorten(p), "hypothesis": o.text, "references": refs, "prompt_truncated": o.truncated,
         "cut": o.cut}
        for g, p, o, refs in zip(groups, prompts, outputs, references)
    ]
    return scores, samples


def _shorten(text: str, limit: int = 2000) -> str:
    """`text`, or its first and last characters around '...' where it is longer than `limit`
    (a report quotes prompts; a 1 MB one would make it 1 MB)."""
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"
