"""splitpeft across real hosts: a cloud and two devices, each its own network namespace and
address, device links limited by `tc tbf` (bench/netns_deploy.py's testbed); the real SuperLink,
SuperNodes, `flwr run` and split server. Slow; skipped where namespaces cannot be made (not
root, no `ip` or `tc`, EPERM in a container)."""

import importlib.util
import sys
from pathlib import Path

import pytest
from conftest import tiny_config

from splitpeft.experiment.run import run_experiment

# the bench script by its path (bench/ on sys.path would shadow modules such as `channel`)
_spec = importlib.util.spec_from_file_location("netns_deploy", Path(__file__).resolve().parents[2] / "bench" / "netns_deploy.py")
netns_deploy = importlib.util.module_from_spec(_spec)
sys.modules["netns_deploy"] = netns_deploy  # dataclasses look their module up there
_spec.loader.exec_module(netns_deploy)

RATE_MBIT = 5.0  # slow enough that a device's split traffic takes most of a second


@pytest.fixture
def testbed():
    try:
        netns_deploy.check_namespaces()
    except netns_deploy.NamespaceError as error:
        pytest.skip(f"cannot make network namespaces and tbf links here: {error}")
    with netns_deploy.Testbed(2) as bed:
        yield bed


@pytest.mark.slow
def test_a_federation_across_namespaces_counts_the_loopback_bytes_and_is_held_to_the_link_rate(tmp_path, testbed, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # three torch processes on a small machine
    overrides = netns_deploy.run_overrides(devices=2, rounds=1, steps=3, batch_size=4, rate_mbit=RATE_MBIT)
    testbed.set_rate(RATE_MBIT)
    deployment = netns_deploy.start_deployment(testbed, tmp_path)
    try:
        report = netns_deploy.federate(deployment, tmp_path / "run", overrides, timeout_s=150)
    finally:
        deployment.stop()

    (got,) = report["rounds"]
    assert sorted(got["devices"]) == ["device-0", "device-1"] and got["dropped"] == []
    (want,) = run_experiment(tiny_config("tiny-llama", *overrides), tmp_path / "loopback", progress=False)["rounds"]
    rate_bytes_per_s = RATE_MBIT * 1e6 / 8
    for device, stats in got["devices"].items():
        # the same frames cross the namespaces' links as the in-process channel counts
        for key in ("bytes_up", "bytes_down", "adapter_bytes_up", "adapter_bytes_down", "tokens"):
            assert stats[key] == want["devices"][device][key], key
        split_bytes = stats["bytes_up"] - stats["adapter_bytes_up"] + stats["bytes_down"] - stats["adapter_bytes_down"]
        # the steps' frames, plus the session's opening and closing ones
        assert 0 < sum(stats["step_bytes_up"]) + sum(stats["step_bytes_down"]) <= split_bytes
        # the limit is real: the local phase took at least its bytes' time at the link rate
        assert stats["wall_s"] >= split_bytes / rate_bytes_per_s, (stats["wall_s"], split_bytes / rate_bytes_per_s)
        assert stats["simulated_s"] >= split_bytes / rate_bytes_per_s
