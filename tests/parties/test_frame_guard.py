"""Finding 1 of issue 21: one frame may not poison a server session, a round or a checkpoint.

Bug: a plain-split activation frame of finite values +-3e38 (or, U-shaped, a finite head gradient
of +-3e38) passed the frame checks, left NaN in the session's AdamW moments, got its device dropped
again in every later round although it then sent honest data, and made the federation's
checkpoint unresumable ("tensor session/device-0/0/exp_avg is not finite floating point").
"""

import pytest
import torch
from conftest import tiny_config

from splitpeft.federation.checkpoint import load_checkpoint, save_checkpoint
from splitpeft.federation.simulation import Simulation
from splitpeft.model.guards import MAX_GRAD_ABS, gradient_problem
from splitpeft.transport.messages import Kind, Message, Meta

HUGE = 3e38  # finite in fp32


def _sim(*overrides: str) -> Simulation:
    return Simulation(tiny_config("tiny-llama", "federation.num_devices=2", "federation.local_steps=2",
                                  "data.max_length=48", *overrides))


def _poison_first_frame(sim: Simulation, device_id: str, kind: Kind, name: str) -> list[Message]:
    """`device_id` replaces the first `kind` frame it sends by +-HUGE of the same shape; returns the replies it got."""
    channel = sim.channels[device_id]
    exchange = channel.exchange
    replies: list[Message] = []
    done = []

    def attack(message: Message) -> Message:
        if message.kind == kind and not done:
            done.append(True)
            honest = message.tensors[name]
            signs = torch.where(torch.rand(honest.shape) < 0.5, -1.0, 1.0).to(honest.dtype)
            message = Message(kind, {**message.tensors, name: signs * HUGE}, meta=message.meta)
            reply = exchange(message)
            replies.append(reply)
            return reply
        return exchange(message)

    channel.exchange = attack
    return replies


def _session_state_finite(sim: Simulation) -> bool:
    return all(session.nonfinite() is None for session in sim.server.sessions.values())


CASES = {
    "plain_split_activations": (["placement.labels_on_device=false"], Kind.ACTIVATIONS, "hidden"),
    "u_shaped_head_gradient": (["placement.labels_on_device=true"], Kind.HEAD_GRADIENT, "grad"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_issue21_finding1_a_huge_finite_frame_is_refused_before_compute_and_the_device_trains_next_round(case, tmp_path):
    """Issue 21 finding 1: a finite +-3e38 frame is refused by the server's norm bound before any
    compute, naming the bound; the session's state stays finite, the device is dropped for that
    round only, trains in the next, and the checkpoint saves and resumes."""
    overrides, kind, name = CASES[case]
    sim = _sim(*overrides)
    replies = _poison_first_frame(sim, "device-0", kind, name)
    first = sim.run_round()
    assert replies and replies[0].kind == Kind.ERROR
    assert "exceeds the server's bound" in replies[0].meta[Meta.ERROR]
    assert "robust.frame_norm_factor" in replies[0].meta[Meta.ERROR]
    assert [entry["device"] for entry in first.dropped] == ["device-0"]
    assert any("exceeds the server's bound" in line for line in first.rejected)
    assert _session_state_finite(sim)
    second = sim.run_round()  # device-0 is honest now
    assert second.dropped == [] and set(second.devices) == {"device-0", "device-1"}
    save_checkpoint(sim, tmp_path / "ckpt")
    assert load_checkpoint(_sim(*overrides), tmp_path / "ckpt") == 2


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_issue21_finding1_without_the_bound_the_step_guard_rolls_the_step_back(case):
    """Issue 21 finding 1, second line of defence: with robust.frame_norm_factor=0 the frame
    reaches the step, whose gradients are not finite; the step is not taken (adapters and AdamW
    moments exactly as before it), the device is told why, and the session trains on."""
    overrides, kind, name = CASES[case]
    sim = _sim(*overrides, "robust.frame_norm_factor=0")
    sim.run_round()  # every session has AdamW moments now
    session = sim.server.sessions["device-0"]
    replies = _poison_first_frame(sim, "device-0", kind, name)
    snapshots = []
    original_open = sim.server._open

    def open_and_snapshot(device_id, message):
        reply = original_open(device_id, message)
        if device_id == "device-0":
            snapshots.append({n: p.detach().clone() for n, p in session.model.named_parameters() if p.requires_grad}
                             | {f"{i}.{k}": v.clone() for i, s in enumerate(session.optimizer.state.values())
                                for k, v in s.items()})
        return reply

    sim.server._open = open_and_snapshot
    sim.run_round()
    assert replies[0].kind == Kind.ERROR and "server step rolled back" in replies[0].meta[Meta.ERROR]
    after = {n: p.detach() for n, p in session.model.named_parameters() if p.requires_grad} | {
        f"{i}.{k}": v for i, s in enumerate(session.optimizer.state.values()) for k, v in s.items()}
    for key, before in snapshots[0].items():
        assert torch.equal(before, after[key]), key
    assert _session_state_finite(sim)
    third = sim.run_round()
    assert third.dropped == []


def test_issue21_finding1_a_session_gone_bad_is_reset_from_the_global_state_not_banned(tmp_path):
    """Issue 21 finding 1, last net: a session whose moments are non-finite anyway (whatever put
    them there) is reset, not kept and not banned: at its next opening (it trains that round) and at
    a round's end (before any checkpoint), listed in the round's `repaired`; the checkpoint then
    holds finite state and resumes."""
    sim = _sim("placement.labels_on_device=true")
    sim.run_round()
    session = sim.server.sessions["device-1"]

    def poison():
        next(iter(session.optimizer.state.values()))["exp_avg"].fill_(float("nan"))

    poison()
    record = sim.run_round()
    assert record.dropped == [] and set(record.devices) == {"device-0", "device-1"}
    assert [line.split(":")[0] for line in record.repaired] == ["server/device-1"]
    assert _session_state_finite(sim)
    poison()
    sim.repair_parties(record)  # as at the end of a round
    assert [line.split(":")[0] for line in record.repaired] == ["server/device-1"]
    assert _session_state_finite(sim)
    save_checkpoint(sim, tmp_path / "ckpt")
    assert load_checkpoint(_sim("placement.labels_on_device=true"), tmp_path / "ckpt") == 2


def test_issue21_finding1_gradient_problem_names_the_parameter():
    """Issue 21 finding 1: the step guard's check names a non-finite or overflowing gradient."""
    good, nan, huge = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    good.grad = torch.ones(3)
    nan.grad = torch.tensor([0.0, float("nan"), 1.0])
    huge.grad = torch.full((3,), MAX_GRAD_ABS * 2)
    assert gradient_problem([("good", good)]) is None
    assert gradient_problem([("good", good), ("bad", nan)]) == "the gradient of bad contains NaN or Inf"
    assert "the gradient of big reaches" in gradient_problem([("big", huge)])


def test_issue21_finding1_a_checkpoint_is_never_written_with_non_finite_state(tmp_path):
    """Issue 21 finding 1: save_checkpoint refuses non-finite state, naming the tensor, and leaves
    the last checkpoint as it was (the round end repairs parties first, so a run never meets this)."""
    from splitpeft.federation.checkpoint import CheckpointError, verify_checkpoint

    sim = _sim("placement.labels_on_device=true")
    sim.run_round()
    save_checkpoint(sim, tmp_path / "ckpt")
    next(iter(sim.server.sessions["device-0"].optimizer.state.values()))["exp_avg"].fill_(float("inf"))
    with pytest.raises(CheckpointError, match="session/device-0/.* is not finite"):
        save_checkpoint(sim, tmp_path / "ckpt")
    assert verify_checkpoint(tmp_path / "ckpt", sim.config) == 1
