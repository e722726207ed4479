"""The package layout: the public API resolves, and dependencies point one way (data <- stages <- pipeline)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import retromae_st

PACKAGE = Path(retromae_st.__file__).parent

# A module in the key folder may not import from any of the listed modules (they sit above it in the flow).
FORBIDDEN = {
    "data": (
        "retromae_st.pretraining",
        "retromae_st.finetuning",
        "retromae_st.evaluation",
        "retromae_st.pipeline",
        "retromae_st.cli",
    ),
    "pretraining": (
        "retromae_st.finetuning",
        "retromae_st.evaluation",
        "retromae_st.pipeline",
        "retromae_st.cli",
    ),
    "finetuning": ("retromae_st.evaluation", "retromae_st.pipeline", "retromae_st.cli"),
    "evaluation": ("retromae_st.pipeline", "retromae_st.cli"),
}


@pytest.mark.parametrize("name", retromae_st.__all__)
def test_every_public_name_resolves(name):
    assert getattr(retromae_st, name) is not None


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_dependencies_point_one_way(folder):
    offending = [
        f"{path.relative_to(PACKAGE)} imports {module}"
        for path in sorted((PACKAGE / folder).glob("*.py"))
        for module in _imported_modules(path)
        if module.startswith(FORBIDDEN[folder])
    ]
    assert not offending, offending
