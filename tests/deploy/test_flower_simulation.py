"""The same ServerApp and ClientApp on Flower's simulation engine (Ray): virtual SuperNodes, each
one device, on loopback (slow), and the settings a virtual SuperNode reads from the run config."""

import json
import time

import pytest
from flower_deployment import Deployment
from test_flower import assert_trained_as_in_process, finish, run_overrides

from splitpeft.deploy.keys import DeploymentError
from splitpeft.deploy.settings import NodeSettings


@pytest.mark.slow
def test_twenty_virtual_supernodes_train_the_in_process_simulations_adapters(tmp_path):
    """20 devices, each a virtual SuperNode on Ray (one CPU each), over TLS with deploy-keys'
    tokens and certificate: split traffic goes over splitpeft's gRPC stream as in a deployment,
    and the adapters after 2 rounds equal the in-process simulation's to 1e-5."""
    overrides = run_overrides(devices=20, rounds=2, steps=1)
    flower = Deployment(tmp_path, 20, tls=True, simulation=True)
    try:
        flower.start_superlink()
        out = tmp_path / "flower-run"
        start = time.perf_counter()
        finish(flower, flower.submit(out, overrides, **{"device-state-dir": str(tmp_path / "device-state")}))
        took = time.perf_counter() - start
    finally:
        flower.stop()
    assert (out / "report.json").is_file(), flower.log("flwr-run-1")
    report = json.loads((out / "report.json").read_text())
    assert [len(entry["completed"]) for entry in report["rounds"]] == [20, 20]
    assert_trained_as_in_process(tmp_path, overrides, report)
    print(f"simulation engine, 20 virtual SuperNodes, 2 rounds: {took:.1f} s")


def test_a_virtual_supernode_is_the_device_of_its_partition_with_that_devices_token(tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"device-0": "zero", "device-1": "one"}))
    cert = tmp_path / "cert.pem"
    cert.write_bytes(b"PEM")
    run_config = {"tokens-file": str(tokens), "split-address": "0.0.0.0:9301", "device-state-dir": str(tmp_path / "s")}
    node = NodeSettings.of_context({"partition-id": 1, "num-partitions": 2}, run_config)
    assert (node.device, node.token, node.split_server, node.root_cert) == (1, "one", "127.0.0.1:9301", None)
    assert node.state_dir == tmp_path / "s" and node.data_path is None
    node = NodeSettings.of_context({"partition-id": 0, "num-partitions": 2},
                                   {**run_config, "split-connect": "cloud:9400", "tls-cert": str(cert)})
    assert (node.split_server, node.root_cert) == ("cloud:9400", b"PEM")
    with pytest.raises(DeploymentError, match="device-2, which the tokens file has no token for"):
        NodeSettings.of_context({"partition-id": 2, "num-partitions": 3}, run_config)
    with pytest.raises(DeploymentError, match="partition-id"):
        NodeSettings.of_context({"partition-id": -1, "num-partitions": 3}, run_config)
    with pytest.raises(DeploymentError, match=r"unknown node config keys \['device'\]"):
        NodeSettings.of_context({"partition-id": 0, "num-partitions": 3, "device": 1}, run_config)
    with pytest.raises(DeploymentError, match="tokens-file"):
        NodeSettings.of_context({"partition-id": 0, "num-partitions": 3}, {})
    # a real SuperNode's node config is read as before
    assert NodeSettings.of_context({"device": 1, "split-server": "h:1", "token": "t"}, run_config).split_server == "h:1"
