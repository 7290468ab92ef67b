"""PEFT export: a standard adapter folder that PeftModel.from_pretrained loads with the trained logits."""

import json

import pytest
import torch
from peft import PeftModel

from splitpeft.model.adapters import (
    AdapterError,
    LoraWeights,
    export_peft,
    inject,
    read_adapters,
    target_module_names,
    write_adapters,
)
from splitpeft.model.backbone import backbone_of, share_frozen_copy
from splitpeft.model.loading import load_model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2"])
def test_exported_adapter_reproduces_logits(tmp_path, name):
    base = load_model(name).model
    backbone = backbone_of(base)
    modules = target_module_names(backbone, backbone.default_target_modules, range(backbone.num_blocks))
    ranks = {m: (2, 4, 8)[i % 3] for i, m in enumerate(modules)}  # mixed ranks -> rank_pattern
    trained = inject(share_frozen_copy(base), ranks, alpha=16.0)
    g = torch.Generator().manual_seed(3)
    write_adapters(trained, {n: LoraWeights(torch.randn(w.A.shape, generator=g), 0.05 * torch.randn(w.B.shape, generator=g))
                             for n, w in read_adapters(trained).items()})
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        want = trained(ids).logits
        plain = base(ids).logits
    export_peft(base, read_adapters(trained), 16.0, tmp_path / "adapter", merged=True)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["rank_pattern"]
    loaded = PeftModel.from_pretrained(load_model(name).model, str(tmp_path / "adapter")).eval()
    merged_cls = type(base)
    merged = merged_cls.from_pretrained(tmp_path / "adapter" / "merged").eval()
    with torch.no_grad():
        got = loaded(ids).logits
        got_merged = merged(ids).logits
    assert not torch.allclose(want, plain, atol=1e-4)  # the adapter really changes the model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_merged, want, rtol=1e-4, atol=1e-4)


def test_write_adapters_rejects_wrong_shapes_and_unknown_modules():
    base = load_model("tiny-llama").model
    model = inject(share_frozen_copy(base), {"model.layers.0.self_attn.q_proj": 4}, alpha=8.0)
    with pytest.raises(AdapterError, match="do not match"):
        write_adapters(model, {"model.layers.0.self_attn.q_proj": LoraWeights(torch.zeros(2, 32), torch.zeros(32, 2))})
    with pytest.raises(AdapterError, match="has no adapter"):
        write_adapters(model, {"model.layers.1.self_attn.q_proj": LoraWeights(torch.zeros(4, 32), torch.zeros(32, 4))})
    with pytest.raises(AdapterError, match="no such modules"):
        inject(share_frozen_copy(base), {"model.layers.9.mlp.up_proj": 4}, alpha=8.0)


@pytest.mark.parametrize("bad", ["shape", "unknown"])
def test_write_adapters_writes_nothing_when_a_later_module_is_bad(bad):
    base = load_model("tiny-llama").model
    first, second = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"
    model = inject(share_frozen_copy(base), {first: 4, second: 4}, alpha=8.0)
    before = read_adapters(model)
    good = LoraWeights(torch.ones(4, 32), torch.ones(32, 4))
    wrong = {"shape": (second, LoraWeights(torch.ones(2, 32), torch.ones(32, 2))),
             "unknown": ("model.layers.1.mlp.up_proj", good)}[bad]
    with pytest.raises(AdapterError):
        write_adapters(model, dict([(first, good), wrong]))  # the good one comes first
    after = read_adapters(model)
    for name, weights in before.items():
        assert torch.equal(after[name].A, weights.A) and torch.equal(after[name].B, weights.B)


def test_parties_share_frozen_weights():
    base = load_model("tiny-llama").model
    copy = inject(share_frozen_copy(base), {"model.layers.0.self_attn.q_proj": 4}, alpha=8.0)
    assert copy.model.layers[1].mlp.up_proj.weight is base.model.layers[1].mlp.up_proj.weight
    assert copy.model.layers[0].self_attn.q_proj.base_layer.weight is base.model.layers[0].self_attn.q_proj.weight
    assert not hasattr(base.model.layers[0].self_attn.q_proj, "lora_A")


def test_exporting_an_adapter_raises_no_dependency_warning(tmp_path):
    """peft's read of the deprecated `is_gradient_checkpointing` is silenced where we build peft models
    (a newcomer's console shows no FutureWarning), and only that warning: others still surface."""
    import warnings

    base = load_model("tiny-llama").model
    backbone = backbone_of(base)
    modules = target_module_names(backbone, backbone.default_target_modules, range(backbone.num_blocks))
    trained = inject(share_frozen_copy(base), dict.fromkeys(modules, 4), alpha=8.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_peft(base, read_adapters(trained), 8.0, tmp_path / "adapter")
        warnings.warn("another FutureWarning", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == ["another FutureWarning"]
