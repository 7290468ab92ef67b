"""A real device (the Flower ClientApp) builds its own side only: its shard, its runtime at the
server's plan, no server sessions and no other device's data, and the same batches the
simulation would give that device."""

from pathlib import Path

from conftest import tiny_config

from splitpeft.deploy.client_app import build_own_device
from splitpeft.deploy.settings import NodeSettings
from splitpeft.federation.simulation import Simulation
from splitpeft.parties.device import DeviceRuntime


def _node(device: int, data_path: str | None = None) -> NodeSettings:
    return NodeSettings(device=device, split_server="127.0.0.1:1", token="t", root_cert=None, data_path=data_path,
                        state_dir=Path("unused"), status_file=None)


def test_a_device_builds_only_its_own_shard_and_plan():
    config = tiny_config("tiny-llama", "federation.num_devices=3", "data.max_length=48")
    sim = Simulation(config)
    reference = sim.devices[1]
    device = build_own_device(config, _node(1), reference.split_layer, dict(reference.ranks))
    assert isinstance(device, DeviceRuntime) and device.device_id == "device-1"
    assert device.split_layer == reference.split_layer and device.ranks == reference.ranks
    # exactly device-1's shard, in the simulation's order: no other device's examples
    assert [item.input_ids for item in device.data.items] == [item.input_ids for item in reference.data.items]
    assert len(device.data.items) < len(sim.devices[0].data.items) + len(sim.devices[1].data.items)
    for _ in range(3):
        assert device.data.next().input_ids.tolist() == reference.data.next().input_ids.tolist()


def test_a_device_with_its_own_file_trains_on_all_of_it(tmp_path):
    lines = [f"name[Place {i}], food[French]||Place {i} serves French food." for i in range(7)]
    path = tmp_path / "mine.txt"
    path.write_text("\n".join(lines) + "\n")
    config = tiny_config("tiny-llama", "data.source=e2e", f"data.path={path}", "data.max_length=48")
    device = build_own_device(config, _node(2, str(path)), 2, {})
    assert device.device_id == "device-2" and len(device.data.items) == 7
