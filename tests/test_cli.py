"""The real CLI, end to end on the tiny preset, and its handling of bad input."""

import json
import subprocess
import sys

import pytest

from splitpeft.cli import main

ROUND_KEYS = {"bytes_up", "bytes_down", "flops", "peak_memory_bytes", "tokens", "train_loss", "wall_s"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitpeft.cli", *args], capture_output=True, text=True, timeout=600)


def _greedy_continuation(run, prompt: str, max_new_tokens: int) -> str:
    """What `generate` should print for `prompt`, decoded by hand: the run's base model with its
    saved adapter, greedy argmax token by token (no special tokens added, stop at eos), the new
    tokens decoded, stripped and cut at the first newline."""
    import torch
    from peft import PeftModel

    from splitpeft.config import load_config
    from splitpeft.model.adapters import peft_quietly
    from splitpeft.model.loading import load_model

    config = load_config(run / "config.yaml")
    loaded = load_model(config.model.name, seed=config.seed)
    with peft_quietly():  # transformers 5's deprecation warning on the attribute peft reads
        model = PeftModel.from_pretrained(loaded.model, str(run / "adapter")).eval()
    tokenizer = loaded.tokenizer
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids  # (1, T)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.cat([ids, torch.tensor([new], dtype=ids.dtype)], dim=1)).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip().split("\n", 1)[0].strip()


@pytest.mark.slow
def test_simulate_evaluate_generate_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = _run("simulate", "--preset", "tiny", "--out", str(out), "--no-progress", "federation.rounds=2")
    assert result.returncode == 0, result.stderr
    assert f"report: {out / 'report.json'}" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert len(report["rounds"]) == 2
    for entry in report["rounds"]:
        assert set(entry["devices"]) == {"device-0", "device-1", "device-2"}
        for stats in entry["devices"].values():
            assert ROUND_KEYS <= set(stats)
            assert stats["bytes_up"] > 0 and stats["flops"] > 0 and stats["peak_memory_bytes"] > 0
        assert entry["eval_perplexity"] > 1
    for metric in ("perplexity", "bleu", "nist", "rouge_l", "cider"):
        assert metric in report["eval"]
    assert report["totals"]["bytes_up"] == sum(
        s["bytes_up"] for r in report["rounds"] for s in r["devices"].values()
    )
    for name in ("config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "loss.png", "bytes.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder or lock beside it

    evaluated = _run("evaluate", str(out), "eval.groups=2")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((out / "eval.json").read_text())["perplexity"] == pytest.approx(report["eval"]["perplexity"], rel=1e-4)

    mr = "name : Aromi | food : Italian"
    generated = _run("generate", str(out), "--mr", mr, "--max-new-tokens", "5")
    assert generated.returncode == 0, generated.stderr
    # --mr formats the MR with the training template: the printed line is exactly the run's
    # greedy continuation of that prompt, and it is not empty
    expected = _greedy_continuation(out, f"Meaning representation: {mr}\nDescription:", 5)
    assert expected and generated.stdout == expected + "\n"
    # --prompt takes the prompt as it is: the same prompt by hand prints the same line
    raw = _run("generate", str(out), "--prompt", f"Meaning representation: {mr}\nDescription:", "--max-new-tokens", "5")
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout == generated.stdout
    other = _run("generate", str(out), "--prompt", "The Aromi is", "--max-new-tokens", "5")
    assert other.returncode == 0, other.stderr
    expected_other = _greedy_continuation(out, "The Aromi is", 5)
    assert expected_other and other.stdout == expected_other + "\n"


@pytest.mark.parametrize("args,message", [
    (["simulate", "--preset", "tiny", "federation.roundz=2"], "unknown config key 'federation.roundz'"),
    (["simulate", "--preset", "tiny", "placement.split_layer=9"], "split_layer 9 is out of range"),
    (["simulate", "--preset", "tiny", "model.name=./no/such/model"], "does not exist"),
    (["simulate", "--preset", "tiny", "data.source=e2e", "data.path=/no/such/file.txt"], "/no/such/file.txt"),
    (["simulate", "--config", "/no/such/config.yaml"], "does not exist"),
    (["evaluate", "/no/such/run"], "is not a splitpeft run folder"),
    (["simulate", "--preset", "tiny", "eval.length_penalty=100"], "eval.length_penalty must be in [-10, 10], not 100"),
    (["simulate", "--preset", "tiny", "eval.length_penalty=short"], "eval.length_penalty must be a number"),
    (["simulate", "--preset", "tiny", "eval.no_repeat_ngram_size=-1"], "eval.no_repeat_ngram_size must be in [0, 64], not -1"),
    (["simulate", "--preset", "tiny", "eval.no_repeat_ngram_size=1.5"], "eval.no_repeat_ngram_size must be an integer"),
])
def test_bad_input_is_one_clear_error_and_no_run_folder(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    if args[0] == "simulate":
        args = [*args, "--out", str(out), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitpeft: error:") and message in err
    assert not out.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".run.")]


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text("{}")
    assert main(["simulate", "--preset", "tiny", "--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (out / "report.json").read_text() == "{}"


# ------------------------------------------------------------------ output paths (issue 12, finding 9)


def _user_files(root):
    """Every file under `root` with its content: what a refused run must leave as it was."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _checkpoint_folder(path):
    from splitpeft.federation.checkpoint import write_state

    write_state(path, {"rounds_done": 1}, {})


# (arguments, working folder relative to the test's folder, expected message): the test's folder
# holds work/notes.txt, mydata/notes.txt and elsewhere/ (a splitpeft checkpoint)
UNSAFE = {
    "--checkpoint is a folder of the user's": (["--out", "run", "--checkpoint", "../mydata"], "work",
                                               "checkpoint folder ../mydata exists and was not written by splitpeft"),
    "--out . --overwrite": (["--out", ".", "--overwrite"], "work", "is the working folder or one of its parents"),
    "--out .. --overwrite": (["--out", "..", "--overwrite"], "work", "is the working folder or one of its parents"),
    "--checkpoint .": (["--out", "run", "--checkpoint", "."], "work", "is the working folder or one of its parents"),
    "--out a folder of the user's --overwrite": (["--out", "../mydata", "--overwrite"], "work",
                                                 "was not written by splitpeft (no .splitpeft-run in it)"),
    "--checkpoint inside --out": (["--out", "run", "--checkpoint", "run/ckpt"], "work",
                                  "checkpoint folder run/ckpt is inside the output folder run"),
    "--out inside --checkpoint": (["--out", "ckpt/run", "--checkpoint", "ckpt"], "work",
                                  "output folder ckpt/run is inside the checkpoint folder ckpt"),
    "symlinked --out": (["--out", "link", "--overwrite"], "work", "output folder link is a symbolic link"),
    "symlinked --checkpoint": (["--out", "run", "--checkpoint", "link"], "work", "checkpoint folder link is a symbolic link"),
    "a run's checkpoint without --resume": (["--out", "run", "--checkpoint", "../elsewhere"], "work",
                                            "holds a checkpoint already: --resume continues that run, --overwrite starts over"),
    "--resume without a checkpoint": (["--out", "run", "--checkpoint", "nothing", "--resume"], "work",
                                      "no checkpoint in nothing to resume from"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_output_paths_that_could_lose_data_are_refused_before_training(tmp_path, capsys, monkeypatch, case):
    """Bug (issue 12, finding 9): `--checkpoint mydata` deleted an unrelated folder, `--out .
    --overwrite` emptied the working folder, a checkpoint inside `--out` was destroyed at the
    end, a symlinked `--out` trained to the end and then failed. Now each is refused with one
    line before any training, and every file is left as it was."""
    from splitpeft.experiment import run

    arguments, cwd, message = UNSAFE[case]
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("the user's notes")
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "notes.txt").write_text("the user's data")
    _checkpoint_folder(tmp_path / "elsewhere")
    (tmp_path / "work" / "link").symlink_to(tmp_path / "mydata")
    before = _user_files(tmp_path)

    def no_training(*_args, **_kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(run, "Simulation", no_training)
    monkeypatch.chdir(tmp_path / cwd)
    assert main(["simulate", "--preset", "tiny", "--no-progress", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitpeft: error:") and message in err and err.count("\n") == 1
    assert _user_files(tmp_path) == before
    assert not [p for p in tmp_path.rglob(".*splitpeft-*")]  # no staging folder or lock left anywhere


def test_overwrite_replaces_only_a_run_folder_splitpeft_wrote(tmp_path, capsys):
    """A run folder carries splitpeft's marker; --overwrite replaces it (and an empty folder),
    and starts a checkpoint of the same run over."""
    args = ["simulate", "--preset", "tiny", "--no-progress", "federation.rounds=1", "federation.local_steps=1",
            "eval.generation=false", "eval.every_round=false", "data.max_length=48"]
    out, checkpoint = tmp_path / "run", tmp_path / "ckpt"
    out.mkdir()  # empty: nothing to lose
    assert main([*args, "--out", str(out), "--checkpoint", str(checkpoint)]) == 0
    assert (out / ".splitpeft-run").is_file() and (checkpoint / "manifest.json").is_file()
    assert main([*args, "--out", str(out), "--checkpoint", str(checkpoint)]) == 2
    assert "is not empty (use --overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(out), "--checkpoint", str(checkpoint), "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "run"]


def test_overrides_after_options_and_unknown_flags(tmp_path, capsys):
    """Overrides may follow options; a stray flag is still an error."""
    out = tmp_path / "cmp"
    assert main(["compare", "hsplit", "--preset", "tiny", "--out", str(out), "federation.roundz=1"]) == 2
    assert "unknown config key 'federation.roundz'" in capsys.readouterr().err
    assert main(["compare", "nosuch", "--preset", "tiny", "--out", str(out)]) == 2
    assert "unknown suite 'nosuch'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["simulate", "--preset", "tiny", "--out", str(out), "--bogus"])
    assert not out.exists()


def test_summary_says_why_a_device_has_no_loss_in_the_last_round():
    from splitpeft.cli import _absence

    last_round = {"devices": {"device-0": {}}, "dropped": [{"device": "device-1", "error": "link cut"}]}
    assert _absence(last_round, "device-1") == "dropped"
    assert _absence(last_round, "device-2") == "not selected"


def test_the_summary_of_a_large_fleet_prints_a_few_device_rows_and_points_to_the_report(capsys):
    from splitpeft.cli import SUMMARY_ROWS, _summary
    from splitpeft.config import load_config

    devices = {f"device-{i}": {"tokens": 10, "bytes_up": 1, "bytes_down": 1, "flops": 1, "peak_memory_bytes": 1}
               for i in range(SUMMARY_ROWS + 30)}
    report = {"info": {"devices": {d: {"split_layer": 2} for d in devices}, "plans": None},
              "rounds": [{"devices": {d: {"train_loss": 1.0} for d in devices}, "selected": list(devices),
                          "completed": list(devices), "dropped": []}],
              "totals": {"per_device": devices}, "eval": {"perplexity": 3.0}}
    _summary(report, load_config(preset="tiny"))
    out = capsys.readouterr().out
    assert f"device-{SUMMARY_ROWS - 1} " in out and f"device-{SUMMARY_ROWS} " not in out
    assert f"the first {SUMMARY_ROWS} of {SUMMARY_ROWS + 30} devices that trained; all of them: report.json" in out


# ------------------------------------------------------------------ evaluate --data (issue 14)

TEST_FILE = """\
name : Aromi | food : Italian||Aromi serves Italian food.
name : Aromi | food : Italian||Italian food is served at Aromi.
name : The Mill | area : riverside||The Mill is by the river.
name : Zizzi | eatType : pub||Zizzi is a pub.
name : Zizzi | eatType : pub||There is a pub called Zizzi.
name : Zizzi | eatType : pub||Zizzi is a pub in town.
"""


@pytest.fixture(scope="module")
def trained_on_a_file(tmp_path_factory):
    """A tiny run trained on an E2E file that is deleted afterwards: evaluating on --data
    must not need it."""
    root = tmp_path_factory.mktemp("evaluate-data")
    train = root / "train.txt"
    train.write_text("".join(f"name : Place{i} | food : Thai||Place{i} serves Thai food.\n" for i in range(40)))
    run = root / "run"
    assert main(["simulate", "--preset", "tiny", "--no-progress", "--out", str(run), "data.source=e2e",
                 f"data.path={train}", "data.limit=null", "federation.rounds=1", "federation.local_steps=1",
                 "eval.generation=false", "eval.every_round=false", "data.max_length=48"]) == 0
    train.unlink()
    test = root / "test.txt"
    test.write_text(TEST_FILE)
    return run, test


def test_evaluate_on_a_test_file_holds_out_all_of_it(trained_on_a_file, capsys):
    from splitpeft.cli import _adapted_model, _load_run
    from splitpeft.data.batching import encode
    from splitpeft.data.sources import load_examples
    from splitpeft.experiment.evaluation import perplexity

    run, test = trained_on_a_file
    assert main(["evaluate", str(run), "--data", str(test), "eval.generation=true", "eval.groups=2"]) == 0
    assert f"written: {run / 'eval-test.json'}" in capsys.readouterr().out
    result = json.loads((run / "eval-test.json").read_text())
    assert result["data"] == str(test)
    # generation: the first eval.groups MRs of the file, each against all of its references
    assert [s["group"] for s in result["samples"]] == ["name : Aromi | food : Italian", "name : The Mill | area : riverside"]
    assert result["samples"][0]["references"] == ["Aromi serves Italian food.", "Italian food is served at Aromi."]
    assert {"bleu", "nist", "rouge_l", "cider"} <= set(result)
    # perplexity: every example of the file (the run's config says 16), recomputed here
    config = _load_run(run, [])
    assert config.eval.perplexity_examples == 16 < 100
    model, tokenizer = _adapted_model(run, config)
    examples = load_examples("e2e", str(test))
    expected = perplexity(model, encode(examples, tokenizer, config.data.max_length), config.federation.batch_size,
                          int(tokenizer.pad_token_id))
    assert result["perplexity_examples"] == 6
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)

    assert main(["evaluate", str(run), "--data", str(test), "eval.perplexity_examples=2"]) == 0
    assert json.loads((run / "eval-test.json").read_text())["perplexity_examples"] == 2
    assert not (run / "eval.json").exists()  # the held-out split was never evaluated


@pytest.mark.parametrize("content,message", [
    (None, "e2e data file not found: "),
    ("name : Aromi||Aromi is nice.\nno separator here\n", "test.txt:2: expected 'MR||text', found no '||'"),
    ("", "has no examples"),
])
def test_evaluate_with_a_missing_or_malformed_test_file_is_one_error(trained_on_a_file, tmp_path, capsys, content, message):
    run, _ = trained_on_a_file
    test = tmp_path / "test.txt"
    if content is not None:
        test.write_text(content)
    before = {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}
    assert main(["evaluate", str(run), "--data", str(test)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("splitpeft: error:") and message in err and err.count("\n") == 1
    assert {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()} == before


def test_evaluate_passes_the_eval_decoding_options_to_generation(trained_on_a_file, monkeypatch):
    from splitpeft.experiment import run as run_module

    seen = {}
    real = run_module.evaluate_generation

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "evaluate_generation", spy)
    run, test = trained_on_a_file
    assert main(["evaluate", str(run), "--data", str(test), "eval.generation=true", "eval.groups=1", "eval.max_new_tokens=4",
                 "eval.num_beams=2", "eval.length_penalty=0.8", "eval.no_repeat_ngram_size=3"]) == 0
    assert (seen["num_beams"], seen["length_penalty"], seen["no_repeat_ngram_size"]) == (2, 0.8, 3)


def test_a_run_prints_one_line_per_round_when_its_output_is_a_file(tmp_path):
    """Output to a pipe (a log file, CI): no bar, but one plain line per round with loss, time and bytes."""
    out = tmp_path / "run"
    result = _run("simulate", "--preset", "tiny", "--out", str(out), "federation.rounds=2", "eval.generation=false")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("round ")]
    assert [line.split(" | ")[0] for line in lines] == ["round 1/2", "round 2/2"], result.stdout
    report = json.loads((out / "report.json").read_text())
    for line, entry in zip(lines, report["rounds"]):
        assert "devices 3/3" in line and f"held-out ppl {entry['eval_perplexity']:.3f}" in line
        up = sum(s["bytes_up"] for s in entry["devices"].values()) / 1e6
        assert f"MB up {up:.1f}" in line and "\x1b" not in line  # plain text, no terminal codes
