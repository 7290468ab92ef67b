"""FLOP counting of attention: grouped-query attention (fewer key/value heads than query heads)
counts as the work the kernel does, on every attention operator torch has a formula for, whether
or not this torch's own formulas accept unexpanded key/value heads (torch 2.11 on a CUDA machine
refused them with an AssertionError, which ended the step)."""

import pytest
import torch
import torch.nn.functional as F

from splitpeft.model.usage import ATTENTION_FLOPS, flop_counter

aten = torch.ops.aten
B, HQ, HKV, T, D = 2, 8, 2, 16, 32


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=torch.bfloat16)


SDPA_FORWARD = [aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_efficient_attention,
                aten._scaled_dot_product_flash_attention_for_cpu]
SDPA_BACKWARD = [aten._scaled_dot_product_flash_attention_backward,
                 aten._scaled_dot_product_efficient_attention_backward,
                 aten._scaled_dot_product_flash_attention_for_cpu_backward]


@pytest.mark.parametrize("op", SDPA_FORWARD, ids=str)
def test_grouped_query_forward_counts_as_every_query_head_attending(op):
    count = ATTENTION_FLOPS[op]
    grouped = count(meta(B, HQ, T, D), meta(B, HKV, T, D), meta(B, HKV, T, D))
    assert grouped == count(meta(B, HQ, T, D), meta(B, HQ, T, D), meta(B, HQ, T, D)) == 2 * (2 * B * HQ * T * T * D)


@pytest.mark.parametrize("op", SDPA_BACKWARD, ids=str)
def test_grouped_query_backward_counts_as_every_query_head_attending(op):
    count = ATTENTION_FLOPS[op]
    grouped = count(meta(B, HQ, T, D), meta(B, HQ, T, D), meta(B, HKV, T, D), meta(B, HKV, T, D))
    full = count(meta(B, HQ, T, D), meta(B, HQ, T, D), meta(B, HQ, T, D), meta(B, HQ, T, D))
    assert grouped == full > 0


def test_raw_kernels_have_heads_on_their_third_axis():
    count = ATTENTION_FLOPS[aten._flash_attention_forward]  # (B, T, H, D), cumulative lengths None
    grouped = count(meta(B, T, HQ, D), meta(B, T, HKV, D), meta(B, T, HKV, D), None, None, T, T)
    assert grouped == count(meta(B, T, HQ, D), meta(B, T, HQ, D), meta(B, T, HQ, D), None, None, T, T) > 0


def test_counter_on_sdpa_with_grouped_heads_equals_expanded_heads():
    q = torch.randn(B, HQ, T, D, requires_grad=True)
    k, v = torch.randn(B, HKV, T, D), torch.randn(B, HKV, T, D)
    with flop_counter() as grouped:
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    with flop_counter() as expanded:
        F.scaled_dot_product_attention(q, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1),
                                       is_causal=True).sum().backward()
    assert grouped.get_total_flops() == expanded.get_total_flops() > 0


def test_a_formula_that_refuses_grouped_heads_sees_them_widened():
    from splitpeft.model.usage import _query_heads_for_all

    def strict(query, key, value, *rest, **kwargs):  # torch 2.11's formulas: equal heads or AssertionError
        assert query.shape[1] == key.shape[1] == value.shape[1], "sdpa_flop_count: query/key/value shapes are incompatible"
        return 1

    assert _query_heads_for_all(strict, 0, 1)(meta(B, HQ, T, D), meta(B, HKV, T, D), meta(B, HKV, T, D)) == 1
    with pytest.raises(AssertionError):
        strict(meta(B, HQ, T, D), meta(B, HKV, T, D), meta(B, HKV, T, D))


class ScriptedAllocator:
    """CUDA's allocator statistics as a U-shaped step on a shared GPU moves them (no GPU here):
    `allocated` now, and the most since the last reset."""

    def __init__(self, allocated: int) -> None:
        self.allocated, self.peak = allocated, allocated

    def to(self, allocated: int, peak: int | None = None) -> None:
        self.peak = max(self.peak, allocated if peak is None else peak)
        self.allocated = allocated


def test_on_a_shared_gpu_the_meter_counts_only_the_devices_own_segments(monkeypatch):
    import splitpeft.model.usage as usage
    from splitpeft.model.usage import DeviceMeter

    gpu = ScriptedAllocator(1000)  # what the step starts with
    monkeypatch.setattr(usage, "cuda_allocated", lambda device: gpu.allocated)
    monkeypatch.setattr(usage, "cuda_peak", lambda device: gpu.peak)
    monkeypatch.setattr(usage, "cuda_reset_peak", lambda device: setattr(gpu, "peak", gpu.allocated))
    meter = DeviceMeter(count_flops=False, device=torch.device("cuda"))
    meter.begin_step([])
    with meter.compute():      # the device's blocks: 400 of activations kept, 100 more for a moment
        gpu.to(1400, peak=1500)
    gpu.to(4400)               # the server's blocks, holding 3000 of activations for the head gradient
    with meter.compute():      # the device's head and loss: 200 more for a moment, 50 kept
        gpu.to(1450 + 3000, peak=1600 + 3000)
    gpu.to(1450)               # the server's backward frees its 3000
    with meter.compute():      # the device's backward: 250 over what it holds for a moment, all freed
        with meter.compute():  # a segment inside a segment is part of it
            gpu.to(1450, peak=1700)
        gpu.to(1000)
    assert meter.end_step() == 700  # the device's own: 1700 - 1000; the server's 3000 is not in it
