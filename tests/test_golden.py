"""Behaviour is preserved: the five reference runs of `golden_runs.py` (split, U-shaped split,
dlora + Kill and Revive, centralized, HSplitLoRA with ARMSC + noise-free) give the recorded
adapters (within 1e-5) and exactly the recorded byte, FLOP and token counts and plans.

The runs hold every x86 machine to the same kernels (`golden_runs.KERNELS`); what is left between
machines is fp32 rounding below 2e-6 in the adapters (measured: the AVX-512 machine of issue 14
against the recording one), hence 1e-5 and not 1e-6.

Recorded before the package was reorganised into one folder per concept; re-record only for a
change that is meant to alter results (`python tests/golden_runs.py record`), and say so."""

import json

import pytest
import torch
from golden_runs import GOLDEN, RUNS, run
from safetensors.torch import load_file


@pytest.mark.parametrize("name", sorted(RUNS))
def test_reference_run_is_unchanged(name, tmp_path):
    tensors, summary = run(name, tmp_path / name)
    expected_tensors = load_file(GOLDEN / f"{name}.safetensors")
    expected = json.loads((GOLDEN / f"{name}.json").read_text())
    assert sorted(tensors) == sorted(expected_tensors)
    for key, value in expected_tensors.items():
        assert tensors[key].shape == value.shape, key
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=1e-5, msg=key)
    losses = summary.pop("train_loss")
    expected_losses = expected.pop("train_loss")
    assert summary == expected
    assert [len(r) for r in losses] == [len(r) for r in expected_losses]
    for got, want in zip(losses, expected_losses):
        assert got == pytest.approx(want, abs=1e-6)
