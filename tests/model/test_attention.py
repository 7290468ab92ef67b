"""The models' attention (`model/attention.py`): transformers' SDPA, with short bf16 / fp16 sequences
on a CPU computed in fp32."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from splitpeft.hsplit.memory import ModelShapes, block_saved
from splitpeft.model.attention import ATTENTION, FP32_ON_CPU_UP_TO, attention_forward, runs_in_fp32
from splitpeft.model.loading import tiny_model


def _qkv(batch: int, length: int, dtype: torch.dtype, heads: int = 4, kv_heads: int = 2, dim: int = 8):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, length, dim, generator=generator)
    k = torch.randn(batch, kv_heads, length, dim, generator=generator)
    v = torch.randn(batch, kv_heads, length, dim, generator=generator)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _module():
    model, _ = tiny_model("tiny-llama")
    return model, model.model.layers[0].self_attn


def test_every_model_splitpeft_builds_runs_this_attention():
    model, _ = _module()
    assert model.config._attn_implementation == ATTENTION


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_short_low_precision_attention_on_a_cpu_is_sdpa_in_fp32_rounded_once(dtype):
    """Output = SDPA of the fp32 inputs, rounded to the input's dtype: with grouped-query heads,
    the causal flag, and a boolean padding mask."""
    _, module = _module()
    module.num_key_value_groups = 2
    q, k, v = _qkv(3, 12, dtype)
    assert runs_in_fp32(q, k)
    got, _ = attention_forward(module, q, k, v, None, scaling=0.35, dropout=0.0)
    want, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None, scaling=0.35, dropout=0.0)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)
    mask = torch.ones(3, 1, 12, 12, dtype=torch.bool).tril()
    mask[0, :, :, 9:] = False  # padding at the end of row 0
    got, _ = attention_forward(module, q, k, v, mask, scaling=0.35, dropout=0.0)
    want, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), mask, scaling=0.35, dropout=0.0)
    torch.testing.assert_close(got, want.to(dtype), rtol=0, atol=0)


def test_gradients_flow_back_in_the_inputs_dtype():
    _, module = _module()
    module.num_key_value_groups = 2
    q, k, v = (t.requires_grad_() for t in _qkv(2, 10, torch.bfloat16))
    out, _ = attention_forward(module, q, k, v, None, scaling=0.35, dropout=0.0)
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and bool(torch.isfinite(t.grad).all())
               for t in (q, k, v))
    reference = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want, _ = sdpa_attention_forward(module, *reference, None, scaling=0.35, dropout=0.0)
    want.square().sum().backward()
    for got, ref in zip((q, k, v), reference):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=0.05, atol=0.05)


def test_fp32_long_sequences_and_one_token_decoding_are_sdpa_as_is():
    _, module = _module()
    module.num_key_value_groups = 2
    cases = [_qkv(2, 12, torch.float32), _qkv(1, FP32_ON_CPU_UP_TO + 1, torch.bfloat16)]
    q, k, v = _qkv(2, 12, torch.bfloat16)
    cases.append((q[:, :, -1:], k, v))  # one query against the cached keys
    for q, k, v in cases:
        assert not runs_in_fp32(q, k)
        got, _ = attention_forward(module, q, k, v, None, scaling=0.35, dropout=0.0)
        want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.35, dropout=0.0)
        assert got.dtype == q.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_bf16_model_matches_its_fp32_self_to_bf16_rounding():
    model, _ = _module()
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        got = model.to(torch.bfloat16)(ids).logits.float()
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())


def test_the_memory_model_knows_where_attention_runs_in_fp32():
    """The planner's prediction counts sdpa's fp32 q, k, v and output exactly where
    `runs_in_fp32` computes in fp32 (tests/hsplit/test_memory_precision.py checks the bytes against
    the meter in bf16 on the tiny models, whose sequences are short)."""
    model, _ = _module()
    cpu = ModelShapes.from_config(model.config, dtype="bf16")
    cuda = ModelShapes.from_config(model.config, dtype="bf16", device="cuda")
    fp32 = ModelShapes.from_config(model.config, dtype="fp32")
    assert cpu.attention_in_fp32(FP32_ON_CPU_UP_TO) and not cpu.attention_in_fp32(FP32_ON_CPU_UP_TO + 1)
    assert not cpu.attention_in_fp32(1) and not cuda.attention_in_fp32(64) and not fp32.attention_in_fp32(64)
    widths = sum(cpu.qkv_dims) + cpu.hidden_size  # q, k, v and the output: 2 more bytes an element in fp32
    roles = {"q": 4, "o": 4}
    extra = block_saved(cpu, roles, True, 2, 64).bytes - block_saved(cuda, roles, True, 2, 64).bytes
    assert extra == 2 * 64 * (widths * 2 + cpu.hidden_size * 2)  # + o_proj's own bf16 input
    assert ModelShapes.from_model(model).on_cpu
