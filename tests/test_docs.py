"""The documentation: the site builds with `mkdocs build --strict` (a broken link, a page left out
of the navigation or a docstring reference that does not resolve fails here), its configuration
reference holds every config key, and the README stays a short front page with the two commands."""

import os
import re
import subprocess
import sys
from pathlib import Path

from splitpeft.config import reference_rows

ROOT = Path(__file__).resolve().parent.parent


def test_the_site_builds_strictly_and_its_reference_holds_every_config_key(tmp_path):
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    page = (site / "reference" / "configuration" / "index.html").read_text()
    keys = [row["key"] for row in reference_rows()]
    missing = [key for key in keys if f"<code>{key}</code>" not in page]
    assert not missing, f"config keys missing from the generated reference: {missing}"
    cli = (site / "reference" / "cli" / "index.html").read_text()
    assert all(f"splitpeft {command}" in cli for command in ("simulate", "compare", "evaluate", "privacy"))
    assert "run_experiment" in (site / "reference" / "api" / "index.html").read_text()


def test_every_key_has_a_help_string_and_numbers_show_their_range():
    rows = reference_rows()
    assert len({row["key"] for row in rows}) == len(rows)
    assert [row["key"] for row in rows if not row["help"].strip()] == []
    ranked = {row["key"]: row["range"] for row in rows}
    assert ranked["lora.rank"] == "[1, 65536]" and ranked["hsplit.server_rank"] == "[1, 65536]"


def test_the_readme_is_a_short_front_page_that_starts_with_the_ci_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    commands = [line for line in readme.splitlines()[:20] if line.startswith("bash scripts/setup.sh")]
    assert len(commands) == 2 and "splitpeft simulate" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci  # CI runs exactly the README's test command
    for link in re.findall(r"\]\(((?:docs/|BENCHMARKS)[^)#]*)", readme):  # every page it links to exists
        assert (ROOT / link).is_file(), link
