"""Kill and Revive: the policy's arithmetic, and what killing saves in dlora and split."""

from collections import defaultdict

import pytest
import torch
from conftest import tiny_config

from splitpeft.config import KillReviveConfig
from splitpeft.dlora.killrevive import (
    KillRevive,
    product_norm,
    update_norm,
)
from splitpeft.dlora.remote import input_groups
from splitpeft.federation.simulation import Simulation
from splitpeft.model.adapters import LoraWeights, read_adapters
from splitpeft.transport.messages import Kind, decode, tensor_bytes


def test_gram_norms_equal_dense_norms():
    g = torch.Generator().manual_seed(0)
    a0, b0, a1, b1 = (torch.randn(s, generator=g) for s in [(4, 9), (7, 4), (4, 9), (7, 4)])
    assert product_norm(a1, b1) == pytest.approx(float(torch.linalg.norm(b1 @ a1)), rel=1e-5)
    assert update_norm(LoraWeights(a0, b0), LoraWeights(a1, b1)) == pytest.approx(
        float(torch.linalg.norm(b1 @ a1 - b0 @ a0)), rel=1e-5)


def test_policy_kills_lowest_scores_down_to_the_fraction_and_revives_by_margin():
    modules = [f"m{i}" for i in range(8)]
    policy = KillRevive(KillReviveConfig(warmup=2, interval=2, active_fraction=0.25, revive_interval=4, revive_margin=0.1), modules)
    policy.scores = {f"m{i}": float(i) for i in range(8)}
    assert policy.decide() == ([], [])          # step 1: warming up
    kill, revive = policy.decide()              # step 2: first kill
    assert sorted(kill) == [f"m{i}" for i in range(6)] and revive == []
    assert policy.active == {"m6", "m7"}
    policy.decide()                             # step 3
    # step 4 is a revive step: m0's gradient beats the weakest active (m6) by more than 10%
    assert policy.wants_killed_gradients() is True
    kill, revive = policy.decide({"m0": 2.0, "m6": 1.0, "m7": 5.0, "m1": 1.05})
    assert revive == ["m0"] and kill == ["m6"]
    assert policy.active == {"m0", "m7"}


def test_static_baselines_choose_once():
    modules = [f"m{i}" for i in range(8)]
    for selection in ("static_random", "static_score"):
        policy = KillRevive(KillReviveConfig(warmup=2, interval=1, active_fraction=0.25, selection=selection), modules, seed=3)
        policy.scores = {f"m{i}": float(i) for i in range(8)}
        policy.decide()
        policy.decide()
        chosen = set(policy.active)
        assert len(chosen) == 2
        if selection == "static_score":
            assert chosen == {"m6", "m7"}
        for _ in range(10):
            policy.decide({m: 100.0 for m in modules})
        assert policy.active == chosen


def _kr_run(placement: str, enabled: bool, steps: int = 12):
    frames = defaultdict(list)
    sim = Simulation(
        tiny_config("tiny-llama", f"placement.placement={placement}", "federation.num_devices=1",
                    f"federation.local_steps={steps}", f"kill_revive.enabled={str(enabled).lower()}",
                    "kill_revive.warmup=3", "kill_revive.interval=3", "kill_revive.revive_interval=4",
                    "kill_revive.active_fraction=0.25", "federation.batch_size=2", "data.max_length=40"),
        tap=lambda device, direction, frame: frames[direction].append(frame),
    )
    return sim, frames


def test_dlora_killed_adapters_get_no_traffic_and_bytes_match_active_tensors():
    sim, frames = _kr_run("dlora", True)
    device = sim.devices[0]
    asked: list[list[str]] = []
    original = sim.placement.device_step

    def recording_step(dev, batch, channel):
        killed_now = set(dev.killed)
        start = len(frames["down"])
        loss = original(dev, batch, channel)
        for frame in frames["down"][start:]:
            message = decode(frame)
            if message.kind in (Kind.BRANCH_INPUTS, Kind.BRANCH_GRADS):
                names = list(message.meta["modules"])
                asked.append(names)
                assert not set(names) & killed_now, "the server asked for a killed adapter"
                if message.kind == Kind.BRANCH_GRADS:
                    # exactly the active modules' output gradients, each (B, T, d_out) float32
                    assert set(message.tensors) == set(names)
        return loss

    sim.placement.device_step = recording_step
    sim.run_round()
    assert device.killed, "nothing was killed"
    assert len(device.kill_revive.active) == round(0.25 * 28)
    killed_phase = [names for names in asked[-6:]]
    assert all(names for names in killed_phase)
    # bytes of one late step = encoded sizes of exactly the active groups' tensors
    last_up = [decode(f) for f in frames["up"]][-40:]
    outputs = [m for m in last_up if m.kind == Kind.BRANCH_OUTPUTS]
    assert outputs and all(set(m.tensors) <= device.kill_revive.active for m in outputs)
    assert all(tensor_bytes(m.tensors) == sum(t.numel() * 4 for t in m.tensors.values()) for m in outputs)


def test_dlora_kr_cuts_device_flops_and_traffic():
    full, _ = _kr_run("dlora", False, steps=10)
    kr, _ = _kr_run("dlora", True, steps=10)
    full.run_round()
    kr.run_round()
    a, b = full.rounds[0].devices["device-0"], kr.rounds[0].devices["device-0"]
    assert b.bytes_up < a.bytes_up and b.bytes_down < a.bytes_down
    assert b.flops < a.flops


@pytest.mark.parametrize("placement", ["dlora", "split"])
def test_kill_then_revive_keeps_weights(placement):
    sim, _ = _kr_run(placement, True)
    device = sim.devices[0]
    channel = sim.channels[device.device_id]
    device.load(sim.state.global_adapters)
    device.open_session(channel)
    device.local_phase(3, channel)
    name = sorted(device.modules)[0]
    before = read_adapters(device.model, [name])[name]
    sim.placement.apply_kill_revive(device, channel, [name], [])
    assert name in device.killed
    device.local_phase(2, channel)
    after_kill = read_adapters(device.model, [name])[name]
    assert torch.equal(after_kill.A, before.A) and torch.equal(after_kill.B, before.B)
    sim.placement.apply_kill_revive(device, channel, [], [name])
    revived = read_adapters(device.model, [name])[name]
    assert name not in device.killed
    assert torch.equal(revived.A, before.A) and torch.equal(revived.B, before.B)
    if placement == "dlora":
        assert name not in sim.server.sessions[device.device_id].step_state.killed


def test_input_groups_share_llama_inputs():
    groups = input_groups(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                           "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                           "model.layers.1.self_attn.q_proj"])
    assert groups["model.layers.0.self_attn.q_proj"] == groups["model.layers.0.self_attn.k_proj"]
    assert groups["model.layers.0.mlp.gate_proj"] == groups["model.layers.0.mlp.up_proj"]
    assert len(set(groups.values())) == 4


def test_dlora_step_bytes_are_exactly_the_active_modules_tensors():
    """After the kills, one step's branch traffic is B*T*(d_in per active input group + d_out per
    active module) floats down and up for the forward, the same again for the backward (minus
    input gradients the first block does not need), plus headers."""
    from splitpeft.transport.messages import header_bytes

    sim, frames = _kr_run("dlora", True, steps=8)
    sim.run_round()
    device = sim.devices[0]
    active = device.kill_revive.active
    shapes = {name: module.weight.shape for name, module in sim.loaded.model.named_modules() if name in device.ranks}
    groups = input_groups(sorted(active))
    up = [decode(f) for f in frames["up"]]
    down = [decode(f) for f in frames["down"]]
    # the last step: each message up gets one reply down; down also carries the round's first
    # ADAPTERS download, which has no request, so reply i of the step sits at down[i + 1].
    assert down[0].kind == Kind.ADAPTERS and up[0].kind == Kind.OPEN_SESSION
    start_up = max(i for i, m in enumerate(up) if m.kind == Kind.ACTIVATIONS)
    end = next(i for i in range(start_up + 1, len(down)) if down[i].kind == Kind.STEP_DONE)
    step_up, step_down = up[start_up:end], down[start_up + 1:end + 1]
    start_down = start_up + 1
    hidden = step_up[0].tensors["hidden"]
    tokens = hidden.shape[0] * hidden.shape[1]
    d_out = {n: int(shapes[n][0]) for n in active}
    d_in = {n: int(shapes[n][1]) for n in active}
    inputs_down = sum(m.tensors["x"].numel() for m in step_down if m.kind == Kind.BRANCH_INPUTS)
    assert inputs_down == tokens * sum(d_in[sorted(n for n in active if groups[n] == g)[0]] for g in set(groups.values()))
    outputs_up = sum(t.numel() for m in step_up if m.kind == Kind.BRANCH_OUTPUTS for t in m.tensors.values())
    grads_down = sum(t.numel() for m in step_down if m.kind == Kind.BRANCH_GRADS for t in m.tensors.values())
    assert outputs_up == grads_down == tokens * sum(d_out.values())
    for message_frames in (frames["up"][start_up:end], frames["down"][start_down:end + 1]):
        for frame in message_frames:
            assert len(frame) == tensor_bytes(decode(frame).tensors) + header_bytes(frame)
