"""The server's own training pairs for the attackers: text it makes by running the model it knows.

The server holds the public base model and the adapters it aggregated, so from any public prompts
(the auxiliary text's, `privacy.aux_source`) it can sample as many completions as it likes, and
run them through the device's blocks to get (state, token) pairs: it is not limited to the
auxiliary text it happens to have (`privacy.aux_generate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from splitpeft.data.batching import bounded_token_ids
from splitpeft.data.examples import Example, completion_text


@torch.no_grad()
def sampled_completions(model: Any, tokenizer: Any, prompts: Sequence[Example], per_prompt: int, *,
                        max_new_tokens: int, seed: int, temperature: float = 1.0, top_p: float = 0.95,
                        batch_size: int = 16) -> list[Example]:
    """`per_prompt` completions of each example's prompt, sampled from `model` (temperature,
    nucleus `top_p`), at most `max_new_tokens` tokens each, cut at eos; as Examples with the
    prompt's group. An empty prompt starts from the tokenizer's bos (or eos) token. Seeded inside
    `torch.random.fork_rng`: the same call gives the same text, and the caller's random state is
    untouched. Completions that come out empty are dropped."""
    if per_prompt < 0 or max_new_tokens < 1:
        raise ValueError(f"per_prompt must be >= 0 and max_new_tokens >= 1, got {per_prompt}, {max_new_tokens}")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer needs an eos token to stop sampling")
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id
    pad_id = eos_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    device = next(model.parameters()).device
    jobs = [example for example in prompts for _ in range(per_prompt)]
    out: list[Example] = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(jobs), batch_size):
                batch = jobs[start:start + batch_size]
                ids = [bounded_token_ids(tokenizer, e.prompt, None, keep="end") or [int(start_id)] for e in batch]
                width = max(len(row) for row in ids)
                input_ids = torch.full((len(batch), width), int(pad_id), dtype=torch.long)  # (B, T), left-padded
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, row_ids in enumerate(ids):
                    input_ids[row, width - len(row_ids):] = torch.tensor(row_ids)
                    attention[row, width - len(row_ids):] = 1
                generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                           do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                           max_new_tokens=max_new_tokens, pad_token_id=int(pad_id),
                                           eos_token_id=int(eos_id))  # (B, T + new)
                for example, text in zip(batch, tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)):
                    if text.strip():
                        out.append(Example(example.prompt, completion_text(text) if example.prompt else text.strip(),
                                           example.group))
    finally:
        model.train(was_training)
    return out
