"""Tests for splitpeft.data: loading, splitting, partitioning, encoding and batching."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from splitpeft.data.batching import (
    Batch,
    BatchStream,
    EncodedExample,
    collate,
    encode,
    iterate_batches,
)
from splitpeft.data.examples import DataError, Example, format_mr_prompt, parse_mr
from splitpeft.data.partition import partition, split_by_group
from splitpeft.data.sources import load_examples

E2E_VALID = Path(__file__).resolve().parents[3] / "shared" / "data" / "e2e" / "valid.txt"  # ../shared beside the repo


@pytest.fixture(scope="module")
def builtin() -> list[Example]:
    return load_examples("builtin", seed=0)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE tokenizer trained on a few builtin examples."""
    texts = [ex.prompt + ex.completion for ex in load_examples("builtin", limit=60)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def write(tmp_path: Path, name: str, lines: list[str]) -> str:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- loading


def test_builtin_deterministic_with_multiple_references(builtin: list[Example]) -> None:
    assert builtin == load_examples("builtin", seed=0)
    assert builtin != load_examples("builtin", seed=1)
    assert 500 <= len(builtin) <= 700
    refs = Counter(ex.group for ex in builtin)
    assert 150 <= len(refs) <= 250
    assert set(refs.values()) <= {2, 3}
    for ex in builtin[:20]:
        assert ex.prompt == format_mr_prompt(ex.group)
        assert ex.completion.startswith(" ") and ex.completion.strip()
        assert ex.fields["name"] in ex.completion
        assert "type" in ex.fields
    # References of one MR are different sentences.
    by_group: dict[str, set[str]] = {}
    for ex in builtin:
        by_group.setdefault(ex.group, set()).add(ex.completion)
    assert all(len(texts) == refs[g] for g, texts in by_group.items())


def test_limit(builtin: list[Example]) -> None:
    assert load_examples("builtin", limit=7) == builtin[:7]
    with pytest.raises(DataError):
        load_examples("builtin", limit=0)


@pytest.mark.skipif(not E2E_VALID.is_file(), reason="E2E validation file not present")
def test_e2e_real_file() -> None:
    examples = load_examples("e2e", str(E2E_VALID))
    assert len(examples) == 4672
    first = examples[0]
    assert first.group == "name : Alimentum | area : city centre | family friendly : no"
    assert first.prompt == format_mr_prompt(first.group)
    assert first.completion.startswith(" There is a place in the city centre")
    assert dict(first.fields) == {"name": "Alimentum", "area": "city centre", "family friendly": "no"}
    keys = set().union(*(ex.fields for ex in examples))
    assert keys == {"name", "type", "food", "price", "customer rating", "area", "family friendly", "near"}
    assert len({ex.group for ex in examples}) == 547


def test_e2e_both_mr_formats(tmp_path: Path) -> None:
    path = write(tmp_path, "e2e.txt", [
        "name[The Eagle], eatType[coffee shop], food[Japanese]||The Eagle serves sushi.",
        "",
        "name : Aromi | near : Café Rouge|| Aromi is near Café Rouge. ",
    ])
    a, b = load_examples("e2e", path)
    assert dict(a.fields) == {"name": "The Eagle", "eattype": "coffee shop", "food": "Japanese"}
    assert a.completion == " The Eagle serves sushi."
    assert dict(b.fields) == {"name": "Aromi", "near": "Café Rouge"}
    assert b.completion == " Aromi is near Café Rouge."
    assert parse_mr("name[X], customer rating[5 out of 5]") == {"name": "X", "customer rating": "5 out of 5"}


@pytest.mark.parametrize(
    "bad_line",
    [
        "name : Aromi | area : riverside -- no separator",
        "||text without MR",
        "name : Aromi||   ",
        "name : Aromi | area riverside||text",
        "name[Aromi], area riverside||text",
        "name : Aromi | name : Other||text",
    ],
)
def test_e2e_malformed_line_names_file_and_line(tmp_path: Path, bad_line: str) -> None:
    path = write(tmp_path, "bad.txt", ["name : A | area : riverside||ok", "", bad_line])
    with pytest.raises(DataError, match=r"bad\.txt:3\b"):
        load_examples("e2e", path)


def test_missing_file_and_unknown_source(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="nope.txt"):
        load_examples("e2e", missing)
    with pytest.raises(DataError, match="needs a path"):
        load_examples("jsonl")
    with pytest.raises(DataError, match="builtin.*e2e.*jsonl.*hf:"):
        load_examples("csv", missing)


def test_hf_without_datasets_is_clear() -> None:
    # The error path is only exercised when datasets is absent.
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="datasets"):
            load_examples("hf:e2e_nlg:validation")
    else:
        pytest.skip("datasets is installed")


def test_jsonl_both_schemas(tmp_path: Path) -> None:
    path = write(tmp_path, "d.jsonl", [
        json.dumps({"context": "Q: 2+2?\nA:", "completion": " 4", "topic": "math", "n": 3}),
        "",
        json.dumps({"instruction": "Translate", "input": "chat", "output": "cat", "lang": "fr"}),
        json.dumps({"instruction": "Say hi", "output": "hi"}),
    ])
    a, b, c = load_examples("jsonl", path)
    assert (a.prompt, a.completion, a.group, dict(a.fields)) == ("Q: 2+2?\nA:", " 4", "Q: 2+2?\nA:", {"topic": "math"})
    assert b.prompt == "Instruction: Translate\nInput: chat\nResponse:"
    assert b.completion == " cat" and b.group == b.prompt and dict(b.fields) == {"lang": "fr"}
    assert c.prompt == "Instruction: Say hi\nResponse:"


@pytest.mark.parametrize(
    "bad_line",
    ['{"context": "x"', '{"context": "x"}', '{"instruction": "x"}', '{"foo": "bar"}', "[1, 2]",
     '{"context": "x", "completion": 3}'],
)
def test_jsonl_errors_name_line(tmp_path: Path, bad_line: str) -> None:
    path = write(tmp_path, "d.jsonl", [json.dumps({"context": "a", "completion": "b"}), bad_line])
    with pytest.raises(DataError, match=r"d\.jsonl:2\b"):
        load_examples("jsonl", path)


# ---------------------------------------------------------------- split and partition


def test_split_by_group_disjoint_and_deterministic(builtin: list[Example]) -> None:
    train, held_out = split_by_group(builtin, 0.2, seed=3)
    assert len(train) + len(held_out) == len(builtin)
    assert not {ex.group for ex in train} & {ex.group for ex in held_out}
    n_groups = len({ex.group for ex in builtin})
    assert len({ex.group for ex in held_out}) == round(0.2 * n_groups)
    assert (train, held_out) == split_by_group(builtin, 0.2, seed=3)
    assert held_out != split_by_group(builtin, 0.2, seed=4)[1]
    with pytest.raises(ValueError):
        split_by_group(builtin[:3], 0.1, seed=0)  # one group: a part would be empty
    with pytest.raises(ValueError):
        split_by_group(builtin, 1.0, seed=0)


def test_partition_iid(builtin: list[Example]) -> None:
    shards = partition(builtin, 5, "iid", seed=0)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(builtin)
    assert Counter(ex for s in shards for ex in s) == Counter(builtin)
    assert shards == partition(builtin, 5, "iid", seed=0)
    assert shards != partition(builtin, 5, "iid", seed=1)


def test_partition_dirichlet(builtin: list[Example]) -> None:
    shards = partition(builtin, 5, "dirichlet", alpha=0.5, field="food", seed=0)
    assert shards == partition(builtin, 5, "dirichlet", alpha=0.5, field="food", seed=0)
    assert all(shards)
    assert Counter(ex for s in shards for ex in s) == Counter(builtin)

    def mean_top_share(alpha: float) -> float:
        """Mean over devices of the share of its most common food value."""
        parts = partition(builtin, 5, "dirichlet", alpha=alpha, field="food", seed=1)
        tops = [Counter(ex.fields.get("food", "<none>") for ex in p).most_common(1)[0][1] / len(p) for p in parts]
        return sum(tops) / len(tops)

    assert mean_top_share(0.05) > mean_top_share(100.0) + 0.2


def test_partition_dirichlet_fixes_empty_devices(builtin: list[Example]) -> None:
    few = builtin[:12]
    for seed in range(10):
        shards = partition(few, 10, "dirichlet", alpha=0.01, field="type", seed=seed)
        assert all(shards) and sum(map(len, shards)) == 12


def test_partition_errors(builtin: list[Example]) -> None:
    with pytest.raises(ValueError, match="scheme"):
        partition(builtin, 2, "shards")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_devices"):
        partition(builtin, 0, "iid")
    with pytest.raises(ValueError, match="field"):
        partition(builtin, 2, "dirichlet")
    with pytest.raises(ValueError, match="examples"):
        partition(builtin[:3], 4, "dirichlet", field="food")


# ---------------------------------------------------------------- encode and batches


def test_encode_masks_prompt_exactly(builtin: list[Example], tokenizer: PreTrainedTokenizerFast) -> None:
    examples = builtin[:5]
    encoded = encode(examples, tokenizer, max_length=512)
    eos = tokenizer.eos_token_id
    for ex, enc in zip(examples, encoded):
        prompt_ids = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
        assert enc.input_ids == prompt_ids + completion_ids + [eos]
        assert enc.labels == [-100] * len(prompt_ids) + completion_ids + [eos]
        assert tokenizer.decode([t for t in enc.labels if t != -100], skip_special_tokens=True) == ex.completion


def test_encode_truncation_keeps_completion(tokenizer: PreTrainedTokenizerFast) -> None:
    ex = Example(format_mr_prompt("name : The Eagle | Type : pub"), " The Eagle is a pub.", "g", {})
    full = encode([ex], tokenizer, max_length=1000)[0]
    n_completion = sum(t != -100 for t in full.labels)
    # Prompt cut from the left; completion intact.
    cut = encode([ex], tokenizer, max_length=n_completion + 2)[0]
    assert len(cut.input_ids) == n_completion + 2
    assert cut.input_ids == full.input_ids[-(n_completion + 2):]
    assert cut.labels[2:] == full.labels[-n_completion:] and cut.labels[:2] == [-100, -100]
    # Prompt gone, then the completion's tail goes.
    tail = encode([ex], tokenizer, max_length=2)[0]
    assert tail.input_ids == full.input_ids[-n_completion:][:2] and tail.labels == tail.input_ids
    assert encode([ex], tokenizer, max_length=1)[0].input_ids == full.input_ids[-n_completion:][:1]


def test_collate_shapes_and_padding() -> None:
    items = [EncodedExample([5, 6, 7, 8], [-100, -100, 7, 8]), EncodedExample([1, 2], [-100, 2])]
    batch = collate(items, pad_id=0)
    assert batch.input_ids.shape == batch.labels.shape == (2, 4)
    assert batch.input_ids.dtype == batch.labels.dtype == torch.long
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [1, 2, 0, 0]]
    assert batch.labels.tolist() == [[-100, -100, 7, 8], [-100, 2, -100, -100]]
    assert batch.completion_tokens == 3 and batch.tokens == 6
    # pad_id equal to a real token (GPT-2 uses eos as pad) does not change the count.
    assert collate([EncodedExample([3, 9], [-100, 9]), EncodedExample([3], [3])], pad_id=9).tokens == 3
    with pytest.raises(ValueError):
        collate([], pad_id=0)


def _items(n: int) -> list[EncodedExample]:
    return [EncodedExample([i, i + 1, 99], [-100, i + 1, 99]) for i in range(n)]


def test_batch_stream_reproducible() -> None:
    def take(seed: int, k: int = 12) -> list[list[list[int]]]:
        stream = BatchStream(_items(10), batch_size=4, pad_id=0, seed=seed)
        return [stream.next().input_ids.tolist() for _ in range(k)]

    torch.manual_seed(123)
    a = take(0)
    torch.manual_seed(456)
    assert a == take(0)
    assert a != take(1)
    stream = BatchStream(_items(10), batch_size=4, pad_id=0, seed=0)
    for _ in range(2):  # one epoch = 2 full batches of distinct examples
        batch = stream.next()
        assert isinstance(batch, Batch) and batch.input_ids.shape == (4, 3)
    assert stream.epoch == 0
    stream.next()
    assert stream.epoch == 1
    assert BatchStream(_items(3), batch_size=8, pad_id=0, seed=0).next().input_ids.shape == (3, 3)


def test_iterate_batches_ordered_single_pass() -> None:
    batches = list(iterate_batches(_items(5), batch_size=2, pad_id=0))
    assert [b.input_ids.shape[0] for b in batches] == [2, 2, 1]
    assert [row[0] for b in batches for row in b.input_ids.tolist()] == [0, 1, 2, 3, 4]


def test_whole_partition_gives_every_device_all_examples():
    examples = load_examples("builtin")[:20]
    shards = partition(examples, 3, "whole")
    assert len(shards) == 3 and all(shard == list(examples) for shard in shards)


def test_stream_seek_continues_where_position_was_taken_and_rejects_bad_positions():
    stream = BatchStream(_items(10), batch_size=4, pad_id=0, seed=3)
    for _ in range(3):  # into the second epoch
        stream.next()
    position = stream.position
    expected = [stream.next().input_ids.tolist() for _ in range(4)]
    other = BatchStream(_items(10), batch_size=4, pad_id=0, seed=3)
    other.seek(*position)
    assert [other.next().input_ids.tolist() for _ in range(4)] == expected
    with pytest.raises(ValueError, match=r"stream position \(0, 11\) is out of range"):
        other.seek(0, 11)
    with pytest.raises(ValueError, match="out of range"):
        other.seek(-1, 0)


def test_files_split_at_line_feeds_only_and_lose_a_byte_order_mark(tmp_path: Path) -> None:
    """Found: `str.splitlines` also split at U+2028, U+0085 and form feeds, so a valid JSONL line
    (json.dumps keeps U+2028 as is) was refused, an E2E error named the wrong line and a text
    example became two; a UTF-8 BOM stayed in the first MR's first key."""
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text(json.dumps({"context": "Say hi", "completion": "hi\u2028there"}, ensure_ascii=False) + "\r\n",
                     encoding="utf-8")
    assert [e.completion.strip() for e in load_examples("jsonl", str(jsonl))] == ["hi\u2028there"]
    text = tmp_path / "data.txt"
    text.write_text("one line\x0cwith a form feed\nsecond\n", encoding="utf-8")
    assert len(load_examples("text", str(text))) == 2
    e2e = tmp_path / "e2e.txt"
    e2e.write_bytes("\ufeffname[Aromi], type[pub]||Aromi is a pub.\u0085\nno bars here\n".encode())
    with pytest.raises(DataError, match=r"e2e.txt:2: expected 'MR\|\|text'"):
        load_examples("e2e", str(e2e))
    e2e.write_bytes("\ufeffname[Aromi], type[pub]||Aromi is a pub.\n".encode())
    assert dict(load_examples("e2e", str(e2e))[0].fields) == {"name": "Aromi", "type": "pub"}
