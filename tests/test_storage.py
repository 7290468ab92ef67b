"""Atomic folder writes: a SIGKILL at any instant of a checkpoint write leaves a complete, verified
checkpoint (the previous round's or the new one), and the next write or read cleans up after it.

The writer runs in a forked child that is killed; the parent reads the checkpoint back through
`read_state` (which verifies it) after every kill.
"""

import multiprocessing
import os
import random
import signal
import sys
import time

import pytest
import torch

from splitpeft.federation.checkpoint import read_state, write_state
from splitpeft.storage import atomic_folder

FORK = multiprocessing.get_context("fork")


@pytest.fixture
def folder(tmp_path):
    """A fresh folder, in memory where the machine has one: a kill test needs hundreds of writes,
    and fsync to a busy disk takes tens of ms each (rename semantics are the same)."""
    import shutil
    import tempfile
    from pathlib import Path

    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="splitpeft-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _write_round(target, round_index: int) -> None:
    """A small checkpoint whose every tensor says which round wrote it."""
    tensors = {f"t{i}": torch.full((64 * (i + 1),), float(round_index)) for i in range(3)}
    write_state(target, {"round": round_index, "filler": "x" * 2000}, tensors)


def _assert_complete(target, at_least: int) -> int:
    """The checkpoint in `target` is complete and consistent, of round `at_least` or later."""
    state, tensors = read_state(target)  # verifies it, and finishes an interrupted swap first
    round_index = state["round"]
    assert round_index >= at_least, f"the checkpoint went back from round {at_least} to {round_index}"
    assert sorted(tensors) == ["t0", "t1", "t2"]
    for tensor in tensors.values():
        assert torch.equal(tensor, torch.full_like(tensor, float(round_index)))
    return round_index


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "ckpt")


def _write_forever(target, first_round: int, started) -> None:
    started.set()
    for round_index in range(first_round, first_round + 1_000_000):
        _write_round(target, round_index)


def test_a_checkpoint_survives_sigkill_at_random_points_of_repeated_writes(folder):
    """Bug (issue 12, finding 7): `atomic_folder` deleted the old folder and then renamed the new
    one, so a kill in between lost the checkpoint, and a kill mid-write leaked its staging folder.
    Now: after each of 100 SIGKILLs at random instants of a run of writes, a complete checkpoint
    of the last round or a later one is there, and nothing else is left beside it once read."""
    target = folder / "ckpt"
    started = time.perf_counter()
    for round_index in range(5):
        _write_round(target, round_index)
    write_s = (time.perf_counter() - started) / 5
    last, rng, advanced = 4, random.Random(12), 0
    window = 4 * write_s  # widened while kills land before any write completes (a loaded machine is slower)
    for _ in range(100):
        ready = FORK.Event()
        child = FORK.Process(target=_write_forever, args=(target, last + 1, ready))
        child.start()
        ready.wait(10)
        time.sleep(rng.uniform(0.0, window))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        round_index = _assert_complete(target, last)
        advanced += round_index > last
        window = max(4 * write_s, window / 1.2) if round_index > last else min(window * 1.5, 2.0)
        last = round_index
        assert _leftovers(folder) == []
    assert advanced > 10  # the kills did land after some writes were done, and in the middle of others


def _write_once_killed_at(target, round_index: int, kill_at: int) -> None:
    """Write one checkpoint, SIGKILLed just before its `kill_at`-th call into the OS (posix or
    fcntl: every open, write, fsync, rename, unlink, listdir, lock)."""
    calls = 0

    def profile(_frame, event, function):
        nonlocal calls
        if (event == "c_call" and getattr(function, "__module__", None) in ("posix", "fcntl")
                and function.__name__ not in ("fspath", "urandom")):  # not system calls that change anything
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    sys.setprofile(profile)
    _write_round(target, round_index)
    sys.setprofile(None)


def test_a_checkpoint_survives_sigkill_before_every_system_call_of_its_write(folder):
    """Bug (issue 12, finding 7), every instant in turn: the write is killed just before its
    1st, 2nd, ... call into the OS until one write completes; after each kill the checkpoint read
    back is complete (the old round, or the new one once the new folder is in place) and no
    staging folder, old folder or lock is left beside it."""
    target = folder / "ckpt"
    _write_round(target, 0)
    last, seen = 0, set()
    for kill_at in range(1, 1000):
        child = FORK.Process(target=_write_once_killed_at, args=(target, last + 1, kill_at))
        child.start()
        child.join()
        round_index = _assert_complete(target, last)
        seen.add(round_index - last)
        assert _leftovers(folder) == []
        if child.exitcode == 0:  # this write ran to the end without being killed
            assert round_index == last + 1
            break
        assert child.exitcode == -signal.SIGKILL
        last = round_index
    else:
        pytest.fail("the write never completed")
    assert kill_at > 20 and seen == {0, 1}  # killed before and after the swap


def test_only_what_splitpeft_left_is_cleaned_up(tmp_path):
    """Siblings without splitpeft's lock file, or whose writer is alive, are never touched."""
    import fcntl

    from splitpeft.storage import LOCK_TEXT

    target = tmp_path / "ckpt"
    foreign = tmp_path / ".ckpt.splitpeft-0123456789abcdef.partial"  # the name, but no lock file
    foreign.mkdir()
    (foreign / "mine.txt").write_text("user data")
    wrong_text = tmp_path / ".ckpt.splitpeft-1111111111111111.lock"
    wrong_text.write_text("not splitpeft's\n")
    (tmp_path / ".ckpt.splitpeft-1111111111111111.partial").mkdir()
    alive = tmp_path / ".ckpt.splitpeft-2222222222222222.lock"  # a writer in progress: its lock is held
    alive.write_bytes(LOCK_TEXT)
    (tmp_path / ".ckpt.splitpeft-2222222222222222.partial").mkdir()
    with alive.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        _write_round(target, 1)
        _write_round(target, 2)
        assert _assert_complete(target, 2) == 2
    assert (foreign / "mine.txt").read_text() == "user data"
    assert wrong_text.exists() and (tmp_path / ".ckpt.splitpeft-1111111111111111.partial").is_dir()
    assert (tmp_path / ".ckpt.splitpeft-2222222222222222.partial").is_dir()
    _write_round(target, 3)  # the writer of 2222... has died (its lock is free): now it is cleaned
    assert not alive.exists() and not (tmp_path / ".ckpt.splitpeft-2222222222222222.partial").exists()


def test_a_failed_write_leaves_the_old_folder_and_nothing_else(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target) as staging:
        (staging / "a.txt").write_text("new")
        raise RuntimeError("the run failed")
    assert (target / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(FileExistsError), atomic_folder(tmp_path / "file"):
        pass
    assert (tmp_path / "file").read_text() == "not a folder"
