"""On a GPU: every placement trains on CUDA in bf16 (fp16 with loss scaling, nf4 bases), tensors
stay on the GPU through the in-process channel, and the meter reads the CUDA allocator.
Skipped without a GPU (CI has none); run them with `pytest -m cuda` where one is visible."""

import pytest
import torch
from conftest import tiny_config

from splitpeft.federation.simulation import Simulation
from splitpeft.model.runtime import is_quantized

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ON_GPU = ["runtime.server_device=cuda", "runtime.device_device=cuda"]


@pytest.mark.parametrize("placement,labels_on_device", [("split", False), ("split", True), ("dlora", False), ("centralized", False)])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_every_placement_trains_on_cuda(placement, labels_on_device, dtype):
    if placement == "dlora" and dtype == "fp16":
        pytest.skip("fp16 is refused for dlora")
    sim = Simulation(tiny_config("tiny-llama", *ON_GPU, f"runtime.dtype={dtype}", f"placement.placement={placement}",
                                 f"placement.labels_on_device={str(labels_on_device).lower()}", "federation.num_devices=2"))
    device = sim.devices[0]
    assert all(t.device.type == "cuda" for t in device.frozen_tensors())
    record = sim.run_round()
    for stats in record.devices.values():
        assert all(torch.isfinite(torch.tensor(stats.losses)))
        assert stats.peak_memory_bytes > device.resident_bytes()  # allocator peak above what it holds
    assert any(bool(w.B.any()) for w in sim.state.global_adapters.values())


def test_split_on_cuda_matches_cpu_in_fp32():
    cpu = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "placement.split_layer=2"))
    gpu = Simulation(tiny_config("tiny-llama", *ON_GPU, "federation.num_devices=1", "placement.split_layer=2"))
    cpu_losses = cpu.run_round().devices["device-0"].losses
    gpu_losses = gpu.run_round().devices["device-0"].losses
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-4)
    assert cpu.rounds[0].devices["device-0"].bytes_up == gpu.rounds[0].devices["device-0"].bytes_up


def test_nf4_base_on_cuda_trains():
    sim = Simulation(tiny_config("tiny-llama", *ON_GPU, "runtime.dtype=bf16", "runtime.base_quantization=nf4",
                                 "federation.num_devices=2"))
    assert any(is_quantized(m) for m in sim.devices[0].model.modules())
    record = sim.run_round()
    assert all(torch.isfinite(torch.tensor(s.losses)).all() for s in record.devices.values())


def test_activations_stay_on_the_gpu_through_the_in_process_channel():
    sim = Simulation(tiny_config("tiny-llama", *ON_GPU, "runtime.dtype=bf16", "federation.num_devices=1"))
    seen = []
    original = sim.server.handle

    def spy(device_id, message):
        seen.extend(t.device.type for t in message.tensors.values())
        return original(device_id, message)

    sim.server.handle = spy
    sim.run_round()
    assert seen and set(seen) == {"cuda"}


def test_a_merge_rounds_alike_on_the_gpu_and_on_the_cpu():
    # A GPU server and its CPU devices must keep the same bf16 frozen weights after a merge.
    from splitpeft.model.runtime import stochastic_round

    x = torch.randn(64, 48, dtype=torch.float32) * 3
    on_cpu = stochastic_round(x, torch.bfloat16, "model.layers.0.self_attn.q_proj")
    on_gpu = stochastic_round(x.cuda(), torch.bfloat16, "model.layers.0.self_attn.q_proj")
    assert torch.equal(on_gpu.cpu(), on_cpu)
