"""Checkpoint after a round, resume in a fresh process-like Simulation: same result as no stop."""

import json

import pytest
import torch
from conftest import tiny_config

from splitpeft.federation.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from splitpeft.federation.simulation import Simulation

CASES = {
    "split-fedavg": ["federation.num_devices=2"],
    "noise_free": ["federation.num_devices=2", "federation.aggregator=noise_free"],
    "noise_free-warm": ["federation.num_devices=2", "federation.aggregator=noise_free", "federation.noise_free_start=warm"],
    "noise_free-warm-keep": ["federation.num_devices=3", "federation.devices_per_round=2", "federation.aggregator=noise_free",
                             "federation.noise_free_start=warm", "federation.noise_free_moments=keep"],
    "noise_free-own_a-keep": ["federation.num_devices=2", "federation.aggregator=noise_free", "federation.noise_free_start=warm",
                              "federation.noise_free_factors=own_a", "federation.noise_free_moments=keep"],
    # devices at two ranks (HetLoRA's planner on budgets of 0.95 and 1.4 MB)
    "zero_pad-mixed-ranks": ["federation.num_devices=2", "hsplit.planner=budget_rank", "federation.aggregator=zero_pad",
                             "fleet.memory_bytes=[950000,1400000]"],
    "noise_free-mean_a-low_rank-mixed-ranks": ["federation.num_devices=2", "hsplit.planner=budget_rank",
                                               "federation.aggregator=noise_free", "federation.noise_free_start=warm",
                                               "federation.noise_free_factors=mean_a", "federation.noise_free_moments=keep",
                                               "federation.noise_free_frozen=low_rank", "fleet.memory_bytes=[950000,1400000]"],
    "sampled": ["federation.num_devices=3", "federation.devices_per_round=2"],
    "dlora-kr": ["federation.num_devices=2", "placement.placement=dlora", "kill_revive.enabled=true",
                 "kill_revive.warmup=2", "kill_revive.interval=2", "kill_revive.revive_interval=3",
                 "kill_revive.active_fraction=0.25"],
    "dlora-kr-server-trains": ["federation.num_devices=2", "placement.placement=dlora", "kill_revive.enabled=true",
                               "kill_revive.warmup=2", "kill_revive.interval=2", "kill_revive.revive_interval=3",
                               "kill_revive.active_fraction=0.25", "kill_revive.server_trains_killed=true"],
    "dlora-kr-gradient": ["federation.num_devices=2", "placement.placement=dlora", "kill_revive.enabled=true",
                          "kill_revive.warmup=2", "kill_revive.interval=2", "kill_revive.revive_interval=3",
                          "kill_revive.active_fraction=0.25", "kill_revive.selection=gradient"],
    # the bound is a share of the median score when warm-up ended: a resume must keep that reference
    "dlora-kr-converged-relative": ["federation.num_devices=2", "placement.placement=dlora", "kill_revive.enabled=true",
                                    "kill_revive.warmup=2", "kill_revive.interval=2", "kill_revive.revive_interval=3",
                                    "kill_revive.active_fraction=0.25", "kill_revive.selection=converged",
                                    "kill_revive.kill_threshold_relative=true", "kill_revive.kill_threshold=1.0"],
}


def _same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name].A, b[name].A, rtol=1e-5, atol=atol)
        torch.testing.assert_close(a[name].B, b[name].B, rtol=1e-5, atol=atol)


def _straight_and_saved(tmp_path, overrides):
    """An uninterrupted 3-round run of `overrides`, and a 2-round one saved to tmp_path / "ckpt"."""
    straight = Simulation(tiny_config("tiny-llama", *overrides))
    for _ in range(3):
        straight.run_round()
    first = Simulation(tiny_config("tiny-llama", *overrides))
    first.run_round()
    first.run_round()
    save_checkpoint(first, tmp_path / "ckpt")
    return straight, first


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_equals_an_uninterrupted_run(tmp_path, case):
    overrides = [*CASES[case], "federation.local_steps=3", "data.max_length=48"]
    straight, first = _straight_and_saved(tmp_path, overrides)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        saved_logits = first.global_model()(ids).logits
    del first

    resumed = Simulation(tiny_config("tiny-llama", *overrides))
    assert load_checkpoint(resumed, tmp_path / "ckpt") == 2
    with torch.no_grad():  # the global model as saved, before any further round
        torch.testing.assert_close(resumed.global_model()(ids).logits, saved_logits, rtol=1e-4, atol=1e-5)
    resumed.run_round()
    assert len(resumed.rounds) == 3
    _same(straight.state.global_adapters, resumed.state.global_adapters)
    # A resumed run merges the summed deltas at once, (W + (D1 + D2)) against ((W + D1) + D2): fp32
    # rounding apart. Warm adapters are singular vectors of the aggregate, which turn with such
    # rounding where singular values lie close; the model (losses, logits below) stays as tight.
    atol = 1e-5 if "warm" in case else 1e-6
    for holder in straight.state.holder_state:
        _same(straight.state.holder_state[holder], resumed.state.holder_state[holder], atol=atol)
    assert straight.rounds[-1].devices["device-0"].losses == pytest.approx(resumed.rounds[-1].devices["device-0"].losses, rel=1e-5)
    for device, other in zip(straight.devices, resumed.devices):
        assert device.killed == other.killed
    with torch.no_grad():  # the global model too (under a warm start: the merged weights alone)
        torch.testing.assert_close(straight.global_model()(ids).logits, resumed.global_model()(ids).logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if c.endswith("mixed-ranks")])
def test_mixed_rank_cases_hold_mixed_ranks_and_strided_adapters(case):
    """Bug: a checkpoint of a fleet at mixed ranks could not be written (zero-padding's aggregate
    gave the lower-rank holder a B with strides (1, d_out), which safetensors refuses: the 12-round
    HetLoRA run of the unequal-rank fleet stopped at its first save). The cases above resume such
    fleets; this checks they are what they say."""
    sim = Simulation(tiny_config("tiny-llama", *CASES[case], "federation.local_steps=1", "data.max_length=48"))
    assert len({rank for device in sim.devices for rank in device.ranks.values()}) == 2
    sim.run_round()
    if case.startswith("zero_pad"):
        assert any(not w.B.is_contiguous() for state in sim.state.holder_state.values() for w in state.values())


def test_incomplete_or_foreign_checkpoints_are_refused(tmp_path):
    sim = Simulation(tiny_config("tiny-llama", "federation.num_devices=1", "federation.local_steps=1"))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_checkpoint(sim, tmp_path / "missing")
    sim.run_round()
    save_checkpoint(sim, tmp_path / "ckpt")
    other = Simulation(tiny_config("tiny-gpt2", "federation.num_devices=1", "federation.local_steps=1"))
    with pytest.raises(CheckpointError, match="tiny-llama"):
        load_checkpoint(other, tmp_path / "ckpt")


# ------------------------------------------------------------------ verification (issue 12, finding 8)

SMALL = ["federation.num_devices=2", "federation.local_steps=1", "data.max_length=48"]


def _saved_after_one_round(tmp_path_factory, overrides):
    """A checkpoint after one round of a run of `overrides`, and a fresh Simulation of the same config."""
    folder = tmp_path_factory.mktemp("saved") / "ckpt"
    sim = Simulation(tiny_config("tiny-llama", *overrides))
    sim.run_round()
    save_checkpoint(sim, folder)
    return folder, Simulation(tiny_config("tiny-llama", *overrides))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint after one round of a small run, and a fresh Simulation of the same config."""
    return _saved_after_one_round(tmp_path_factory, SMALL)


def _copy(saved, tmp_path):
    import shutil

    return shutil.copytree(saved[0], tmp_path / "ckpt")


def _rehash(path):
    """Make the manifest describe the files as they are now: a checkpoint edited by hand, or by
    a bug, that no hash check can catch."""
    import hashlib
    import json

    manifest_file = path / "manifest.json"
    if not manifest_file.exists():  # a checkpoint written before manifests
        return
    manifest = json.loads(manifest_file.read_text())
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest_file.write_text(json.dumps(manifest))


def _flip_bytes(path):
    data = bytearray((path / "tensors.safetensors").read_bytes())
    for offset in range(len(data) - 40, len(data) - 36):  # in the tensor data, not the header
        data[offset] ^= 0xFF
    (path / "tensors.safetensors").write_bytes(bytes(data))


def _truncate(path):
    data = (path / "tensors.safetensors").read_bytes()
    (path / "tensors.safetensors").write_bytes(data[: len(data) // 2])


def _edit_state(path):
    state = (path / "state.json").read_text()
    (path / "state.json").write_text(state.replace('"rounds_done": 1', '"rounds_done": 0'))


CORRUPTIONS = {
    "flipped tensor bytes": (_flip_bytes, "tensors.safetensors does not match the SHA-256"),
    "truncated tensors": (_truncate, "(truncated or extended)"),
    "edited state": (_edit_state, "state.json does not match the SHA-256"),
    "no tensors": (lambda p: (p / "tensors.safetensors").unlink(), "tensors.safetensors is missing"),
    "no manifest": (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    "garbled manifest": (lambda p: (p / "manifest.json").write_text('{"format": "splitpeft-st'), "is not JSON"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_a_corrupted_or_truncated_checkpoint_is_refused_with_one_line(saved, tmp_path, case):
    """Bug (issue 12, finding 8): nothing checked a checkpoint's files; 4 flipped data bytes
    resumed with a different adapter, a truncated file gave a traceback. Now the manifest's
    sizes and SHA-256 refuse either with one line naming the file."""
    corrupt, message = CORRUPTIONS[case]
    path = _copy(saved, tmp_path)
    corrupt(path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(saved[1], path)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def _state_edit(edit):
    def apply(path):
        import json

        state = json.loads((path / "state.json").read_text())
        edit(state)
        (path / "state.json").write_text(json.dumps(state))
    return apply


def _tensor_edit(edit):
    def apply(path):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path / "tensors.safetensors"))
        edit(tensors)
        save_file(tensors, str(path / "tensors.safetensors"))
    return apply


def _first(tensors, prefix):
    return next(key for key in sorted(tensors) if key.startswith(prefix))


MALFORMED = {
    "no devices": (_state_edit(lambda s: s.update(devices={})), "devices are [], this run has ['device-0', 'device-1']"),
    "rounds_done -1": (_state_edit(lambda s: s.update(rounds_done=-1)), "rounds_done is -1, not an integer in 0..2"),
    "rounds_done past the run": (_state_edit(lambda s: s.update(rounds_done=7)), "rounds_done is 7"),
    "rounds_done disagrees with the rounds": (_state_edit(lambda s: s.update(rounds_done=2)), "records 1 rounds"),
    "negative stream epoch": (_state_edit(lambda s: s["devices"]["device-0"].update(stream=[-1, 0])), "stream epoch is -1"),
    "unknown module": (_state_edit(lambda s: s["devices"]["device-0"]["ranks"].update({"no.such.module": 4})),
                       "names modules the model does not adapt"),
    "rank out of range": (_state_edit(lambda s: s["devices"]["device-0"]["ranks"].update(
        {next(iter(s["devices"]["device-0"]["ranks"])): 100000000})), "not an integer in 0..16"),
    "negative optimiser steps": (_state_edit(lambda s: s["devices"]["device-0"]["optimizer_steps"].update({"0": -3.0})),
                                 "not a finite number >= 0"),
    "NaN in an adapter": (_tensor_edit(lambda t: t[_first(t, "global/")].fill_(float("nan"))), "is not finite"),
    "adapter of the wrong width": (_tensor_edit(lambda t: t.update({_first(t, "global/"): t[_first(t, "global/")][:, :3].contiguous()})),
                                   "expected (r, "),
    "moment of the wrong shape": (_tensor_edit(lambda t: t.update({_first(t, "opt/"): t[_first(t, "opt/")][:1].contiguous()})),
                                  "has shape"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_checkpoint_is_refused_with_one_line(saved, tmp_path, case):
    """Bug (issue 12, finding 8): `devices={}` gave a traceback and `rounds_done=-1` trained 6
    rounds of a 3-round run. Now every field is range-checked against the run, even in a
    checkpoint whose manifest matches its files (edited by hand, or written by a bug)."""
    edit, message = MALFORMED[case]
    path = _copy(saved, tmp_path)
    edit(path)
    _rehash(path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(saved[1], path)
    assert message in str(refused.value) and "\n" not in str(refused.value)


KILLED_TRAINING = ["federation.num_devices=2", "federation.local_steps=4", "data.max_length=48",
                   "placement.placement=dlora", "kill_revive.enabled=true", "kill_revive.warmup=2",
                   "kill_revive.interval=2", "kill_revive.active_fraction=0.25", "kill_revive.server_trains_killed=true"]


@pytest.fixture(scope="module")
def saved_killed_training(tmp_path_factory):
    """A checkpoint after one round of a dlora run whose server trains the killed adapters."""
    return _saved_after_one_round(tmp_path_factory, KILLED_TRAINING)


def _killed_moments(state):
    return state["sessions"]["device-0"]["killed_moments"]


MALFORMED_KILLED = {
    "killed moment of the wrong shape": (
        _tensor_edit(lambda t: t.update({_first(t, "killed/"): t[_first(t, "killed/")][:1].contiguous()})), "the adapter's"),
    "NaN killed moment": (_tensor_edit(lambda t: t[_first(t, "killed/")].fill_(float("nan"))), "is not finite"),
    "killed moment of an unknown module": (
        _state_edit(lambda s: _killed_moments(s).update({"no.such.module": [1.0, 1.0]})), "does not hold"),
    "killed moment past the run's steps": (
        _state_edit(lambda s: _killed_moments(s).update({next(iter(_killed_moments(s))): [1.0, 1e9]})), "more than 4"),
    "killed moment tensor missing": (_tensor_edit(lambda t: t.pop(_first(t, "killed/"))), "it lacks killed/"),
}


def _kr_state(state):
    return state["devices"]["device-0"]["kill_revive"]


def test_kill_and_revive_reference_score_is_checked_and_may_be_absent(saved_killed_training, tmp_path):
    """`reference_score` (converged's relative bound) is range-checked; a checkpoint written before
    it was saved (no key) still resumes, the reference then taken at the next decision."""
    folder, sim = saved_killed_training
    assert isinstance(_kr_state(json.loads((folder / "state.json").read_text()))["reference_score"], float)
    bad = _copy(saved_killed_training, tmp_path / "bad")
    _state_edit(lambda s: _kr_state(s).update(reference_score=-1.0))(bad)
    _rehash(bad)
    with pytest.raises(CheckpointError, match="kill_revive.reference_score is -1.0, not a finite number >= 0"):
        load_checkpoint(sim, bad)
    older = _copy(saved_killed_training, tmp_path / "older")
    _state_edit(lambda s: _kr_state(s).pop("reference_score"))(older)
    _rehash(older)
    fresh = Simulation(tiny_config("tiny-llama", *KILLED_TRAINING))
    assert load_checkpoint(fresh, older) == 1
    assert fresh.devices[0].kill_revive.reference_score is None


@pytest.mark.parametrize("case", sorted(MALFORMED_KILLED))
def test_a_malformed_killed_moment_is_refused_with_one_line(saved_killed_training, tmp_path, case):
    """The moments of the killed adapters a dlora server trains are checked like every other tensor
    of a checkpoint: shape against the device's adapter, finiteness, module names, step counts."""
    folder, sim = saved_killed_training
    state = json.loads((folder / "state.json").read_text())
    assert _killed_moments(state)  # the round killed adapters and the server trained them
    edit, message = MALFORMED_KILLED[case]
    path = _copy(saved_killed_training, tmp_path)
    edit(path)
    _rehash(path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(sim, path)
    assert message in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.parametrize("override,message", [
    ("placement.placement=dlora", "placement.placement is 'split' there, 'dlora' here"),
    ("federation.num_devices=3", "federation.num_devices is 2 there, 3 here"),
    ("federation.aggregator=noise_free", "federation.aggregator is 'fedavg' there, 'noise_free' here"),
])
def test_a_checkpoint_of_another_run_is_refused_with_one_line(saved, override, message):
    """Bug (issue 12, finding 8): a `split` checkpoint resumed under `dlora` without complaint, a
    changed `num_devices` gave a traceback. The manifest's run identity must match."""
    other = Simulation(tiny_config("tiny-llama", *SMALL, override))
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(other, saved[0])
    assert message in str(refused.value) and "\n" not in str(refused.value)


def _without_identity_key(folder, key):
    """The checkpoint as a splitpeft before option `key` existed wrote it: its identity lacks the key."""
    import json

    manifest_file = folder / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["identity"][key]
    manifest_file.write_text(json.dumps(manifest))


def test_a_checkpoint_from_before_an_option_existed_resumes_at_its_default(saved, tmp_path):
    """Bug (thirteenth session): `federation.noise_free_frozen` was added with a default that keeps
    the earlier behaviour, yet every kept state of a longer run was refused ('<absent>' there, 'copy'
    here). An absent key counts as its default, as `compare --reuse` counts a stored report's; a run
    that sets the option to another value is still refused."""
    folder = _copy(saved, tmp_path)
    _without_identity_key(folder, "federation.noise_free_frozen")
    assert load_checkpoint(Simulation(tiny_config("tiny-llama", *SMALL)), folder) == 1
    other = Simulation(tiny_config("tiny-llama", *SMALL, "federation.aggregator=noise_free",
                                   "federation.noise_free_start=warm", "federation.noise_free_frozen=low_rank"))
    with pytest.raises(CheckpointError, match="federation.noise_free_frozen is 'copy' there, 'low_rank' here"):
        load_checkpoint(other, folder)


def test_cli_resume_refuses_a_corrupted_or_foreign_checkpoint_before_training(tmp_path, capsys, monkeypatch):
    """Through the CLI: exit status 2, one line on stderr, no run folder, no training."""
    from splitpeft.cli import main
    from splitpeft.experiment import run

    args = ["simulate", "--preset", "tiny", "--no-progress", "federation.rounds=2", "federation.local_steps=1",
            "eval.generation=false", "eval.every_round=false", "data.max_length=48"]
    checkpoint = tmp_path / "ckpt"
    assert main([*args, "federation.rounds=1", "--out", str(tmp_path / "first"), "--checkpoint", str(checkpoint)]) == 0
    capsys.readouterr()

    def no_training(*_args, **_kwargs):
        raise AssertionError("a refused resume built a simulation")

    monkeypatch.setattr(run, "Simulation", no_training)
    assert main([*args, "placement.placement=dlora", "--out", str(tmp_path / "second"), "--checkpoint", str(checkpoint),
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitpeft: error: checkpoint") and "placement.placement is 'split' there" in err
    assert err.count("\n") == 1
    _flip_bytes(checkpoint)
    assert main([*args, "--out", str(tmp_path / "second"), "--checkpoint", str(checkpoint), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "tensors.safetensors does not match the SHA-256" in err and err.count("\n") == 1
    assert not (tmp_path / "second").exists()


@pytest.mark.slow
def test_cli_resume_after_a_killed_run_matches_an_uninterrupted_one(tmp_path):
    """The run is killed (SIGKILL) after its first checkpoint; --resume finishes it, and the
    exported adapter equals that of a run that was never stopped."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    args = ["simulate", "--preset", "tiny", "federation.rounds=3", "federation.local_steps=3", "--no-progress",
            "eval.generation=false"]
    straight = subprocess.run([sys.executable, "-m", "splitpeft.cli", *args, "--out", str(tmp_path / "straight")],
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr
    checkpoint = tmp_path / "ckpt"
    process = subprocess.Popen([sys.executable, "-m", "splitpeft.cli", *args, "--out", str(tmp_path / "killed"),
                                "--checkpoint", str(checkpoint)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (checkpoint / "state.json").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed").exists()  # nothing half-written looks like a run
    rounds_done = json.loads((checkpoint / "state.json").read_text())["rounds_done"]
    assert rounds_done >= 1
    resumed = subprocess.run([sys.executable, "-m", "splitpeft.cli", *args, "--out", str(tmp_path / "killed"),
                              "--checkpoint", str(checkpoint), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    report = json.loads((tmp_path / "killed" / "report.json").read_text())
    assert len(report["rounds"]) == 3


# ------------------------------------------------------------------ exactness with count_flops (issue 21, finding 10)


@pytest.mark.parametrize("case", ["split-fedavg", "sampled"])
def test_resume_with_flop_counting_is_bit_identical(tmp_path, case):
    """Issue 21 finding 10: with count_flops=true a resumed run differed from an uninterrupted one
    by up to 1.5e-8. The meter counts each step shape once, under torch's FlopCounterMode, whose
    decompositions round differently; a resumed device counted its shapes again. The per-shape
    counts are now checkpointed, so the resumed run steps exactly as the uninterrupted one:
    adapters, losses and FLOPs equal bit for bit."""
    overrides = [*CASES[case], "federation.local_steps=3", "data.max_length=48", "count_flops=true"]
    straight, first = _straight_and_saved(tmp_path, overrides)
    del first
    resumed = Simulation(tiny_config("tiny-llama", *overrides))
    load_checkpoint(resumed, tmp_path / "ckpt")
    resumed.run_round()
    for name, weights in straight.state.global_adapters.items():
        assert torch.equal(weights.A, resumed.state.global_adapters[name].A), name
        assert torch.equal(weights.B, resumed.state.global_adapters[name].B), name
    for device, stats in straight.rounds[-1].devices.items():
        assert stats.losses == resumed.rounds[-1].devices[device].losses
        assert stats.flops == resumed.rounds[-1].devices[device].flops > 0


def test_flop_counts_keep_a_low_rank_warm_starts_corrected_modules(tmp_path):
    """The meter's per-step counts are keyed by the modules under a low-rank warm correction too
    (a cold round's count does not hold the corrections' FLOPs); a checkpoint keeps those keys."""
    overrides = [*CASES["noise_free-mean_a-low_rank-mixed-ranks"], "federation.local_steps=2", "data.max_length=48",
                 "count_flops=true"]
    first = Simulation(tiny_config("tiny-llama", *overrides))
    first.run_round()
    first.run_round()
    save_checkpoint(first, tmp_path / "ckpt")
    resumed = Simulation(tiny_config("tiny-llama", *overrides))
    load_checkpoint(resumed, tmp_path / "ckpt")
    for device, other in zip(first.devices, resumed.devices):
        counts = device.meter._flops_by_key
        assert any(key[3] for key in counts) and any(not key[3] for key in counts)  # warm and cold rounds
        assert other.meter._flops_by_key == counts
