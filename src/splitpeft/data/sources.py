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
- ``"text"``: plain text, one example a non-empty line (no prompt; the loss is on the whole line),
  e.g. a public corpus for the privacy meter's attackers (``privacy.aux_source=text``).
- ``"hf:<dataset>[:split]"``: a Hugging Face dataset via ``datasets.load_dataset`` (needs the
  ``datasets`` package and a network).

Loss is on completion tokens only: labels are ``-100`` on the prompt and on padding, following the
Hugging Face convention that labels are *not* shifted (the loss shifts them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from splitpeft.data.builtin import builtin_examples
from splitpeft.data.examples import (
    DataError,
    Example,
    completion_text,
    format_instruction_prompt,
    mr_example,
)

SOURCES = ("builtin", "e2e", "jsonl", "text", "hf:<dataset>[:split]")


"""Value used by Dirichlet partitioning for examples that lack the partition field."""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_examples(
    source: str, path: str | None = None, *, limit: int | None = None, seed: int = 0
) -> list[Example]:
    """Load a dataset as a list of :class:`Example`.

    Args:
        source: ``"builtin"``, ``"e2e"``, ``"jsonl"``, ``"text"`` or ``"hf:<dataset>[:split]"`` (split
            defaults to ``"train"``).
        path: file to read; required for ``"e2e"``, ``"jsonl"`` and ``"text"``, ignored otherwise.
        limit: keep only the first ``limit`` examples (file order; generation order for builtin).
        seed: seed of the builtin generator (other sources are read in file order).

    Raises:
        DataError: unknown source, missing file, malformed record, or unavailable dataset.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive integer or None, got {limit!r}")
    if source == "builtin":
        examples = builtin_examples(seed)
    elif source in ("e2e", "jsonl", "text"):
        if path is None:
            raise DataError(f"source {source!r} needs a path to a file")
        file = Path(path)
        if not file.is_file():
            raise DataError(f"{source} data file not found: {path}")
        lines = _read_lines(file)
        parse = {"e2e": _parse_e2e_lines, "jsonl": _parse_jsonl, "text": _parse_text}[source]
        examples = parse(lines, str(file))
    elif source.startswith("hf:"):
        examples = _load_hf(source)
    else:
        raise DataError(f"unknown data source {source!r}; valid sources: {', '.join(SOURCES)}")
    if not examples:
        raise DataError(f"data source {source!r} ({path or 'no file'}) has no examples")
    return examples[:limit] if limit is not None else examples


def _read_lines(file: Path) -> list[str]:
    """The file's lines, split at line feeds only (\\n or \\r\\n): `str.splitlines` also splits at
    U+2028, U+0085 and form feeds, which may stand inside an example (a JSON string holds U+2028
    as is). A UTF-8 byte order mark at the start is dropped."""
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {file}: {err}") from err
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's last line feed ends its last line
    return [line.removesuffix("\r") for line in lines]


def _parse_e2e_lines(lines: Iterable[str], where: str) -> list[Example]:
    examples = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if "||" not in line:
            raise DataError(f"{where}:{line_no}: expected 'MR||text', found no '||'")
        mr, text = line.split("||", 1)
        try:
            examples.append(mr_example(mr, text))
        except ValueError as err:
            raise DataError(f"{where}:{line_no}: {err}") from err
    return examples


def _parse_text(lines: Iterable[str], where: str) -> list[Example]:
    """One example per non-empty line: no prompt, the line (stripped) as the completion."""
    return [Example("", line.strip(), line.strip()) for line in lines if line.strip()]


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
        completion = completion_text(text("output"))
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
                examples.append(mr_example(row["meaning_representation"], row["human_reference"]))
            else:
                examples.append(_record_example(row))
        except ValueError as err:
            raise DataError(f"{source} row {row_no}: {err}") from err
    return examples
