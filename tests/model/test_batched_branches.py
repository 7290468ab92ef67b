"""The shared server pass's branches (`model/batched.py`, `_stacked_branches`): each member's
s B (A drop(x)) on its rows, minus its warm start's s0 B0 (A0 x) on the undropped rows, computed
for all members in two batched products."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from splitpeft.model.adapters import ADAPTER_NAME, inject, lora_ab, lora_layers
from splitpeft.model.batched import Member, _stacked_branches

NAME = "model.layers.0.mlp.up_proj"


def _layers(dropout: float, members: int, ranks: tuple[int, ...] | None = None) -> list:
    """`members` LoRA layers on NAME (rank 4 each, or `ranks`), each from its own seed, B random."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    layers = []
    for index in range(members):
        torch.manual_seed(index)
        model = inject(LlamaForCausalLM(config), {NAME: ranks[index] if ranks else 4}, alpha=8.0, dropout=dropout)
        layer = lora_layers(model)[NAME]
        with torch.no_grad():
            lora_ab(layer)[1].normal_()
        layers.append(layer)
    return layers


@pytest.mark.parametrize("dropout", [0.0, 0.4], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_branches_are_each_members_branch_minus_its_warm_copy(dropout, dtype):
    layers = _layers(dropout, 3)
    generator = torch.Generator().manual_seed(7)
    rows_each, seq, d_in = 2, 5, 32
    x = torch.randn(3 * rows_each, seq, d_in, generator=generator).to(dtype)
    warm = [(0.5, torch.randn(4, d_in, generator=generator), torch.randn(48, 4, generator=generator)), None,
            (2.0, torch.randn(4, d_in, generator=generator), torch.randn(48, 4, generator=generator))]
    members = [Member(session=SimpleNamespace(warm_factors={}), hidden=x[i * rows_each:(i + 1) * rows_each],
                      rows=slice(i * rows_each, (i + 1) * rows_each), layers={NAME: layers[i]},
                      warm={NAME: warm[i]} if warm[i] is not None else {})
               for i in range(3)]
    torch.manual_seed(11)
    base = torch.randn(3 * rows_each, seq, 48, generator=generator).to(dtype)  # the linear's own output
    kept = base.clone()
    got = _stacked_branches(NAME, members, x, base)
    assert got is not None and got.shape == base.shape
    assert torch.equal(base, kept)  # out of place: the linear's output is left as it is
    torch.manual_seed(11)  # the same dropout mask: the pass draws it for all rows first
    dropped = layers[0].lora_dropout[ADAPTER_NAME](x.float())
    want = []
    for i, layer in enumerate(layers):
        a, b = (f.detach().float() for f in lora_ab(layer))
        rows = slice(i * rows_each, (i + 1) * rows_each)
        branch = float(layer.scaling[ADAPTER_NAME]) * dropped[rows] @ a.T @ b.T
        if warm[i] is not None:
            s0, a0, b0 = warm[i]
            branch = branch - s0 * x[rows].float() @ a0.T @ b0.T
        want.append(branch)
    want = torch.cat(want) + base.float()
    # bf16: a few units of bf16 rounding (2^-8) of the output's scale
    atol = 1e-5 if dtype == torch.float32 else 2**-6 * float(want.abs().max())
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=0, atol=atol)


def _one_row_members(layers: list, x: torch.Tensor) -> list[Member]:
    """A member per layer, each on one row of `x`, no warm start."""
    return [Member(session=SimpleNamespace(warm_factors={}), hidden=x[i:i + 1], rows=slice(i, i + 1),
                   layers={NAME: layer}, warm={}) for i, layer in enumerate(layers)]


def test_a_non_contiguous_output_gets_the_same_sum():
    x = torch.randn(2, 3, 32)
    members = _one_row_members(_layers(0.0, 2), x)
    output = torch.randn(48, 3, 2).transpose(0, 2)  # (2, 3, 48), not contiguous
    got = _stacked_branches(NAME, members, x, output)
    want = _stacked_branches(NAME, members, x, output.contiguous())
    assert got is not None and want is not None
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_members_at_different_ranks_are_left_to_the_per_member_path():
    x = torch.randn(2, 3, 32)
    members = _one_row_members(_layers(0.0, 2, ranks=(2, 4)), x)
    assert _stacked_branches(NAME, members, x, torch.randn(2, 3, 48)) is None
