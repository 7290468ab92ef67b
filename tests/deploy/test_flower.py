"""splitpeft on Flower's deployment engine: a real SuperLink, SuperNodes and `flwr run` on loopback
(slow), plus the validation of what the ServerApp and ClientApp read from configs and the wire."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from flower_deployment import Deployment, wait_for
from flwr.app import Array, ArrayRecord
from safetensors.torch import load_file

from splitpeft.config import dump_yaml
from splitpeft.deploy.client_app import DeviceStore, build_own_device, train_round
from splitpeft.deploy.keys import DeploymentError, node_key_pair
from splitpeft.deploy.records import frame_array, frame_of, round_stats_from_json
from splitpeft.deploy.settings import NodeSettings, ServerSettings
from splitpeft.experiment.run import run_experiment
from splitpeft.federation.simulation import Simulation
from splitpeft.storage import LOCK_TEXT
from splitpeft.transport.messages import Kind, Message, MessageError, encode


def run_overrides(devices: int, rounds: int, steps: int) -> list[str]:
    return [f"federation.num_devices={devices}", f"federation.rounds={rounds}", f"federation.local_steps={steps}",
            "eval.generation=false", "eval.baseline=false"]


def adapter_state(checkpoint):
    """Global and per-holder adapters of a checkpoint (what the next round would start from)."""
    tensors = load_file(str(checkpoint / "tensors.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith(("global/", "holder/"))}


def in_process(tmp_path, overrides):
    config = tiny_config("tiny-llama", *overrides)
    report = run_experiment(config, tmp_path / "in-process", progress=False, checkpoint=tmp_path / "in-process.ckpt")
    return report, adapter_state(tmp_path / "in-process.ckpt")


def assert_trained_as_in_process(tmp_path, overrides, report):
    """The run whose checkpoint is tmp_path/flower-run.checkpoint and whose report is `report`
    trained what the in-process simulation trains: adapters to 1e-5, and per device and round
    the tokens, losses and bytes (the same frames cross the gRPC stream and Flower as the
    in-process channel)."""
    expected_report, expected = in_process(tmp_path, overrides)
    got = adapter_state(tmp_path / "flower-run.checkpoint")
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    for got_round, want_round in zip(report["rounds"], expected_report["rounds"]):
        assert got_round["dropped"] == []
        for device, stats in want_round["devices"].items():
            assert got_round["devices"][device]["tokens"] == stats["tokens"]
            assert got_round["devices"][device]["train_loss"] == pytest.approx(stats["train_loss"], rel=1e-5)
            assert got_round["devices"][device]["bytes_up"] == stats["bytes_up"]
            assert got_round["devices"][device]["bytes_down"] == stats["bytes_down"]


@pytest.fixture
def deployment(tmp_path):
    created = []

    def make(num_devices, **options):
        created.append(Deployment(tmp_path, num_devices, **options))
        return created[-1]

    yield make
    for d in created:
        d.stop()


def finish(deployment, run, timeout=420):
    try:
        run.wait(timeout=timeout)
    except Exception as error:
        raise AssertionError(f"flwr run did not finish\n{deployment.log('superlink')}") from error


@pytest.mark.slow
def test_flower_deployment_trains_the_same_adapters_as_the_in_process_simulation(tmp_path, deployment):
    """Over TLS on both sides (SuperLink and split stream), with deploy-keys' tokens, certificate
    and SuperNode keys (Flower's node authentication: an unregistered SuperNode is refused)."""
    overrides = run_overrides(devices=3, rounds=2, steps=2)
    flower = deployment(3, tls=True, node_auth=True)
    flower.start_superlink()
    flower.register_devices()
    for index in range(3):
        flower.start_device(index)
    stranger_key = tmp_path / "stranger.node-key"
    stranger_key.write_bytes(node_key_pair()[0])
    stranger = flower.start_device(0, name="stranger", node_key=stranger_key)
    out = tmp_path / "flower-run"
    finish(flower, flower.submit(out, overrides))
    assert stranger.wait(timeout=60) != 0 and "Failed to activate SuperNode" in flower.log("stranger")
    assert (out / "report.json").is_file(), flower.log("flwr-run-4")
    report = json.loads((out / "report.json").read_text())

    assert_trained_as_in_process(tmp_path, overrides, report)


@pytest.mark.slow
def test_flower_deployment_with_the_batched_server_pass_trains_the_one_at_a_time_adapters(tmp_path, deployment):
    """server.batch_devices on the ServerApp: the split steps of the three SuperNodes' devices that
    arrive within server.batch_window_ms run as one pass (issue 22); the adapters equal the
    in-process simulation's one device at a time to 1e-5, and the report lists the shared passes."""
    overrides = [*run_overrides(devices=3, rounds=2, steps=3), "server.batch_window_ms=2000"]
    flower = deployment(3)
    flower.start_superlink()
    for index in range(3):
        flower.start_device(index)
    out = tmp_path / "flower-run"
    finish(flower, flower.submit(out, [*overrides, "server.batch_devices=true"]))
    report = json.loads((out / "report.json").read_text())
    _, expected = in_process(tmp_path, [*overrides, "server.batch_devices=false"])
    got = adapter_state(tmp_path / "flower-run.checkpoint")
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    assert all(entry["dropped"] == [] for entry in report["rounds"])
    assert max(size for entry in report["rounds"] for size in entry["server_passes"]) > 1


@pytest.mark.slow
def test_flower_dlora_with_kill_and_revive_uploading_killed_adapters_by_name_trains_the_in_process_adapters(
        tmp_path, deployment):
    """dlora with Kill and Revive and `upload_killed` over Flower: each SuperNode restores its killed
    set from its own store, names the adapters killed before the round (`Meta.UNCHANGED`), and the
    ServerApp counts the values it gave: adapters, losses and bytes equal the in-process run's."""
    overrides = [*run_overrides(devices=2, rounds=3, steps=4), "placement.placement=dlora", "kill_revive.enabled=true",
                 "kill_revive.warmup=2", "kill_revive.interval=1", "kill_revive.active_fraction=0.25",
                 "kill_revive.upload_killed=true"]
    flower = deployment(2)
    flower.start_superlink()
    for index in range(2):
        flower.start_device(index)
    out = tmp_path / "flower-run"
    finish(flower, flower.submit(out, overrides))
    assert (out / "report.json").is_file(), flower.log("flwr-run-2")
    report = json.loads((out / "report.json").read_text())
    assert_trained_as_in_process(tmp_path, overrides, report)
    # from round 2 on the killed adapters travel as names: the upload is smaller than round 1's
    first, later = ([entry["devices"][d]["adapter_bytes_up"] for d in ("device-0", "device-1")]
                    for entry in (report["rounds"][0], report["rounds"][2]))
    assert all(b < a for a, b in zip(first, later))


@pytest.mark.slow
@pytest.mark.parametrize("node_auth", [False, True], ids=["plain", "tls-node-auth"])
def test_a_device_killed_mid_round_is_dropped_rejoins_after_a_restart_and_a_bad_token_is_refused(
        tmp_path, deployment, node_auth):
    """Plain: the restarted SuperNode joins as a new node. With node authentication it keeps its
    registered node id, and is asked again which device it is."""
    overrides = run_overrides(devices=3, rounds=3, steps=40)
    flower = deployment(3, tls=node_auth, node_auth=node_auth)
    flower.start_superlink()
    if node_auth:
        flower.register_devices()
    status = tmp_path / "device-1.status.json"
    flower.start_device(0)
    flower.start_device(1, **{"status-file": str(status)})
    flower.start_device(2, token="not-the-token")
    out = tmp_path / "run"
    run = flower.submit(out, overrides, **{"rejoin-timeout": 180.0})

    def training_in_round_1():
        try:
            state = json.loads(status.read_text())
        except (OSError, ValueError):
            return False
        return state["round"] == 1 and state["frames"] >= 3

    wait_for(training_in_round_1, 300, "device-1 to be training in round 1", flower)
    flower.kill("device-1")
    flower.restart_device(1)  # the device's machine comes back: a new SuperNode, the same state folder
    finish(flower, run)
    report = json.loads((out / "report.json").read_text())
    first, second, third = report["rounds"]
    assert sorted(first["devices"]) == ["device-0", "device-1"]
    assert sorted(second["devices"]) == ["device-0"]  # the round completed without the dead device
    lost = {entry["device"]: entry["error"] for entry in second["dropped"]}
    assert "split stream broke" in lost["device-1"]
    # device-2's node holds a wrong token: it cannot prove it is device-2, so it never gets the slot
    refused = {entry["device"]: entry["error"] for entry in first["dropped"]}
    assert "no Flower node has proved to be this device" in refused["device-2"]
    assert "no Flower node has proved to be this device" in lost["device-2"]
    # device-1's partial round-1 update did not count: only device-0 and its server session did
    assert second["devices"]["device-0"]["steps"] == 40
    # the restarted device took its place again in the next round
    assert sorted(third["devices"]) == ["device-0", "device-1"]
    assert [entry["device"] for entry in third["dropped"]] == ["device-2"]
    assert third["devices"]["device-1"]["steps"] == 40


@pytest.mark.slow
def test_a_killed_server_resumes_and_ends_with_the_uninterrupted_adapters(tmp_path, deployment):
    # one device sampled per round (device-0, device-1, device-0 with this seed): device-0 comes
    # back in round 2 from the state it saved in round 0, across the server's restart
    overrides = [*run_overrides(devices=2, rounds=3, steps=20), "federation.devices_per_round=1"]
    flower = deployment(2)
    flower.start_superlink()
    flower.start_device(0)
    flower.start_device(1)
    out = tmp_path / "run"
    checkpoint = tmp_path / "run.checkpoint"
    run = flower.submit(out, overrides)

    def one_round_done():
        try:
            return json.loads((checkpoint / "state.json").read_text())["rounds_done"] >= 1
        except (OSError, ValueError):
            return False

    wait_for(one_round_done, 300, "the first round's checkpoint", flower)
    flower.kill("superlink")  # with the ServerApp and its split server
    run.wait(timeout=60)
    assert not (out / "report.json").exists()
    flower.start_superlink()  # same database: the SuperNodes stay registered
    finish(flower, flower.submit(out, overrides, resume=True))
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert [sorted(r["devices"]) for r in report["rounds"]] == [["device-0"], ["device-1"], ["device-0"]]

    _, expected = in_process(tmp_path, overrides)
    got = adapter_state(checkpoint)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ validation (fast)


def test_node_settings_name_what_is_wrong(tmp_path):
    with pytest.raises(DeploymentError, match="unknown node config keys \\['colour'\\]"):
        NodeSettings.from_node_config({"device": 0, "split-server": "h:1", "token": "t", "colour": "red"})
    with pytest.raises(DeploymentError, match="'device' must be the device's index"):
        NodeSettings.from_node_config({"device": "zero", "split-server": "h:1", "token": "t"})
    with pytest.raises(DeploymentError, match="missing setting 'split-server'"):
        NodeSettings.from_node_config({"device": 0, "token": "t"})
    with pytest.raises(DeploymentError, match="cannot read the token file"):
        NodeSettings.from_node_config({"device": 0, "split-server": "h:1", "token-file": str(tmp_path / "none")})
    (tmp_path / "token").write_text("s3cret\n")
    node = NodeSettings.from_node_config({"device": 2, "split-server": "h:1", "token-file": str(tmp_path / "token")})
    assert node.token == "s3cret" and node.device == 2


def test_server_settings_name_what_is_wrong(tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"device-0": "a"}))
    with pytest.raises(DeploymentError, match="unknown run config keys \\['round'\\]"):
        ServerSettings.from_run_config({"tokens-file": str(tokens), "round": 3})
    with pytest.raises(DeploymentError, match="experiment config: unknown"):
        ServerSettings.from_run_config({"tokens-file": str(tokens), "preset": "tiny", "overrides": "federation.roundz=2"})
    with pytest.raises(DeploymentError, match="TLS needs both"):
        ServerSettings.from_run_config({"tokens-file": str(tokens), "preset": "tiny", "tls-cert": "c.pem"})
    with pytest.raises(DeploymentError, match="'rejoin-timeout' must be a non-negative number"):
        ServerSettings.from_run_config({"tokens-file": str(tokens), "preset": "tiny", "rejoin-timeout": -1.0})
    assert ServerSettings.from_run_config({"tokens-file": str(tokens), "preset": "tiny"}).rejoin_timeout_s == 0.0
    tokens.write_text(json.dumps({"device-0": ""}))
    with pytest.raises(DeploymentError, match="non-empty token"):
        ServerSettings.from_run_config({"tokens-file": str(tokens), "preset": "tiny"})
    with pytest.raises(DeploymentError, match="cannot read the tokens file"):
        ServerSettings.from_run_config({"tokens-file": str(tmp_path / "missing.json"), "preset": "tiny"})


@pytest.mark.parametrize("overrides, named", [
    (["federation.round_deadline_s=1.0"], "federation.round_deadline_s"),
    (["federation.devices_per_round=2", "federation.over_select=1.5"], "federation.over_select"),
    (["fleet.availability=0.5"], "fleet.availability or a trace's availability"),
    (["federation.workers=2"], "federation.workers"),
])
def test_a_deployment_refuses_the_settings_that_only_simulate_a_fleet(overrides, named):
    """Deadlines and over-selection would rank real devices by what each reports of itself."""
    from splitpeft.deploy.server_app import check_deployable

    check_deployable(Simulation(tiny_config("tiny-llama")))  # an ordinary run deploys
    with pytest.raises(DeploymentError, match=f"{named} only simulate a fleet"):
        check_deployable(Simulation(tiny_config("tiny-llama", *overrides)))


def test_frames_in_flower_records_are_validated():
    message = Message(Kind.ADAPTERS, {"m.A": torch.ones(2, 3), "m.B": torch.zeros(3, 2)}, meta={"device": "device-0"})
    frame = encode(message)
    assert frame_of(ArrayRecord({"frame": frame_array(frame)}), 1 << 20).tensors["m.A"].shape == (2, 3)
    with pytest.raises(MessageError, match="carries no frame"):
        frame_of(ArrayRecord({"other": frame_array(frame)}), 1 << 20)
    with pytest.raises(MessageError, match="flat uint8"):
        frame_of(ArrayRecord({"frame": Array(np.zeros((2, 2), dtype=np.float32))}), 1 << 20)
    with pytest.raises(MessageError):
        frame_of(ArrayRecord({"frame": frame_array(frame[:-7])}), 1 << 20)  # truncated
    with pytest.raises(MessageError):
        frame_of(ArrayRecord({"frame": frame_array(frame)}), 64)  # over the size limit
    poisoned = encode(Message(Kind.ADAPTERS, {"m.A": torch.full((2, 3), float("nan")), "m.B": torch.zeros(3, 2)}))
    with pytest.raises(MessageError, match="NaN|non-finite"):
        frame_of(ArrayRecord({"frame": frame_array(poisoned)}), 1 << 20)


def test_round_statistics_from_a_device_are_checked():
    assert round_stats_from_json(json.dumps({"tokens": 5, "losses": [1.0]})).tokens == 5
    with pytest.raises(MessageError, match="unknown round statistics \\['evil'\\]"):
        round_stats_from_json(json.dumps({"evil": 1}))
    with pytest.raises(MessageError, match="'tokens' must be a number"):
        round_stats_from_json(json.dumps({"tokens": "many"}))
    with pytest.raises(MessageError, match="not JSON"):
        round_stats_from_json("{")


def test_device_store_resumes_from_the_latest_round_before_and_keeps_two(tmp_path):
    store = DeviceStore(tmp_path / "device-0")
    assert store.latest_before(0) is None
    for round_index in range(4):
        store.save(round_index, {"round": round_index}, {"x": torch.full((2,), float(round_index))})
    assert sorted(p.name for p in (tmp_path / "device-0").iterdir()) == ["round-2", "round-3"]
    info, tensors = store.latest_before(3)  # the server redoes round 3 after a crash
    assert info == {"round": 2} and tensors["x"].tolist() == [2.0, 2.0]
    assert store.latest_before(10)[0] == {"round": 3}


def test_device_store_keeps_the_state_a_device_sampled_every_other_round_resumes_from(tmp_path):
    """A device in rounds 0 and 2 whose round-2 upload the server lost redoes round 2 from round 0."""
    store = DeviceStore(tmp_path / "device-0")
    store.save(0, {"round": 0}, {"x": torch.zeros(2)})
    store.save(2, {"round": 2}, {"x": torch.ones(2)})
    assert store.latest_before(2)[0] == {"round": 0}
    store.save(2, {"round": 2}, {"x": torch.ones(2)})  # the redone round overwrites its own state
    store.save(5, {"round": 5}, {"x": torch.ones(2)})
    assert sorted(p.name for p in (tmp_path / "device-0").iterdir()) == ["round-2", "round-5"]
    assert store.latest_before(5)[0] == {"round": 2}


def test_a_save_killed_mid_swap_is_found_again_not_skipped(tmp_path):
    """Found: a device killed between moving its round-2 state aside and renaming the new one in
    resumed round 3 from round 0's state, silently. The store now finishes such a save first."""
    store = DeviceStore(tmp_path / "device-0")
    store.save(0, {"round": 0}, {"x": torch.zeros(2)})
    store.save(2, {"round": 2}, {"x": torch.ones(2)})
    ident = "0123456789abcdef"  # the re-save of round 2 (a redone round), killed between its renames
    (tmp_path / "device-0" / f".round-2.splitpeft-{ident}.lock").write_bytes(LOCK_TEXT)
    (tmp_path / "device-0" / "round-2").rename(tmp_path / "device-0" / f".round-2.splitpeft-{ident}.old")
    info, tensors = store.latest_before(3)
    assert info == {"round": 2} and tensors["x"].tolist() == [1.0, 1.0]
    assert sorted(p.name for p in (tmp_path / "device-0").iterdir()) == ["round-0", "round-2"]


@pytest.mark.parametrize("run_key", ["../../escaped", "/abs/elsewhere", "0123", "g" * 32])
def test_a_run_key_that_is_not_the_servers_uuid_is_refused_before_anything_is_written(tmp_path, run_key):
    """Found: the round message's run key named the device's state folder unchecked, so a server
    (or whoever forged its message) made the device write and delete outside its state-dir."""
    config = tiny_config("tiny-llama")
    node = NodeSettings(device=0, split_server="127.0.0.1:1", token="t", root_cert=None, data_path=None,
                        state_dir=tmp_path / "state" / "nested", status_file=None)
    round_info = {"config": dump_yaml(config), "round": 0, "device": "device-0", "split-layer": 1,
                  "ranks": json.dumps({}), "run-key": run_key}
    with pytest.raises(DeploymentError, match="run key .* is not 32 hexadecimal digits"):
        train_round(node, round_info, ArrayRecord({}))
    assert list(tmp_path.iterdir()) == []


def test_a_device_with_its_own_data_file_trains_on_all_of_it(tmp_path):
    """node config data-path: no share of the device's own data is held out (it never evaluates)."""
    own = tmp_path / "mine.txt"
    own.write_text("".join(f"name[Shop {i}], area[riverside]||Shop {i} is by the river.\n" for i in range(30)))
    config = tiny_config("tiny-llama", f"data.path={own}", "data.source=e2e", "data.partition=whole")
    node = NodeSettings(device=1, split_server="127.0.0.1:1", token="t", root_cert=None, data_path=str(own),
                        state_dir=tmp_path / "state", status_file=None)
    device = build_own_device(config, node, 2, {})
    assert len(device.data.items) == 30
    simulated = Simulation(config)  # a simulated run holds a share out for evaluation
    assert simulated.held_out and len(simulated.streams[0].items) == 30 - len(simulated.held_out)


def test_deploy_keys_writes_tokens_certificate_and_node_keys_once(tmp_path, capsys):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    from splitpeft.cli import main

    keys = tmp_path / "keys"
    assert main(["deploy-keys", "--devices", "2", "--hosts", "cloud.example.org,10.0.0.5", "--out", str(keys)]) == 0
    tokens = json.loads((keys / "tokens.json").read_text())
    assert sorted(tokens) == ["device-0", "device-1"] and tokens["device-0"] != tokens["device-1"]
    assert all((keys / f"{d}.token").read_text() == token for d, token in tokens.items())
    names = x509.load_pem_x509_certificate((keys / "server-cert.pem").read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert "cloud.example.org" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    private = load_ssh_private_key((keys / "device-1.node-key").read_bytes(), password=None)
    assert private.public_key() == load_ssh_public_key((keys / "device-1.node-key.pub").read_bytes())
    for secret in ("tokens.json", "server-key.pem", "device-0.token", "device-0.node-key"):
        assert (keys / secret).stat().st_mode & 0o077 == 0, secret
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    capsys.readouterr()
    assert main(["deploy-keys", "--devices", "2", "--out", str(keys)]) == 2
    assert "exists; deploy-keys never overwrites keys" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == before  # never overwritten


def test_replies_without_their_parts_are_refused_by_name():
    from flwr.app import RecordDict

    from splitpeft.deploy.server_app import FlowerEngine

    engine = FlowerEngine(grid=None, settings=None)
    with pytest.raises(MessageError, match="lacks its upload or its statistics"):
        engine._result(None, "device-0", RecordDict({"upload": ArrayRecord({})}))
    assert engine._claim_device(7, RecordDict({})) == set()  # an answer to "query" without a device id
    assert engine.nodes == {}
