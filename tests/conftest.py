import logging

import pytest
import torch

from splitpeft.config import ExperimentConfig, load_config


def tiny_config(model: str = "tiny-llama", *overrides: str) -> ExperimentConfig:
    """The tiny preset on `model` with extra key=value overrides."""
    return load_config(preset="tiny", overrides=[f"model.name={model}", *overrides])


def assert_export_reproduces_global_model(sim, folder) -> None:
    """`sim.export(folder)` loaded back with peft on a fresh tiny-llama computes `sim.global_model()`'s logits."""
    from peft import PeftModel

    from splitpeft.model.loading import load_model

    model = sim.global_model()
    sim.export(folder)
    loaded = PeftModel.from_pretrained(load_model("tiny-llama").model, str(folder)).eval()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def record_holders(sim) -> dict[str, list[str]]:
    """Wrap `sim`'s aggregator: module -> sorted holders of the copies it aggregated (last round)."""
    holders: dict[str, list[str]] = {}
    original = sim.state.aggregator.aggregate

    def spy(module, copies):
        holders[module] = sorted(c.holder for c in copies)
        return original(module, copies)

    sim.state.aggregator.aggregate = spy
    return holders


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    logging.getLogger("splitpeft").setLevel(logging.WARNING)
    yield


# Tiny models run thousands of tiny matrix products: on a loaded 2-core machine torch's default
# thread pool makes each one orders of magnitude slower than a single thread does.
torch.set_num_threads(1)
