"""The attention every splitpeft model runs: transformers' SDPA, with short low-precision sequences
on a CPU computed in fp32.

On this project's CPUs (x86 with AMX) torch's SDPA kernel in bf16 is slower than the same kernel in
fp32 for short sequences, forward and backward: causal attention of SmolLM2's heads (9 query, 3
key/value, dim 64) took 27.4 ms in bf16 against 20.1 ms in fp32 at B=16, T=128, and 13.6 against
6.9 ms at T=64, casts included (`bench/attention.py`). From T about 192 bf16 is faster. Attention
was a fifth of a bf16 server pass's CPU time (its backward alone 22% of the 16-device pass in
`bench/batched_server.py --profile`). So where the inputs are bf16 / fp16 on a CPU and the keys are
at most `FP32_ON_CPU_UP_TO` positions, q, k, v (and a float mask) go to fp32, SDPA runs there, and
its output comes back in the input's dtype: more accurate as well as faster (fp32 softmax and
products; only the inputs and the output are rounded). Everything else (GPUs, fp32, long sequences,
one-token decoding) is transformers' SDPA as is.

transformers picks the function by `config._attn_implementation`; `ATTENTION` names this one (and
the SDPA mask builder for it), registered once on import.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "splitpeft_sdpa"


FP32_ON_CPU_UP_TO = 160


"""Longest key length (positions) whose low-precision CPU attention runs in fp32 (crossover ~192)."""


LOW_PRECISION = (torch.bfloat16, torch.float16)


def computes_in_fp32(on_cpu: bool, low_precision: bool, query_positions: int, key_positions: int) -> bool:
    """The rule, for a call and for the memory model's prediction of one (`ModelShapes.attention_in_fp32`):
    a CPU, a bf16 / fp16 model, more than one query (not decoding), at most `FP32_ON_CPU_UP_TO` keys."""
    return on_cpu and low_precision and query_positions > 1 and key_positions <= FP32_ON_CPU_UP_TO


def runs_in_fp32(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether `attention_forward` computes this call in fp32. query (B, H, T_q, D), key (B, H_kv, T_k, D)."""
    return computes_in_fp32(query.device.type == "cpu", query.dtype in LOW_PRECISION, query.shape[2], key.shape[2])


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' `sdpa_attention_forward`, in fp32 where `runs_in_fp32` says so.

    query (B, H, T_q, D), key and value (B, H_kv, T_k, D), attention_mask None, bool or additive
    (B | 1, 1, T_q, T_k) -> (output (B, T_q, H, D) in query's dtype, None)."""
    if not runs_in_fp32(query, key):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    mask = attention_mask
    if mask is not None and mask.is_floating_point():
        mask = mask.float()
    bias = kwargs.get("position_bias")
    if bias is not None and bias.is_floating_point():
        kwargs["position_bias"] = bias.float()
    output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), mask, **kwargs)
    return output.to(query.dtype), weights


AttentionInterface.register(ATTENTION, attention_forward)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)
