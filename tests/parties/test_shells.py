"""Issue 23 item 1: devices and server sessions are state between rounds; they borrow a shell
(model with LoRA branches, optimiser) from a pool while they train (`parties/shells.py`)."""

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from splitpeft.federation.simulation import Simulation
from splitpeft.model.adapters import lora_ab, lora_layers
from splitpeft.parties.shells import SpillStore


def _state(sim: Simulation) -> dict[str, torch.Tensor]:
    """Every party's adapters and AdamW moments, and the global adapters."""
    state: dict[str, torch.Tensor] = {}
    parties = [*((d.device_id, d) for d in sim.devices), *((f"server/{n}", s) for n, s in sim.server.sessions.items())]
    for name, party in parties:
        for module, weights in party.adapters().items():
            state[f"{name}/{module}.A"], state[f"{name}/{module}.B"] = weights.A, weights.B
        for i, tensor in enumerate(party.optimizer_state_tensors()):
            state[f"{name}/moment{i}"] = tensor.detach().clone()
    for module, weights in sim.state.global_adapters.items():
        state[f"global/{module}.A"], state[f"global/{module}.B"] = weights.A, weights.B
    return state


@pytest.mark.parametrize("overrides", [
    ["placement.labels_on_device=false"],
    ["placement.labels_on_device=true", "federation.aggregator=noise_free", "federation.noise_free_start=warm",
     "federation.noise_free_moments=keep"],
    ["kill_revive.enabled=true", "kill_revive.warmup=1", "kill_revive.interval=1", "kill_revive.active_fraction=0.5"],
], ids=["plain_split", "u_shaped_warm_kept_moments", "kill_revive"])
def test_spilling_every_partys_state_to_disk_changes_nothing(overrides, tmp_path):
    """federation.state_memory_bytes=0 writes every parked party to disk between rounds: the
    adapters, moments and losses are those of the run that keeps them in memory, bit for bit; the
    spill folder is created under federation.spill_dir and removed when its pool goes."""
    common = ["federation.num_devices=4", "federation.local_steps=2", "federation.rounds=3", *overrides]
    kept = Simulation(tiny_config("tiny-llama", *common))
    spilled = Simulation(tiny_config("tiny-llama", *common, "federation.state_memory_bytes=0",
                                     f"federation.spill_dir={tmp_path}"))
    for _ in range(3):
        one, two = kept.run_round(), spilled.run_round()
        assert one.dropped == two.dropped == []
        for device_id, stats in one.devices.items():
            assert two.devices[device_id].losses == stats.losses
    assert spilled.device_pool.store.spilled > 0 and spilled.device_pool.store.resident == 0
    assert kept.device_pool.store.spilled == 0
    folders = list(tmp_path.iterdir())  # one for the devices, one for the server's sessions
    assert len(folders) == 2 and all(f.name.startswith("splitpeft-spill-") for f in folders)
    files = [f for folder in folders for f in folder.iterdir()]
    one, two = _state(kept), _state(spilled)
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key
    assert files  # the spilled parties' files were there until read back
    spilled.device_pool.close()
    spilled.session_pool.close()
    assert list(tmp_path.iterdir()) == []  # its own folder went, nothing else


def test_a_fleet_reuses_a_few_shells_instead_of_building_one_per_device():
    """Twelve devices with the same plan, trained one after another over two rounds, are served by
    one device shell and one server-session shell; between rounds no party holds a shell."""
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=12", "federation.local_steps=1",
                                 "federation.rounds=2"))
    for _ in range(2):
        record = sim.run_round()
        assert sorted(record.completed) == sorted(sim.device_ids)
    assert sim.device_pool.built == 1 and sim.session_pool.built == 1
    assert sim.device_pool.lent == 0 and sim.session_pool.lent == 0
    assert all(d.is_parked for d in sim.devices) and all(s.is_parked for s in sim.server.sessions.values())


def test_a_pool_keeps_as_many_free_shells_as_were_lent_at_once():
    """A lockstep round binds every device's shell together: a pool whose max_free is below that
    count still keeps them all, so the next round builds none; with fewer lent, max_free holds."""
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1"))
    pool, spec = sim.device_pool, sim.devices[0].spec
    pool.max_free = 2
    shells = [pool.acquire(spec) for _ in range(5)]
    for shell in shells:
        pool.release(spec, shell)
    assert (pool.built, pool.most_lent, pool.free_shells()) == (5, 5, 5)
    again = [pool.acquire(spec) for _ in range(5)]
    assert pool.built == 5 and {id(s) for s in again} == {id(s) for s in shells}
    for shell in again:
        pool.release(spec, shell)
    assert pool.free_shells() == 5 and pool.lent == 0


def test_parking_and_binding_again_keeps_adapters_moments_frozen_flags_and_the_warm_copy():
    """A party parked and bound again (to another shell of its spec) computes exactly what it
    did: same adapters, AdamW moments, frozen adapters, and under a warm start its own W - s B A."""
    sim = Simulation(tiny_config("tiny-llama", "federation.aggregator=noise_free", "federation.noise_free_start=warm",
                                 "federation.rounds=2"))
    sim.run_round()
    device = sim.devices[0]
    device.load(sim.state.start_state(device.device_id, device.ranks))
    first = device.modules[0]
    device.set_trainable([first], False)
    device.optimizer.state[device.parameters[1]] = {"step": torch.tensor(3.0), "exp_avg": torch.full_like(device.parameters[1], 0.5),
                                                    "exp_avg_sq": torch.full_like(device.parameters[1], 0.25)}
    inputs = torch.randint(0, 100, (2, 7))

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return device.backbone.blocks(device.backbone.embed(inputs), 0, device.split_layer)

    before = forward()
    adapters, copies = device.adapters(), [w.clone() for w in device.warm_copies()]
    assert copies, "the warm start gave the device its own frozen weights"
    other = sim.device_pool.acquire(device.spec)  # the next bind must take a different shell
    device.park()
    assert device.is_parked and device.adapters().keys() == adapters.keys()
    assert device.nonfinite() is None and device.is_parked  # checked in what it keeps, without a shell
    shell = device.shell
    assert shell is not other
    for name, weights in device.adapters().items():
        assert torch.equal(weights.A, adapters[name].A) and torch.equal(weights.B, adapters[name].B)
    assert [torch.equal(a, b) for a, b in zip(device.warm_copies(), copies)] == [True] * len(copies)
    state = device.optimizer.state[device.parameters[1]]
    assert float(state["step"]) == 3.0 and torch.equal(state["exp_avg"], torch.full_like(device.parameters[1], 0.5))
    layers = lora_layers(device.model)
    assert all(p.requires_grad == (name != first) for name, layer in layers.items() for p in lora_ab(layer))
    assert torch.equal(forward(), before)
    sim.device_pool.release(device.spec, other)


def test_a_parked_party_with_a_nonfinite_moment_is_found_and_reset_without_losing_its_adapters():
    sim = Simulation(tiny_config("tiny-llama", "federation.rounds=1"))
    sim.run_round()
    device = sim.devices[1]
    device.optimizer.state[device.parameters[0]]["exp_avg_sq"][0, 0] = float("nan")
    adapters = device.adapters()
    device.park()
    bad = device.nonfinite()
    assert bad is not None and bad.endswith("exp_avg_sq") and "lora_A" in bad
    assert device.reset_if_nonfinite() == bad
    assert device.is_parked and device.nonfinite() is None
    assert device.optimizer_state_tensors() == []  # the moments went
    for name, weights in device.adapters().items():
        assert torch.equal(weights.A, adapters[name].A)


def test_spill_store_keeps_what_fits_in_memory_and_the_rest_in_its_own_folder(tmp_path):
    mine = tmp_path / "yours.txt"
    mine.write_text("a file the store did not create")
    store = SpillStore(memory_bytes=100, directory=tmp_path)
    small = store.put({"x": torch.arange(10, dtype=torch.float32)})  # 40 bytes: in memory
    big = store.put({"y": torch.ones(50), "z": torch.zeros(3, 2, dtype=torch.bfloat16)})  # 212 bytes: over the budget
    assert store.resident == 40 and store.spilled == 212
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    [written] = list(folder.iterdir())
    # safetensors (tensors only, nothing to unpickle): one flat buffer per dtype, the layout stays in memory
    assert {name: t.numel() for name, t in load_file(str(written)).items()} == {"float32": 50, "bfloat16": 6}
    assert torch.equal(store.peek(big)["z"], torch.zeros(3, 2, dtype=torch.bfloat16))
    assert torch.equal(store.take(big)["y"], torch.ones(50)) and store.spilled == 0 and not written.exists()
    assert torch.equal(store.take(small)["x"], torch.arange(10, dtype=torch.float32)) and store.resident == 0
    again = store.put({"w": torch.ones(40)})
    store.drop(again)
    assert store.spilled == 0 and list(folder.iterdir()) == []
    store.put({"v": torch.ones(40)})
    store.close()
    assert not folder.exists() and mine.read_text() == "a file the store did not create"
    with pytest.raises(ValueError, match="memory_bytes"):
        SpillStore(memory_bytes=-1)


def test_the_spill_folder_goes_with_the_process(tmp_path):
    """A store never closed still removes its folder when the process ends."""
    import subprocess
    import sys
    code = ("import torch; from splitpeft.parties.shells import SpillStore; "
            f"s = SpillStore(0, {str(tmp_path)!r}); s.put({{'a': torch.ones(4)}}); "
            "import pathlib; print(len(list(pathlib.Path(" + repr(str(tmp_path)) + ").iterdir())))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ}, check=True)
    assert done.stdout.strip() == "1" and list(Path(tmp_path).iterdir()) == []


def test_devices_that_do_not_train_cost_no_shell_and_no_tensors():
    """Forty registered devices, four a round: the ones never selected hold no shell and no parked
    tensors after rounds, the report's info and the end-of-round checks included."""
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=40", "federation.devices_per_round=4",
                                 "federation.local_steps=1", "federation.rounds=2"))
    trained = set()
    for _ in range(2):
        trained |= set(sim.run_round().completed)
    info = sim.info()
    assert sim.device_pool.lent == 0 and sim.device_pool.built == 1
    idle = [d for d in sim.devices if d.device_id not in trained]
    assert len(idle) >= 32
    assert all(d.is_parked and d._parked is None for d in idle)
    assert info["devices"][idle[0].device_id]["resident_bytes"] == info["devices"][sorted(trained)[0]]["resident_bytes"] > 0
    assert sim.device_pool.store.resident == sum(
        t.numel() * t.element_size() for d in sim.devices if d.device_id in trained for t in d._parked_tensors().values())
