"""E2E metrics (splitpeft.experiment.metrics) and LM evaluation (splitpeft.experiment.evaluation) on toy inputs."""

from __future__ import annotations

import math
import shutil
import subprocess
from dataclasses import dataclass

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
