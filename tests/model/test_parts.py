"""A party holds only the frozen tensors it runs: a device the embedding, its k blocks and (labels
on the device) the final norm and head; a server session its blocks and head. In process (views
of the simulation's base) and in a real device (the Flower ClientApp reading its part from the
model's safetensors files, nothing else)."""

from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import splitpeft.model.parts as parts
from splitpeft.deploy.client_app import build_own_device
from splitpeft.deploy.settings import NodeSettings
from splitpeft.federation.simulation import Simulation
from splitpeft.model.backbone import backbone_of
from splitpeft.model.loading import load_model, load_model_part, tiny_folder
from splitpeft.model.parts import Part, resident_bytes, view_part

MODELS = ["tiny-llama", "tiny-gpt2"]
NUM_BLOCKS = 4


def expected_names(model_name: str, blocks: range, embedding: bool, head: bool) -> set[str]:
    """Parameter names of the plain model in that part, written out by family (not via Part)."""
    base = load_model(model_name).model
    if model_name == "tiny-gpt2":
        embed, block, head_names = ["transformer.wte.weight", "transformer.wpe.weight"], "transformer.h.{}.", [
            "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"]
    else:
        embed, block, head_names = ["model.embed_tokens.weight"], "model.layers.{}.", ["model.norm.weight", "lm_head.weight"]
    names = {n for n, _ in base.named_parameters(remove_duplicate=False) if n.startswith(tuple(block.format(j) for j in blocks))}
    names |= set(embed) if embedding else set()
    names |= set(head_names) if head else set()
    return names


def held_names(model: torch.nn.Module) -> set[str]:
    """Names of the frozen, materialised parameters (peft's `.base_layer` folded away)."""
    return {n.replace(".base_layer", "") for n, p in model.named_parameters(remove_duplicate=False)
            if ".lora_" not in n and p.device.type != "meta"}


def with_tied(names: set[str]) -> set[str]:
    """The tiny models tie the head to the token embedding: one tensor under both names, so
    holding either means holding both names."""
    embedding = {"model.embed_tokens.weight", "transformer.wte.weight"}
    out = set(names)
    if names & embedding:
        out.add("lm_head.weight")
    if "lm_head.weight" in names:
        out |= {n for n in embedding if n.split(".")[0] == ("model" if "model.norm.weight" in names else "transformer")}
    return out


def _expected_bytes(model_name: str, names: set[str]) -> int:
    base = load_model(model_name).model
    params = dict(base.named_parameters(remove_duplicate=False))
    return parts.storage_bytes(params[n] for n in names if n in params)[0]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("placement,split_layer,labels_on_device", [
    ("split", 0, False), ("split", 1, False), ("split", 3, True), ("split", 4, False), ("dlora", 0, False),
    ("centralized", 0, False),
])
def test_in_process_devices_and_sessions_hold_exactly_their_part(model, placement, split_layer, labels_on_device):
    config = tiny_config(model, "federation.num_devices=2", f"placement.placement={placement}",
                         f"placement.split_layer={split_layer}", f"placement.labels_on_device={str(labels_on_device).lower()}")
    sim = Simulation(config)
    device = sim.devices[0]
    if placement == "split":
        want = expected_names(model, range(split_layer), True, labels_on_device)
    elif placement == "dlora":
        want = expected_names(model, range(0), True, True)  # data, embedding, head and loss stay home
    else:
        want = expected_names(model, range(NUM_BLOCKS), True, True)
    assert held_names(device.model) == with_tied(want)
    assert device.resident_bytes() == _expected_bytes(model, want)
    info = sim.info()["devices"]["device-0"]
    assert info["resident_bytes"] == device.resident_bytes() == info["predicted_resident_bytes"]
    if placement != "centralized":
        sim.run_round()  # sessions open; the device still holds only its part after training
        assert held_names(device.model) == held_names(sim.devices[0].model)
        session = sim.server.sessions["device-0"]
        server_blocks = range(split_layer, NUM_BLOCKS) if placement == "split" else range(NUM_BLOCKS)
        server_head = placement == "split" and not labels_on_device
        server_want = expected_names(model, server_blocks, False, server_head)
        assert held_names(session.model) == with_tied(server_want)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("split_layer,labels_on_device", [(1, False), (2, True), (0, False)])
def test_a_real_device_reads_only_its_part_from_the_safetensors_files(model, split_layer, labels_on_device, monkeypatch):
    read: list[str] = []
    original = parts._read

    def spy(name, files, model_, folder):
        read.append(name)
        return original(name, files, model_, folder)

    monkeypatch.setattr(parts, "_read", spy)
    config = tiny_config(model, f"placement.split_layer={split_layer}", f"placement.labels_on_device={str(labels_on_device).lower()}")
    node = NodeSettings(device=0, split_server="127.0.0.1:1", token="t", root_cert=None, data_path=None,
                        state_dir=Path("unused"), status_file=None)
    sim = Simulation(config)
    reference = sim.devices[0]
    device = build_own_device(config, node, split_layer, dict(reference.ranks))
    want = expected_names(model, range(split_layer), True, labels_on_device)
    assert set(read) == want - {"lm_head.weight"}  # a tied head is read once, as the embedding
    assert not any(f".{j}." in name for name in read for j in range(split_layer, NUM_BLOCKS))
    assert held_names(device.model) == held_names(reference.model)
    assert device.resident_bytes() == reference.resident_bytes()
    # the same frozen values as the simulation's device
    mine = dict(device.model.named_parameters())
    for name, parameter in reference.model.named_parameters():
        if parameter.device.type != "meta" and ".lora_" not in name:
            assert torch.equal(mine[name], parameter), name


def test_a_part_loaded_from_files_runs_like_the_whole_model():
    whole = load_model("tiny-llama").model
    part = load_model_part("tiny-llama", lambda backbone: Part(range(2), embedding=True, head=False)).model
    ids = torch.tensor([[5, 9, 33, 2, 7]])
    a, b = backbone_of(whole), backbone_of(part)
    assert torch.equal(a.blocks(a.embed(ids), 0, 2), b.blocks(b.embed(ids), 0, 2))
    with pytest.raises((RuntimeError, NotImplementedError)):  # block 2 exists only as shapes
        b.blocks(b.embed(ids), 2, 3).sum().item()
    assert resident_bytes(part) < resident_bytes(whole)


def test_view_part_shares_storage_when_nothing_changes_and_converts_otherwise():
    base = load_model("tiny-llama").model
    same = view_part(base, Part(range(1), True, False))
    assert same.model.layers[0].self_attn.q_proj.weight is base.model.layers[0].self_attn.q_proj.weight
    assert same.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    half = view_part(base, Part(range(1), True, False), dtype=torch.bfloat16)
    assert half.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert base.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # the base is untouched


def test_missing_safetensors_is_a_clear_error(tmp_path):
    folder = tiny_folder("tiny-llama", 0)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="no model.safetensors"):
        parts.load_part(tmp_path, lambda backbone: Part(range(1), True, False), device=torch.device("cpu"), dtype=torch.float32)
