"""IWI: gradient-weight probe, cost normalisation, and the smoothed tracker."""

import copy
import math

import pytest
import torch

from splitpeft.data.batching import Batch, EncodedExample, collate
from splitpeft.hsplit.importance import (
    ImportanceTracker,
    adaptation_cost,
    base_linear,
    linear_dims,
    normalised_scores,
    probe_importance,
)
from splitpeft.model.adapters import inject, target_module_names
from splitpeft.model.backbone import backbone_of, share_frozen_copy
from splitpeft.model.loading import load_model
from splitpeft.model.loss import causal_lm_loss


def probe_batches(n: int = 2, batch_size: int = 2, seq_len: int = 12) -> list[Batch]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n):
        items = []
        for _ in range(batch_size):
            ids = torch.randint(2, 300, (seq_len,), generator=generator).tolist()
            items.append(EncodedExample(ids, [-100] * (seq_len // 2) + ids[seq_len // 2:]))
        batches.append(collate(items, pad_id=1))
    return batches


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_probe_scores_are_finite_positive_one_per_module_and_deterministic(name):
    base = load_model(name).model
    backbone = backbone_of(base)
    modules = target_module_names(backbone, backbone.default_target_modules, range(backbone.num_blocks))
    batches = probe_batches()
    flags = {n: p.requires_grad for n, p in base.named_parameters()}

    scores = probe_importance(base, backbone, batches, modules)

    assert list(scores) == modules
    assert all(math.isfinite(v) and v > 0 for v in scores.values())
    assert scores == probe_importance(base, backbone, batches, modules)
    # the shared base stays frozen and no gradient is left anywhere
    assert {n: p.requires_grad for n, p in base.named_parameters()} == flags
    assert all(p.grad is None for p in base.parameters())


def test_probe_matches_an_independent_gradient_weight_product():
    """Reference: a deep copy of the model with real requires_grad flags and .grad."""
    base = load_model("tiny-gpt2").model
    backbone = backbone_of(base)
    modules = target_module_names(backbone, ["c_fc", "c_attn"], range(2))
    batches = probe_batches(n=2)
    reference = copy.deepcopy(base)
    reference.eval()
    ref_backbone = backbone_of(reference)
    expected = {m: 0.0 for m in modules}
    for batch in batches:
        reference.zero_grad(set_to_none=True)
        for m in modules:
            base_linear(reference, m).weight.requires_grad_(True)
        hidden = ref_backbone.blocks(ref_backbone.embed(batch.input_ids), 0, ref_backbone.num_blocks)
        causal_lm_loss(ref_backbone.head(hidden), batch.labels).backward()
        for m in modules:
            w = base_linear(reference, m).weight
            expected[m] += float((w.detach() * w.grad).abs().mean()) / len(batches)

    scores = probe_importance(base, backbone, batches, modules)
    for m in modules:
        assert scores[m] == pytest.approx(expected[m], rel=1e-5)


def test_probe_reads_through_lora_wrappers():
    """On a model with LoRA injected, a module's score is that of its frozen base weight."""
    base = load_model("tiny-llama").model
    backbone = backbone_of(base)
    modules = target_module_names(backbone, ["q_proj", "down_proj"], range(2))
    plain = probe_importance(base, backbone, probe_batches(), modules)
    adapted = inject(share_frozen_copy(base), {m: 4 for m in modules}, alpha=8.0)
    wrapped = probe_importance(adapted, backbone_of(adapted), probe_batches(), modules)
    # B = 0 at init: the adapted model computes the same function, so the scores agree
    for m in modules:
        assert wrapped[m] == pytest.approx(plain[m], rel=1e-5)
    assert all(p.grad is None for p in adapted.parameters())


def test_linear_dims_handles_conv1d_and_linear():
    gpt2 = load_model("tiny-gpt2").model
    llama = load_model("tiny-llama").model
    assert linear_dims(base_linear(gpt2, "transformer.h.0.mlp.c_fc")) == (32, 128)  # Conv1D (d_in, d_out)
    assert linear_dims(base_linear(llama, "model.layers.0.mlp.down_proj")) == (64, 32)


def test_normalised_scores_divide_by_rank_times_width():
    assert adaptation_cost(32, 64, 8) == 8 * 96
    scores = normalised_scores({"a": 96.0, "b": 96.0}, {"a": (32, 64), "b": (16, 16)}, rank=2)
    assert scores == {"a": 96.0 / (2 * 96), "b": 96.0 / (2 * 32)}
    with pytest.raises(ValueError):
        normalised_scores({"a": 1.0}, {"a": (1, 1)}, rank=0)


def test_tracker_follows_the_formula_by_hand():
    tracker = ImportanceTracker(beta_min=0.5, beta_max=0.9)
    assert tracker.update({"a": 1.0, "b": 3.0}) == {"a": 1.0, "b": 3.0}  # first probe: s = g
    # f = (|2 - 1| + |3 - 3|) / (1 + 3) = 0.25; beta = 0.5 + 0.4 * 0.75 = 0.8
    s2 = tracker.update({"a": 2.0, "b": 3.0})
    assert tracker.history[-1].fluctuation == pytest.approx(0.25)
    assert tracker.history[-1].beta == pytest.approx(0.8)
    assert s2["a"] == pytest.approx(0.8 * 1.0 + 0.2 * 2.0)
    assert s2["b"] == pytest.approx(3.0)
    # a fluctuation of 1 or more gives beta_min
    tracker.update({"a": 100.0, "b": 100.0})
    assert tracker.history[-1].beta == pytest.approx(0.5)
    assert len(tracker.history) == 3


def test_beta_grows_as_fluctuation_falls():
    tracker = ImportanceTracker()
    tracker.update({"a": 1.0, "b": 1.0})
    # probes converging on (2, 2): each one closer to the running score than the last
    for value in (1.8, 1.6, 1.5, 1.45, 1.42):
        tracker.update({"a": value, "b": value})
    betas = [step.beta for step in tracker.history[1:]]
    fluctuations = [step.fluctuation for step in tracker.history[1:]]
    assert all(f2 < f1 for f1, f2 in zip(fluctuations, fluctuations[1:]))
    assert all(b2 > b1 for b1, b2 in zip(betas, betas[1:]))
    assert all(0.5 <= b <= 0.95 for b in betas)
    assert tracker.beta(0.0) == pytest.approx(0.95) and tracker.beta(5.0) == pytest.approx(0.5)


def test_tracker_rejects_bad_betas():
    with pytest.raises(ValueError, match="beta_min"):
        ImportanceTracker(beta_min=0.9, beta_max=0.5)
