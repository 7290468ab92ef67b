"""The `runtime` section: wrong combinations stop with one line naming the key; bf16, nf4/int8
bases (bitsandbytes' CPU kernels), fp16 loss scaling and gradient checkpointing train."""

import dataclasses

import pytest
import torch
from conftest import tiny_config

import splitpeft.federation.simulation as simulation_module
from splitpeft.config import ConfigError, RuntimeConfig
from splitpeft.federation.simulation import Simulation
from splitpeft.model.runtime import CPU_FP32, Runtime, is_quantized, resolve_runtime


def test_fp16_on_cpu_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"runtime.dtype=fp16 needs CUDA \(runtime.server_device"):
        resolve_runtime(RuntimeConfig(dtype="fp16"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("key", ["server_device", "device_device"])
def test_cuda_without_a_gpu_is_refused_naming_the_key(key):
    with pytest.raises(ConfigError, match=f"runtime.{key}=cuda but no CUDA GPU is visible"):
        resolve_runtime(RuntimeConfig(**{key: "cuda"}))


def test_unknown_device_and_auto():
    with pytest.raises(ConfigError, match="runtime.device_device must be cpu, cuda, cuda:N or auto, not 'tpu'"):
        resolve_runtime(RuntimeConfig(device_device="tpu"))
    auto = resolve_runtime(RuntimeConfig(server_device="auto", device_device="auto"))
    assert auto.server_device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("overrides,message", [
    (["runtime.base_quantization=nf4", "federation.aggregator=noise_free"], "runtime.base_quantization: only fedavg"),
    (["runtime.base_quantization=int8", "federation.aggregator=zero_pad"], "runtime.base_quantization: only fedavg"),
    (["runtime.dtype=fp16", "placement.placement=dlora"], "runtime.dtype=fp16: dlora"),
    (["runtime.dtype=fp64"], "runtime.dtype must be one of fp32, bf16, fp16"),
    (["runtime.base_quantization=nf3"], "runtime.base_quantization must be one of none, int8, nf4"),
    (["runtime.base_quantization=nf4", "hsplit.planner=armsc", "fleet.memory_bytes=[1000000000,1000000000,1000000000]"],
     "hsplit.planner=armsc plans from IWI scores, which need float weights; use one of fixed, uniform"),
    (["runtime.base_quantization=nf4", "hsplit.planner=budget_rank", "fleet.memory_bytes=[1000000000,1000000000,1000000000]"],
     "hsplit.planner=budget_rank gives devices different ranks, which fedavg cannot average"),
])
def test_config_combinations_that_cannot_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config("tiny-llama", *overrides)


def test_a_quantized_base_takes_a_planner_that_gives_every_device_one_rank():
    # The planners say so themselves (`one_rank`, `uses_scores`): uniform (SplitLoRA) gives the
    # weakest device's rank to all, so fedavg averages its copies over an nf4 base.
    sim = Simulation(tiny_config("tiny-llama", "runtime.dtype=bf16", "runtime.base_quantization=nf4",
                                 "hsplit.planner=uniform", "federation.num_devices=2", "fleet.memory_bytes=[400000000,200000000]"))
    assert len({frozenset(d.ranks.values()) for d in sim.devices}) == 1
    record = sim.run_round()
    assert all(torch.isfinite(torch.tensor(s.losses)).all() for s in record.devices.values())


def test_quantizing_gpt2_is_a_clear_error():
    with pytest.raises(ValueError, match="runtime.base_quantization: GPT-2 stores its block linears as Conv1D"):
        Simulation(tiny_config("tiny-gpt2", "runtime.base_quantization=nf4", "runtime.dtype=bf16"))


@pytest.mark.parametrize("mode,quantize", [("nf4", "both"), ("int8", "devices"), ("nf4", "server")])
def test_a_quantized_base_trains_and_holds_fewer_bytes(mode, quantize):
    plain = Simulation(tiny_config("tiny-llama", "runtime.dtype=bf16", "federation.num_devices=2"))
    sim = Simulation(tiny_config("tiny-llama", "runtime.dtype=bf16", f"runtime.base_quantization={mode}",
                                 f"runtime.quantize={quantize}", "federation.num_devices=2"))
    device, reference = sim.devices[0], plain.devices[0]
    device_layers = [m for m in device.model.modules() if is_quantized(m)]
    assert bool(device_layers) == (quantize in ("devices", "both"))
    if device_layers:
        assert device.resident_bytes() < reference.resident_bytes()
    record = sim.run_round()
    session_layers = [m for m in sim.server.sessions["device-0"].model.modules() if is_quantized(m)]
    assert bool(session_layers) == (quantize in ("server", "both"))
    assert all(stats.steps == 2 * 0 + sim.config.federation.local_steps for stats in record.devices.values())
    assert all(torch.isfinite(torch.tensor(stats.losses)).all() for stats in record.devices.values())
    assert all(torch.isfinite(w.B).all() for w in sim.state.global_adapters.values())
    assert any(bool(w.B.any()) for w in sim.state.global_adapters.values())  # the adapters moved


def test_gradient_checkpointing_computes_the_same_step_with_fewer_saved_activations():
    runs = {}
    for flag in ("false", "true"):
        sim = Simulation(tiny_config("tiny-llama", f"runtime.gradient_checkpointing={flag}", "federation.num_devices=1",
                                     "placement.split_layer=3"))
        record = sim.run_round()
        runs[flag] = (sim, record.devices["device-0"])
    (plain, plain_stats), (checkpointed, stats) = runs["false"], runs["true"]
    assert stats.losses == pytest.approx(plain_stats.losses, rel=1e-5)
    for name, weights in plain.state.global_adapters.items():
        assert torch.allclose(checkpointed.state.global_adapters[name].A, weights.A, atol=1e-6)
        assert torch.allclose(checkpointed.state.global_adapters[name].B, weights.B, atol=1e-6)
    assert stats.peak_memory_bytes < plain_stats.peak_memory_bytes


def test_fp16_loss_scaling_scales_backward_and_sends_unscaled_fp32_gradients(monkeypatch):
    """fp16 needs CUDA in a run; its loss scaling is plain torch, so it is checked here on CPU by
    handing the simulation an fp16 runtime directly."""
    fp16 = dataclasses.replace(CPU_FP32, dtype=torch.float16)
    assert fp16.loss_scaling
    monkeypatch.setattr(simulation_module, "resolve_runtime", lambda config: fp16)
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "placement.split_layer=2"))
    frames = []
    sim.channels["device-0"].tap = lambda device, direction, frame: frames.append((direction, frame))
    record = sim.run_round()
    device, session = sim.devices[0], sim.server.sessions["device-0"]
    assert device.scaler is not None and session.scaler is not None
    assert device.scaler.get_scale() > 1 and session.scaler.get_scale() > 1
    assert all(torch.isfinite(torch.tensor(record.devices["device-0"].losses)))
    assert any(bool(w.B.any()) for w in sim.state.global_adapters.values())
    up = [f for d, f in frames if d == "up" and b'"hidden"' in f[:400]]
    down = [f for d, f in frames if d == "down" and b'"grad"' in f[:400]]
    assert up and all(b'"F16"' in f[:400] for f in up)        # activations in fp16
    assert down and all(b'"F32"' in f[:400] for f in down)    # gradients unscaled, in fp32


def test_fp16_overflow_sends_a_zero_gradient_and_skips_the_step():
    from splitpeft.model.loading import load_model
    from splitpeft.parties.party import Party, Training

    base = load_model("tiny-llama").model.to(torch.float16)
    runtime = Runtime(torch.device("cpu"), torch.device("cpu"), torch.float16, "none", False, False, False)
    party = Party(base, {"model.layers.0.self_attn.q_proj": 2}, Training(alpha=4.0, lr=0.1, runtime=runtime))
    before = {n: p.detach().clone() for n, p in party.model.named_parameters() if p.requires_grad}
    x = torch.full((1, 3, 32), 60000.0, dtype=torch.float16, requires_grad=True)
    out = party.model.model.layers[0].self_attn.q_proj(x)
    party.backward(out.float().sum() * 1e10)
    assert torch.equal(party.outgoing_grad(x), torch.zeros_like(x, dtype=torch.float32))
    scale = party.scaler.get_scale()
    party.optimizer_step()
    assert party.scaler.get_scale() < scale  # the scaler backed off
    for name, parameter in party.model.named_parameters():
        if name in before:
            assert torch.equal(parameter, before[name])  # the overflowed step was skipped
