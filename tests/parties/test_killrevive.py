"""Kill and Revive: the policy's arithmetic, and what killing saves in dlora and split."""

from collections import defaultdict

import pytest
import torch
from conftest import tiny_config

from splitpeft.config import ConfigError, KillReviveConfig
from splitpeft.dlora.remote import input_groups
from splitpeft.federation.simulation import Simulation
from splitpeft.model.adapters import LoraWeights, read_adapters
from splitpeft.model.loss import labelled_positions
from splitpeft.parties.killrevive import (
    KillRevive,
    block_of,
    jaccard,
    kr_summary,
    product_norm,
    scheduled_target,
    update_norm,
)
from splitpeft.transport.messages import Kind, Message, MessageError, Meta, decode, encode, tensor_bytes


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


def _kr_run(placement: str, enabled: bool, steps: int = 12, *overrides: str):
    frames = defaultdict(list)
    sim = Simulation(
        tiny_config("tiny-llama", f"placement.placement={placement}", "federation.num_devices=1",
                    f"federation.local_steps={steps}", f"kill_revive.enabled={str(enabled).lower()}",
                    "kill_revive.warmup=3", "kill_revive.interval=3", "kill_revive.revive_interval=4",
                    "kill_revive.active_fraction=0.25", "federation.batch_size=2", "data.max_length=40",
                    *overrides),
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


# Where a LLaMA block's adapted linears sit in its forward pass: q, k, v read the attention input,
# o the attention output, gate and up the MLP input, down the MLP activations. Linears of one
# (block, stage) read the same tensor, which the server sends once.
_STAGE = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}


def _stage(module: str) -> tuple[int, int]:
    block = int(module.split(".layers.")[1].split(".")[0])
    return block, _STAGE[module.rsplit(".", 1)[1]]


def _traced_kr_run(enabled: bool, steps: int, *overrides: str):
    """A one-device dlora round, with per step: the adapters the device runs, the adapters whose
    gradients the server tracks, the batch shape, the step's frames each way and its adapter FLOPs."""
    sim, frames = _kr_run("dlora", enabled, steps, *overrides)
    device = sim.devices[0]
    trace: list[dict] = []
    original_step, original_end = sim.placement.device_step, device.meter.end_step

    def step(dev, batch, channel):
        killed = set(dev.killed)
        # the server tracks killed adapters' gradients only on steps that measure them (revive steps)
        sources = set(dev.modules) if dev.measure_killed and killed else set(dev.modules) - killed
        up, down = len(frames["up"]), len(frames["down"])
        loss = original_step(dev, batch, channel)
        trace.append({"active": set(dev.modules) - killed, "sources": sources, "shape": tuple(batch.input_ids.shape),
                      "norms": len(killed) if dev.measure_killed else 0,  # float32 gradient norms in STEP_DONE
                      "labelled": int(labelled_positions(batch.labels)[0].numel()),
                      "up": frames["up"][up:], "down": frames["down"][down:]})
        return loss

    def end_step():
        before = device.meter.adapter_flops
        peak = original_end()
        trace[-1]["adapter_flops"] = device.meter.adapter_flops - before
        return peak

    sim.placement.device_step, device.meter.end_step = step, end_step
    record = sim.run_round()
    return sim, record.devices[device.device_id], trace


def _dims(sim) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every adapted linear, from the frozen weights (d_out, d_in)."""
    ranks = sim.devices[0].ranks
    return {n: (int(m.weight.shape[1]), int(m.weight.shape[0])) for n, m in sim.loaded.model.named_modules() if n in ranks}


def _expected_payload(dims, active, sources, shape, hidden, norms=0) -> tuple[int, int]:
    """Tensor bytes (up, down) of one dlora step with `active` adapters on the device (see
    dlora/placement.py): a float32 (B, T, width) tensor per message part, namely

    up:   embedded hidden + each active branch output (d_out) + head gradient (d)
          + dL/dx for each active input group that has a gradient source upstream of it
    down: each active input group's x (d_in) + final hidden (d) + each active branch output's gradient (d_out)
          + on steps that measure the killed adapters, one float32 gradient norm per killed adapter
    """
    def f32(width: int) -> int:
        return tensor_bytes({"t": torch.empty(*shape, width)})

    groups = {_stage(m): dims[m][0] for m in active}  # (block, stage) -> d_in
    outputs = sum(f32(dims[m][1]) for m in active)
    input_grads = sum(f32(d_in) for g, d_in in groups.items() if any(_stage(m) < g for m in sources))
    return (2 * f32(hidden) + outputs + input_grads,
            sum(f32(d_in) for d_in in groups.values()) + f32(hidden) + outputs + 4 * norms)


def _check_step_traffic(sim, stats, trace) -> None:
    """Every step's counted bytes = the active adapters' tensors + the frames' headers, exactly."""
    from splitpeft.transport.messages import header_bytes

    dims, hidden = _dims(sim), sim.loaded.model.config.hidden_size
    assert len(trace) == stats.steps
    for i, step in enumerate(trace):
        for direction, counted, payload in zip(("up", "down"), (stats.step_bytes_up, stats.step_bytes_down),
                                               _expected_payload(dims, step["active"], step["sources"], step["shape"], hidden,
                                                                 step["norms"])):
            headers = [header_bytes(frame) for frame in step[direction]]
            # Headers (frame prefix, safetensors' JSON of names, dtypes, shapes and offsets, and the
            # meta: call ids, module names, the killed adapters' names on revive steps) are
            # the only bytes not derived from tensor shapes, so they are taken from the frames; they
            # do not grow with the tokens: ~200 bytes plus < 128 per module they name (at most twice).
            assert all(h < 256 + 128 * len(dims) for h in headers), (i, direction, headers)
            assert counted[i] == sum(len(frame) for frame in step[direction]) == payload + sum(headers), (i, direction)


def _expected_adapter_flops(sim, active, shape) -> int:
    """FLOPs of the device's LoRA branches s B A x for one step, per active module (r, d_in, d_out),
    N = B T tokens: forward A x, B (A x): 2 N r (d_in + d_out); backward: the gradients of B, of A x,
    of A and of x (x is always a leaf that requires grad on the device): 4 N r (d_in + d_out)."""
    dims, ranks = _dims(sim), sim.devices[0].ranks
    tokens = shape[0] * shape[1]
    return sum(6 * tokens * ranks[m] * sum(dims[m]) for m in active)


def test_dlora_kr_cuts_device_flops_and_traffic():
    # revivals off (revive_interval past the round): one kill at the end of warm-up, then the same
    # active set for the rest of the round
    steps, warmup, no_revive = 10, 3, "kill_revive.revive_interval=1000"
    sim_full, a, full = _traced_kr_run(False, steps, no_revive)
    sim_kr, b, kr = _traced_kr_run(True, steps, no_revive)
    assert b.bytes_up < a.bytes_up and b.bytes_down < a.bytes_down
    assert b.flops < a.flops
    modules = set(sim_kr.devices[0].modules)
    assert len(modules) == 28  # 4 blocks x 7 linears
    target = round(0.25 * len(modules))
    for i in range(steps):
        assert full[i]["active"] == modules
        assert kr[i]["active"] == (modules if i < warmup else sim_kr.devices[0].kill_revive.active)
    assert len(kr[warmup]["active"]) == target

    _check_step_traffic(sim_full, a, full)
    _check_step_traffic(sim_kr, b, kr)

    config = sim_kr.loaded.model.config
    for sim, stats, trace in ((sim_full, a, full), (sim_kr, b, kr)):
        for i, step in enumerate(trace):
            expected = _expected_adapter_flops(sim, step["active"], step["shape"])
            assert step["adapter_flops"] == expected, (i, step["adapter_flops"], expected)
            # the rest of the device's step: the frozen (tied) LM head, forward and input gradient, on
            # the labelled positions only (embedding lookups, the loss and AdamW count no FLOPs)
            assert 0 < step["labelled"] < step["shape"][0] * step["shape"][1]
            assert stats.step_flops[i] == expected + 4 * step["labelled"] * config.hidden_size * config.vocab_size
        assert stats.adapter_flops == sum(step["adapter_flops"] for step in trace)
        assert stats.flops == sum(stats.step_flops)

    # After the kill the branch work is the active adapters' share of all adapters' work, by size
    # (rank x (d_in + d_out)), not by count (the kill keeps 7 of 28 adapters of unequal sizes).
    dims, ranks = _dims(sim_kr), sim_kr.devices[0].ranks
    size = {m: ranks[m] * sum(dims[m]) for m in modules}
    for i in range(warmup, steps):
        active = sum(size[m] for m in kr[i]["active"])
        assert kr[i]["adapter_flops"] * sum(size.values()) == full[i]["adapter_flops"] * active


def test_dlora_step_traffic_follows_revivals():
    """With revivals (every 4 steps): on revive steps the server also tracks the killed adapters'
    gradients, so input groups after a killed adapter in the forward pass send dL/dx back too; the
    bytes still match the active adapters' tensors exactly."""
    sim, stats, trace = _traced_kr_run(True, 10)
    assert any(e["revived"] for e in sim.devices[0].kill_revive.events), "no revival happened: the test needs one"
    assert any(step["sources"] != step["active"] for step in trace)
    _check_step_traffic(sim, stats, trace)


def test_dlora_step_flops_follow_revivals():
    """Bug: DeviceRuntime.local_phase keyed the meter's FLOP cache by (batch shape, number killed),
    so after a revival swapped adapters of different sizes the device was charged the old set's
    FLOPs (and a revive step's larger count was reused for later steps in split)."""
    sim, stats, trace = _traced_kr_run(True, 10)
    sizes = {_expected_adapter_flops(sim, step["active"], step["shape"]) for step in trace}
    if len(sizes) < 3:  # all adapters, after the kill, after a revival (not an AssertionError: not the bug)
        pytest.fail("no revival changed the active adapters' size: the test needs one")
    for i, step in enumerate(trace):
        assert step["adapter_flops"] == _expected_adapter_flops(sim, step["active"], step["shape"]), i


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


def test_killed_norms_are_zero_for_a_killed_adapter_backward_never_reached():
    """Bug: with no gradient on a killed adapter's A and B, `sum` of nothing was the integer 0 and
    torch.sqrt(0) raised TypeError, failing the whole dlora step."""
    from splitpeft.dlora.remote import DLoRASession

    state = DLoRASession(active=set())
    state.set_killed({"m": LoraWeights(torch.ones(2, 3), torch.ones(4, 2)), "n": LoraWeights(torch.ones(2, 3), torch.ones(4, 2))})
    a, b = state._killed_params["n"]
    a.grad, b.grad = torch.full((2, 3), 2.0), torch.full((4, 2), 1.0)
    names, values = state.killed_norms_tensor()
    norms = dict(zip(names, values.tolist()))
    assert norms["m"] == 0.0
    assert norms["n"] == pytest.approx((6 * 4.0 + 8 * 1.0) ** 0.5)


def test_a_step_done_carrying_killed_norms_is_as_long_whatever_their_values():
    """STEP_DONE carries the killed adapters' gradient norms as one float32 tensor under their sorted
    names, so its frame's length depends on the killed set only (JSON numbers' digits made frames of
    equal steps differ in length, as the loss's once did)."""
    from splitpeft.dlora.remote import KILLED_NORMS_TENSOR, DLoRASession
    from splitpeft.transport.messages import Message, encode

    lengths, sent = set(), []
    for scale in (1.0, 1 / 3, 1e-7, 12345.678):
        state = DLoRASession(active=set(), killed_grad_norms=True)
        state.set_killed({"n": LoraWeights(torch.ones(2, 3), torch.ones(4, 2)), "m": LoraWeights(torch.ones(2, 3), torch.ones(4, 2))})
        for a, b in state._killed_params.values():
            a.grad, b.grad = torch.full((2, 3), scale), torch.full((4, 2), scale / 7)
        meta, tensors = state.killed_norms_reply()
        assert meta["killed_grad_norms"] == ["m", "n"] and tensors[KILLED_NORMS_TENSOR].shape == (2,)
        names, norms = state.killed_norms_tensor()
        assert names == ["m", "n"] and torch.equal(tensors[KILLED_NORMS_TENSOR], norms)
        frame = encode(Message(Kind.STEP_DONE, tensors, meta=meta))
        lengths.add(len(frame))
        sent.append(decode(frame).tensors[KILLED_NORMS_TENSOR])
    assert len(lengths) == 1
    assert sent[1][0].item() == pytest.approx((6 / 9 + 8 / 441) ** 0.5)
    assert DLoRASession(active=set()).killed_norms_reply() == ({}, {})  # not asked: nothing sent


def test_dlora_hybrid_kills_its_own_blocks_locally_and_hands_the_rest_to_the_server():
    """dlora's hybrid (the device runs blocks [0, 2) itself): a killed adapter of those blocks stays
    on the device, frozen and still measured for revival; one of the server's blocks is handed over."""
    sim, _ = _kr_run("dlora", True, 12, "placement.dlora_device_blocks=2")
    device = sim.devices[0]
    channel = sim.channels[device.device_id]
    device.load(sim.state.global_adapters)
    device.open_session(channel)
    device.local_phase(2, channel)
    own = next(n for n in sorted(device.modules) if ".layers.0." in n)
    remote = next(n for n in sorted(device.modules) if ".layers.3." in n)
    sim.placement.apply_kill_revive(device, channel, [own, remote], [])
    session = sim.server.sessions[device.device_id].step_state
    assert set(session.killed) == {remote}
    assert sim.placement.killed_on_device(device, device.killed) == [own]
    device.local_phase(3, channel)  # trains with both killed
    sim.placement.apply_kill_revive(device, channel, [], [own, remote])
    assert own not in device.killed and remote not in device.killed and remote not in session.killed
    assert set(session.killed) == set(device.killed) - set(sim.placement.killed_on_device(device, device.killed))
    record = sim.run_round()
    assert record.devices["device-0"].steps == 12 and not record.dropped


# ---------------------------------------------------------------- the new selections and the measurement

_BLOCKS = [f"model.layers.{b}.{m}" for b in range(4) for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]


def _blocks_active(policy) -> dict[str, int]:
    counts = {block_of(n): 0 for n in policy.modules}
    for name in policy.active:
        counts[block_of(name)] += 1
    return counts


def test_block_of_names_the_transformer_block():
    assert block_of("model.layers.12.mlp.up_proj") == "model.layers.12"
    assert block_of("base_model.model.transformer.h.3.attn.c_attn") == "base_model.model.transformer.h.3"
    assert block_of("lm_head") == "lm_head"


def test_block_floor_keeps_an_adapter_in_every_block_through_kills_and_revivals():
    """Block 0 scores lowest everywhere: without the floor all of it dies, with block_floor=1 one
    of its adapters stays, and revival swaps never take a block's last active adapter."""
    for selection in ("dynamic", "scheduled", "converged"):
        settings = KillReviveConfig(warmup=1, interval=1, active_fraction=0.125, revive_interval=2, revive_margin=0.0,
                                    selection=selection, fraction_start=0.125, kill_threshold=1e9)
        bare = KillRevive(settings, _BLOCKS)
        bare.scores = {n: float(i) for i, n in enumerate(_BLOCKS)}
        bare.decide()
        assert len(bare.active) == 2 and _blocks_active(bare)["model.layers.0"] == 0, selection

        floored = KillRevive(KillReviveConfig(**{**settings.__dict__, "block_floor": 1}), _BLOCKS)
        floored.scores = {n: float(i) for i, n in enumerate(_BLOCKS)}
        floored.decide()
        counts = _blocks_active(floored)
        assert set(counts.values()) == {1}, (selection, counts)  # the floor keeps 4 > target 2
        # each block's survivor is its best-scoring adapter
        assert floored.active == {f"model.layers.{b}.mlp.down_proj" for b in range(4)}
        # a revive step where every killed adapter beats every active one: swaps stay within blocks
        assert floored.wants_killed_gradients()
        grads = {n: (10.0 if n not in floored.active else 1.0) for n in _BLOCKS}
        kill, revive = floored.decide(grads)
        assert revive and len(kill) == len(revive)
        assert set(_blocks_active(floored).values()) == {1}, selection
        assert {block_of(n) for n in kill} == {block_of(n) for n in revive}


@pytest.mark.parametrize("start,decay", [(1.0, 4), (0.5, 3), (1.0, 0)])
def test_scheduled_active_count_follows_the_linear_schedule(start, decay):
    """After the j-th kill step: round(n (f_end + (start - f_end) max(0, 1 - j / decay))), computed
    here independently, with no revivals (revive_interval past the run)."""
    n, f_end, warmup, interval = 32, 0.125, 3, 2
    modules = [f"model.layers.{i // 8}.m{i % 8}" for i in range(n)]
    settings = KillReviveConfig(warmup=warmup, interval=interval, active_fraction=f_end, revive_interval=10**6,
                                selection="scheduled", fraction_start=start, decay_intervals=decay)
    policy = KillRevive(settings, modules)
    policy.scores = {m: float(i) for i, m in enumerate(modules)}
    for step in range(1, 20):
        policy.decide()
        if step < warmup:
            assert len(policy.active) == n
            continue
        last_kill_step = step if (step % interval == 0 or step == warmup) else step - step % interval
        last_kill_step = max(last_kill_step, warmup)
        j = (last_kill_step - warmup) // interval
        fraction = f_end + (start - f_end) * (max(0.0, 1 - j / decay) if decay else 0.0)
        expected = max(1, round(fraction * n))
        assert len(policy.active) == expected, (step, len(policy.active), expected)
        assert scheduled_target(settings, n, last_kill_step) == expected
        # the survivors are the highest scores
        assert policy.active == set(modules[n - expected:])
    assert len(policy.active) == round(f_end * n)


def test_converged_kills_only_adapters_below_the_threshold():
    modules = [f"model.layers.{i // 4}.m{i % 4}" for i in range(16)]
    settings = KillReviveConfig(warmup=2, interval=2, active_fraction=0.125, revive_interval=10**6,
                                selection="converged", kill_threshold=0.01)
    policy = KillRevive(settings, modules)
    moving = {m: 0.05 for m in modules}                  # everyone still moving
    policy.scores = dict(moving)
    policy.decide()
    assert policy.decide() == ([], [])                   # kill step: nobody converged, nobody dies
    converged = {modules[3], modules[7], modules[8]}
    policy.scores.update({m: 0.001 for m in converged})  # three converge
    policy.scores[modules[0]] = 0.0099                   # just under
    policy.scores[modules[1]] = 0.0101                   # just over
    policy.decide()
    kill, _ = policy.decide()
    assert set(kill) == converged | {modules[0]}
    assert modules[1] in policy.active
    # when all converge the target still holds: never below active_fraction (2 of 16)
    policy.scores = {m: 1e-6 * i for i, m in enumerate(modules)}
    policy.decide()
    policy.decide()
    assert policy.active == set(modules[-2:])


def test_converged_relative_bound_is_a_share_of_the_median_score_when_warm_up_ended():
    """Measured at 720 steps (BENCHMARKS.md): every adapter's update score sat below 0.05 from the
    first kill on, so `converged` at an absolute 0.05 killed exactly what `dynamic` killed. With
    `kill_threshold_relative` the bound is a share of the median score at the end of warm-up, fixed
    from then on: the scores that follow shrink, the bound does not."""
    modules = [f"model.layers.{i // 4}.m{i % 4}" for i in range(16)]
    scores = {m: 0.02 + 0.002 * i for i, m in enumerate(modules)}   # 0.020..0.050, median 0.036
    absolute = KillRevive(KillReviveConfig(warmup=2, interval=2, active_fraction=0.125, revive_interval=10**6,
                                           selection="converged", kill_threshold=0.05), modules)
    dynamic = KillRevive(KillReviveConfig(warmup=2, interval=2, active_fraction=0.125, revive_interval=10**6), modules)
    relative = KillRevive(KillReviveConfig(warmup=2, interval=2, active_fraction=0.125, revive_interval=10**6,
                                           selection="converged", kill_threshold=0.75, kill_threshold_relative=True),
                          modules)
    for policy in (absolute, dynamic, relative):
        policy.scores = dict(scores)
        policy.decide()
        policy.decide()
    assert absolute.active == dynamic.active and len(dynamic.active) == 2  # the absolute bound binds nothing
    assert relative.reference_score == pytest.approx(0.036)
    bound = 0.75 * 0.036
    assert relative.events[-1]["kill_threshold"] == pytest.approx(bound)
    assert relative.killed == {m for m in modules if scores[m] < bound}     # 0.020..0.026: four
    assert len(relative.killed) == 4
    # the kill event records each killed adapter's own score, every one under the bound it recorded
    assert relative.events[-1]["killed_scores"] == {m: pytest.approx(scores[m]) for m in relative.killed}
    assert all(v < bound for v in relative.events[-1]["killed_scores"].values())
    assert set(dynamic.events[-1]["killed_scores"]) == set(modules) - dynamic.active
    # the survivors' scores shrink by a fifth: the reference stays, so more fall below the same bound
    relative.scores.update({m: scores[m] * 0.8 for m in relative.active})
    relative.decide()
    relative.decide()
    assert relative.reference_score == pytest.approx(0.036)
    assert relative.killed == set(modules[:7])                         # 0.8 * 0.032 < 0.027 < 0.8 * 0.034


def test_dynamic_kills_to_the_target_whatever_the_threshold():
    """The threshold is `converged`'s: dynamic (the golden run's policy) ignores it."""
    modules = [f"model.layers.0.m{i}" for i in range(8)]
    policy = KillRevive(KillReviveConfig(warmup=1, interval=1, active_fraction=0.25, kill_threshold=0.0), modules)
    policy.scores = {m: 1.0 for m in modules}
    policy.decide()
    assert len(policy.active) == 2


def test_new_settings_are_checked():
    from splitpeft.config import load_config

    with pytest.raises(ConfigError, match="fraction_start"):
        load_config(preset="tiny", overrides=["kill_revive.active_fraction=0.5", "kill_revive.fraction_start=0.25"])
    with pytest.raises(ConfigError, match="block_floor"):
        load_config(preset="tiny", overrides=["kill_revive.selection=static_score", "kill_revive.block_floor=1"])
    with pytest.raises(ConfigError, match="kill_threshold"):
        load_config(preset="tiny", overrides=["kill_revive.kill_threshold=-1"])
    with pytest.raises(ConfigError, match="kill_threshold_relative is a setting of selection=converged"):
        load_config(preset="tiny", overrides=["kill_revive.kill_threshold_relative=true"])
    with pytest.raises(ConfigError, match="decay_intervals"):
        load_config(preset="tiny", overrides=["kill_revive.decay_intervals=-1"])


def test_events_and_summary_measure_the_active_set_and_killed_gradients():
    """Every revive step is an event with the killed adapters' gradient ratios, even when nothing
    revives; the summary's counts, overlaps and shares match a hand count."""
    modules = [f"model.layers.0.m{i}" for i in range(4)]
    policy = KillRevive(KillReviveConfig(warmup=2, interval=100, active_fraction=0.5, revive_interval=2, revive_margin=0.5), modules)
    policy.scores = {m: float(i) for i, m in enumerate(modules)}
    policy.decide()
    policy.decide()                                        # step 2: cut to m2, m3
    assert policy.active == {modules[2], modules[3]}
    policy.decide()                                        # step 3: nothing
    policy.decide({modules[0]: 1.2, modules[1]: 0.5, modules[2]: 1.0, modules[3]: 4.0})  # step 4: m0 1.2 < 1.5
    policy.decide()
    policy.decide({modules[0]: 1.6, modules[1]: 0.5, modules[2]: 1.0, modules[3]: 4.0})  # step 6: m0 revives
    events = policy.events
    assert [e["step"] for e in events] == [2, 4, 6]
    assert events[1]["revived"] == [] and events[1]["killed_grad_ratio"] == {modules[0]: 1.2, modules[1]: 0.5}
    assert events[2]["revived"] == [modules[0]] and events[2]["killed"] == [modules[2]]
    assert events[2]["jaccard"] == pytest.approx(1 / 3) and events[1]["jaccard"] == 1.0
    summary = policy.summary()
    assert summary["kills"] == 1 and summary["revives"] == 1
    assert summary["swaps_per_check"] == pytest.approx(0.5)
    assert summary["jaccard_min"] == pytest.approx(1 / 3)
    assert summary["ever_active"] == 3                     # m1 never came back
    # entries from step 2 on (5 sets): m3 all 5, m2 4 of 5, m0 1 of 5
    assert summary["active_share"][modules[3]] == 1.0 and summary["active_share"][modules[2]] == pytest.approx(0.8)
    assert summary["active_share"][modules[0]] == pytest.approx(0.2) and summary["active_share"][modules[1]] == 0.0
    growth = summary["grad_ratio_by_age"]                  # m0, m1 killed at step 2: ages 2 and 4
    assert growth[2]["count"] == 2 and growth[2]["max"] == pytest.approx(1.2) and growth[2]["above_margin"] == 0.0
    assert growth[4]["above_margin"] == 0.5
    assert jaccard(set(), set()) == 1.0
    # the same from a report's form (names per step)
    same = kr_summary(modules, [a for _, a in policy.active_history], events, 2, 0.5)
    assert same["active_share"] == summary["active_share"]


@pytest.mark.parametrize("overrides", [
    ("kill_revive.selection=scheduled", "kill_revive.fraction_start=0.5", "kill_revive.decay_intervals=1"),
    ("kill_revive.selection=converged", "kill_revive.kill_threshold=1e6"),
    ("kill_revive.selection=dynamic", "kill_revive.block_floor=1"),
    ("kill_revive.selection=gradient",),
])
def test_new_selections_still_cut_dlora_traffic_and_adapter_flops(overrides):
    """Once the schedule / test has run its course the device runs the target's share of
    adapters (block_floor 1 on 4 blocks keeps 7 = the target here), so bytes and adapter FLOPs drop."""
    steps = 12
    _, full, full_trace = _traced_kr_run(False, steps, "kill_revive.revive_interval=1000")
    sim, kr, trace = _traced_kr_run(True, steps, "kill_revive.revive_interval=1000", *overrides)
    assert len(sim.devices[0].kill_revive.active) == round(0.25 * 28)
    assert kr.bytes_up < full.bytes_up and kr.bytes_down < full.bytes_down
    assert kr.adapter_flops < full.adapter_flops
    assert trace[-1]["adapter_flops"] < 0.5 * full_trace[-1]["adapter_flops"]
    late_up = sum(len(f) for f in trace[-1]["up"])
    assert late_up < 0.6 * full.step_bytes_up[-1]
    _check_step_traffic(sim, kr, trace)


def test_the_first_update_from_b_zero_scores_exactly_one_so_ties_break_by_model_order():
    """Bug: from B = 0 the relative update ||B1 A1 - 0|| / ||B1 A1|| is 1, but computed through
    the Gram matrices it was 1 up to rounding, so the first kill ranked every adapter by float
    noise and another CPU's kernels killed other adapters (the golden dlora_kr run drifted)."""
    from splitpeft.config import KillReviveConfig
    from splitpeft.model.adapters import LoraWeights
    from splitpeft.parties.killrevive import KillRevive

    generator = torch.Generator().manual_seed(3)
    names = [f"model.layers.{j}.mlp.{m}" for j in range(4) for m in ("up_proj", "down_proj", "gate_proj")]
    before, after = {}, {}
    for i, name in enumerate(names):
        r, d_in, d_out = 2 + i % 3, 16 + 8 * i, 24 + 4 * i
        a = torch.randn(r, d_in, generator=generator)
        before[name] = LoraWeights(a, torch.zeros(d_out, r))
        after[name] = LoraWeights(a + 0.01 * torch.randn(r, d_in, generator=generator), 1e-3 * torch.randn(d_out, r, generator=generator))
    policy = KillRevive(KillReviveConfig(enabled=True, warmup=1, interval=1, active_fraction=0.25), names)
    policy.observe(before, after)
    assert all(policy.scores[n] == 1.0 for n in names)
    kill, _ = policy.decide()
    assert kill == sorted(names)[:len(names) - 3]  # 3 of 12 stay: the last three in name order


def test_gradient_kills_the_lowest_gradient_ema_not_the_lowest_update_score():
    """`gradient` ranks kills by the EMA of each active adapter's gradient norm (what revival
    compares), whatever the update scores say; `dynamic` on the same state kills by update score."""
    modules = [f"model.layers.{i // 4}.m{i % 4}" for i in range(8)]
    settings = KillReviveConfig(warmup=2, interval=2, active_fraction=0.25, revive_interval=10**6, ema=0.5,
                                selection="gradient")
    policy = KillRevive(settings, modules)
    assert policy.wants_active_gradients()
    policy.scores = {m: float(i) for i, m in enumerate(modules)}       # update scores: m0 lowest
    first = {m: float(8 - i) for i, m in enumerate(modules)}           # gradients: m7 lowest
    second = {**first, modules[7]: 100.0}                              # m7's gradient jumps
    policy.observe_gradients(first)
    policy.decide()
    policy.observe_gradients(second)
    assert policy.grad_scores[modules[7]] == 0.5 * 1.0 + 0.5 * 100.0  # EMA with ema = 0.5
    kill, _ = policy.decide()                                          # kill step: 6 of 8 go
    assert policy.active == {modules[0], modules[7]}                  # the two largest gradient EMAs stay
    assert sorted(kill) == sorted(set(modules) - {modules[0], modules[7]})
    dynamic = KillRevive(KillReviveConfig(warmup=2, interval=2, active_fraction=0.25, revive_interval=10**6), modules)
    dynamic.scores = dict(policy.scores)
    dynamic.decide()
    dynamic.decide()
    assert dynamic.active == {modules[6], modules[7]}                 # by update score instead
    assert not dynamic.wants_active_gradients()


@pytest.mark.parametrize("lie", ["unknown_name", "short_tensor"])
def test_a_step_done_with_norms_the_device_did_not_ask_for_is_refused(lie):
    """A server's STEP_DONE that names adapters this device has not killed, or carries fewer norms than
    names, is a MessageError naming the problem, not norms taken on trust."""
    from splitpeft.dlora.remote import KILLED_NORMS_TENSOR
    from splitpeft.transport.messages import Message, MessageError, Meta

    sim, _ = _kr_run("dlora", True)
    device = sim.devices[0]
    channel = sim.channels[device.device_id]
    device.load(sim.state.global_adapters)
    device.open_session(channel)
    killed = sorted(device.modules)[0]
    sim.placement.apply_kill_revive(device, channel, [killed], [])
    device.measure_killed = True
    exchange = channel.exchange

    def lying(message: Message) -> Message:
        reply = exchange(message)
        if reply.kind == Kind.STEP_DONE:
            assert reply.meta[Meta.KILLED_GRAD_NORMS] == [killed]  # the honest reply names the killed one
            if lie == "unknown_name":
                return Message(Kind.STEP_DONE, reply.tensors, meta={Meta.KILLED_GRAD_NORMS: [sorted(device.modules)[1]]})
            return Message(Kind.STEP_DONE, {KILLED_NORMS_TENSOR: torch.zeros(0)}, meta=reply.meta)
        return reply

    channel.exchange = lying
    expected = "has not killed" if lie == "unknown_name" else "shape"
    with pytest.raises(MessageError, match=expected):
        sim.placement.device_step(device, device.data.next(), channel)
    assert device.grad_norms == {}


def test_upload_killed_counts_a_frozen_adapter_in_the_mean_at_its_frozen_value():
    """Measured at 720 steps: the published rule's held-out drift sat in modules that one device
    alone kept training, whose mean was that device's copy. With `upload_killed` a device that
    keeps a module killed uploads it unchanged (the round's start), so the module's FedAvg is
    p0 * trained + p1 * start; without it, the one trained copy."""
    killed_module = "model.layers.0.self_attn.q_proj"
    runs = {}
    for upload in (False, True):
        sim = Simulation(tiny_config(
            "tiny-llama", "placement.placement=dlora", "federation.num_devices=2", "federation.local_steps=3",
            "kill_revive.enabled=true", "kill_revive.warmup=1000", f"kill_revive.upload_killed={str(upload).lower()}",
            "federation.batch_size=2", "data.max_length=40"))
        start = sim.state.start_state("device-1", sim.devices[1].ranks)[killed_module]
        sim.devices[1].killed = {killed_module}  # device 1 keeps it killed all round (the warm-up never ends)
        sim.devices[1].kill_revive.active.discard(killed_module)
        record = sim.run_round()
        uploaded = {d: record.devices[d].bytes_up for d in record.devices}
        runs[upload] = (sim.state.global_adapters[killed_module], start, record, uploaded)
    alone, start, _, bytes_without = runs[False]
    mixed, start_again, record_with, bytes_with = runs[True]
    torch.testing.assert_close(start, start_again)
    tokens = [record_with.devices[d].tokens for d in ("device-0", "device-1")]
    p0, p1 = tokens[0] / sum(tokens), tokens[1] / sum(tokens)
    torch.testing.assert_close(mixed.A, p0 * alone.A + p1 * start.A, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mixed.B, p0 * alone.B + p1 * start.B, rtol=1e-5, atol=1e-7)
    # killed since before the round and still as given: it travels as its name, the server has its value
    assert 0 < bytes_with["device-1"] - bytes_without["device-1"] < 200 and bytes_with["device-0"] == bytes_without["device-0"]


def _kr_uploads(names: bool = True) -> tuple[Simulation, list[dict[str, Message]]]:
    """Two dlora rounds with Kill and Revive killing from step 2 and `upload_killed`; each round's
    upload messages. `names=False`: the devices forget their round's start, so every killed
    adapter travels as tensors."""
    sim = Simulation(tiny_config(
        "tiny-llama", "placement.placement=dlora", "federation.num_devices=2", "federation.local_steps=4",
        "kill_revive.enabled=true", "kill_revive.warmup=2", "kill_revive.interval=1", "kill_revive.active_fraction=0.25",
        "kill_revive.upload_killed=true", "federation.batch_size=2", "data.max_length=40"))
    rounds: list[dict[str, Message]] = []
    for device in sim.devices:
        def load(adapters, device=device, load=device.load):
            load(adapters)
            if not names:
                device.round_start = {}

        def upload(device=device, upload=device.upload_message):
            message = upload()
            rounds[-1][device.device_id] = message
            return message
        device.load, device.upload_message = load, upload
    for _ in range(2):
        rounds.append({})
        sim.run_round()
    return sim, rounds


def test_upload_killed_names_adapters_killed_before_the_round_and_the_server_counts_what_it_gave():
    """An adapter killed before the round began and still as loaded travels as its name
    (`Meta.UNCHANGED`), and the server counts it at the value it gave that device: the very same
    aggregate as sending it, fewer bytes up. One killed during the round travels as tensors."""
    named_sim, named = _kr_uploads()
    sent_sim, sent = _kr_uploads(names=False)
    assert all(Meta.UNCHANGED not in m.meta for m in named[0].values())  # round 1 began with none killed
    for device_id, message in named[1].items():
        unchanged = message.meta[Meta.UNCHANGED]
        assert unchanged and not {f"{n}.A" for n in unchanged} & set(message.tensors)
        assert Meta.UNCHANGED not in sent[1][device_id].meta
        assert {f"{n}.A" for n in unchanged} <= set(sent[1][device_id].tensors)
        # killed during round 1, before round 2 began: the first upload sent them
        assert {f"{n}.A" for n in unchanged} <= set(named[0][device_id].tensors)
        assert len(encode(message)) < len(encode(sent[1][device_id])) - len(unchanged) * 100
    for name, weights in sent_sim.state.global_adapters.items():
        assert torch.equal(named_sim.state.global_adapters[name].A, weights.A)
        assert torch.equal(named_sim.state.global_adapters[name].B, weights.B)
    rounds = named_sim.rounds[1].devices, sent_sim.rounds[1].devices
    assert all(rounds[0][d].adapter_bytes_up < rounds[1][d].adapter_bytes_up for d in rounds[0])


def test_an_upload_naming_what_the_round_did_not_give_drops_its_device_alone():
    sim = Simulation(tiny_config(
        "tiny-llama", "placement.placement=dlora", "federation.num_devices=2", "federation.min_devices=1",
        "federation.batch_size=2", "data.max_length=40", "federation.local_steps=2"))
    device = sim.devices[1]
    given = sim.download_message(device)
    module = sorted(device.ranks)[0]
    tensors = {k: v for k, v in given.tensors.items() if not k.startswith(f"{module}.")}
    named = sim.uploaded("device-1", Message(Kind.ADAPTERS, tensors, meta={Meta.UNCHANGED: [module]}))
    assert torch.equal(named[module].A, given.tensors[f"{module}.A"]) and len(named) == len(device.ranks)
    for meta, error in [({Meta.UNCHANGED: ["model.layers.99.mlp.up_proj"]}, "did not give it"),
                        ({Meta.UNCHANGED: [module, module]}, "more than once"),
                        ({Meta.UNCHANGED: module}, "list of module names"),
                        ({Meta.UNCHANGED: [3]}, "list of module names")]:
        with pytest.raises(MessageError, match=error):
            sim.uploaded("device-1", Message(Kind.ADAPTERS, tensors, meta=meta))
    with pytest.raises(MessageError, match="sends it as well"):
        sim.uploaded("device-1", Message(Kind.ADAPTERS, given.tensors, meta={Meta.UNCHANGED: [module]}))
    with pytest.raises(MessageError, match="did not give it"):  # device-0 was not given anything yet
        sim.uploaded("device-0", Message(Kind.ADAPTERS, {}, meta={Meta.UNCHANGED: [module]}))
    sim.state.given.clear()

    def lying(upload=device.upload_message):
        message = upload()
        return Message(message.kind, message.tensors, meta={**message.meta, Meta.UNCHANGED: ["model.layers.99.mlp.up_proj"]})
    device.upload_message = lying
    record = sim.run_round()
    assert [entry["device"] for entry in record.dropped] == ["device-1"] and "did not give it" in record.dropped[0]["error"]
    assert record.completed == ["device-0"]
