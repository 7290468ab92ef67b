"""MkDocs hooks (mkdocs.yml `hooks:`): fill the generated parts of the documentation at build time,
so they cannot go stale: the configuration reference from the config schema's help strings and
bounds, the command line from the CLI's own parser, and the benchmarks from BENCHMARKS.md."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from splitpeft.cli import build_parser
from splitpeft.config import reference_markdown

ROOT = Path(__file__).resolve().parent.parent


def cli_markdown() -> str:
    """`splitpeft --help` and each command's `--help`, as the parser prints them."""
    parser = build_parser()
    sections = ["```text", parser.format_help().rstrip(), "```"]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        command.epilog = None  # `simulate`'s epilog lists every config key: the configuration page has them
        sections += ["", f"## `splitpeft {name}`", "", "```text", command.format_help().rstrip(), "```"]
    return "\n".join(sections) + "\n"


def benchmarks_markdown() -> str:
    """BENCHMARKS.md without its title (the page has one)."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    return text.split("\n", 1)[1] if text.startswith("# ") else text


GENERATED = {
    "<!-- splitpeft:config-reference -->": reference_markdown,
    "<!-- splitpeft:cli -->": cli_markdown,
    "<!-- splitpeft:benchmarks -->": benchmarks_markdown,
}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    for marker, make in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
