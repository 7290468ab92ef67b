"""Datasets, device partitions, tokenisation and batching.

Flow: ``load_examples`` (text records) -> ``split_by_group`` (train / held-out MRs) ->
``partition`` (one shard per device, IID or Dirichlet non-IID) -> ``encode`` (token ids with the
prompt masked out of the loss) -> ``BatchStream`` / ``iterate_batches`` (padded tensors).

Sources:

- ``"builtin"``: an offline, seeded generator of E2E-like restaurant data (no files needed).
- ``"e2e"``: E2E NLG files of ``MR||text`` lines; the MR is either ``key : value | key : value``
  (the cleaned release) or ``key[value], key[value]`` (the original release).
- ``"jsonl"``: one JSON object a line with ``context`` + ``completion`` or ``instruction``
  (+ optional ``input``) + ``output``.
- ``"hf:<dataset>[:split]"``: a Hugging Face dataset via ``datasets.load_dataset`` (needs the
  ``datasets`` package and a network).

Loss is on completion tokens only: labels are ``-100`` on the prompt and on padding, following the
Hugging Face convention that labels are *not* shifted (the loss shifts them).
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label value that ``torch.nn.functional.cross_entropy`` (and HF models) skip."""

SOURCES = ("builtin", "e2e", "jsonl", "hf:<dataset>[:split]")
MISSING_FIELD_VALUE = "<none>"
"""Value used by Dirichlet partitioning for examples that lack the partition field."""


class DataError(ValueError):
    """A dataset could not be loaded; the message names the file and 1-based line where relevant."""


@dataclass(frozen=True)
class Example:
    """One (prompt, completion) pair.

    Attributes:
        prompt: text the model is conditioned on, already formatted with the template.
        completion: target text; the loss is computed on these tokens only.
        group: key grouping references. Examples with the same group share an input and are
            multiple references of each other (for E2E: the raw MR string).
        fields: attributes used for non-IID partitioning (for E2E: MR key -> value, keys
            lower-cased as written in the MR, e.g. ``"family friendly"``).
    """

    prompt: str
    completion: str
    group: str
    # Left out of the hash (a mapping is unhashable); equal examples still hash equal.
    fields: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)


# --------------------------------------------------------------------------------------------
# Prompt templates
# --------------------------------------------------------------------------------------------


def format_mr_prompt(mr: str) -> str:
    """Prompt for a meaning representation (E2E and builtin): ``"Meaning representation: {mr}\\nDescription:"``."""
    return f"Meaning representation: {mr}\nDescription:"


def format_instruction_prompt(instruction: str, input_text: str = "") -> str:
    """Prompt for instruction data: ``Instruction: ...\\n[Input: ...\\n]Response:``."""
    parts = [f"Instruction: {instruction.strip()}"]
    if input_text.strip():
        parts.append(f"Input: {input_text.strip()}")
    parts.append("Response:")
    return "\n".join(parts)


def _completion_text(text: str) -> str:
    # The leading space makes the completion tokenise the way it would right after the prompt.
    return " " + text.strip()


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_examples(
    source: str, path: str | None = None, *, limit: int | None = None, seed: int = 0
) -> list[Example]:
    """Load a dataset as a list of :class:`Example`.

    Args:
        source: ``"builtin"``, ``"e2e"``, ``"jsonl"`` or ``"hf:<dataset>[:split]"`` (split
            defaults to ``"train"``).
        path: file to read; required for ``"e2e"`` and ``"jsonl"``, ignored otherwise.
        limit: keep only the first ``limit`` examples (file order; generation order for builtin).
        seed: seed of the builtin generator (other sources are read in file order).

    Raises:
        DataError: unknown source, missing file, malformed record, or unavailable dataset.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
    if source == "builtin":
        examples = builtin_examples(seed)
    elif source in ("e2e", "jsonl"):
        if path is None:
            raise DataError(f"source {source!r} needs a path to a file")
        file = Path(path)
        if not file.is_file():
            raise DataError(f"{source} data file not found: {path}")
        lines = _read_lines(file)
        examples = _parse_e2e_lines(lines, str(file)) if source == "e2e" else _parse_jsonl(lines, str(file))
    elif source.startswith("hf:"):
        examples = _load_hf(source)
    else:
        raise DataError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")
    if not examples:
        raise DataError(f"data source {source!r} ({path or 'no file'}) has no examples")
    return examples[:limit] if limit is not None else examples


def _read_lines(file: Path) -> list[str]:
    try:
        return file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {file}: {err}") from err


_PIPE_FIELD = re.compile(r"^\s*([^:]+?)\s*:\s*(.*?)\s*$")
_BRACKET_FIELD = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


def parse_mr(mr: str) -> dict[str, str]:
    """Parse an E2E meaning representation into ``{key (lower-cased): value}``.

    Accepts ``name : Alimentum | area : city centre`` and ``name[Alimentum], area[city centre]``.

    Raises:
        ValueError: empty MR, a field without key or value, or a repeated key.
    """
    mr = mr.strip()
    if not mr:
        raise ValueError("empty meaning representation")
    pairs: list[tuple[str, str]] = []
    if "[" in mr:
        pos = 0
        for match in _BRACKET_FIELD.finditer(mr):
            if match.start() != pos:
                break
            pairs.append((match.group(1), match.group(2).strip()))
            pos = match.end()
        if pos != len(mr):
            raise ValueError(f"cannot parse field at {mr[pos:pos + 30]!r}")
    else:
        for chunk in mr.split("|"):
            match = _PIPE_FIELD.match(chunk)
            if match is None:
                raise ValueError(f"field {chunk.strip()!r} is not 'key : value'")
            pairs.append((match.group(1), match.group(2)))
    fields: dict[str, str] = {}
    for key, value in pairs:
        key = key.strip().lower()
        if not key or not value:
            raise ValueError(f"field {key or '?'!r} has an empty key or value")
        if key in fields:
            raise ValueError(f"field {key!r} appears twice")
        fields[key] = value
    return fields


def _mr_example(mr: str, text: str) -> Example:
    """Build an example from a raw MR and its reference; raises ValueError if either is bad."""
    mr = mr.strip()
    if not text.strip():
        raise ValueError("empty reference text")
    fields = parse_mr(mr)
    return Example(format_mr_prompt(mr), _completion_text(text), mr, MappingProxyType(fields))


def _parse_e2e_lines(lines: Iterable[str], where: str) -> list[Example]:
    examples = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if "||" not in line:
            raise DataError(f"{where}:{line_no}: expected 'MR||text', found no '||'")
        mr, text = line.split("||", 1)
        try:
            examples.append(_mr_example(mr, text))
        except ValueError as err:
            raise DataError(f"{where}:{line_no}: {err}") from err
    return examples


def _record_example(record: Mapping[str, Any]) -> Example:
    """Map a context/completion or instruction/input/output record to an Example."""

    def text(key: str, required: bool = True) -> str:
        value = record.get(key, "")
        if not isinstance(value, str):
            raise ValueError(f"key {key!r} must be a string, got {type(value).__name__}")
        if required and not value.strip():
            raise ValueError(f"key {key!r} is empty")
        return value

    if "context" in record or "completion" in record:
        used = {"context", "completion"}
        missing = sorted(k for k in used if k not in record)
        if missing:
            raise ValueError(f"missing key(s) {missing}; need 'context' and 'completion'")
        prompt, completion = text("context"), text("completion")
    elif "instruction" in record or "output" in record:
        used = {"instruction", "input", "output"}
        missing = sorted(k for k in ("instruction", "output") if k not in record)
        if missing:
            raise ValueError(f"missing key(s) {missing}; need 'instruction' and 'output'")
        prompt = format_instruction_prompt(text("instruction"), text("input", required=False))
        completion = _completion_text(text("output"))
    else:
        raise ValueError(
            "need keys 'context'+'completion' or 'instruction'(+'input')+'output', "
            f"found {sorted(record)}"
        )
    fields = {k: v for k, v in record.items() if k not in used and isinstance(v, str)}
    return Example(prompt, completion, prompt, MappingProxyType(fields))


def _parse_jsonl(lines: Iterable[str], where: str) -> list[Example]:
    examples = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}:{line_no}: invalid JSON: {err.msg}") from err
        if not isinstance(record, dict):
            raise DataError(f"{where}:{line_no}: expected a JSON object, got {type(record).__name__}")
        try:
            examples.append(_record_example(record))
        except ValueError as err:
            raise DataError(f"{where}:{line_no}: {err}") from err
    return examples


def _load_hf(source: str) -> list[Example]:
    """``hf:<dataset>[:split]`` via ``datasets.load_dataset``; maps e2e_nlg or generic columns."""
    _, _, rest = source.partition(":")
    name, _, split = rest.partition(":")
    split = split or "train"
    if not name:
        raise DataError(f"{source!r}: expected 'hf:<dataset name>[:split]'")
    try:
        import datasets  # optional dependency
    except ImportError as err:
        raise DataError(
            f"{source!r} needs the 'datasets' package (pip install datasets) and network access; "
            "offline, use source 'builtin', 'e2e' or 'jsonl' with a local file"
        ) from err
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types (network, missing split)
        raise DataError(
            f"could not load Hugging Face dataset {name!r} split {split!r} "
            f"(network access needed unless cached): {err}"
        ) from err
    examples = []
    for row_no, row in enumerate(rows, start=1):
        try:
            if "meaning_representation" in row and "human_reference" in row:
                examples.append(_mr_example(row["meaning_representation"], row["human_reference"]))
            else:
                examples.append(_record_example(row))
        except ValueError as err:
            raise DataError(f"{source} row {row_no}: {err}") from err
    return examples


# --------------------------------------------------------------------------------------------
# Builtin task: E2E-like restaurant descriptions
# --------------------------------------------------------------------------------------------

_NAMES = (
    "The Punter", "The Eagle", "Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Browns",
    "Clowns", "Cocum", "Cotto", "Fitzbillies", "Giraffe", "Green Man", "Loch Fyne", "Midsummer House",
    "Strada", "Taste of Cambridge", "The Cricketers", "The Golden Curry", "The Mill", "The Olive Grove",
    "The Phoenix", "The Plough", "The Rice Boat", "The Vaults", "The Waterman", "Wildwood", "Zizzi",
)
_NEAR = ("Burger King", "Café Rouge", "Crowne Plaza Hotel", "Raja Indian Cuisine", "The Bakers",
         "Yippee Noodle Bar", "All Bar One", "Ranch")
_TYPES = ("coffee shop", "pub", "restaurant")
_FOODS = ("Chinese", "English", "Fast food", "French", "Indian", "Italian", "Japanese")
_AREAS = ("city centre", "riverside")
_PRICES = ("cheap", "moderate", "high", "less than £ 20", "£ 20 - 25", "more than £ 30")
_RATINGS = ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5")

# Phrases that read well after "has" / "with"; several per value for varied wording.
_PRICE_TEXT = {
    "cheap": ("low prices", "cheap food"),
    "moderate": ("moderate prices", "mid-range prices"),
    "high": ("high prices", "expensive food"),
    "less than £ 20": ("prices under £20", "meals for less than £20"),
    "£ 20 - 25": ("prices of £20-25", "meals for £20-25"),
    "more than £ 30": ("prices over £30", "meals for more than £30"),
}


def _rating_text(rating: str, rng: random.Random) -> str:
    if "out of" in rating:
        return rng.choice((f"a customer rating of {rating}", f"a {rating} rating"))
    article = "an" if rating[0] in "aeiou" else "a"
    return rng.choice((f"{article} {rating} customer rating", f"{rating} ratings"))


def _builtin_reference(fields: Mapping[str, str], variant: int, rng: random.Random) -> str:
    """One templated description of ``fields``; ``variant`` (0..2) picks the sentence shape."""
    name, kind, food = fields["name"], fields["type"], fields.get("food")
    noun = f"{'fast food' if food == 'Fast food' else food} {kind}" if food else kind
    article = "an" if noun[0].lower() in "aeiou" else "a"
    where = []
    if "area" in fields:
        where.append(rng.choice((f"in the {fields['area']}", f"located in the {fields['area']}")))
    if "near" in fields:
        where.append(rng.choice((f"near {fields['near']}", f"close to {fields['near']}")))
    extras = []
    if "price" in fields:
        extras.append(rng.choice(_PRICE_TEXT[fields["price"]]))
    if "customer rating" in fields:
        extras.append(_rating_text(fields["customer rating"], rng))
    place = (" " + " ".join(where)) if where else ""
    has = " and ".join(extras)
    family = fields.get("family friendly")
    if variant == 0:
        text = f"{name} is {article} {noun}{place}."
        if has:
            text += f" It has {has}."
        if family:
            text += " It is family friendly." if family == "yes" else " It is not family friendly."
    elif variant == 1:
        text = f"There is {article} {noun} called {name}{place}" + (f" with {has}" if has else "") + "."
        if family:
            text += " Children are welcome." if family == "yes" else " It is not suitable for children."
    else:
        lead = {"yes": "A family friendly", "no": "An adults only"}.get(family or "", article.capitalize())
        text = f"{lead} {noun}{place}, {name}" + (f" has {has}" if has else " is worth a visit") + "."
    return text


def builtin_examples(seed: int = 0, n_mrs: int = 220) -> list[Example]:
    """Generate the builtin E2E-like task: ``n_mrs`` distinct MRs with 2-3 references each.

    MRs use the cleaned E2E format (``name : X | Type : Y | ...``), so they parse exactly like the
    real file; references come from three sentence templates with small wording variations.
    Deterministic given ``seed``.
    """
    rng = random.Random(seed)
    optional = (
        ("food", _FOODS), ("price", _PRICES), ("customer rating", _RATINGS),
        ("area", _AREAS), ("family friendly", ("yes", "no")), ("near", _NEAR),
    )
    seen: set[str] = set()
    examples: list[Example] = []
    while len(seen) < n_mrs:
        parts = [("name", rng.choice(_NAMES)), ("Type", rng.choice(_TYPES))]
        for key, values in optional:
            if rng.random() < 0.6:
                parts.append((key, rng.choice(values)))
        mr = " | ".join(f"{key} : {value}" for key, value in parts)
        if mr in seen:
            continue
        seen.add(mr)
        fields = {key.lower(): value for key, value in parts}
        variants = rng.sample(range(3), k=rng.choice((2, 3, 3, 3)))
        for variant in variants:
            examples.append(_mr_example(mr, _builtin_reference(fields, variant, rng)))
    return examples


# --------------------------------------------------------------------------------------------
# Held-out split and device partitions
# --------------------------------------------------------------------------------------------


def _rng(seed: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(seed)


def split_by_group(
    examples: Sequence[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split into (train, eval) so that no group is in both (evaluation on unseen inputs).

    ``round(eval_fraction * n_groups)`` randomly chosen groups go to eval; order within each part
    follows the input. Deterministic given ``seed``.

    Raises:
        ValueError: ``eval_fraction`` outside (0, 1) or a part would be empty.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    groups = list(dict.fromkeys(ex.group for ex in examples))
    n_eval = round(eval_fraction * len(groups))
    if n_eval < 1 or n_eval >= len(groups):
        raise ValueError(
            f"eval_fraction={eval_fraction} of {len(groups)} groups leaves "
            f"{'eval' if n_eval < 1 else 'train'} empty"
        )
    order = _rng(seed).permutation(len(groups))
    eval_groups = {groups[i] for i in order[:n_eval]}
    train = [ex for ex in examples if ex.group not in eval_groups]
    held_out = [ex for ex in examples if ex.group in eval_groups]
    return train, held_out


def partition(
    examples: Sequence[Example],
    n_devices: int,
    scheme: Literal["iid", "dirichlet", "whole"],
    *,
    alpha: float = 0.5,
    field: str | None = None,
    seed: int = 0,
) -> list[list[Example]]:
    """Share examples among ``n_devices`` devices.

    - ``"iid"``: shuffle, then deal round-robin (sizes differ by at most one).
    - ``"whole"``: every device gets all examples (a real device with its own data file).
    - ``"dirichlet"``: for each value v of ``fields[field]`` (missing -> ``"<none>"``), draw
      p ~ Dir(alpha * 1_n) and give device i a share p_i of v's examples. Small alpha -> each
      value concentrates on few devices (label skew). Empty devices then take one example from
      the largest device until every device has one.

    Deterministic given ``seed``.

    Raises:
        ValueError: unknown scheme, ``n_devices < 1``, fewer examples than devices,
            ``alpha <= 0``, or ``field`` missing for ``"dirichlet"``.
    """
    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    if scheme == "whole":
        if not examples:
            raise ValueError("no examples to train on")
        return [list(examples) for _ in range(n_devices)]
    if scheme not in ("iid", "dirichlet"):
        raise ValueError(f"unknown partition scheme {scheme!r}; expected 'iid', 'dirichlet' or 'whole'")
    if len(examples) < n_devices:
        raise ValueError(f"cannot give {n_devices} devices an example each from {len(examples)} examples")
    rng = _rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(examples))
        return [[examples[i] for i in order[d::n_devices]] for d in range(n_devices)]

    if field is None:
        raise ValueError("partition scheme 'dirichlet' needs field= (e.g. 'food' or 'type')")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    by_value: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_value.setdefault(ex.fields.get(field, MISSING_FIELD_VALUE), []).append(i)
    shards: list[list[int]] = [[] for _ in range(n_devices)]
    for value in sorted(by_value):  # sorted: draws must not depend on input order of values
        indices = np.array(by_value[value])[rng.permutation(len(by_value[value]))]
        proportions = rng.dirichlet(np.full(n_devices, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(indices)).round().astype(int)
        for device, part in enumerate(np.split(indices, cuts)):
            shards[device].extend(int(i) for i in part)
    for device in range(n_devices):
        if not shards[device]:
            largest = max(range(n_devices), key=lambda d: len(shards[d]))
            shards[device].append(shards[largest].pop())
    return [[examples[i] for i in sorted(shard)] for shard in shards]


# --------------------------------------------------------------------------------------------
# Tokenisation and batching
# --------------------------------------------------------------------------------------------


@dataclass
class EncodedExample:
    """Token ids of prompt + completion + eos; ``labels`` is ``-100`` on prompt tokens."""

    input_ids: list[int]
    labels: list[int]


def encode(examples: Iterable[Example], tokenizer: Any, max_length: int) -> list[EncodedExample]:
    """Tokenise examples for causal-LM training with loss on the completion only.

    ``input_ids = prompt_ids + completion_ids + [eos]`` (no BOS, no other special tokens);
    ``labels = [-100] * len(prompt_ids) + completion_ids + [eos]``. Past ``max_length``, tokens are
    dropped from the left of the prompt first, then from the end of the completion; examples left
    without completion tokens are skipped (the count is logged).

    Args:
        tokenizer: a Hugging Face tokenizer (callable, with ``eos_token_id``).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    eos_id = getattr(tokenizer, "eos_token_id", None)
    if eos_id is None:
        raise ValueError("tokenizer has no eos_token_id; set tokenizer.eos_token")
    encoded: list[EncodedExample] = []
    skipped = 0
    for ex in examples:
        prompt_ids = list(tokenizer(ex.prompt, add_special_tokens=False)["input_ids"])
        completion_ids = list(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) + [eos_id]
        overflow = len(prompt_ids) + len(completion_ids) - max_length
        if overflow > 0:
            from_prompt = min(overflow, len(prompt_ids))
            prompt_ids = prompt_ids[from_prompt:]
            completion_ids = completion_ids[: len(completion_ids) - (overflow - from_prompt)]
        if not completion_ids:
            skipped += 1
            continue
        encoded.append(
            EncodedExample(
                input_ids=prompt_ids + completion_ids,
                labels=[IGNORE_INDEX] * len(prompt_ids) + completion_ids,
            )
        )
    if skipped:
        logger.warning("encode: skipped %d example(s) with no completion token within max_length=%d",
                       skipped, max_length)
    return encoded


@dataclass
class Batch:
    """Right-padded batch. ``input_ids``, ``labels``: (B, T) long; labels unshifted, -100 = no loss."""

    input_ids: torch.Tensor
    labels: torch.Tensor

    @property
    def completion_tokens(self) -> int:
        """Positions that contribute to the loss after the shift: ``(labels[:, 1:] != -100).sum()``."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def tokens(self) -> int:
        """Non-pad tokens.

        Every row ends with a labelled token (the eos, or the last kept completion token) followed
        only by padding, so a row's length is 1 + the index of its last label != -100. Counting it
        this way stays right when ``pad_id`` is also a real token (e.g. GPT-2's eos).
        """
        labelled = self.labels != IGNORE_INDEX  # (B, T)
        positions = torch.arange(1, self.labels.shape[1] + 1, device=self.labels.device)  # (T,)
        return int((labelled * positions).amax(dim=1).sum()) if self.labels.numel() else 0


def collate(items: Sequence[EncodedExample], pad_id: int) -> Batch:
    """Stack examples into a (B, T) batch, T = longest item; pad ``input_ids`` with ``pad_id`` and
    ``labels`` with -100 on the right (attention is causal, so no attention mask is needed)."""
    if not items:
        raise ValueError("collate needs at least one example")
    width = max(len(item.input_ids) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for row, item in enumerate(items):
        if len(item.input_ids) != len(item.labels):
            raise ValueError(f"item {row}: input_ids and labels differ in length")
        input_ids[row, : len(item.input_ids)] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, : len(item.labels)] = torch.tensor(item.labels, dtype=torch.long)
    return Batch(input_ids=input_ids, labels=labels)


class BatchStream:
    """Endless, reproducible stream of batches over one device's examples.

    Each epoch visits the examples in the order ``np.random.default_rng([seed, epoch])``
    permutes them, in batches of ``min(batch_size, n)`` (a short tail is dropped, and reappears in
    later epochs' shuffles). Global RNG state is never used, so a stream depends on its seed only.
    """

    def __init__(self, items: Sequence[EncodedExample], batch_size: int, pad_id: int, seed: int):
        if not items:
            raise ValueError("BatchStream needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.items = list(items)
        self.batch_size = min(batch_size, len(self.items))
        self.pad_id = pad_id
        self.seed = seed
        self.epoch = 0
        self._order = self._permutation(0)
        self._cursor = 0

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.items))

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, examples of it consumed): where the stream stands, for checkpoints."""
        return self.epoch, self._cursor

    def seek(self, epoch: int, cursor: int) -> None:
        """Continue from `position` (epoch, cursor) as if the batches before it had been drawn."""
        if epoch < 0 or not 0 <= cursor <= len(self.items):
            raise ValueError(f"stream position ({epoch}, {cursor}) is out of range")
        self.epoch, self._order, self._cursor = epoch, self._permutation(epoch), cursor

    def next(self) -> Batch:
        """The next batch; starts a freshly shuffled epoch when the current one runs out."""
        if self._cursor + self.batch_size > len(self._order):
            self.epoch += 1
            self._order = self._permutation(self.epoch)
            self._cursor = 0
        chosen = self._order[self._cursor : self._cursor + self.batch_size]
        self._cursor += self.batch_size
        return collate([self.items[i] for i in chosen], self.pad_id)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self.next()


def iterate_batches(items: Sequence[EncodedExample], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """One pass over ``items`` in order, in batches of ``batch_size`` (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield collate(items[start : start + batch_size], pad_id)
