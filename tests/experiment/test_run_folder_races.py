"""The run folder while a run holds it: a second run or evaluation on it is refused at start, a
folder the user makes there during the run is never replaced, and report.json is written so that
neither a failed write nor a power cut leaves half of one (fourth review of storage, 2026-12-06)."""

import json
import os

import pytest

from splitpeft.cli import main
from splitpeft.config import load_config
from splitpeft.experiment import report as report_module
from splitpeft.experiment import run as run_module
from splitpeft.experiment.report import write_json
from splitpeft.experiment.run import RunFolderError, run_experiment

ARGS = ["--preset", "tiny", "--no-progress", "federation.num_devices=2", "federation.local_steps=1", "federation.rounds=1",
        "eval.generation=false", "eval.every_round=false", "eval.baseline=false", "data.max_length=48"]


def _config():
    return load_config(preset="tiny", overrides=[a for a in ARGS if "=" in a])


def test_a_second_run_on_an_output_folder_being_evaluated_is_refused_and_mixes_nothing(tmp_path, capsys, monkeypatch):
    """Found: only the checkpoint was locked, so a second run with the same --out --overwrite
    swapped its folder in while the first evaluated, and the first then wrote its report into the
    second's folder. Now the second is refused at start, one line naming the folder."""
    out = tmp_path / "run"
    second = {}
    original = run_module.evaluate_model

    def evaluate_then_start_a_second_run(*args, **kwargs):
        if not second:  # the first run's folder is in place; its evaluation runs
            second["started"] = True  # once: on the old code the second run evaluated too
            second["status"] = main(["simulate", *ARGS, "seed=1", "--out", str(out), "--overwrite"])
            second["err"] = capsys.readouterr().err
            second["evaluate"] = main(["evaluate", str(out)])
            second["evaluate_err"] = capsys.readouterr().err
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate_model", evaluate_then_start_a_second_run)
    assert main(["simulate", *ARGS, "--out", str(out)]) == 0
    assert second["status"] == 2 and second["evaluate"] == 2
    assert second["err"].startswith(f"splitpeft: error: output folder {out} is in use by another run (process {os.getpid()})")
    assert second["err"].count("\n") == 1
    assert f"run folder {out} is in use by another run" in second["evaluate_err"]
    written = json.loads((out / "report.json").read_text())
    assert written["status"] == "finished" and written["config"]["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the lock went with its run


def test_evaluating_a_folder_that_is_not_a_run_makes_nothing_beside_it(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "run"
    assert main(["evaluate", str(missing)]) == 2
    assert "is not a splitpeft run folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_folder_the_user_makes_at_out_during_the_run_is_never_replaced(tmp_path):
    out = tmp_path / "run"

    def user_writes_there(_round, _entry):
        out.mkdir()
        (out / "thesis.tex").write_text("four years of work")

    with pytest.raises(RunFolderError, match="was not written by splitpeft .*it changed during the run; this run's results"):
        run_experiment(_config(), out, overwrite=True, progress=False, on_round=user_writes_there)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder or lock left


def test_the_privacy_command_never_replaces_a_folder_made_while_it_measured(tmp_path, capsys, monkeypatch):
    """Found: `splitpeft privacy` checked its --out once, before minutes of measuring, and then
    swapped its folder in whatever was there by then."""
    out = tmp_path / "table"
    original = run_module.leakage_table

    def measure_while_the_user_writes_there(*args, **kwargs):
        table = original(*args, **kwargs)
        out.mkdir()
        (out / "thesis.tex").write_text("four years of work")
        return table

    monkeypatch.setattr(run_module, "leakage_table", measure_while_the_user_writes_there)
    fast = ["placement.labels_on_device=true", "privacy.learned_steps=10", "privacy.aux_examples=16",
            "privacy.audit_examples=4", "data.max_length=48"]
    assert main(["privacy", "--preset", "tiny", "--depths", "1", "--out", str(out), "--overwrite", *fast]) == 2
    assert "it changed during the run; the table's files were not written" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table"]


def test_a_failed_json_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"status": "trained"})
    with pytest.raises(TypeError):
        write_json(path, {"status": "finished", "eval": object()})  # fails half way through the dump
    assert json.loads(path.read_text()) == {"status": "trained"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_json_is_on_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    """Found: report.json written into a finished run folder was renamed over the old one without
    an fsync, so a power cut could leave it empty. Now the file is flushed before the rename and
    the folder after it."""
    order = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(report_module.os, "fsync", lambda fd: (order.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(report_module.os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b))[1])
    write_json(tmp_path / "report.json", {"status": "finished"})
    assert order == ["fsync", "replace", "fsync"]
