"""runtime.dtype=auto (issue 22, item 1): bf16 where both sides have bf16 matrix units, fp32
elsewhere, and the run says which and why."""

import pytest
import torch
from conftest import tiny_config

from splitpeft.config import RuntimeConfig
from splitpeft.model import runtime as runtime_module
from splitpeft.model.runtime import auto_dtype, resolve_runtime


@pytest.fixture
def cpu_feature(monkeypatch):
    """Pretend the CPU reports `feature` (None: no bf16 units)."""
    def set_feature(feature):
        monkeypatch.setattr(runtime_module, "cpu_bf16_feature", lambda: feature)
    return set_feature


@pytest.mark.parametrize("feature", ["amx_bf16", "avx512_bf16", "bf16"])
def test_auto_takes_bf16_on_a_cpu_with_bf16_units_and_says_why(cpu_feature, feature):
    cpu_feature(feature)
    runtime = resolve_runtime(RuntimeConfig(dtype="auto"))
    assert runtime.dtype == torch.bfloat16 and runtime.dtype_name == "bf16"
    assert runtime.dtype_reason == f"runtime.dtype=auto chose bf16: the CPU has {feature}"


def test_auto_takes_fp32_on_a_cpu_without_them_and_says_why(cpu_feature):
    cpu_feature(None)
    runtime = resolve_runtime(RuntimeConfig(dtype="auto"))
    assert runtime.dtype == torch.float32
    assert runtime.dtype_reason.startswith("runtime.dtype=auto chose fp32: the CPU reports none of amx_bf16")


def test_a_configured_dtype_is_taken_as_it_is(cpu_feature):
    cpu_feature(None)
    runtime = resolve_runtime(RuntimeConfig(dtype="bf16"))
    assert runtime.dtype == torch.bfloat16 and runtime.dtype_reason == "runtime.dtype=bf16 as configured"


def test_auto_needs_both_sides(cpu_feature, monkeypatch):
    """A CUDA server with bf16 and CPU devices without bf16 units: fp32, naming the side that lacks them."""
    cpu_feature(None)
    monkeypatch.setattr(runtime_module, "_bf16_units", lambda where: (where.type == "cuda", f"{where} answer"))
    dtype, reason = auto_dtype(torch.device("cuda", 0), torch.device("cpu"))
    assert dtype == "fp32" and reason == "runtime.dtype=auto chose fp32: cpu answer"


def test_this_machines_cpu_flags_are_read():
    """On Linux the answer comes from /proc/cpuinfo: whatever it says, the function names a known flag or None."""
    runtime_module.cpu_bf16_feature.cache_clear()
    assert runtime_module.cpu_bf16_feature() in (*runtime_module.BF16_CPU_FLAGS, None)


def test_a_run_at_auto_trains_and_its_report_says_which_dtype_and_why(cpu_feature):
    cpu_feature("amx_bf16")
    from splitpeft.federation.simulation import Simulation

    sim = Simulation(tiny_config("tiny-llama", "runtime.dtype=auto", "federation.num_devices=2", "federation.local_steps=1"))
    record = sim.run_round()
    assert record.dropped == []
    info = sim.info()["runtime"]
    assert info["dtype"] == "bf16" and info["dtype_reason"] == "runtime.dtype=auto chose bf16: the CPU has amx_bf16"
    assert all(p.dtype == torch.bfloat16 for p in sim.loaded.model.parameters() if p.is_floating_point())
    machine = sim.info()["machine"]  # bf16 rounds differently on other processors: the report names this one
    assert machine["processor"] == runtime_module.processor_name() and machine["processor"]
    assert machine["cpu_bf16"] == "amx_bf16" and machine["torch"] == torch.__version__ and machine["threads"] >= 1
