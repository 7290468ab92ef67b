"""An example: a prompt and its completion, with the fields of its meaning representation.

E2E meaning representations (`name[The Eagle], food[French]` or `name : The Eagle | food :
French`) are parsed into fields; prompts use one template (`format_mr_prompt`) for training,
evaluation and generation alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

MISSING_FIELD_VALUE = "<none>"


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


def completion_text(text: str) -> str:
    # The leading space makes the completion tokenise the way it would right after the prompt.
    return " " + text.strip()


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
            pipe_match = _PIPE_FIELD.match(chunk)
            if pipe_match is None:
                raise ValueError(f"field {chunk.strip()!r} is not 'key : value'")
            pairs.append((pipe_match.group(1), pipe_match.group(2)))
    fields: dict[str, str] = {}
    for key, value in pairs:
        key = key.strip().lower()
        if not key or not value:
            raise ValueError(f"field {key or '?'!r} has an empty key or value")
        if key in fields:
            raise ValueError(f"field {key!r} appears twice")
        fields[key] = value
    return fields


def mr_example(mr: str, text: str) -> Example:
    """Build an example from a raw MR and its reference; raises ValueError if either is bad."""
    mr = mr.strip()
    if not text.strip():
        raise ValueError("empty reference text")
    fields = parse_mr(mr)
    return Example(format_mr_prompt(mr), completion_text(text), mr, MappingProxyType(fields))
