"""What the CLI does when a second run shares a checkpoint, when the disk is full, and when it is
stopped by a signal (issue 21, findings 6, 8 and 9): one line, an intended exit status, the old
state intact and nothing half-written left beside it."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors import SafetensorError

from splitpeft.cli import main
from splitpeft.config import load_config
from splitpeft.federation.checkpoint import is_state_folder, verify_checkpoint

ARGS = ["simulate", "--preset", "tiny", "--no-progress", "federation.num_devices=2", "federation.local_steps=1",
        "eval.generation=false", "eval.every_round=false", "data.max_length=48"]


def _config(rounds):
    return load_config(preset="tiny", overrides=[a for a in ARGS[4:] if "=" in a] + [f"federation.rounds={rounds}"])


def _hidden_siblings(folder):
    """splitpeft's staging folders and lock files beside the folders in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ finding 6: one checkpoint, one run


def test_a_second_run_on_a_checkpoint_in_use_is_refused(tmp_path, capsys, monkeypatch):
    """Issue 21 finding 6: two runs that shared one --checkpoint both exited 0, one replacing the
    other's checkpoint. Now the run that comes second is refused at start (one line naming the
    folder, exit 2, the first run's checkpoint untouched), and the first finishes and resumes."""
    from splitpeft.experiment import run

    checkpoint = tmp_path / "ckpt"
    second = {}
    original = run.save_checkpoint

    def save_then_start_a_second_run(sim, path, extra=None):
        original(sim, path, extra)
        if not second:  # while the first run is between rounds 1 and 2, holding its checkpoint
            before = (checkpoint / "tensors.safetensors").read_bytes()
            second["status"] = main([*ARGS, "federation.rounds=2", "--out", str(tmp_path / "second"),
                                     "--checkpoint", str(checkpoint), "--resume"])
            second["err"] = capsys.readouterr().err
            second["untouched"] = (checkpoint / "tensors.safetensors").read_bytes() == before

    monkeypatch.setattr(run, "save_checkpoint", save_then_start_a_second_run)
    assert main([*ARGS, "federation.rounds=2", "--out", str(tmp_path / "first"), "--checkpoint", str(checkpoint)]) == 0
    assert second["status"] == 2
    assert second["err"].startswith(f"splitpeft: error: checkpoint folder {checkpoint} is in use by another run "
                                    f"(process {os.getpid()})")
    assert second["err"].count("\n") == 1 and second["untouched"]
    assert not (tmp_path / "second").exists()
    assert verify_checkpoint(checkpoint, _config(2)) == 2  # the first run's, complete
    # The lock lives beside the folder (never in it) and is gone once its run ends.
    assert is_state_folder(checkpoint) and not any(p.name.startswith(".") for p in checkpoint.iterdir())
    assert _hidden_siblings(tmp_path) == []


def test_the_checkpoint_lock_dies_with_its_process(tmp_path, capsys):
    """Issue 21 finding 6: the lock is an flock, so a holder killed with SIGKILL leaves no stale
    lock: the next run takes the folder (and the lock file left behind) and finishes."""
    checkpoint = tmp_path / "ckpt"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from splitpeft.storage import exclusive\n"
         f"with exclusive({str(checkpoint)!r}):\n    print('held', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main([*ARGS, "federation.rounds=1", "--out", str(tmp_path / "run"), "--checkpoint", str(checkpoint)]) == 2
        assert f"is in use by another run (process {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert _hidden_siblings(tmp_path) == [".ckpt.splitpeft-owner.lock"]  # left by the killed holder
    assert main([*ARGS, "federation.rounds=1", "--out", str(tmp_path / "run"), "--checkpoint", str(checkpoint)]) == 0
    assert _hidden_siblings(tmp_path) == []


# ------------------------------------------------------------------ finding 8: disk full


def _disk_full_on_call(monkeypatch, module, name, call, error):
    """Make `module.name` raise `error` on its `call`-th call (1-based), as a full disk would."""
    original = getattr(module, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


ENOSPC = {
    "safetensors": SafetensorError('Error while serializing: I/O error: No space left on device (os error 28) at path '
                                   '"/somewhere/.tmpAbC123"'),
    "oserror": OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
}


@pytest.mark.parametrize("kind", sorted(ENOSPC))
def test_disk_full_while_writing_a_checkpoint_is_one_line_and_the_old_one_stands(tmp_path, capsys, monkeypatch, kind):
    """Issue 21 finding 8: a full disk during a checkpoint write was a SafetensorError traceback
    and exit 1. Now: one line naming the checkpoint folder and the errno, exit 2, the previous
    round's checkpoint intact (it verifies), no staging folder left, no run folder."""
    from splitpeft.federation import checkpoint as checkpoint_module

    _disk_full_on_call(monkeypatch, checkpoint_module, "save_file", 2, ENOSPC[kind])  # round 2's checkpoint
    checkpoint = tmp_path / "ckpt"
    assert main([*ARGS, "federation.rounds=2", "--out", str(tmp_path / "run"), "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert err == f"splitpeft: error: cannot write {checkpoint}: [Errno 28] No space left on device\n"
    assert verify_checkpoint(checkpoint, _config(2)) == 1
    assert not (tmp_path / "run").exists()
    assert _hidden_siblings(tmp_path) == []


def test_disk_full_while_writing_the_run_folder_keeps_the_old_one(tmp_path, capsys, monkeypatch):
    """Issue 21 finding 8: a full disk while the run folder is written (here its report; the
    adapter export and plots are written the same way) is one line naming the folder and the
    errno, exit 2; the run folder it was to replace is left as it was."""
    from splitpeft.experiment import run

    out = tmp_path / "run"
    assert main([*ARGS, "federation.rounds=1", "--out", str(out)]) == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    _disk_full_on_call(monkeypatch, run, "write_json", 1, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert main([*ARGS, "federation.rounds=1", "--out", str(out), "--overwrite"]) == 2
    assert capsys.readouterr().err == f"splitpeft: error: cannot write {out}: [Errno 28] No space left on device\n"
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert _hidden_siblings(tmp_path) == []


# ------------------------------------------------------------------ finding 9: SIGTERM, SIGINT


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_round_stops_cleanly_and_says_how_to_resume(tmp_path, capsys, monkeypatch, signum):
    """Issue 21 finding 9: SIGTERM killed the process (143 by the signal) and left its staging
    folder. Now a signal in the middle of round 2 abandons that round: exit 128 + signal, one line
    with the resume command, round 1's checkpoint stands, nothing left beside the folders, and
    the printed command finishes the run."""
    from splitpeft.federation.simulation import Simulation

    original = Simulation.run_round

    def signalled_in_round_two(self, *args, **kwargs):
        if len(self.rounds) == 1:
            os.kill(os.getpid(), signum)  # delivered to this (the main) thread at once
            time.sleep(5)  # not reached: the stop raises inside the round
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Simulation, "run_round", signalled_in_round_two)
    checkpoint, out = tmp_path / "ckpt", tmp_path / "run"
    argv = [*ARGS, "federation.rounds=3", "--out", str(out), "--checkpoint", str(checkpoint)]
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert main(argv) == 128 + signum
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert err.count("\n") == 1 and err.startswith(f"splitpeft: stopped by {name}; no run folder was written; "
                                                   f"{checkpoint} holds round 1 of 3; to resume: splitpeft simulate")
    assert err.rstrip().endswith(f"--checkpoint {checkpoint} --resume")
    assert verify_checkpoint(checkpoint, _config(3)) == 1
    assert not out.exists() and _hidden_siblings(tmp_path) == []
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # the CLI's are gone

    monkeypatch.setattr(Simulation, "run_round", original)
    resume = err.rstrip().split("to resume: splitpeft ", 1)[1].split(" ")
    assert resume == [*argv, "--resume"]
    assert main(resume) == 0
    assert verify_checkpoint(checkpoint, _config(3)) == 3 and (out / "report.json").is_file()


def test_a_signal_during_a_checkpoint_write_lets_it_finish(tmp_path, capsys, monkeypatch):
    """Issue 21 finding 9: a stop that comes while a checkpoint is being written is taken once
    the write is done, so the round just finished is the one that stands."""
    from splitpeft.federation import checkpoint as checkpoint_module

    original = checkpoint_module.save_file

    def signalled_mid_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler runs here: the stop is held, not raised
        return original(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", signalled_mid_write)
    checkpoint = tmp_path / "ckpt"
    assert main([*ARGS, "federation.rounds=3", "--out", str(tmp_path / "run"), "--checkpoint", str(checkpoint)]) == 143
    assert f"{checkpoint} holds round 1 of 3; to resume:" in capsys.readouterr().err
    assert verify_checkpoint(checkpoint, _config(3)) == 1
    assert _hidden_siblings(tmp_path) == []


def test_a_signal_while_the_finished_run_folder_is_swapped_in_says_so(tmp_path, capsys, monkeypatch):
    """Issue 21 finding 9: a stop that comes while the trained run folder is being put in place
    lets the swap finish, and the line says the trained run is there (no resume needed) and how to
    evaluate it (issue 21 finding 4: evaluation comes after the swap, so the stop skips it)."""
    from splitpeft import storage

    original = storage._fsync_tree

    def signalled_during_the_swap(folder):
        if folder.name.startswith(".run."):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)  # the handler runs here: the stop is held until the swap is done
        return original(folder)

    monkeypatch.setattr(storage, "_fsync_tree", signalled_during_the_swap)
    out = tmp_path / "run"
    assert main([*ARGS, "federation.rounds=1", "--out", str(out), "--checkpoint", str(tmp_path / "ckpt")]) == 143
    assert capsys.readouterr().err == (f"splitpeft: stopped by SIGTERM; the trained run is in {out}, not evaluated: "
                                       f"`splitpeft evaluate {out}` evaluates it\n")
    assert (out / "report.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "report.json").read_text())["status"] == "trained"
    assert _hidden_siblings(tmp_path) == []


@pytest.mark.slow
def test_sigterm_from_outside_exits_143_and_resume_finishes(tmp_path):
    """Issue 21 finding 9, as a user meets it: a real process, SIGTERM sent from outside once
    round 1 is checkpointed. Exit status 143 from the process itself (not death by the signal),
    the resume line on stderr, no staging folder or lock left, and the printed command (run as
    `python -m splitpeft.cli`) finishes the run."""
    import json

    checkpoint, out = tmp_path / "ckpt", tmp_path / "run"
    argv = [*ARGS, "federation.rounds=8", "--out", str(out), "--checkpoint", str(checkpoint)]
    process = subprocess.Popen([sys.executable, "-m", "splitpeft.cli", *argv], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (checkpoint / "state.json").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("splitpeft: stopped by SIGTERM; no run folder was written; ") and " --resume" in line
    assert not out.exists() and _hidden_siblings(tmp_path) == []
    done = verify_checkpoint(checkpoint, _config(8))
    assert 1 <= done < 8
    resume = line.split("to resume: splitpeft ", 1)[1].split(" ")
    finished = subprocess.run([sys.executable, "-m", "splitpeft.cli", *resume], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert len(json.loads((out / "report.json").read_text())["rounds"]) == 8
