"""The C allocator a long run leaves behind: `runtime.malloc_arenas` caps glibc's arenas and
`runtime.release_memory_each_round` hands freed heap pages back. A 720-step hybrid run (five
devices in lockstep threads) grew to 6 GB resident with 1.3 GB in use, spread over 12 arenas;
`malloc_trim(0)` on it gave 4 GB back. Each check runs in a fresh interpreter: arenas, once made,
stay for the process's life."""

import os
import subprocess
import sys

import pytest
from conftest import tiny_config

import splitpeft.experiment.run as run_module
from splitpeft.experiment.run import run_experiment
from splitpeft.model.runtime import _glibc, limit_malloc_arenas

glibc_only = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=environment, check=True)


# Six threads alive at once each allocate tensors; glibc's malloc_stats then lists every arena on stderr.
THREADS = """
import ctypes, sys, threading
import torch
from splitpeft.model.runtime import limit_malloc_arenas
print(limit_malloc_arenas({count}))
barrier = threading.Barrier(6)
def work():
    kept = [torch.ones(4096) for _ in range(64)]
    barrier.wait()
    del kept
threads = [threading.Thread(target=work) for _ in range(6)]
[t.start() for t in threads]
[t.join() for t in threads]
sys.stdout.flush()
ctypes.CDLL("libc.so.6").malloc_stats()
"""


@glibc_only
def test_the_arena_cap_holds_while_threads_allocate_and_glibcs_default_does_not():
    capped = _python(THREADS.format(count=1))
    assert capped.stdout.strip() == "glibc malloc, at most 1 arena (runtime.malloc_arenas)"
    assert capped.stderr.count("Arena ") == 1
    two = _python(THREADS.format(count=2))
    assert two.stderr.count("Arena ") == 2
    default = _python(THREADS.format(count=0))
    assert default.stdout.strip() == "glibc malloc, its default arenas (runtime.malloc_arenas=0)"
    assert default.stderr.count("Arena ") >= 6  # a new thread takes a new arena up to 8 a core


@glibc_only
def test_malloc_arena_max_in_the_environment_wins():
    told = _python(THREADS.format(count=1), MALLOC_ARENA_MAX="3")
    assert told.stdout.strip() == "glibc malloc, MALLOC_ARENA_MAX=3 from the environment"
    assert told.stderr.count("Arena ") == 3


@glibc_only
def test_freed_heap_pages_go_back_only_when_released():
    """2048 tensors of 64 KB (below glibc's mmap threshold: served from the heap) between small
    ones that stay: freeing them leaves 128 MB resident until `release_freed_memory`."""
    measured = _python("""
import torch
from splitpeft.model.runtime import release_freed_memory, resident_bytes
kept, freed = [], []
for _ in range(2048):
    freed.append(torch.ones(64 << 10, dtype=torch.uint8))
    kept.append(torch.ones(16))
full = resident_bytes()
del freed
held = resident_bytes()
print(full, held, release_freed_memory(), resident_bytes())
""")
    full, held, released, after = measured.stdout.split()
    mib = 1 << 20
    assert int(full) - int(held) < 16 * mib  # free() alone gave almost nothing back
    assert released == "True"
    assert int(held) - int(after) > 100 * mib  # of the 128 MB freed


def test_a_run_reports_its_allocator_and_each_rounds_resident_memory(tmp_path):
    report = run_experiment(tiny_config("tiny-llama", "federation.rounds=2", "federation.local_steps=2",
                                        "eval.generation=false", "privacy.estimate=false"),
                            tmp_path / "run", progress=False)
    assert report["allocator"] == limit_malloc_arenas(2)
    resident = [entry["resident_bytes"] for entry in report["rounds"]]
    if _glibc() is not None:
        assert all(isinstance(value, int) and value > 50 << 20 for value in resident)  # torch alone is more


@pytest.mark.parametrize("release", [True, False])
def test_a_run_releases_freed_memory_after_each_round_only_when_asked(tmp_path, monkeypatch, release):
    calls = []
    monkeypatch.setattr(run_module, "release_freed_memory", lambda: calls.append(1) or True)
    run_experiment(tiny_config("tiny-llama", "federation.rounds=3", "federation.local_steps=1", "eval.generation=false",
                               "privacy.estimate=false", f"runtime.release_memory_each_round={str(release).lower()}"),
                   tmp_path / "run", progress=False)
    assert len(calls) == (3 if release else 0)
