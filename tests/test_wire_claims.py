"""Finding 11 of issue 12: the documentation (docs/explanations/placements.md, linked from the
README) says what leaves the device in each placement, and the wire agrees: plain split sends the completion ids as labels, U-shaped sends no label tensor, and
dlora's first message is the raw embeddings, which the server maps back to every token."""

from pathlib import Path

import torch
from conftest import tiny_config

from splitpeft.federation.simulation import Simulation
from splitpeft.model.loss import IGNORE_INDEX
from splitpeft.transport.messages import Kind, decode

README = (Path(__file__).parent.parent / "docs" / "explanations" / "placements.md").read_text()


def _first_step_frames(placement: str, labels_on_device: bool = False):
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", f"placement.placement={placement}",
                                 "placement.split_layer=2", f"placement.labels_on_device={str(labels_on_device).lower()}"))
    frames = []
    sim.channels["device-0"].tap = lambda device, direction, frame: frames.append((direction, decode(frame)))
    device = sim.devices[0]
    batch = device.data.next()
    device.data = type("Once", (), {"next": lambda self: batch})()  # the step trains on the batch we keep
    device.load(sim.state.global_adapters)
    device.open_session(sim.channels["device-0"])
    sim.placement.device_step(device, batch, sim.channels["device-0"])
    return sim, batch, [m for d, m in frames if d == "up"]


def test_the_readme_does_not_claim_token_ids_stay_home():
    assert "input token ids never leave the device" not in README
    assert "Token ids and labels never leave the device" not in README
    assert "## What leaves the device" in README


def test_plain_split_sends_the_completion_tokens_as_labels():
    _, batch, up = _first_step_frames("split")
    activations = next(m for m in up if m.kind == Kind.ACTIVATIONS)
    labels = activations.tensors["labels"].long()
    completion = batch.labels != IGNORE_INDEX
    assert bool(completion.any())
    assert torch.equal(labels[completion], batch.input_ids[completion])  # verbatim token ids
    assert "the labels are the completion tokens themselves" in README


def test_u_shaped_split_sends_no_label_tensor():
    _, _, up = _first_step_frames("split", labels_on_device=True)
    assert up and all("labels" not in m.tensors for m in up)
    assert "no label tensor" in README


def test_dlora_sends_embeddings_the_server_maps_back_to_every_token():
    sim, batch, up = _first_step_frames("dlora")
    embedded = next(m for m in up if m.kind == Kind.ACTIVATIONS).tensors["hidden"]  # (B, T, d)
    table = sim.server.base.get_input_embeddings().weight  # the server holds the same table
    recovered = torch.cdist(embedded.reshape(-1, embedded.shape[-1]), table).argmin(dim=1)
    assert torch.equal(recovered, batch.input_ids.reshape(-1))  # 100% of tokens
    assert "nearest row recovers every token" in README or "maps them back to the exact tokens" in README \
        or "maps back to the exact tokens" in README
