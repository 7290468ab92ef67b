"""E2E metrics (splitpeft.experiment.metrics) and LM evaluation (splitpeft.experiment.evaluation) on toy inputs."""

from __future__ import annotations

import math
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from splitpeft.experiment.evaluation import evaluate_generation, generate, perplexity
from splitpeft.experiment.metrics import coco_tokenize, e2e_metrics, group_references

REFS = [
    ["The Eagle is a coffee shop near Burger King in the riverside area.",
     "Near Burger King by the riverside there is a coffee shop called The Eagle."],
    ["Alimentum is a family-friendly Italian restaurant in the city centre.",
     "In the city centre, Alimentum serves Italian food and is kid friendly."],
    ["The Mill is a cheap pub serving French food.",
     "Serving French food, The Mill is a low priced pub.",
     "The Mill pub has French food at low prices."],
    ["Zizzi is a highly rated Japanese restaurant near the river."],
]


def test_perfect_hypotheses_score_top() -> None:
    scores = e2e_metrics([refs[0] for refs in REFS], REFS, meteor=False)
    assert set(scores) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["rouge_l"] == pytest.approx(1.0)
    assert scores["cider"] is not None and scores["cider"] > 2.0
    assert scores["nist"] is not None and scores["nist"] > 1.0


def test_bad_hypothesis_scores_lower() -> None:
    good = e2e_metrics([refs[0] for refs in REFS], REFS, meteor=False)
    bad = e2e_metrics([refs[0] for refs in REFS[:-1]] + ["banana split forever"], REFS, meteor=False)
    for name in ("bleu", "nist", "rouge_l", "cider"):
        assert bad[name] < good[name], name  # type: ignore[operator]


def test_multi_reference_beats_single_for_second_reference() -> None:
    hyps = [refs[-1] for refs in REFS]  # matches the last reference of each group
    multi = e2e_metrics(hyps, REFS, meteor=False)
    single = e2e_metrics(hyps, [refs[:1] for refs in REFS], meteor=False)
    for name in ("bleu", "nist", "rouge_l"):
        assert multi[name] > single[name], name  # type: ignore[operator]
    assert multi["bleu"] == pytest.approx(100.0)


def test_group_references_first_seen_order() -> None:
    groups, refs = group_references(["b", "a", "b", "c", "a"], ["1", "2", "3", "4", "5"])
    assert groups == ["b", "a", "c"]
    assert refs == [["1", "3"], ["2", "5"], ["4"]]


def test_empty_and_mismatched_inputs_raise() -> None:
    with pytest.raises(ValueError):
        e2e_metrics([], [])
    with pytest.raises(ValueError):
        e2e_metrics(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        e2e_metrics(["a"], [[]])


def test_empty_hypothesis_does_not_crash() -> None:
    scores = e2e_metrics(["", ""], [["a small pub"], ["a big cafe"]], meteor=False)
    assert scores["bleu"] == 0.0 and scores["rouge_l"] == 0.0 and scores["nist"] == 0.0


def test_coco_tokenize_matches_ptb_style() -> None:
    assert coco_tokenize("It's family-friendly. Near X, too!") == "it 's family-friendly near x too"


def test_coco_tokenize_normalises_currency_and_brackets_like_ptb() -> None:
    """Bug: "£20" stayed one token, where the PTBTokenizer of the E2E script writes "# 20"
    (and the euro as "$", brackets as -lrb- ...); every E2E price differed, so ROUGE-L and
    CIDEr were off in the third decimal. Expected strings are CoreNLP 3.4.1's output."""
    assert coco_tokenize("Prices are £20-25, less than €5 or ¥5.") == "prices are # 20-25 less than $ 5 or ¥ 5"
    assert coco_tokenize("A pub (cheap) [b] {c}") == "a pub -lrb- cheap -rrb- -lsb- b -rsb- -lcb- c -rcb-"


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
def test_meteor_runs_and_leaves_no_java_process() -> None:
    def meteor_jvms() -> int:
        out = subprocess.run(["pgrep", "-f", "meteor-1.5.jar"], capture_output=True, text=True)
        return len(out.stdout.split())

    before = meteor_jvms()
    hyps = [refs[0] for refs in REFS[:-1]] + ["banana split forever"]
    meteor = e2e_metrics(hyps, REFS)["meteor"]
    assert meteor is not None and 0.5 < meteor < 1.0  # three perfect, one wrong
    assert meteor_jvms() == before


def test_meteor_without_java_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    scores = e2e_metrics([refs[0] for refs in REFS], REFS)
    assert scores["meteor"] is None
    assert scores["bleu"] == pytest.approx(100.0)


# --- agreement with the official E2E scorer ----------------------------------------------

NAMES = ["The Eagle", "Alimentum", "The Mill", "Zizzi", "Fitzbillies", "The Phoenix", "Cotto", "Aromi",
         "Blue Spice", "The Wrestlers", "Clowns", "Strada", "Giraffe", "The Cricketers", "Loch Fyne"]
FOODS = ["Italian", "French", "English", "Japanese", "Chinese", "Indian", "fast food"]
KINDS = ["coffee shop", "pub", "restaurant"]
AREAS = ["city centre", "riverside"]
PRICES = ["cheap", "moderate", "high", "less than £20", "£20-25", "more than £30"]
RATINGS = ["0 out of 5", "1 out of 5", "3 out of 5", "5 out of 5", "low", "average", "high"]
NEAR = ["Burger King", "the Rice Boat", "Café Brazil", "Crowne Plaza Hotel", "All Bar One", "Raja Indian Cuisine"]
FILLERS = ["It's", "There is", "Located in the", "Near", "a", "the", "is", "and", "with", "which", "serves",
           "food", ",", "."]


def _reference(rng: random.Random, slots: tuple) -> str:
    name, food, kind, area, price, rating, near, family = slots
    openings = [
        f"{name} is a {kind} serving {food} food",
        f"{name} is a {food} {kind}",
        f"There is a {kind} called {name} that serves {food} food",
        f"Located in the {area}, {name} offers {food} food",
    ]
    details = [
        f"it is in the {area} area near {near}",
        f"prices are {price}",
        f"its customer rating is {rating}",
        f"it's {'family-friendly' if family else 'not kid friendly'}",
        f"you can find it near {near}",
        f"the price range is {price} and it is rated {rating}",
    ]
    parts = [rng.choice(openings)] + rng.sample(details, rng.randint(0, 3))
    text = parts[0]
    for part in parts[1:]:
        joiner = rng.choice([", and ", ". ", "; ", " - ", " and "])
        capital = joiner == ". " or rng.random() < 0.2
        text += joiner + (part[0].upper() + part[1:] if capital else part)
    return text + rng.choice([".", ".", "!", ""])


def _hypothesis(rng: random.Random, references: list[str]) -> str:
    """A reference as it is (1 in 5), or with words dropped, replaced, upper-cased or doubled;
    1 in 10 also cut to half its length (so the length penalties act)."""
    words = rng.choice(references).split()
    edit = rng.random()
    if edit < 0.2:
        return " ".join(words)
    out = []
    for word in words:
        r = rng.random()
        if r < 0.12:
            continue
        out.append(rng.choice(FILLERS) if r < 0.2 else word.upper() if r < 0.24 else word)
        if rng.random() < 0.05:
            out.append(word)
    if edit > 0.9:
        out = out[: max(1, len(out) // 2)]
    return " ".join(out)


def official_fixture(seed: int = 14, num_mrs: int = 60) -> tuple[list[str], list[list[str]]]:
    """E2E-like outputs and 1-8 references per MR, the same on every run (a seeded generator)."""
    rng = random.Random(seed)
    hypotheses, references = [], []
    for _ in range(num_mrs):
        slots = (rng.choice(NAMES), rng.choice(FOODS), rng.choice(KINDS), rng.choice(AREAS),
                 rng.choice(PRICES), rng.choice(RATINGS), rng.choice(NEAR), rng.random() < 0.5)
        group = [_reference(rng, slots) for _ in range(rng.randint(1, 8))]
        references.append(group)
        hypotheses.append(_hypothesis(rng, group))
    return hypotheses, references


def write_official_inputs(folder: str) -> None:
    """The fixture in the official scorer's text format: one output a line; references one a
    line, MRs separated by an empty line."""
    hypotheses, references = official_fixture()
    Path(folder, "outputs.txt").write_text("\n".join(hypotheses) + "\n")
    Path(folder, "references.txt").write_text("\n\n".join("\n".join(refs) for refs in references) + "\n")


# The official scorer's numbers on exactly `official_fixture()`: tuetschek/e2e-metrics at 1b9c4d8
# (measure_scores.py; BLEU and NIST from its mteval-v13a-sig.pl, METEOR 1.5 and CIDEr/ROUGE-L
# from its pycocoevalcap after CoreNLP 3.4.1's PTBTokenizer), checked out at /tmp/e2e-metrics
# and run once with
#   .venv/bin/python -c "import sys; sys.path.insert(0, 'tests/experiment'); \
#       from test_metrics import write_official_inputs; write_official_inputs('/tmp/fixture')"
#   cd /tmp/e2e-metrics && PERL5LIB=/tmp/e2e-shim PYTHONPATH=/tmp/e2e-shim /tmp/e2evenv/bin/python \
#       measure_scores.py /tmp/fixture/references.txt /tmp/fixture/outputs.txt
# where /tmp/e2evenv is this project's venv plus `future`, and /tmp/e2e-shim holds stand-ins for
# the two imports the text-file path never calls (Perl's XML::Twig, for .xml inputs, and
# skimage.draw, for COCO segmentation masks). It prints BLEU on 0-1 and every score to 4 decimals.
OFFICIAL = {"bleu": 0.7135, "nist": 8.2422, "meteor": 0.4778, "rouge_l": 0.8376, "cider": 2.8704}


def _ours_on_the_official_scale(meteor: bool) -> dict[str, float | None]:
    hypotheses, references = official_fixture()
    scores = e2e_metrics(hypotheses, references, meteor=meteor)
    assert scores["bleu"] is not None
    return {**scores, "bleu": scores["bleu"] / 100}


def test_fixture_has_many_mrs_and_varying_reference_counts() -> None:
    hypotheses, references = official_fixture()
    assert len(hypotheses) == len(references) == 60
    assert {len(refs) for refs in references} == set(range(1, 9))
    assert sum(any(h == r for r in refs) for h, refs in zip(hypotheses, references)) < 20  # mostly edited (16 of 60 copy a reference)
    assert official_fixture() == (hypotheses, references)


@pytest.mark.parametrize("name", ["bleu", "nist", "rouge_l", "cider"])
def test_metric_equals_the_official_scorer(name: str) -> None:
    assert _ours_on_the_official_scale(meteor=False)[name] == pytest.approx(OFFICIAL[name], abs=1e-4)


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
def test_meteor_equals_the_official_scorer() -> None:
    assert _ours_on_the_official_scale(meteor=True)["meteor"] == pytest.approx(OFFICIAL["meteor"], abs=1e-4)


def test_nist_is_not_nltks() -> None:
    """Bug: NIST came from nltk's corpus_nist, which matches each reference separately (best
    one per n-gram order) and gave 6.22 where mteval-v13a gives 7.82; on the fixture too it
    is far from the official number that `nist` reproduces."""
    from nltk.translate.nist_score import corpus_nist

    from splitpeft.experiment.metrics import mteval_tokenize

    hypotheses, references = official_fixture()
    nltk_nist = corpus_nist([[mteval_tokenize(r) for r in refs] for refs in references],
                            [mteval_tokenize(h) for h in hypotheses], n=5)
    assert abs(nltk_nist - OFFICIAL["nist"]) > 0.5


def test_nist_length_penalty_halves_at_two_thirds_of_the_reference_length() -> None:
    """mteval's penalty exp(-beta log(ratio)^2) is 0.5 at L_hyp / L_ref = 2/3 and 1 from 1 on:
    a hypothesis of 2 of a reference's 3 words (all matching) scores half of its info sum."""
    from splitpeft.experiment.metrics import nist

    full = nist([["a", "b", "c"]], [[["a", "b", "c"]]])
    short = nist([["a", "b"]], [[["a", "b", "c"]]])
    # info from the one reference: unigrams log2(3/1), bigrams log2(1/1) = 0, ...
    assert full == pytest.approx(math.log2(3))
    assert short == pytest.approx(0.5 * math.log2(3))


# --- evaluation.py on a tiny random LLaMA -------------------------------------------------

CORPUS = [
    "name : The Eagle | eatType : coffee shop || The Eagle is a coffee shop.",
    "name : Alimentum | food : Italian || Alimentum serves Italian food.",
    "name : The Mill | priceRange : cheap || The Mill is cheap.\nnew line",
]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Example:
    prompt: str
    completion: str
    group: str


@pytest.fixture(scope="module")
def tiny_lm():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<eos>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    return model, tokenizer


def _encode(tokenizer, prompt: str, completion: str) -> Encoded:
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Encoded(input_ids=p + c, labels=[-100] * len(p) + c)


def _items(tokenizer) -> list[Encoded]:
    return [_encode(tokenizer, *line.split("||")) for line in CORPUS]


def test_perplexity_equals_exp_mean_ce_by_hand(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    items = _items(tokenizer)
    nll, count = 0.0, 0
    with torch.no_grad():
        for item in items:  # one unpadded sequence at a time
            logits = model(torch.tensor([item.input_ids])).logits[0]  # (T, V)
            for t in range(1, len(item.labels)):
                if item.labels[t] != -100:
                    nll += F.cross_entropy(logits[t - 1], torch.tensor(item.labels[t])).item()
                    count += 1
    expected = math.exp(nll / count)
    got = perplexity(model, items, batch_size=2, pad_id=tokenizer.pad_token_id)
    assert math.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-5)


def test_perplexity_independent_of_padding(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    items = _items(tokenizer)
    assert len({len(item.input_ids) for item in items}) > 1  # batching really pads
    one = perplexity(model, items, batch_size=1, pad_id=tokenizer.pad_token_id)
    three = perplexity(model, items, batch_size=3, pad_id=tokenizer.pad_token_id)
    # eos as pad: the mask is by length, so eos inside a sequence stays attended
    three_eos = perplexity(model, items, batch_size=3, pad_id=tokenizer.eos_token_id)
    assert three == pytest.approx(one, rel=1e-5)
    assert three_eos == pytest.approx(one, rel=1e-5)


def test_perplexity_restores_training_mode(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    model.train()
    perplexity(model, _items(tokenizer), batch_size=2, pad_id=tokenizer.pad_token_id)
    assert model.training
    model.eval()


def test_generate_greedy_deterministic_and_beam(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    prompts = [line.split("||")[0] for line in CORPUS]
    tokenizer.padding_side = "right"
    first = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=2)
    second = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert len(first) == len(prompts) and all(isinstance(s, str) for s in first)
    assert all("\n" not in s for s in first)
    assert first == second  # greedy, and left padding does not change the result
    assert tokenizer.padding_side == "right"
    beams = generate(model, tokenizer, prompts, max_new_tokens=8, num_beams=3, batch_size=2)
    assert len(beams) == len(prompts)


def _new_token_ids(model, tokenizer, prompts, **options) -> list[list[int]]:
    """The token ids `generate` decodes for each prompt, captured from model.generate."""
    captured: list[list[int]] = []
    original = model.generate

    def spy(**kwargs):
        out = original(**kwargs)
        captured.extend(row[kwargs["input_ids"].shape[1]:].tolist() for row in out)
        return out

    model.generate = spy
    try:
        generate(model, tokenizer, prompts, max_new_tokens=20, batch_size=1, **options)
    finally:
        del model.generate
    return [[t for t in ids if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)] for ids in captured]


def test_no_repeat_ngram_size_reaches_generate(tiny_lm) -> None:
    """no_repeat_ngram_size=1: no token twice in an output (the random model repeats without it)."""
    model, tokenizer = tiny_lm
    prompts = [line.split("||")[0] for line in CORPUS]
    plain = _new_token_ids(model, tokenizer, prompts)
    assert any(len(set(ids)) < len(ids) for ids in plain)
    for num_beams in (1, 3):
        banned = _new_token_ids(model, tokenizer, prompts, no_repeat_ngram_size=1, num_beams=num_beams)
        assert all(ids and len(set(ids)) == len(ids) for ids in banned), num_beams


def test_decoding_options_reach_model_generate(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    seen: list[dict] = []
    original = model.generate

    def spy(**kwargs):
        seen.append({k: kwargs.get(k) for k in ("num_beams", "length_penalty", "no_repeat_ngram_size")})
        return original(**kwargs)

    model.generate = spy
    try:
        examples = [Example("name : A ||", "A is nice.", "A"), Example("name : B ||", "B is far.", "B")]
        evaluate_generation(model, tokenizer, examples, max_new_tokens=4, num_beams=3, length_penalty=0.8,
                            no_repeat_ngram_size=4, meteor=False)
        generate(model, tokenizer, ["name : A ||"], max_new_tokens=4, length_penalty=0.8)
    finally:
        del model.generate
    assert seen[0] == {"num_beams": 3, "length_penalty": 0.8, "no_repeat_ngram_size": 4}
    assert seen[-1] == {"num_beams": 1, "length_penalty": None, "no_repeat_ngram_size": 0}  # greedy: no beam option
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        generate(model, tokenizer, ["name : A ||"], no_repeat_ngram_size=-1)


def test_evaluate_generation_groups(tiny_lm, monkeypatch: pytest.MonkeyPatch) -> None:
    import splitpeft.experiment.metrics

    monkeypatch.setattr(splitpeft.experiment.metrics, "_meteor", lambda gts, res: None)  # no JVM here
    model, tokenizer = tiny_lm
    examples = [
        Example("name : A ||", "A is nice.", "A"),
        Example("name : B ||", "B is far.", "B"),
        Example("name : A ||", "There is A.", "A"),
    ]
    scores, samples = evaluate_generation(model, tokenizer, examples, max_new_tokens=6)
    assert set(scores) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    assert [s["group"] for s in samples] == ["A", "B"]
    assert samples[0]["references"] == ["A is nice.", "There is A."]
    _, limited = evaluate_generation(model, tokenizer, examples, max_new_tokens=6, limit_groups=1)
    assert len(limited) == 1
