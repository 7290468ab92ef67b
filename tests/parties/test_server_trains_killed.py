"""`kill_revive.server_trains_killed` (issue 25): a dlora server keeps training the killed adapters it
computes, from the gradients its backward reaches anyway, with its own AdamW; the device fetches
them before it uploads. Training an adapter on the server is the same arithmetic as on the device,
so a device whose adapter is killed from the first step learns what one that killed nothing learns."""

import pytest
import torch
from conftest import tiny_config

from splitpeft.config import ConfigError
from splitpeft.dlora.remote import DLoRASession
from splitpeft.federation.simulation import Simulation
from splitpeft.model.adapters import LoraWeights, read_adapters
from splitpeft.transport.messages import Kind, Message, MessageError, Meta, decode


def _sim(train: bool, *overrides: str, tap=None) -> Simulation:
    return Simulation(tiny_config(
        "tiny-llama", "placement.placement=dlora", "federation.num_devices=1", "federation.batch_size=2",
        "data.max_length=40", "kill_revive.enabled=true", "kill_revive.warmup=1000",  # no kill of the policy's own
        f"kill_revive.server_trains_killed={str(train).lower()}", *overrides), tap=tap)


def _start(sim: Simulation):
    device = sim.devices[0]
    channel = sim.channels[device.device_id]
    device.load(sim.state.global_adapters)
    device.open_session(channel)
    return device, channel


def _killed_names(device) -> list[str]:
    return sorted(device.modules)[::3]  # a third of the adapters, in every kind of linear


def test_a_server_trained_killed_adapter_learns_what_a_device_trained_one_does():
    """Killed before the first step, with the server training them, a third of the adapters end
    (after two local phases, so a fetch and a re-KILL with the moments kept between them) where a
    run that killed nothing ends them; frozen, they do not move."""
    ends = {}
    for case in ("no kill", "server trains", "frozen"):
        sim = _sim(case == "server trains")
        device, channel = _start(sim)
        names = _killed_names(device)
        start = read_adapters(device.model, names)
        if case != "no kill":
            sim.placement.apply_kill_revive(device, channel, names, [])
        first = device.local_phase(3, channel)
        if case == "server trains":
            assert device.trained_killed == set(names)
        second = device.local_phase(2, channel)
        ends[case] = (device.adapters(), first.losses + second.losses)
        if case == "frozen":
            assert device.trained_killed == set()
            for name in names:
                assert torch.equal(ends[case][0][name].A, start[name].A) and torch.equal(ends[case][0][name].B, start[name].B)
    trained, reference = ends["server trains"], ends["no kill"]
    assert trained[1] == pytest.approx(reference[1], abs=1e-5)
    worst = max(float((w - r).abs().max()) for name in reference[0]
                for w, r in zip(trained[0][name], reference[0][name]))
    assert worst < 1e-5
    names = _killed_names(sim.devices[0])
    moved = [name for name in names if not torch.equal(trained[0][name].B, ends["frozen"][0][name].B)]
    assert moved == names  # every killed adapter trained on the server


def test_the_round_uploads_the_server_trained_killed_adapters_and_counts_their_fetch():
    """In a whole round with the policy's own kills, the device fetches the killed adapters at the end
    of its phase (REVIVE asking to keep them killed, counted in its traffic) and uploads them with the
    active ones; frozen, killed adapters stay home."""
    uploads, fetched, killed, modules = {}, {}, {}, set()
    for train in (True, False):
        frames: list[bytes] = []
        sim = _sim(train, "kill_revive.warmup=3", "kill_revive.interval=3", "kill_revive.active_fraction=0.25",
                   "federation.local_steps=8",
                   tap=lambda device, direction, frame, frames=frames: frames.append(frame) if direction == "up" else None)
        record = sim.run_round()
        device = sim.devices[0]
        assert device.killed and not record.dropped
        up = [decode(f) for f in frames]
        uploads[train] = set(next(m for m in reversed(up) if m.kind == Kind.ADAPTERS).tensors)
        asks = [m for m in up if m.kind == Kind.REVIVE and m.meta.get(Meta.KEEP_KILLED)]
        fetched[train] = [sorted(m.meta[Meta.MODULES]) for m in asks]
        killed[train] = set(device.killed)
        modules = set(device.modules)
    assert uploads[True] == {f"{n}.{p}" for n in modules for p in "AB"}
    assert fetched[True] == [sorted(killed[True])]  # once, at the end of the phase
    assert fetched[False] == []
    assert uploads[False] == {f"{n}.{p}" for n in modules - killed[False] for p in "AB"}


def test_the_server_refuses_a_killed_step_whose_gradients_are_not_finite():
    state = DLoRASession(active=set(), train_killed=True, lr=0.1)
    state.set_killed({"m": LoraWeights(torch.ones(2, 3), torch.ones(4, 2))})
    a, b = state._killed_params["m"]
    a.grad, b.grad = torch.full((2, 3), float("nan")), torch.ones(4, 2)
    with pytest.raises(MessageError, match="m.A contains NaN"):
        state.step_killed()
    assert torch.equal(a, torch.ones(2, 3)) and torch.equal(b, torch.ones(4, 2)) and a.grad is None
    a.grad, b.grad = torch.ones(2, 3), torch.ones(4, 2)
    state.step_killed()
    assert float(a.max()) < 1.0  # a finite step is taken


def test_moments_follow_their_adapter_by_name_through_kills_and_revivals():
    state = DLoRASession(active=set(), train_killed=True, lr=0.1)
    state.set_killed({"m": LoraWeights(torch.ones(2, 3), torch.ones(4, 2))})
    for p in state._killed_params["m"]:
        p.grad = torch.ones_like(p)
    state.step_killed()
    moments = state._killed_optimizer.state[state._killed_params["m"][0]]["exp_avg"].clone()
    state.set_killed({"m": LoraWeights(torch.zeros(2, 3), torch.zeros(4, 2)), "n": LoraWeights(torch.ones(1, 3), torch.ones(4, 1))})
    assert torch.equal(state._killed_optimizer.state[state._killed_params["m"][0]]["exp_avg"], moments)  # re-KILL keeps them
    assert state._killed_params["n"][0] not in state._killed_optimizer.state
    handed = state.revive(["m"])
    assert torch.equal(handed["m"].A, torch.zeros(2, 3)) and "m" not in state._killed_moments
    assert list(state._killed_params) == ["n"]


@pytest.mark.parametrize("lie", ["nan", "shape", "other_names"])
def test_a_device_refuses_a_bad_answer_to_its_fetch_and_keeps_its_adapters(lie):
    sim = _sim(True)
    device, channel = _start(sim)
    names = _killed_names(device)[:2]
    sim.placement.apply_kill_revive(device, channel, names, [])
    device.local_phase(2, channel)
    before = device.adapters()
    exchange = channel.exchange

    def lying(message: Message) -> Message:
        reply = exchange(message)
        if message.kind == Kind.REVIVE:
            tensors = dict(reply.tensors)
            key = f"{names[0]}.B"
            if lie == "nan":
                tensors[key] = torch.full_like(tensors[key], float("nan"))
            elif lie == "shape":
                tensors[key] = tensors[key][:-1]
            else:
                tensors = {k: v for k, v in tensors.items() if not k.startswith(names[0] + ".")}
            return Message(Kind.REVIVE, tensors)
        return reply

    channel.exchange = lying
    with pytest.raises(MessageError, match={"nan": "NaN", "shape": "not the device's", "other_names": "other adapters"}[lie]):
        sim.placement.collect_killed(device, channel)
    after = device.adapters()
    assert all(torch.equal(after[n].A, before[n].A) and torch.equal(after[n].B, before[n].B) for n in before)


def test_only_dlora_can_have_its_server_train_killed_adapters():
    with pytest.raises(ConfigError, match="server_trains_killed"):
        tiny_config("tiny-llama", "placement.placement=split", "kill_revive.server_trains_killed=true")
    assert tiny_config("tiny-llama", "placement.placement=dlora", "kill_revive.server_trains_killed=true").kill_revive.server_trains_killed


def test_in_the_hybrid_only_the_servers_killed_adapters_train_and_upload():
    """dlora's hybrid (the device runs blocks [0, 2)): a killed adapter of the device's own blocks
    stays frozen there and home; one of the server's blocks trains on the server and is uploaded."""
    sim = _sim(True, "placement.dlora_device_blocks=2")
    device, channel = _start(sim)
    own = next(n for n in sorted(device.modules) if ".layers.0." in n)
    remote = next(n for n in sorted(device.modules) if ".layers.3." in n)
    start = read_adapters(device.model, [own, remote])
    sim.placement.apply_kill_revive(device, channel, [own, remote], [])
    device.local_phase(3, channel)
    assert device.trained_killed == {remote}
    end = read_adapters(device.model, [own, remote])
    assert torch.equal(end[own].B, start[own].B) and not torch.equal(end[remote].B, start[remote].B)
    uploaded = {key.rsplit(".", 1)[0] for key in device.upload_message().tensors}
    assert remote in uploaded and own not in uploaded


def test_spared_device_blocks_stay_out_of_kill_and_revive_in_the_hybrid():
    """`kill_revive.spare_device_blocks`: the hybrid's own blocks' adapters are never killed, so
    they train on the device all run long; the policy kills among the server's blocks' adapters
    down to active_fraction of those, and the round reports every adapter training on the device."""
    ends = {}
    for spare in (False, True):
        sim = _sim(True, "placement.dlora_device_blocks=2", "kill_revive.warmup=1", "kill_revive.interval=1",
                   "kill_revive.active_fraction=0.25", f"kill_revive.spare_device_blocks={str(spare).lower()}")
        device, _ = _start(sim)
        own = {n for n in device.modules if ".layers.0." in n or ".layers.1." in n}
        assert own and (set(device.kill_revive.modules) == set(device.modules) - own if spare
                        else set(device.kill_revive.modules) == set(device.modules))
        start = read_adapters(device.model, sorted(own))
        sim.run_round()
        ends[spare] = device
        record = sim.rounds[-1].devices[device.device_id]
        assert record.active_adapters == len(device.modules) - len(device.killed)
        if spare:
            assert not own & device.killed and device.killed  # kills happened, none of the device's own
            assert len(device.kill_revive.active) == device.kill_revive.target_active
            end = read_adapters(device.model, sorted(own))
            assert all(not torch.equal(end[n].B, start[n].B) for n in own)  # every one of them trained
    assert own & ends[False].killed  # without the option the policy kills some of them


def test_only_the_hybrid_can_spare_device_blocks():
    for overrides in (["placement.placement=split"], ["placement.placement=dlora"]):
        with pytest.raises(ConfigError, match="spare_device_blocks"):
            tiny_config("tiny-llama", *overrides, "kill_revive.spare_device_blocks=true")
    assert tiny_config("tiny-llama", "placement.placement=dlora", "placement.dlora_device_blocks=1",
                       "kill_revive.spare_device_blocks=true").kill_revive.spare_device_blocks
