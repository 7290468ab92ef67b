"""No held-out example can stop an evaluation or make it run for minutes (issue 21 finding 4):
prompts keep their end within the model's context, scored sequences their last positions, huge
texts are tokenised only as far as they can be kept, and generation has a time bound."""

import json
import time

import pytest
import torch

from splitpeft.cli import main
from splitpeft.data.batching import EncodedExample, bounded_token_ids, encode
from splitpeft.data.examples import Example
from splitpeft.experiment.evaluation import evaluate_generation, generate_outputs, perplexity
from splitpeft.model.loading import load_model

LONG_MR = "name : Aromi | area : riverside | food : " + "Italian, " * 330  # about 3 KB: some 700 tokens


@pytest.fixture(scope="module")
def gpt2():
    loaded = load_model("tiny-gpt2")
    return loaded.model.eval(), loaded.tokenizer


def _greedy(model, ids: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Greedy decoding by hand from `ids` (an independent reference for `generate_outputs`)."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == eos_id:
                break
            new.append(token)
    return new


def test_a_prompt_longer_than_the_context_keeps_its_end(gpt2):
    """Issue 21 finding 4: a held-out prompt longer than GPT-2's 256 positions crashed generation
    (IndexError in the position table). Now it keeps its last 256 - max_new_tokens tokens: the
    output is greedy decoding from exactly those, and the output says the prompt was truncated."""
    model, tokenizer = gpt2
    prompt = f"Meaning representation: {LONG_MR}\nDescription:"
    whole = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert len(whole) > 256
    short = "Meaning representation: name : Zizzi\nDescription:"
    [long_out, short_out] = generate_outputs(model, tokenizer, [prompt, short], max_new_tokens=6, batch_size=2)
    assert long_out.truncated and not short_out.truncated and not long_out.cut
    expected = _greedy(model, whole[-(256 - 6):], 6, tokenizer.eos_token_id)
    assert long_out.text == tokenizer.decode(expected, skip_special_tokens=True).strip().split("\n", 1)[0].strip()


def test_perplexity_of_a_sequence_longer_than_the_context_scores_its_last_positions(gpt2):
    """Issue 21 finding 4: perplexity inputs stay within the context (GPT-2: IndexError past 256)."""
    model, tokenizer = gpt2
    ids = list(range(10, 310))  # 300 tokens, the last 20 labelled
    item = EncodedExample(ids, [-100] * 280 + ids[280:])
    kept = EncodedExample(ids[-256:], item.labels[-256:])
    assert perplexity(model, [item], 1, tokenizer.pad_token_id) == pytest.approx(
        perplexity(model, [kept], 1, tokenizer.pad_token_id), rel=1e-6)


def test_a_huge_text_is_tokenised_only_as_far_as_it_is_kept(gpt2):
    """Issue 21 finding 4: a 1 MB MR was tokenised whole (seconds each time) before generation ran
    on all of its ~300,000 tokens. The window at the kept end gives the whole text's ids there."""
    _, tokenizer = gpt2
    text = "".join(f"name : Place{i} | food : Thai | " for i in range(200))
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert bounded_token_ids(tokenizer, text, 50, keep="end") == whole[-50:]
    assert bounded_token_ids(tokenizer, text, 50, keep="start") == whole[:50]
    assert bounded_token_ids(tokenizer, "short", 50, keep="end") == tokenizer("short", add_special_tokens=False)["input_ids"]
    spaces = " " * 5000 + "end"  # few characters per token is not assumed: the window widens
    assert bounded_token_ids(tokenizer, spaces, 40, keep="end") == tokenizer(spaces, add_special_tokens=False)["input_ids"][-40:]
    huge = "name : Aromi | food : Italian | " * 32_000  # 1 MB
    started = time.perf_counter()
    ids = bounded_token_ids(tokenizer, huge, 256, keep="end")
    assert len(ids) == 256 and time.perf_counter() - started < 0.5
    # encode (training and perplexity) keeps the same tokens as before for such a prompt
    [encoded] = encode([Example(huge, " Aromi.", "g")], tokenizer, 64)
    completion = tokenizer(" Aromi.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded.input_ids[-len(completion):] == completion and len(encoded.input_ids) == 64


def test_generation_has_a_time_bound(gpt2):
    """Issue 21 finding 4: generation time is bounded (eval.max_generation_s_per_prompt): a batch
    stopped by the clock is kept as it stood and counted as cut."""
    model, tokenizer = gpt2
    examples = [Example(f"Meaning representation: name : Place{i}\nDescription:", f" Place{i}.", f"g{i}") for i in range(3)]
    scores, samples = evaluate_generation(model, tokenizer, examples, max_new_tokens=200, max_s_per_prompt=1e-6,
                                           meteor=False)
    assert [s["cut"] for s in samples] == [True, True, True]
    assert "bleu" in scores
    _, unbounded = evaluate_generation(model, tokenizer, examples[:1], max_new_tokens=3, meteor=False)
    assert unbounded[0]["cut"] is False


# ------------------------------------------------------------------ the CLI, as found

def _e2e_file(path, lines):
    path.write_text("".join(f"{mr}||{text}\n" for mr, text in lines))
    return path


@pytest.fixture(scope="module")
def gpt2_run_with_long_prompts(tmp_path_factory):
    """Issue 21 finding 4 as found: a tiny GPT-2 run whose held-out MRs are 3 KB long trained the
    whole run and then crashed in evaluation, leaving no run folder. Returns (exit status, run)."""
    root = tmp_path_factory.mktemp("gpt2-long")
    train = _e2e_file(root / "train.txt", [(f"name : Place{i} | food : " + "Thai, " * 500, f"Place{i} serves Thai food.")
                                           for i in range(30)])
    run = root / "run"
    status = main(["simulate", "--preset", "tiny", "--no-progress", "--out", str(run), "model.name=tiny-gpt2",
                   "data.source=e2e", f"data.path={train}", "data.limit=null", "data.max_length=48",
                   "federation.rounds=1", "federation.local_steps=1", "eval.groups=2", "eval.max_new_tokens=4"])
    return status, run


def test_a_run_whose_held_out_prompts_exceed_the_context_finishes(gpt2_run_with_long_prompts, capsys):
    """Issue 21 finding 4: the run completes, its report says how many prompts were truncated."""
    status, run = gpt2_run_with_long_prompts
    assert status == 0
    report = json.loads((run / "report.json").read_text())
    assert report["eval"]["prompts_truncated"] == 2 and report["eval"]["groups"] == 2
    assert report["status"] == "finished"


def test_evaluate_data_with_a_3_kb_mr_on_gpt2_does_not_crash(gpt2_run_with_long_prompts, tmp_path, caplog):
    """Issue 21 finding 4: `evaluate --data` with a 3 KB MR crashed on GPT-2 (IndexError)."""
    _, run = gpt2_run_with_long_prompts
    test = _e2e_file(tmp_path / "long.txt", [(LONG_MR, "Aromi is Italian."), ("name : Zizzi", "Zizzi.")])
    with caplog.at_level("WARNING", logger="splitpeft"):
        assert main(["evaluate", str(run), "--data", str(test), "eval.groups=2"]) == 0
    assert "1 of the 2 held-out prompts generation uses are longer than the 252 tokens" in caplog.text
    result = json.loads((run / "eval-long.json").read_text())
    assert result["prompts_truncated"] == 1 and result["groups"] == 2 and result["perplexity"] > 1


def test_evaluate_data_with_a_1_mb_mr_on_llama_finishes_quickly(tmp_path, monkeypatch):
    """Issue 21 finding 4: `evaluate --data` with a 1 MB MR on tiny-llama still ran after 150 s
    (its ~300,000 tokens went to generation whole). Now the model sees at most its context less
    eval.max_new_tokens tokens, and the command takes seconds."""
    from splitpeft import cli

    train = _e2e_file(tmp_path / "train.txt", [(f"name : Place{i}", f"Place{i} serves Thai food.") for i in range(30)])
    run = tmp_path / "run"
    assert main(["simulate", "--preset", "tiny", "--no-progress", "--out", str(run), "data.source=e2e",
                 f"data.path={train}", "data.limit=null", "data.max_length=48", "federation.rounds=1",
                 "federation.local_steps=1", "eval.generation=false", "eval.every_round=false"]) == 0
    test = _e2e_file(tmp_path / "huge.txt", [("name : Aromi | food : " + "Italian, " * 115_000, "Aromi is Italian.")])
    assert test.stat().st_size > 1_000_000
    widths = []
    real = cli._adapted_model

    def watched(run_folder, config):
        model, tokenizer = real(run_folder, config)
        inner = model.generate

        def generate(*args, **kwargs):
            widths.append(kwargs["input_ids"].shape[1])
            assert widths[-1] <= 256 - config.eval.max_new_tokens, "the prompt went to the model whole"
            return inner(*args, **kwargs)

        model.generate = generate
        return model, tokenizer

    monkeypatch.setattr(cli, "_adapted_model", watched)
    started = time.perf_counter()
    assert main(["evaluate", str(run), "--data", str(test), "eval.generation=true", "eval.groups=1"]) == 0
    assert time.perf_counter() - started < 30
    assert widths == [256 - 8]
    result = json.loads((run / "eval-huge.json").read_text())
    assert result["prompts_truncated"] == 1 and len(result["samples"][0]["prompt"]) <= 2000


def test_a_failed_evaluation_leaves_the_trained_run_for_evaluate(tmp_path, capsys, monkeypatch):
    """Issue 21 finding 4: an evaluation that crashed lost the whole run (only the checkpoint
    stayed). Now the trained run (adapter, config, report) is in --out before evaluation starts;
    the failure is one line and exit status 1, and `splitpeft evaluate RUN` evaluates the run and
    completes its report."""
    from splitpeft.experiment import run as run_module

    real = run_module.evaluate_model

    def crashing(*args, **kwargs):
        raise IndexError("index out of range in self")

    monkeypatch.setattr(run_module, "evaluate_model", crashing)
    out = tmp_path / "run"
    status = main(["simulate", "--preset", "tiny", "--no-progress", "--out", str(out), "federation.rounds=1",
                   "federation.local_steps=1", "data.max_length=48", "eval.groups=2", "eval.every_round=false"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.splitlines()[-1] == (
        f"splitpeft: error: evaluation failed (IndexError: index out of range in self); the trained run is in {out} "
        f"(adapter/, config.yaml, report.json): `splitpeft evaluate {out}` evaluates it and completes its report")
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml", "report.json",
                 "loss.png", ".splitpeft-run"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder or lock beside it
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "evaluation failed" and report["eval_error"] == "IndexError: index out of range in self"
    assert "eval" not in report and len(report["rounds"]) == 1 and report["rounds"][0]["completed"]

    monkeypatch.setattr(run_module, "evaluate_model", real)
    assert main(["evaluate", str(out)]) == 0
    assert f"completed: {out / 'report.json'}" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    evaluated = json.loads((out / "eval.json").read_text())
    assert report["status"] == "finished" and "eval_error" not in report
    assert report["eval"]["perplexity"] == evaluated["perplexity"] > 1 and report["eval"]["groups"] == 2



def test_evaluation_phases_print_plain_lines_when_stderr_is_not_a_terminal(gpt2, capsys, monkeypatch):
    """In a log file: a line every `every_s` seconds with the count so far, and a closing line with
    the count and the rate, for perplexity and for generation; no bar, no carriage returns."""
    from splitpeft.experiment import evaluation

    original = evaluation.PhaseProgress.__init__

    def every_batch(self, phase, total, unit, *, enabled, every_s=30.0):
        original(self, phase, total, unit, enabled=enabled, every_s=0.0)

    monkeypatch.setattr(evaluation.PhaseProgress, "__init__", every_batch)
    model, tokenizer = gpt2
    items = encode([Example(f"prompt {i}:", f" text {i} here", str(i)) for i in range(5)], tokenizer, 32)
    perplexity(model, items, batch_size=2, pad_id=int(tokenizer.pad_token_id), progress=True)
    generate_outputs(model, tokenizer, ["a", "b", "c"], max_new_tokens=2, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "perplexity: 2/5 examples", "perplexity: 4/5 examples", "perplexity: 5/5 examples",
        lines[3].split(",")[0], "generation: 2/3 prompts", "generation: 3/3 prompts", lines[6].split(",")[0]]
    assert lines[3].startswith("perplexity: 5 examples in ") and lines[3].endswith("examples/s)")
    assert lines[6].startswith("generation: 3 prompts in ") and lines[6].endswith("prompts/s)")
    perplexity(model, items, batch_size=2, pad_id=int(tokenizer.pad_token_id))  # progress off: silent
    assert capsys.readouterr().err == ""


def test_generation_gives_the_output_layer_a_contiguous_input_and_the_same_text(monkeypatch):
    """Hugging Face asks for the last position's logits only, a strided (B, 1, d) slice; torch's
    linear ran that against B copies of the output weight. Generation now makes the head's input
    contiguous (same values, same text) and leaves no hook behind."""
    import contextlib

    import splitpeft.experiment.evaluation as evaluation

    loaded = load_model("tiny-llama")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    head = model.get_output_embeddings()
    seen: list[bool] = []
    watch = head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].is_contiguous()))
    prompts = ["name : Aromi | area : riverside", "name : The Eagle | food : French | priceRange : high", "x"]
    fixed = generate_outputs(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    assert seen and all(seen)
    assert not head._forward_pre_hooks
    monkeypatch.setattr(evaluation, "_contiguous_head_input", lambda _model: contextlib.nullcontext())
    seen.clear()
    plain = generate_outputs(model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    watch.remove()
    assert not all(seen)  # without it the prefill's slice reaches the head strided
    assert [o.text for o in fixed] == [o.text for o in plain]
