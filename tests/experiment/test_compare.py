"""`splitpeft compare`: seeds, mean and spread, rounds and simulated time to target."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from splitpeft import __version__
from splitpeft.cli import main
from splitpeft.config import to_dict
from splitpeft.experiment import compare
from splitpeft.experiment.compare import (
    SCALARS,
    after_warmup,
    round_simulated_s,
    run_comparison,
    simulated_s_to_target,
    spread,
)
from splitpeft.experiment.report import _clean, write_json


def _round(number, loss, device_s, round_s=None):
    """A report round: held-out loss `loss` (stored as its perplexity), devices' simulated times."""
    record = {
        "round": number,
        "eval_perplexity": None if loss is None else math.exp(loss),
        "devices": {f"device-{i}": {"simulated_s": s, "train_loss": loss or 1.0, "tokens": 10, "adapter_flops": 0}
                    for i, s in enumerate(device_s)},
    }
    if round_s is not None:
        record["simulated_round_s"] = round_s
    return record


def test_a_round_lasts_as_long_as_its_slowest_device_unless_the_report_says():
    assert round_simulated_s(_round(1, 2.0, [3.0, 7.5, 1.0])) == 7.5
    # the round's own time (server compute included) wins over the devices'
    assert round_simulated_s(_round(1, 2.0, [3.0, 7.5], round_s=9.25)) == 9.25
    assert round_simulated_s(_round(1, 2.0, [None, None])) is None
    assert round_simulated_s(_round(1, 2.0, [])) == 0.0


def test_simulated_time_to_target_sums_the_rounds_up_to_the_first_at_or_below_it():
    rounds = [
        _round(1, 3.0, [4.0, 10.0]),
        _round(2, None, [5.0, 6.0]),  # not evaluated: its time still counts
        _round(3, 2.0, [1.0, 2.0], round_s=8.0),
        _round(4, 1.0, [3.0, 3.0]),
    ]
    assert simulated_s_to_target(rounds, 2.0) == 10.0 + 6.0 + 8.0  # round 3 is at the target
    assert simulated_s_to_target(rounds, 2.5) == 10.0 + 6.0 + 8.0
    assert simulated_s_to_target(rounds, 3.0) == 10.0
    assert simulated_s_to_target(rounds, 1.0) == 10.0 + 6.0 + 8.0 + 3.0
    assert simulated_s_to_target(rounds, 0.5) is None  # never reached
    untimed = [_round(1, 3.0, [None]), _round(2, 1.0, [2.0])]
    assert simulated_s_to_target(untimed, 1.0) is None


def test_spread_is_numpys_mean_sample_std_min_max():
    values = [3.25, None, 1.5, 4.0, 2.0]
    present = np.array([3.25, 1.5, 4.0, 2.0])
    stats = spread(values)
    assert stats["n"] == 4
    assert stats["mean"] == pytest.approx(np.mean(present))
    assert stats["std"] == pytest.approx(np.std(present, ddof=1))
    assert (stats["min"], stats["max"]) == (1.5, 4.0)
    assert spread([2.0]) == {"mean": 2.0, "std": None, "min": 2.0, "max": 2.0, "n": 1}
    assert spread([None, None])["mean"] is None


def test_after_warmup_counts_each_devices_rounds_that_start_past_its_warmup_steps():
    """warm-up 4, 2 steps a round: device-0 (every round) counts from its 3rd round; device-1, sampled
    in rounds 1, 3, 4 and 5, from its 3rd selected round (round 4)."""
    def stats(i):
        return {"steps": 2, "bytes_up": 10 * i, "bytes_down": i, "adapter_flops": 100.0 * i}

    rounds = [{"devices": {"device-0": stats(1), "device-1": stats(7)}},
              {"devices": {"device-0": stats(2)}},
              {"devices": {"device-0": stats(3), "device-1": stats(8)}},
              {"devices": {"device-0": stats(4), "device-1": stats(9)}},
              {"devices": {"device-0": stats(5), "device-1": stats(10)}}]
    traffic, flops = after_warmup({"config": {"kill_revive": {"warmup": 4}}, "rounds": rounds})
    counted = [3, 4, 5, 9, 10]  # device-0's rounds 3-5, device-1's rounds 4 and 5
    assert traffic == sum(11 * i for i in counted)
    assert flops == sum(100.0 * i for i in counted)
    assert after_warmup({"config": {"kill_revive": {"warmup": 0}}, "rounds": rounds})[0] == 11 * (1 + 2 + 3 + 4 + 5 + 7 + 8 + 9 + 10)


JITTER = {5: 0.0, 6: 0.1, 7: 0.5}


def _fake_report(seed: int, method_offset: float) -> dict:
    """A run whose held-out loss falls 0.5 a round from 4 + offset + jitter; device 1 is the slow one."""
    losses = [4.0 + method_offset + JITTER[seed] - 0.5 * r for r in range(3)]
    rounds = [_round(r + 1, loss, [1.0 + seed, 2.0 + 2 * seed]) for r, loss in enumerate(losses)]
    return {
        "config": {"seed": seed},
        "rounds": rounds,
        "eval": {"bleu": 10.0 + seed, "perplexity": math.exp(losses[-1])},
        "totals": {"device_flops": 1000 * (seed + 1), "bytes_up": 7, "bytes_down": 9, "tokens": 60,
                   "per_device": {"device-0": {"peak_memory_bytes": 5}}},
        "info": {},
    }


def test_each_seed_runs_in_its_own_folder_against_one_target(tmp_path, monkeypatch):
    """The target is the worst of the methods' mean final losses; every seed is measured against it."""
    calls: list[tuple[int, Path]] = []

    def fake_run(config, out, **_):
        calls.append((config.seed, Path(out)))
        offset = 0.25 if config.kill_revive.enabled else 0.0
        return _fake_report(config.seed, offset)

    monkeypatch.setattr(compare, "run_experiment", fake_run)
    out = tmp_path / "cmp"
    comparison = run_comparison("dlora", out, preset="tiny", overrides=["seed=5"], methods=["no_kr", "kr"], seeds=3,
                                progress=False)
    assert sorted(calls) == sorted((s, out / m / f"seed-{s}") for m in ("no_kr", "kr") for s in (5, 6, 7))
    assert comparison["seeds"] == [5, 6, 7]
    # kr's finals are 3.25, 3.35, 3.75: mean 3.45, worse than no_kr's 3.2
    assert comparison["target_heldout_loss"] == pytest.approx(3.45)
    kr = comparison["methods"]["kr"]["runs"]
    # seed 5: 4.25, 3.75, 3.25 reaches it in round 3; seed 7 ends at 3.75, never
    assert kr["seed-5"]["rounds_to_target"] == 3 and kr["seed-5"]["simulated_s_to_target"] == pytest.approx(3 * 12.0)
    assert kr["seed-7"]["rounds_to_target"] is None and kr["seed-7"]["simulated_s_to_target"] is None
    no_kr = comparison["methods"]["no_kr"]["runs"]
    # no_kr seed 6: losses 4.1, 3.6, 3.1 -> round 3; each round lasts the slow device's 2 + 2 * 6 s
    assert no_kr["seed-6"]["rounds_to_target"] == 3 and no_kr["seed-6"]["simulated_s_to_target"] == pytest.approx(3 * 14.0)
    assert no_kr["seed-6"]["simulated_s"] == pytest.approx(3 * 14.0)

    saved = json.loads((out / "comparison.json").read_text())
    for method, entry in saved["methods"].items():
        assert set(entry["spread"]) == set(SCALARS)
        for key, stats in entry["spread"].items():
            values = np.array([r[key] for r in entry["runs"].values() if r[key] is not None], dtype=float)
            assert stats["n"] == len(values), (method, key)
            if len(values) > 1:
                assert stats["mean"] == pytest.approx(values.mean()), (method, key)
                assert stats["std"] == pytest.approx(values.std(ddof=1)), (method, key)
                assert (stats["min"], stats["max"]) == (values.min(), values.max())
    assert saved["methods"]["kr"]["spread"]["rounds_to_target"]["n"] == 2  # seed 7 never got there
    table = (out / "comparison.md").read_text()
    assert "| kr | 3 | 16.00 ± 1.00 |" in table  # BLEU 10 + s over seeds 5, 6, 7
    assert "(2/3)" in table and "worst mean final held-out loss (kr)" in table
    assert (out / "convergence.png").stat().st_size > 0


def test_a_per_seed_target_is_the_worst_final_loss_of_that_seed(tmp_path, monkeypatch):
    """Seed 7's jitter lifts every method's losses; its own target still lets both methods reach it."""
    monkeypatch.setattr(compare, "run_experiment",
                        lambda config, out, **_: _fake_report(config.seed, 0.25 if config.kill_revive.enabled else 0.0))
    out = tmp_path / "cmp"
    comparison = run_comparison("dlora", out, preset="tiny", overrides=["seed=5"], methods=["no_kr", "kr"], seeds=3,
                                target="per_seed", progress=False)
    # kr is the worse method on every seed: its final loss 3 + 0.25 + jitter is each seed's target
    expected = {f"seed-{s}": 3.25 + JITTER[s] for s in (5, 6, 7)}
    assert comparison["target_per_seed"] == pytest.approx(expected)
    assert comparison["target_heldout_loss"] is None  # the seeds' targets differ
    for method in ("no_kr", "kr"):
        for s in (5, 6, 7):
            run = comparison["methods"][method]["runs"][f"seed-{s}"]
            assert run["target_heldout_loss"] == pytest.approx(expected[f"seed-{s}"])
            assert run["rounds_to_target"] == 3  # no_kr's 3.0 + jitter and kr's own final are both at or below
    table = (out / "comparison.md").read_text()
    assert "3.2500 (seed 5), 3.3500 (seed 6), 3.7500 (seed 7)" in table and "| kr | " in table.split("Per seed")[1]
    with pytest.raises(ValueError, match="unknown target 'best'"):
        run_comparison("dlora", tmp_path / "other", preset="tiny", target="best", progress=False)  # type: ignore[arg-type]
    assert not (tmp_path / "other").exists()


@pytest.mark.slow
def test_reuse_reads_a_finished_run_of_the_same_config_and_reruns_a_changed_one(tmp_path, capsys):
    """--reuse: the second comparison reads seed 0 from disk and runs only the new seed 1; a run whose
    config changed is not reused (without --overwrite its folder is refused, not replaced)."""
    out = tmp_path / "cmp"
    common = ["compare", "dlora", "--preset", "tiny", "--methods", "no_kr", "--out", str(out), "--no-progress",
              "federation.num_devices=1", "federation.rounds=1", "federation.local_steps=1", "data.limit=40",
              "eval.generation=false", "eval.perplexity_examples=4"]
    assert main([*common, "--seeds", "1"]) == 0
    first = (out / "no_kr" / "seed-0" / "report.json").stat().st_mtime_ns
    assert main([*common, "--seeds", "2", "--reuse"]) == 0
    assert (out / "no_kr" / "seed-0" / "report.json").stat().st_mtime_ns == first  # read, not run again
    assert (out / "no_kr" / "seed-1" / "report.json").is_file()
    assert json.loads((out / "comparison.json").read_text())["seeds"] == [0, 1]
    capsys.readouterr()
    assert main([*common, "--seeds", "1", "--reuse", "federation.lr=0.01"]) == 2  # another config: not reused
    assert "was not reused: its config differs at federation.lr (0.001 there, 0.01 now)" in capsys.readouterr().err
    assert (out / "no_kr" / "seed-0" / "report.json").stat().st_mtime_ns == first
    # a run written before a key existed: the key counts as its default, and only its default matches
    path = out / "no_kr" / "seed-0" / "report.json"
    report = json.loads(path.read_text())
    del report["config"]["kill_revive"]["spare_device_blocks"]
    path.write_text(json.dumps(report))
    first = path.stat().st_mtime_ns
    assert main([*common, "--seeds", "1", "--reuse"]) == 0
    assert path.stat().st_mtime_ns == first  # reused
    assert main([*common, "--seeds", "1", "--reuse", "kill_revive.spare_device_blocks=true",
                 "placement.placement=dlora", "placement.dlora_device_blocks=1"]) == 2
    assert "its config differs at kill_revive.spare_device_blocks (False there, True now)" in capsys.readouterr().err


@pytest.mark.parametrize("seeds", ["0", "-2"])
def test_seeds_below_one_are_refused_before_any_run(tmp_path, capsys, seeds):
    out = tmp_path / "cmp"
    assert main(["compare", "dlora", "--preset", "tiny", "--seeds", seeds, "--out", str(out)]) == 2
    assert f"--seeds must be a whole number of runs per method, at least 1, not {seeds}" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_compare_cli_runs_every_seed_on_the_tiny_preset(tmp_path, capsys):
    """Two seeds of two dlora methods on the tiny model, through the CLI: different seeds, different runs."""
    out = tmp_path / "cmp"
    args = ["compare", "dlora", "--preset", "tiny", "--methods", "no_kr,kr", "--seeds", "2", "--out", str(out),
            "--no-progress", "federation.num_devices=2", "federation.rounds=2", "federation.local_steps=1",
            "data.limit=80", "data.max_length=96", "eval.generation=false", "eval.perplexity_examples=8",
            "fleet.memory_range=[1000000000,2000000000]", "fleet.flops_per_s=[1e8,4e8]"]
    assert main(args) == 0
    assert "comparison.md" not in capsys.readouterr().err
    for method in ("no_kr", "kr"):
        for seed in (0, 1):
            assert (out / method / f"seed-{seed}" / "report.json").is_file()
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["seeds"] == [0, 1]
    for entry in saved["methods"].values():
        runs = entry["runs"]
        assert [r["seed"] for r in runs.values()] == [0, 1]
        assert runs["seed-0"]["heldout_loss_per_round"] != runs["seed-1"]["heldout_loss_per_round"]
        finals = np.array([r["final_heldout_loss"] for r in runs.values()])
        assert entry["spread"]["final_heldout_loss"]["mean"] == pytest.approx(finals.mean())
        assert entry["spread"]["final_heldout_loss"]["std"] == pytest.approx(finals.std(ddof=1))
        assert all(run["simulated_s"] is not None and run["simulated_s"] > 0 for run in runs.values())
    for method, entry in saved["methods"].items():
        for seed, run in entry["runs"].items():
            report = json.loads((out / method / seed / "report.json").read_text())
            assert run["simulated_s_to_target"] == simulated_s_to_target(report["rounds"], saved["target_heldout_loss"])
    # the worst method's mean final is the target, so at least one of its seeds reaches it
    assert any(r["rounds_to_target"] is not None for e in saved["methods"].values() for r in e["runs"].values())
    assert "±" in (out / "comparison.md").read_text()
    assert (out / "convergence.png").stat().st_size > 0


# ----------------------------------------------------------------------- Issue 21 finding 7: --reuse checks a report


def _run_then_reuse(tmp_path, monkeypatch, capsys):
    """A comparison of one method (seed 5) whose run writes a report as run_experiment would, then the same
    comparison with --reuse reading it back; from then on a run is an error. Returns (the --reuse
    arguments, the run folder, the report as written)."""
    def fake_run(config, out, **_):
        report = _fake_report(config.seed, 0.0)
        report.update(splitpeft_version=__version__, config=json.loads(json.dumps(_clean(to_dict(config)))))
        write_json(Path(out) / "report.json", report)
        return report

    def no_run(config, out, **_):
        raise AssertionError(f"{out} was run again")

    out = tmp_path / "cmp"
    args = ["compare", "dlora", "--preset", "tiny", "--methods", "no_kr", "--out", str(out), "--no-progress", "seed=5"]
    monkeypatch.setattr(compare, "run_experiment", fake_run)
    assert main(args) == 0
    monkeypatch.setattr(compare, "run_experiment", no_run)
    assert main([*args, "--reuse"]) == 0  # the report as written fits
    capsys.readouterr()
    folder = out / "no_kr" / "seed-5"
    return [*args, "--reuse"], folder, json.loads((folder / "report.json").read_text())


def _refusal(args, capsys) -> str:
    """Run the CLI, expect exit 2 and exactly one line on stderr; return it."""
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_reuse_refuses_a_report_edited_to_a_negative_perplexity(tmp_path, monkeypatch, capsys):
    """Issue 21 finding 7: a report edited to perplexity -5 was copied into comparison.json. It is now
    refused, naming the folder and the key, before any run; comparison.json keeps what it had; --overwrite
    runs it again."""
    args, folder, report = _run_then_reuse(tmp_path, monkeypatch, capsys)
    comparison = folder.parent.parent / "comparison.json"
    before = comparison.read_text()
    report["eval"]["perplexity"] = -5
    write_json(folder / "report.json", report)
    line = _refusal(args, capsys)
    assert f"{folder} was not reused: in its report.json, eval.perplexity = -5 is not a finite number >= 1" in line
    assert "use --overwrite to run it again" in line
    assert comparison.read_text() == before
    assert "eval.perplexity = -5" in _refusal([*args, "--seeds", "2"], capsys)  # before seed 6 runs (a run would raise)
    assert not (folder.parent / "seed-6").exists()
    runs: list[Path] = []
    monkeypatch.setattr(compare, "run_experiment", lambda config, out, **_: runs.append(out) or _fake_report(config.seed, 0.0))
    assert main([*args, "--overwrite"]) == 0
    assert runs == [folder]


def test_reuse_refuses_a_report_with_a_key_missing(tmp_path, monkeypatch, capsys):
    """Issue 21 finding 7: a report without a key compare reads gave a KeyError traceback; now one line."""
    args, folder, report = _run_then_reuse(tmp_path, monkeypatch, capsys)
    del report["totals"]["bytes_up"]
    write_json(folder / "report.json", report)
    assert f"{folder} was not reused: in its report.json, totals.bytes_up is missing" in _refusal(args, capsys)
    del report["rounds"][1]["devices"]["device-0"]["train_loss"]
    write_json(folder / "report.json", report)
    assert "rounds[1].devices.device-0.train_loss is missing" in _refusal(args, capsys)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda r: r["rounds"][1]["devices"]["device-0"].update(tokens="60"),
     'rounds[1].devices.device-0.tokens = "60" is not a whole number from 0 to 9223372036854775807'),
    (lambda r: r["rounds"][0]["devices"]["device-1"].update(tokens=True), "rounds[0].devices.device-1.tokens = true is not"),
    (lambda r: r["totals"].update(device_flops=1.5), "totals.device_flops = 1.5 is not a whole number"),
    (lambda r: r["totals"].update(bytes_down=-9), "totals.bytes_down = -9 is not a whole number from 0"),
    (lambda r: r["totals"]["per_device"].update({"device-0": []}), "totals.per_device.device-0 = [] is not an object"),
    (lambda r: r.update(rounds={}), "rounds = {} is not a list"),
    (lambda r: r["rounds"][2]["devices"]["device-1"].update(train_loss=float("nan")),
     "rounds[2].devices.device-1.train_loss = NaN is not a finite number"),
    (lambda r: r["rounds"][0].update(eval_perplexity=0.5), "rounds[0].eval_perplexity = 0.5 is not a finite number >= 1 or null"),
    (lambda r: r["eval"].update(bleu=250), "eval.bleu = 250 is not a finite number from 0 to 100 or null"),
    (lambda r: r["eval"].update(perplexity=10**400), "eval.perplexity = 1000000000000"),
    (lambda r: r["info"].update(plans="none"), 'info.plans = "none" is not a list or null'),
], ids=["string-count", "true-count", "fractional-flops", "negative-bytes", "device-not-object", "rounds-not-list",
        "nan-loss", "perplexity-below-1", "bleu-above-100", "perplexity-beyond-float", "plans-not-list"])
def test_reuse_refuses_a_report_with_a_value_of_the_wrong_type_or_range(tmp_path, monkeypatch, capsys, edit, expected):
    """Issue 21 finding 7: a string where a count belongs gave a TypeError traceback, and NaN, a negative
    count or BLEU 250 went into comparison.json; each is now one line naming the key and the value."""
    args, folder, report = _run_then_reuse(tmp_path, monkeypatch, capsys)
    edit(report)
    (folder / "report.json").write_text(json.dumps(report))  # as edited: NaN stays NaN
    line = _refusal(args, capsys)
    assert line.startswith(f"splitpeft: error: {folder} was not reused: in its report.json, ") and expected in line
    assert len(line) < 400  # a huge value is cut


@pytest.mark.parametrize(("depth", "expected"), [
    (100_000, "its report.json nests lists or objects deeper than Python can parse"),  # json.loads: RecursionError
    (100, "its report.json nests deeper than 32 levels at info.plans[0][0]"),  # parses; compare must not recurse into it
])
def test_reuse_refuses_a_deeply_nested_report(tmp_path, monkeypatch, capsys, depth, expected):
    """Issue 21 finding 7: 100,000 nested lists in a report gave a RecursionError traceback; 100 were copied
    into comparison.json. Both are refused in one line."""
    args, folder, report = _run_then_reuse(tmp_path, monkeypatch, capsys)
    report["info"]["plans"] = "HERE"
    (folder / "report.json").write_text(json.dumps(report).replace('"HERE"', "[" * depth + "]" * depth))
    assert f"{folder} was not reused: {expected}" in _refusal(args, capsys)


@pytest.mark.parametrize("content", [
    b'{"splitpeft_version": "0', b"\xff\xfe\x00binary", b"[" * 100_000,
], ids=["cut-short", "not-utf8", "unclosed-brackets"])
def test_reuse_refuses_a_report_that_is_not_json(tmp_path, monkeypatch, capsys, content):
    """Issue 21 finding 7: a report.json that is not JSON is refused in one line naming the folder (a file
    cut short or not UTF-8 was already; 100,000 unclosed brackets gave a RecursionError traceback)."""
    args, folder, _ = _run_then_reuse(tmp_path, monkeypatch, capsys)
    (folder / "report.json").write_bytes(content)
    assert f"{folder} was not reused: its report.json " in _refusal(args, capsys)



def test_every_kill_and_revive_selection_is_a_method_of_the_dlora_suite_and_keeps_a_hybrids_device_blocks():
    """Each KR selection the config offers is a named method; a user's hybrid override survives the method's own."""
    from splitpeft.config import load_config
    from splitpeft.parties.killrevive import SELECTIONS

    base = load_config(None, [], preset="tiny")
    for selection in SELECTIONS:
        method = "kr" if selection == "dynamic" else selection if selection.startswith("static") else f"kr_{selection}"
        assert method in compare.SUITES["dlora"], f"no dlora method for kill_revive.selection={selection}"
        config = compare.method_config(base, None, "tiny", ["placement.dlora_device_blocks=1"],
                                       compare.SUITES["dlora"][method])
        assert config.kill_revive.enabled and config.kill_revive.selection == selection
        assert config.placement.placement == "dlora" and config.placement.dlora_device_blocks == 1


def test_the_after_warmup_columns_appear_where_devices_compute_adapter_branches(tmp_path, monkeypatch):
    from splitpeft.experiment.compare import markdown_table

    monkeypatch.setattr(compare, "run_experiment", lambda config, out, **_: _fake_report(config.seed, 0.0))
    comparison = run_comparison("dlora", tmp_path / "cmp", preset="tiny", overrides=["seed=5"], methods=["no_kr"], progress=False)
    assert "MB after warm-up" not in markdown_table(comparison)  # no adapter-branch FLOPs measured on the devices
    comparison["methods"]["no_kr"]["spread"]["device_adapter_flops"]["mean"] = 5e9
    assert "| MB after warm-up | adapter GFLOP after warm-up |" in markdown_table(comparison)


def test_last_round_fall_says_how_much_the_last_round_still_gained():
    """The comparison's flattening measure: 1 - ppl_last / ppl_before, from held-out log perplexities."""
    import math

    from splitpeft.experiment.compare import last_round_fall

    assert last_round_fall([math.log(6.0), math.log(5.0), math.log(4.0)]) == pytest.approx(0.2)
    assert last_round_fall([math.log(4.0), math.log(4.4)]) == pytest.approx(-0.1)  # it rose
    assert last_round_fall([math.log(4.0)]) is None and last_round_fall([None, 1.0]) is None
    # over several rounds: the first to the last of the window, what the rounds between did aside
    losses = [math.log(p) for p in (6.0, 5.0, 4.0, 4.2, 3.9, 3.8)]
    assert last_round_fall(losses, 4) == pytest.approx(1 - 3.8 / 5.0)
    assert last_round_fall(losses[2:], 4) is None and last_round_fall([None, *losses[1:]], 5) is None


def test_a_method_that_needs_the_hybrid_runs_only_when_named():
    """`compare dlora` without --methods runs every method its defaults allow: kr_server_spared needs
    dlora's hybrid, so it is left out there (a config check would refuse every run otherwise)."""
    from splitpeft.config import ConfigError, load_config
    from splitpeft.experiment.compare import SUITES, default_methods, method_config

    assert "kr_server_spared" in SUITES["dlora"] and "kr_server_spared" not in default_methods("dlora")
    assert default_methods("hsplit") == list(SUITES["hsplit"])
    base = load_config(None, [], preset="tiny")
    for method in default_methods("dlora"):  # every default builds a valid config
        method_config(base, None, "tiny", [], SUITES["dlora"][method])
    with pytest.raises(ConfigError, match="spare_device_blocks"):
        method_config(base, None, "tiny", [], SUITES["dlora"]["kr_server_spared"])
    hybrid = ["placement.placement=dlora", "placement.dlora_device_blocks=1"]
    assert method_config(load_config(None, hybrid, preset="tiny"), None, "tiny", hybrid,
                         SUITES["dlora"]["kr_server_spared"]).kill_revive.spare_device_blocks


SERVER16_OWN_A = {"hsplit.time_tokens": "data", "federation.aggregator": "noise_free", "federation.noise_free_factors": "own_a"}
MEAN_A = {"federation.aggregator": "noise_free", "federation.noise_free_factors": "mean_a"}


@pytest.mark.parametrize("method, reference, method_has, reference_has", [
    # HetLoRA's zero-padding in place of noise-free aggregation with each holder's own A
    ("hsplitlora_zero_pad", "hsplitlora_server16_data", {"hsplit.time_tokens": "data", "federation.aggregator": "zero_pad"},
     SERVER16_OWN_A),
    # noise-free's warm restarts from one averaged A in place of each holder's own
    ("hsplitlora_mean_a", "hsplitlora_server16_data", {"hsplit.time_tokens": "data", **MEAN_A}, SERVER16_OWN_A),
    # HetLoRA's plans (budget_rank) with noise-free aggregation: the two aggregations where the ranks differ
    ("hetlora_mean_a", "hetlora", {**MEAN_A, "federation.noise_free_frozen": "low_rank"},
     {"hsplit.planner": "budget_rank", "federation.aggregator": "zero_pad"}),
    # mean_a's warm holders computing W x - s B (A x) instead of holding copies of W
    ("hsplitlora_low_rank", "hsplitlora_mean_a", {**MEAN_A, "federation.noise_free_frozen": "low_rank"},
     {**MEAN_A, "federation.noise_free_frozen": "copy"}),
])
def test_aggregation_ablations_differ_from_their_reference_only_in_aggregation(method, reference, method_has, reference_has):
    """The ablations of issue 25: the same planner settings (planner, server rank, time model) as
    the method they ablate, another aggregation or another way to hold the warm frozen weights;
    nothing else differs."""
    from splitpeft.config import load_config, to_dict
    from splitpeft.experiment.compare import SUITES, first_difference, method_config

    fleet = ["federation.num_devices=2", "fleet.memory_bytes=[3000000,6000000]"]
    base = load_config(None, fleet, preset="tiny")
    ablation = to_dict(method_config(base, None, "tiny", fleet, SUITES["hsplit"][method]))
    wanted = to_dict(method_config(base, None, "tiny", fleet, SUITES["hsplit"][reference]))

    def at(tree, dotted):
        section, key = dotted.split(".")
        return tree[section][key]

    assert ablation["hsplit"] == wanted["hsplit"]
    assert {key: at(ablation, key) for key in method_has} == method_has
    assert {key: at(wanted, key) for key in reference_has} == reference_has
    for key in ("aggregator", "noise_free_start", "noise_free_factors", "noise_free_moments", "noise_free_frozen"):
        del ablation["federation"][key], wanted["federation"][key]
    assert first_difference(ablation, wanted) is None


@pytest.mark.parametrize("suite, method", [("dlora", "no_kr"), ("hsplit", "hsplitlora_server16_data")])
def test_checkpoints_continue_a_finished_run_to_more_rounds_as_if_run_that_long(tmp_path, capsys, suite, method):
    """--checkpoints with --reuse: a 2-round run is continued to 3 rounds from the state kept beside
    its folder, not run again, and ends where a 3-round run from the start ends (every round's
    held-out perplexity, simulated time and traffic, the final evaluation); a shorter run without a
    kept state, or one that differs in more than the rounds, is refused, naming why. HSplitLoRA's
    warm restarts keep each device's moments and warm adapters across rounds: they too continue."""
    common = ["compare", suite, "--preset", "tiny", "--methods", method, "--no-progress", "--seeds", "1",
              "federation.num_devices=2", "federation.local_steps=1", "data.limit=40",
              "eval.generation=false", "eval.perplexity_examples=4", "fleet.memory_bytes=[3000000,6000000]"]
    out = tmp_path / "cmp"
    folder, state = out / method / "seed-0", out / method / "seed-0.checkpoint"
    assert main([*common, "--out", str(out), "--checkpoints", "federation.rounds=2"]) == 0
    assert state.is_dir() and len(json.loads((folder / "report.json").read_text())["rounds"]) == 2
    assert main([*common, "--out", str(out), "--checkpoints", "--reuse", "federation.rounds=3"]) == 0
    continued = json.loads((folder / "report.json").read_text())
    assert main([*common, "--out", str(tmp_path / "direct"), "federation.rounds=3"]) == 0
    direct = json.loads((tmp_path / "direct" / method / "seed-0" / "report.json").read_text())
    assert len(continued["rounds"]) == 3
    for key in ("eval_perplexity", "simulated_round_s"):
        assert [r[key] for r in continued["rounds"]] == [r[key] for r in direct["rounds"]]
    assert continued["totals"]["bytes_up"] == direct["totals"]["bytes_up"]
    assert continued["eval"]["perplexity"] == pytest.approx(direct["eval"]["perplexity"], rel=1e-6)
    # a continuation that stopped part way (its state ahead of the finished report) goes on from there
    shorter = json.loads((tmp_path / "direct" / method / "seed-0" / "report.json").read_text())
    shorter["rounds"], shorter["config"]["federation"]["rounds"] = shorter["rounds"][:2], 2
    (folder / "report.json").write_text(json.dumps(shorter))  # the folder as the 2-round run left it
    assert main([*common, "--out", str(out), "--checkpoints", "--reuse", "federation.rounds=4"]) == 0
    longer = json.loads((folder / "report.json").read_text())["rounds"]
    assert [r["eval_perplexity"] for r in longer[:3]] == [r["eval_perplexity"] for r in direct["rounds"]]
    assert len(longer) == 4
    capsys.readouterr()
    # a stopped run whose kept state is of another run is refused before any method runs
    stopped = tmp_path / "stopped"
    assert main([*common, "--out", str(stopped), "--checkpoints", "federation.rounds=1"]) == 0
    shutil.rmtree(stopped / method / "seed-0")  # as a run stopped before its folder was written leaves it
    capsys.readouterr()
    methods = ["--methods", f"{'hetlora' if suite == 'hsplit' else 'kr'},{method}"]
    assert main([*common, *methods, "--out", str(stopped), "--checkpoints", "federation.rounds=1",
                 "federation.lr=0.01"]) == 2
    assert "cannot continue: checkpoint" in capsys.readouterr().err
    assert not (stopped / methods[1].split(",")[0]).exists()  # nothing ran
    # without the kept state there is nothing to continue from
    plain = tmp_path / "plain"
    assert main([*common, "--out", str(plain), "federation.rounds=1"]) == 0
    assert main([*common, "--out", str(plain), "--checkpoints", "--reuse", "federation.rounds=2"]) == 2
    assert "there is no checkpoint of it in" in capsys.readouterr().err
    # another learning rate is another run, even with a kept state
    assert main([*common, "--out", str(out), "--checkpoints", "--reuse", "federation.rounds=5", "federation.lr=0.01"]) == 2
    line = capsys.readouterr().err
    assert "nor continued: it differs in more than federation.rounds; use --overwrite to run it again" in line
    assert len(json.loads((folder / "report.json").read_text())["rounds"]) == 4  # left as it was
    # --overwrite runs it again from the start, its kept state with it
    assert main([*common, "--out", str(out), "--checkpoints", "--reuse", "--overwrite", "federation.rounds=1",
                 "federation.lr=0.01"]) == 0
    assert len(json.loads((folder / "report.json").read_text())["rounds"]) == 1
