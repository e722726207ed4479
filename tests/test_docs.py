"""The README's commands stay true: CI runs the README's test command, recipes are documented."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _first_section_commands() -> list[str]:
    section = README.split("## Set up and run (fresh machine)", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_first_section_has_exactly_two_commands():
    commands = _first_section_commands()
    assert len(commands) == 2
    assert commands[0].endswith("retromae-st quickstart")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert _first_section_commands()[1] in ci


def test_every_recipe_and_command_is_documented():
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        assert f"recipes/{recipe.name}" in README, recipe.name
    for command in ("quickstart", "run", "pretrain", "finetune", "evaluate"):
        assert f"### `retromae-st {command}" in README, command


def test_changelog_follows_keep_a_changelog():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "keepachangelog.com" in changelog and "## [Unreleased]" in changelog
