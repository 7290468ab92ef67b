"""bf16 steps without fp32 detours: the chunked cross-entropy against torch's on upcast logits,
LoRA branches that multiply in bf16 with fp32 factors, and fp32 left exactly as it was."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from splitpeft.model import loss as loss_module
from splitpeft.model.adapters import ADAPTER_NAME, BranchLinear, inject, lora_layers, lora_parameters
from splitpeft.model.backbone import share_frozen_copy
from splitpeft.model.loading import load_model
from splitpeft.model.loss import IGNORE_INDEX, causal_lm_loss, head_loss
from splitpeft.model.parts import Part, view_part


def _logits_and_labels(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 50, 1000, generator=generator)).to(dtype).requires_grad_()
    labels = torch.randint(0, 1000, (3, 50), generator=generator)
    labels[:, :20] = IGNORE_INDEX  # prompts
    labels[2, 40:] = IGNORE_INDEX  # padding
    return logits, labels


@pytest.mark.parametrize("chunk_rows", [7, 128])
def test_chunked_cross_entropy_is_torchs_on_upcast_logits(monkeypatch, chunk_rows):
    """Loss to fp32 rounding, gradient to the bf16 rounding of the same fp32 gradient."""
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_ROWS", chunk_rows)
    logits, labels = _logits_and_labels(torch.bfloat16)
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    ours = logits.grad
    logits.grad = None
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    reference = F.cross_entropy(logits.float().reshape(-1, 1000), shifted, ignore_index=IGNORE_INDEX)
    reference.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), logits.grad.float(), rtol=0, atol=1e-7)
    assert bool((ours.reshape(3, 50, -1)[:, :19] == 0).all())  # no gradient on unlabelled positions


def test_fp32_loss_is_torchs_cross_entropy():
    """To fp32 rounding: ours averages the labelled rows it picked, torch's skips the ignored ones."""
    logits, labels = _logits_and_labels(torch.float32)
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    torch.testing.assert_close(causal_lm_loss(logits, labels),
                               F.cross_entropy(logits.reshape(-1, 1000), shifted, ignore_index=IGNORE_INDEX),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_on_labelled_positions_gives_the_loss_and_gradient_of_the_head_on_all(dtype):
    """`head_loss` runs the head on the labelled positions only: the same loss and the same gradient
    at the hidden states (zero where no label is predicted) as the head over every position."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 1000, bias=False)).to(dtype)
    _, labels = _logits_and_labels(dtype)
    hidden = torch.randn(3, 50, 16, dtype=dtype, requires_grad=True)
    ours = head_loss(head, hidden, labels)
    (ours_grad,) = torch.autograd.grad(ours, hidden)
    everywhere = causal_lm_loss(head(hidden), labels)
    (everywhere_grad,) = torch.autograd.grad(everywhere, hidden)
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    torch.testing.assert_close(ours, everywhere, **tolerance)
    torch.testing.assert_close(ours_grad, everywhere_grad, **tolerance)
    assert bool((ours_grad[:, :19] == 0).all()) and bool((ours_grad[2, 39:] == 0).all())
    assert bool((ours_grad[:, 19:39] != 0).any(dim=-1).all())  # every labelled position got its gradient


def test_labels_that_do_not_match_the_states_are_refused():
    """Positions are flattened with T as the stride: labels one position short would label other
    rows' states, so the loss refuses them by name."""
    _, labels = _logits_and_labels(torch.float32)
    hidden = torch.randn(3, 50, 16)
    head = nn.Linear(16, 1000, bias=False)
    with pytest.raises(ValueError, match="labels of shape"):
        head_loss(head, hidden, labels[:, :49])
    with pytest.raises(ValueError, match="labels of shape"):
        causal_lm_loss(torch.randn(3, 50, 1000), labels[:2])


def test_branch_linear_in_fp32_is_nn_linear_bit_for_bit():
    linear = nn.Linear(64, 8, bias=False)
    x = torch.randn(4, 10, 64)
    want = linear(x)
    linear.__class__ = BranchLinear
    assert torch.equal(linear(x), want)


def test_bf16_lora_branch_multiplies_in_bf16_and_trains_fp32_factors():
    """Adapters, their gradients stay fp32; the branch's product and its saved input are bf16
    (no fp32 copy of the input per adapted module); the gradients match an fp32 branch on the
    same bf16 input to bf16's precision."""
    base = load_model("tiny-llama").model
    bf16 = view_part(base, Part.whole(2), dtype=torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj"
    model = inject(bf16, {name: 4}, alpha=8.0)
    layer = lora_layers(model)[name]
    with torch.no_grad():
        layer.lora_B[ADAPTER_NAME].weight.normal_()
    x = torch.randn(2, 6, layer.in_features).bfloat16()
    saved_dtypes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved_dtypes.append(t.dtype) or t, lambda t: t):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert torch.float32 not in saved_dtypes
    out.float().square().sum().backward()
    a, b = (p for p in lora_parameters(model))
    assert a.dtype == b.dtype == a.grad.dtype == b.grad.dtype == torch.float32

    reference_a = a.detach().clone().requires_grad_()
    reference_b = b.detach().clone().requires_grad_()
    with torch.no_grad():
        frozen = layer.get_base_layer()(x)
    branch = (x.float() @ reference_a.T) @ reference_b.T * layer.scaling[ADAPTER_NAME]
    (frozen.float() + branch).square().sum().backward()
    for ours, reference in ((a.grad, reference_a.grad), (b.grad, reference_b.grad)):
        assert float((ours - reference).norm() / reference.norm()) < 2e-2


def test_fp32_model_keeps_fp32_products():
    base = load_model("tiny-llama").model
    model = inject(share_frozen_copy(base), {"model.layers.0.mlp.down_proj": 2}, alpha=4.0)
    layer = lora_layers(model)["model.layers.0.mlp.down_proj"]
    assert isinstance(layer.lora_A[ADAPTER_NAME], BranchLinear)
    x = torch.randn(1, 3, layer.in_features)
    assert layer(x).dtype == torch.float32
