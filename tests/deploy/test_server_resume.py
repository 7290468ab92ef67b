"""The Flower ServerApp's `resume=true`: refused with a clear error unless an intact checkpoint
is there, never a silent start from round 0 (fast: the refusal comes before any Flower traffic)."""

import json

import pytest
import torch
from flwr.app import Context, RecordDict

from splitpeft.deploy.keys import DeploymentError
from splitpeft.deploy.server_app import _server_main
from splitpeft.experiment.run import RunFolderError
from splitpeft.federation.checkpoint import CheckpointError, write_state
from splitpeft.storage import LOCK_TEXT


class NoGrid:
    """A Grid the ServerApp must not touch: the run is refused before it talks to any node."""

    def __getattr__(self, name):
        raise AssertionError(f"the ServerApp started the run (Grid.{name})")


def _context(tmp_path, **run_config):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({f"device-{i}": f"token-{i}" for i in range(3)}))
    config = {"preset": "tiny", "out": str(tmp_path / "run"), "checkpoint": str(tmp_path / "ckpt"),
              "tokens-file": str(tokens), "split-address": "127.0.0.1:0", "join-timeout": 0, **run_config}
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)


def test_resume_without_a_checkpoint_is_refused_not_started_over(tmp_path):
    """Bug (issue 12, finding 7): with `resume=true` and no checkpoint (e.g. lost by a kill
    mid-write), the ServerApp silently trained from round 0."""
    with pytest.raises(CheckpointError, match="no checkpoint in .*ckpt to resume from"):
        _server_main(NoGrid(), _context(tmp_path, resume=True))
    assert not (tmp_path / "run").exists()


def test_resume_from_a_corrupted_checkpoint_is_refused(tmp_path):
    write_state(tmp_path / "ckpt", {"rounds_done": 1}, {"x": torch.ones(64)})
    data = bytearray((tmp_path / "ckpt" / "tensors.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "ckpt" / "tensors.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        _server_main(NoGrid(), _context(tmp_path, resume=True))


def test_resume_finds_the_checkpoint_of_a_write_killed_mid_swap(tmp_path):
    """Killed between moving the old checkpoint aside and renaming the new one into place: only
    the old sibling exists. It is the checkpoint (here one of another run, so refused as such,
    which shows it was found)."""
    write_state(tmp_path / "ckpt", {"rounds_done": 1}, {"x": torch.ones(64)}, identity={"seed": 7})
    ident = "0123456789abcdef"
    (tmp_path / f".ckpt.splitpeft-{ident}.lock").write_bytes(LOCK_TEXT)  # its writer died: lock free
    (tmp_path / "ckpt").rename(tmp_path / f".ckpt.splitpeft-{ident}.old")
    with pytest.raises(CheckpointError, match="is from a different run: seed is 7 there, 0 here"):
        _server_main(NoGrid(), _context(tmp_path, resume=True))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "tokens.json"]


def test_submitting_again_without_resume_never_replaces_an_earlier_runs_checkpoint(tmp_path):
    """Found: the ServerApp ran with overwrite always on, so a resubmission that forgot
    `resume=true` replaced a long run's checkpoint at its first round. Now it is refused as
    `splitpeft simulate` without --overwrite is; `overwrite=true` starts over."""
    write_state(tmp_path / "ckpt", {"rounds_done": 40}, {"x": torch.ones(64)})
    before = (tmp_path / "ckpt" / "tensors.safetensors").read_bytes()
    with pytest.raises(RunFolderError, match="holds a checkpoint already: --resume continues that run"):
        _server_main(NoGrid(), _context(tmp_path))
    assert (tmp_path / "ckpt" / "tensors.safetensors").read_bytes() == before
    with pytest.raises(DeploymentError, match="setting 'overwrite' must be true or false, not 'yes'"):
        _server_main(NoGrid(), _context(tmp_path, overwrite="yes"))
