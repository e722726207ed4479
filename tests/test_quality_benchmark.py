"""benchmarks/quality.py: the report title says whether a run is the full benchmark or what it lacks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _args(*extra: str):
    # --data points at a folder that need not exist: parse_args only reads paths when a start model is given.
    return quality.parse_args(["--data", "/nonexistent", *extra])


def _records(seeds: int) -> list[dict]:
    """Records shaped as a run writes them (taken from a committed result), one per seed and arm."""
    template = json.loads((RESULTS / "quality_continued_none.json").read_text())["records"][0]
    return [dict(template, seed=s, regime="scarce", arm=a) for s in range(seeds) for a in ("none-mean", "x")]


def test_the_default_run_with_three_seeds_is_the_full_configuration():
    assert quality.run_label(_args(), _records(3)) == "full configuration"


def test_a_run_without_a_regime_or_zero_shot_sets_is_labelled_reduced_and_says_why():
    label = quality.run_label(_args("--stage2-steps", "0", "--zero-shot", ""), _records(3))
    assert label == "REDUCED run: no full-pairs regime; no zero-shot sets"


def test_an_arm_with_fewer_seeds_than_asked_makes_the_run_reduced():
    records = _records(3)[:-1]  # the last arm lost its third seed
    assert quality.run_label(_args(), records) == "REDUCED run: fewer than 3 seeds for some arm"
    assert quality.run_label(_args("--quick"), records) == "quick smoke run"
