"""benchmarks/quality.py: the report title says whether a run is the full benchmark or what it lacks, and the
equal wall-clock arms get RetroMAE's stage-1 time from this run or from earlier records of the same seed."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _args(*extra: str):
    # --data points at a folder that need not exist: parse_args only reads paths when a start model is given.
    return quality.parse_args(["--data", "/nonexistent", *extra])


def _records(seeds: int) -> list[dict]:
    """Records shaped as a run writes them (taken from a committed result), one per seed and arm."""
    template = json.loads((RESULTS / "quality_continued_none.json").read_text())["records"][0]
    arms = [*quality.DEFAULT_ARMS, "x", "mlm-mean@time", "tsdae-mean@time"]
    return [dict(template, seed=s, regime="scarce", arm=a) for s in range(seeds) for a in arms]


def test_the_default_run_with_three_seeds_is_the_full_configuration():
    assert quality.run_label(_args(), _records(3)) == "full configuration"


def test_a_run_without_a_regime_or_zero_shot_sets_is_labelled_reduced_and_says_why():
    label = quality.run_label(_args("--stage2-steps", "0", "--zero-shot", ""), _records(3))
    assert label == "REDUCED run: no full-pairs regime; no zero-shot sets"


def test_an_arm_with_fewer_seeds_than_asked_makes_the_run_reduced():
    records = _records(3)[:-1]  # the last arm lost its third seed
    assert quality.run_label(_args(), records) == "REDUCED run: fewer than 3 seeds for some arm"
    assert quality.run_label(_args("--quick"), records) == "quick smoke run"


def test_an_mlm_arm_without_its_equal_time_twin_makes_the_run_reduced():
    records = [r for r in _records(3) if "@time" not in r["arm"]]
    assert quality.run_label(_args(), records) == "REDUCED run: no equal-time arms"


def test_a_table_without_one_of_the_default_arms_names_it():
    records = [r for r in _records(3) if not r["arm"].startswith("tsdae")]
    assert quality.run_label(_args(), records) == "REDUCED run: arms not run: tsdae-mean"


def test_a_join_has_the_regimes_of_its_records_whatever_the_joining_run_asks_for():
    # Joining (--arms= --include ...) a scarce-only run's records with a full-only run's: the table is not
    # missing a regime, though the joining process's own --stage2-steps is 0.
    records = _records(3) + [dict(r, regime="full") for r in _records(3)]
    assert quality.run_label(_args("--stage2-steps", "0"), records) == "full configuration"
    assert quality.run_label(_args("--scarce-pairs", "0"), records) == "full configuration"
    scarce_only = _records(3)
    assert quality.run_label(_args("--stage2-steps", "0"), scarce_only) == "REDUCED run: no full-pairs regime"


def test_a_join_names_the_arms_one_stage2_regime_lacks():
    full = [dict(r, regime="full") for r in _records(3) if r["arm"] in ("retromae-mean", "none-mean")]
    label = quality.run_label(_args(), _records(3) + full)
    assert label == "REDUCED run: arms not run in full: mlm-mean, tsdae-mean"


def test_a_joined_table_says_the_threads_and_stage2_steps_its_records_ran_with():
    scarce = [dict(r, stage2=dict(r["stage2"], steps=50)) for r in _records(3)]
    full = [dict(r, regime="full", threads=1, stage2=dict(r["stage2"], steps=200)) for r in _records(3)]
    report = {
        "environment": {"cpu": "cpu", "cores": 2, "torch": "2"},
        "config": {**vars(_args("--stage2-steps", "0", "--threads", "2")), "label": "x"},
        "wall_seconds": 0.0,
        "command": "python benchmarks/quality.py --arms=",
        "vocab_size": 10,
        "eval_sets": [],
        "records": scarce + full,  # the scarce records carry no thread count, as older runs' do
    }
    header = quality.markdown(report)
    assert "1 thread(s)" in header
    assert "`full` = all train pairs, 200 steps" in header
    assert "`scarce` = 1000 pairs, 50 steps" in header  # the records' 50, not the default 100
    report["records"] = []
    header = quality.markdown(report)
    assert "2 thread(s)" in header and "`full` = all train pairs, 0 steps" in header


def test_a_join_writes_the_table_of_its_runs_without_loading_data(tmp_path):
    # --data does not exist: a join that loaded the corpus or trained a tokenizer would fail.
    committed = json.loads((RESULTS / "quality_continued_zs_none.json").read_text())
    scarce, full = dict(committed), dict(committed)
    full["eval_sets"] = committed["eval_sets"][:1]  # a run without the zero-shot sets
    full["records"] = [dict(r, regime="full") for r in committed["records"] if r["regime"] == "scarce"]
    retromae_level, threads = logging.getLogger("retromae_st").level, torch.get_num_threads()
    paths = []
    for name, report in (("scarce", scarce), ("full", full)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(report))
    quality.main(
        ["--data", "/nonexistent", "--arms=", "--include", ",".join(map(str, paths)),
         "--output-dir", str(tmp_path), "--name", "joined"]
    )  # fmt: skip
    # A join sets nothing up: the logging and torch settings of a training run would leak into later tests.
    assert logging.getLogger("retromae_st").level == retromae_level
    assert torch.get_num_threads() == threads
    joined = json.loads((tmp_path / "joined.json").read_text())
    assert joined["records"] == committed["records"] + full["records"]
    assert joined["eval_sets"] == committed["eval_sets"]
    assert joined["vocab_size"] == committed["vocab_size"]
    table = (tmp_path / "joined.md").read_text()
    assert "| full | none-mean | 3 |" in table and "| scarce | none-mean | 3 |" in table
    assert (tmp_path / "joined.png").stat().st_size > 0


def _row(regime: str, arm: str, mean: float, std: float, seeds: int = 3) -> dict:
    return {"regime": regime, "arm": arm, "seeds": seeds, "debian-pkgs/ndcg@10": (mean, std)}


def test_retromae_is_measured_against_no_stage_1_and_the_best_other_arm_with_both_noise_yardsticks():
    rows = [
        _row("full", "retromae-mean", 0.716, 0.003),
        _row("full", "none-mean", 0.640, 0.010),
        _row("full", "tsdae-mean", 0.685, 0.003),
        _row("full", "mlm-mean", 0.572, 0.003),
        _row("start", "start", 0.9, 0.0, seeds=1),  # neither a baseline nor compared
        _row("stage1", "retromae-mean", 0.3, 0.0),
    ]
    found = quality.margins(rows, ["debian-pkgs"])
    assert [(m["arm"], m["against"]) for m in found] == [
        ("retromae-mean", "none-mean"),
        ("retromae-mean", "tsdae-mean (best other)"),
    ]
    tsdae = found[1]
    assert tsdae["delta"] == pytest.approx(3.1)
    assert tsdae["two_std"] == pytest.approx(200 * (2 * 0.003**2) ** 0.5)
    assert tsdae["two_se"] == pytest.approx(tsdae["two_std"] / 3**0.5)
    # When no stage 1 is itself the best other arm, it is compared once.
    best_is_none = [_row("scarce", "retromae-mean", 0.5, 0.01), _row("scarce", "none-mean", 0.6, 0.01)]
    assert [m["against"] for m in quality.margins(best_is_none, ["debian-pkgs"])] == [
        "none-mean (best other)"
    ]


def test_a_margin_reads_met_only_two_points_beyond_the_noise():
    assert quality.reading(3.06, 0.90) == "met"
    assert quality.reading(2.80, 0.90) == "ahead"
    assert quality.reading(-0.41, 0.63) == "tie"
    assert quality.reading(-0.41, 0.36) == "behind"


def _timing(seed: int, arm: str, seconds: float, steps: int) -> dict:
    return {
        "seed": seed,
        "arm": arm,
        "stage1": {"steps": steps, "seconds": seconds, "s_per_step": seconds / steps},
    }


def test_an_explicit_equal_time_arm_takes_its_budget_and_pace_from_earlier_records_of_its_seed():
    timings = [
        _timing(0, "retromae-mean", 1200.0, 3000),
        _timing(0, "mlm-mean", 540.0, 3000),
        _timing(1, "retromae-mean", 900.0, 3000),  # another seed's timing must not be used
    ]
    args = _args("--arms", "mlm-mean@time", "--no-equal-time")
    plan = quality.equal_time_plan(args, 0, {}, timings)
    assert plan == {"mlm-mean": (1200.0, 0.18)}


def test_an_earlier_equal_time_record_repeats_its_step_count():
    # An earlier run planned mlm-mean@time at 530.9 s / 4.35 s per step = 122 steps; its own pace was timed
    # in that run and recorded only as the plan's pace.
    earlier_time_arm = {
        "seed": 0,
        "arm": "mlm-mean@time",
        "stage1": {"steps": 122, "seconds": 602.0, "budget_seconds": 530.9, "planned_s_per_step": 4.35},
    }
    timings = [_timing(0, "retromae-mean", 530.9, 50), earlier_time_arm, {**earlier_time_arm, "seed": 1}]
    args = _args("--arms", "mlm-mean@time", "--no-equal-time")
    plan = quality.equal_time_plan(args, 0, {}, timings)
    assert plan == {"mlm-mean": (530.9, 4.35)}
    budget, pace = plan["mlm-mean"]
    assert round(budget / pace) == 122
    # Another RetroMAE record of the seed read first (another run's, 593 s) leaves the repeated count alone.
    other_retromae_first = [_timing(0, "retromae-mean", 593.0, 50), *timings]
    assert quality.equal_time_plan(args, 0, {}, other_retromae_first) == {"mlm-mean": (530.9, 4.35)}
    # An equal-step record of the arm's own pace, where there is one, comes first.
    timings.append(_timing(0, "mlm-mean", 200.0, 50))
    assert quality.equal_time_plan(args, 0, {}, timings) == {"mlm-mean": (530.9, 4.0)}


def test_an_explicit_equal_time_arm_without_timings_for_its_seed_exits_2(capsys):
    args = _args("--arms", "mlm-mean@time")
    with pytest.raises(SystemExit) as exit_:
        quality.equal_time_plan(args, 1, {}, [_timing(0, "retromae-mean", 1200.0, 3000)])
    assert exit_.value.code == 2
    assert "mlm-mean@time, seed 1" in capsys.readouterr().err


def test_arms_run_in_this_process_get_equal_time_twins_unless_turned_off():
    runs = {
        "retromae-mean": (Path("r"), "mean", {"seconds": 100.0, "s_per_step": 0.5}),
        "mlm-mean": (Path("m"), "mean", {"seconds": 40.0, "s_per_step": 0.2}),
        "none-mean": (Path("n"), "mean", {"steps": 0, "seconds": 0.0}),
    }
    assert quality.equal_time_plan(_args(), 0, runs, []) == {"mlm-mean": (100.0, 0.2)}
    assert quality.equal_time_plan(_args("--no-equal-time"), 0, runs, []) == {}


def test_an_explicit_equal_time_arm_without_its_own_pace_is_calibrated_when_asked():
    timings = [_timing(0, "retromae-mean", 1200.0, 3000)]
    calibrated = []

    def calibrate(arm: str) -> dict:
        calibrated.append(arm)
        return {"steps": 100, "seconds": 70.0, "s_per_step": 0.7, "steady_s_per_step": 0.6}

    args = _args("--arms", "tsdae-mean@time", "--calibrate-steps", "100")
    assert quality.equal_time_plan(args, 0, {}, timings, calibrate) == {"tsdae-mean": (1200.0, 0.6)}
    assert calibrated == ["tsdae-mean"]
    # A pace on record is used as it is, without calibrating.
    timings.append(_timing(0, "tsdae-mean", 1500.0, 3000))
    assert quality.equal_time_plan(args, 0, {}, timings, calibrate) == {"tsdae-mean": (1200.0, 0.5)}
    assert calibrated == ["tsdae-mean"]


def test_the_steady_pace_leaves_out_the_first_tenth_of_the_steps():
    timer = quality.StepTimer()
    timer.start, timer.end, timer.steps = 0.0, 29.0, 20
    timer.step_ends = [10.0, 11.0] + [11.0 + i for i in range(1, 19)]  # a slow first step, then 1 s/step
    assert timer.steady_s_per_step == pytest.approx(1.0)
    assert timer.seconds / timer.steps > 1.4


def test_a_seeds_stage1_decoder_starts_the_same_whatever_ran_before(tokenizer, tmp_path, monkeypatch):
    """quality.py builds the loss itself (not through ``pretrain``, which seeds): its fresh decoder must
    still follow the seed, so that a rerun of one seed alone reproduces that seed of a multi-seed run."""
    from conftest import TINY

    from retromae_st.models import build_model

    init_dir = tmp_path / "init"
    build_model(TINY, tokenizer, max_seq_length=32, pooling="mean", save_dir=init_dir, seed=0)
    decoders = []

    def capture(model, windows, out_dir, *, loss, **kwargs):
        """Stands in for training: keeps the loss's fresh decoder weights."""
        decoders.append({k: v.clone() for k, v in loss.decoder.state_dict().items()})

    monkeypatch.setattr(quality, "pretrain", capture)
    args = _args("--max-len", "32")
    for earlier_draws in (0, 1000):
        torch.rand(earlier_draws)  # what an earlier seed or arm of the same process drew
        quality.stage1("retromae-mean", 1, init_dir, tmp_path / "out", None, [], args, seed=3)
    assert decoders[0].keys() == decoders[1].keys()
    assert all(torch.equal(decoders[0][k], decoders[1][k]) for k in decoders[0])
