import pytest
import torch

from splitpeft.model.backbone import ModelError, backbone_of
from splitpeft.model.loading import TINY_MODELS, load_model


@pytest.mark.parametrize("name", TINY_MODELS)
def test_backbone_pieces_equal_the_model_forward(name):
    model = load_model(name).model
    backbone = backbone_of(model)
    ids = torch.randint(0, 300, (3, 17))
    with torch.no_grad():
        want = model(ids).logits
        for k in range(backbone.num_blocks + 1):
            hidden = backbone.blocks(backbone.embed(ids), 0, k)
            got = backbone.head(backbone.blocks(hidden, k, backbone.num_blocks))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelError, match="cannot load model"):
        load_model(str(tmp_path))  # a folder without a model


def test_unsupported_architecture_is_named():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    with pytest.raises(ModelError, match="model type 'bert' is not supported"):
        backbone_of(model)
