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


CI_VENV = ".venv-ci"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    # CI installs into its own venv folder; apart from that name it runs the README's command verbatim.
    assert f"python3 -m venv {CI_VENV} && . {CI_VENV}/bin/activate" in ci
    assert _first_section_commands()[1] in re.sub(rf"{re.escape(CI_VENV)}\b", ".venv", ci)


def test_ci_leaves_the_developers_venv_alone():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert not re.search(r"rm -rf \S*\.venv(/|\s|$)", ci)  # only its own folder is removed
    assert f"{CI_VENV}/" in (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()


def test_every_recipe_and_command_is_documented():
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        assert f"recipes/{recipe.name}" in README, recipe.name
    for command in ("quickstart", "run", "pretrain", "finetune", "evaluate"):
        assert f"### `retromae-st {command}" in README, command


def test_changelog_follows_keep_a_changelog():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "keepachangelog.com" in changelog and "## [Unreleased]" in changelog


def _section_commands(heading: str, command: str) -> list[list[str]]:
    """The ``command`` lines of the bash blocks under README heading ``heading``, split as a shell would."""
    import shlex

    section = README.split(heading, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    lines = []
    for block in re.findall(r"```bash\n(.+?)\n```", section, flags=re.S):
        lines += [line for line in block.replace("\\\n", " ").splitlines() if line.startswith(command)]
    return [shlex.split(line, comments=True)[1:] for line in lines]


def test_readme_evaluate_examples_parse_and_label_their_models(monkeypatch):
    from retromae_st import cli, evaluation

    calls = []
    monkeypatch.setattr(evaluation, "evaluate", lambda models, **kwargs: calls.append((models, kwargs)))
    examples = _section_commands("### `retromae-st evaluate`", "retromae-st evaluate")
    assert len(examples) >= 3
    for argv in examples:
        assert cli.main(argv) == 0, argv
    # The first example used to exit 2 ("several models are labelled ['final']").
    assert list(calls[0][0]) == ["ft", "pt", "all-MiniLM-L6-v2"]
    assert calls[0][0]["pt"] == "runs/pt/final"
    for (models, _), argv in zip(calls, examples, strict=True):
        assert len(models) == argv.count("--model"), argv
