"""The retromae-st command end to end on a tiny recipe: stages, skips, resume, reports, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_texts
from sentence_transformers import SentenceTransformer
from transformers import TrainerCallback

from retromae_st import cli
from retromae_st.allocator import allocator_hint, loaded_allocator
from retromae_st.finetuning import train as finetune_module


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A text corpus and a BEIR folder whose queries are a few words of their document."""
    root = tmp_path_factory.mktemp("data")
    documents = make_texts(120, seed=9)
    (root / "corpus.txt").write_text("\n".join(documents) + "\n")
    beir = root / "toy"
    (beir / "qrels").mkdir(parents=True)
    with (beir / "corpus.jsonl").open("w") as handle:
        for i, text in enumerate(documents):
            handle.write(json.dumps({"_id": f"d{i}", "title": "", "text": text}) + "\n")
    with (beir / "queries.jsonl").open("w") as handle:
        for i, text in enumerate(documents):
            handle.write(json.dumps({"_id": f"q{i}", "text": " ".join(text.split()[1:4])}) + "\n")
    for split, ids in (("train", range(0, 100)), ("test", range(100, 120))):
        rows = ["query-id\tcorpus-id\tscore", *(f"q{i}\td{i}\t1" for i in ids)]
        (beir / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def recipe_file(folder: Path, data: Path) -> Path:
    text = f"""\
name: tiny
output_dir: run
model:
  preset: retromae-tiny
  vocab_size: 150
  max_seq_length: 32
pretrain:
  corpus: {data / "corpus.txt"}
  batch_size: 16
  learning_rate: 1.0e-3
  max_steps: 4
  save_steps: 2
  logging_steps: 1
finetune:
  train: {data / "toy"}
  split: train
  batch_size: 16
  learning_rate: 1.0e-3
  max_steps: 6
  save_steps: 2
  logging_steps: 1
evaluation:
  beir: [{data / "toy"}]
  split: test
"""
    path = folder / "tiny.yaml"
    path.write_text(text)
    return path


class _CrashAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated crash")


def test_run_recipe_end_to_end_with_resume(tmp_path, data, monkeypatch, capsys):
    recipe = recipe_file(tmp_path, data)
    real_finetune = finetune_module.finetune

    def crashing_finetune(*args, **kwargs):
        return real_finetune(*args, **kwargs, callbacks=[_CrashAt(3)])

    # First attempt: dies during stage 2 (after its checkpoint at step 2).
    monkeypatch.setattr(finetune_module, "finetune", crashing_finetune)
    assert cli.main(["run", str(recipe), "--output-root", str(tmp_path)]) == 130
    run = tmp_path / "run"
    assert (run / "stage1" / "final" / "modules.json").is_file()
    assert not (run / "stage2" / "final").exists()
    assert (run / "stage2" / "checkpoints" / "checkpoint-2").is_dir()
    stage1_stamp = (run / "stage1" / "final" / "model.safetensors").stat().st_mtime_ns

    # Second attempt: the same command skips stage 1, resumes stage 2 and finishes.
    monkeypatch.setattr(finetune_module, "finetune", real_finetune)
    capsys.readouterr()
    assert cli.main(["run", str(recipe), "--output-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (run / "stage1" / "final" / "model.safetensors").stat().st_mtime_ns == stage1_stamp
    log = (run / "run.log").read_text()
    assert "Stage 1 is complete" in log and "checkpoint-2" in log
    said = allocator_hint() or f"Memory allocator: {loaded_allocator()}"
    assert log.count(said) == 3, log.count(said)  # stage 1, stage 2 before the crash, stage 2 resumed
    state = json.loads((run / "stage2" / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    steps_logged = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == 6

    report = json.loads((run / "report" / "report.json").read_text())
    text = (run / "report" / "report.md").read_text()
    for label in ("untrained", "stage1-retromae", "stage2-finetuned"):
        assert label in text and label in json.dumps(report)
    assert "report.md" in out
    # the product is a stock model
    model = SentenceTransformer(str(run / "stage2" / "final"))
    assert model.encode(["a query"]).shape == (1, 128)

    # Third time: everything is complete, nothing is redone.
    assert cli.main(["run", str(recipe), "--output-root", str(tmp_path)]) == 0
    assert "The report is complete" in (run / "run.log").read_text()


def test_compare_no_pretraining_adds_stage2_from_init_and_the_signed_difference(tmp_path, data, capsys):
    from safetensors.torch import load_file

    from retromae_st.evaluation.report import comparison_line

    recipe = recipe_file(tmp_path, data)
    short = ["--set", "pretrain.max_steps=2", "--set", "finetune.max_steps=2"]
    command = ["run", str(recipe), "--output-root", str(tmp_path), *short]
    run = tmp_path / "run"
    # A run made before the key existed, then the same run with it on: stage2-only trains and the report
    # (which lacks its row) is redone.
    assert cli.main(command) == 0
    assert not (run / "stage2-only").exists()
    stored = (run / "recipe.yaml").read_text()
    assert "  compare_no_pretraining: false\n" in stored
    (run / "recipe.yaml").write_text(stored.replace("  compare_no_pretraining: false\n", ""))
    capsys.readouterr()
    assert cli.main([*command, "--set", "evaluation.compare_no_pretraining=true"]) == 0
    out = capsys.readouterr().out

    only, stage2 = run / "stage2-only" / "final", run / "stage2" / "final"
    only_log = json.loads((only / "training_log.json").read_text())
    assert only_log["started_from"] == str(run / "init") and only_log["stage1"] is None
    assert json.loads((stage2 / "training_log.json").read_text())["started_from"] == str(
        run / "stage1" / "final"
    )
    assert only_log["global_step"] == 2  # the same stage 2 (steps), only the start differs
    only_weights = load_file(only / "model.safetensors")
    stage2_weights = load_file(stage2 / "model.safetensors")
    assert only_weights.keys() == stage2_weights.keys()
    assert any(not (only_weights[k] == stage2_weights[k]).all() for k in only_weights)

    report = json.loads((run / "report" / "report.json").read_text())
    assert "stage2-only" in [m["label"] for m in report["models"]]
    ndcg = {r["model"]: r["metrics"]["ndcg@10"] for r in report["results"] if r["task"] == "toy"}
    [entry] = report["comparisons"]
    assert (entry["title"], entry["model"], entry["reference"], entry["task"]) == (
        "RetroMAE stage 1 vs none", "stage2-finetuned", "stage2-only", "toy",
    )  # fmt: skip
    difference = ndcg["stage2-finetuned"] - ndcg["stage2-only"]
    assert entry["differences"]["ndcg@10"] == pytest.approx(difference)
    line = comparison_line(entry)
    sign = "±" if round(difference, 4) == 0 else ("+" if difference > 0 else "-")
    assert line.startswith(f"RetroMAE stage 1 vs none: {sign}{abs(difference):.4f} nDCG@10 on toy")
    markdown = (run / "report" / "report.md").read_text()
    assert "| stage2-only |" in markdown and line in markdown
    assert line in out and f"stage2-only: {only}" in out  # the end-of-run summary

    # Once more: stage2-only and the report are complete and skipped.
    stamp = (only / "model.safetensors").stat().st_mtime_ns
    assert cli.main([*command, "--set", "evaluation.compare_no_pretraining=true"]) == 0
    log = (run / "run.log").read_text()
    assert "Stage 2 without stage 1 is complete" in log and "The report is complete" in log
    assert (only / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "missing.yaml"], "recipe missing.yaml does not exist"),
        (["evaluate", "--model", "nowhere", "--beir", "nowhere", "--output", "r"], "nowhere"),
        (["pretrain", "--model", "retromae-tiny", "--corpus", "empty.txt", "--output", "o"], "empty.txt"),
        (
            [
                "pretrain",
                "--model",
                "retromae-tiny",
                "--corpus",
                "c.txt",
                "--output",
                "o",
                "--encoder-mask-ratio",
                "1.0",
            ],
            "encoder_mask_ratio",
        ),  # fmt: skip
        (
            [
                "pretrain",
                "--model",
                "retromae-tiny",
                "--corpus",
                "c.txt",
                "--output",
                "o",
                "--max-seq-length",
                "4096",
            ],
            "max_seq_length=4096",
        ),  # fmt: skip
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, monkeypatch, capsys, args, expected):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "c.txt").write_text("\n".join(make_texts(40)) + "\n")
    monkeypatch.chdir(tmp_path)
    assert cli.main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("retromae-st: error:")]
    assert len(errors) == 1 and expected in errors[0]


def test_user_error_in_a_real_process_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "retromae_st.cli", "run", "missing.yaml"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "retromae-st: error: recipe missing.yaml does not exist"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["quickstart", "run", "pretrain", "finetune", "evaluate"])
def test_help_explains_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: retromae-st {command}" in capsys.readouterr().out


# -- run --check runs every check a run makes before training (issue #10, item 13) --------------------------


def test_check_passes_a_good_recipe_and_writes_nothing(tmp_path, data, capsys):
    recipe = recipe_file(tmp_path, data)
    assert cli.main(["run", str(recipe), "--output-root", str(tmp_path), "--check"]) == 0
    assert f"# output: {tmp_path / 'run'}" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def _break_beir_split(data: Path, tmp: Path) -> str:
    copy = tmp / "toy-no-test"
    shutil.copytree(data / "toy", copy)
    (copy / "qrels" / "test.tsv").unlink()
    return f"evaluation.beir=[{copy}]"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (lambda d, t: f"pretrain.corpus={t / 'missing.txt'}", "pretrain.corpus: "),
        (lambda d, t: f"finetune.train={t / 'no-such-folder'}/", "finetune.train: "),
        (_break_beir_split, "evaluation.beir: "),
        (lambda d, t: "pretrain.loss.decoder_heads=3", "decoder_heads=3 must be a positive integer dividing"),
        (lambda d, t: "pretrain.bf16=true", "bf16 and fp16"),
        (lambda d, t: "model.max_seq_length=1024", "model.max_seq_length=1024 exceeds the 512 positions"),
    ],
)
def test_check_refuses_what_the_run_refuses(tmp_path, data, capsys, monkeypatch, override, expected):
    recipe = recipe_file(tmp_path, data)
    extra = ["--set", override(data, tmp_path)]
    if "bf16" in extra[1]:
        extra += ["--set", "pretrain.fp16=true"]
    base = ["run", str(recipe), "--output-root", str(tmp_path), *extra]
    assert cli.main([*base, "--check"]) == 2
    checked = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("retromae-st: error:")
    ]
    assert len(checked) == 1 and expected in checked[0]
    # The same recipe without --check fails with the same line, before the corpus is even read.
    from retromae_st import pipeline

    def must_not_read(*args, **kwargs):
        raise AssertionError("the corpus was read although the recipe is wrong")

    monkeypatch.setattr(pipeline, "corpus_dataset", must_not_read)
    assert cli.main(base) == 2
    ran = [line for line in capsys.readouterr().err.splitlines() if line.startswith("retromae-st: error:")]
    assert ran == checked


def test_check_refuses_a_model_that_cannot_be_found(tmp_path, data, capsys):
    recipe = recipe_file(tmp_path, data)
    text = recipe.read_text().replace("  preset: retromae-tiny\n  vocab_size: 150\n", "  name_or_path: {}\n")
    not_a_model = tmp_path / "empty-folder"
    not_a_model.mkdir()
    for name, expected in (
        (not_a_model, "neither modules.json nor config.json"),
        ("nobody/no-model", "cache"),
    ):
        recipe.write_text(text.format(name))
        assert cli.main(["run", str(recipe), "--output-root", str(tmp_path), "--check"]) == 2
        [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("retromae-st: error:")]
        assert "model.name_or_path: " in line and expected in line


@pytest.mark.parametrize(
    ("command", "flags", "expected"),
    [
        ("pretrain", ["--save-steps", "0"], "save_steps=0"),
        ("pretrain", ["--batch-size", "0"], "batch_size=0"),
        ("pretrain", ["--decoder-layers", "0"], "decoder_layers=0"),
        ("pretrain", ["--max-length-groups", "0"], "max_length_groups=0"),
        ("pretrain", ["--encoder-mask-ratio", "1.0"], "encoder_mask_ratio=1.0"),
        ("finetune", ["--save-steps", "0"], "save_steps=0"),
        ("finetune", ["--batch-size", "1"], "batch_size=1"),
    ],
)
def test_bad_training_options_are_refused_before_any_input_is_read(
    tmp_path, monkeypatch, capsys, command, flags, expected
):
    from retromae_st import models
    from retromae_st.data import sources
    from retromae_st.finetuning import pairs

    def must_not_run(*args, **kwargs):
        raise AssertionError("input was read before the options were checked")

    for module, name in ((sources, "load_texts"), (models, "load_encoder"), (pairs, "load_pairs")):
        monkeypatch.setattr(module, name, must_not_run)
    inputs = (
        ["--model", "retromae-tiny", "--corpus", "c.txt"]
        if command == "pretrain"
        else ["--model", "m", "--train", "p.jsonl"]
    )
    monkeypatch.chdir(tmp_path)
    assert cli.main([command, *inputs, "--output", "o", *flags]) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("retromae-st: error:")]
    assert expected in line


# -- the process group of a launch ends with the command ----------------------------------------------------


@pytest.mark.parametrize("outcome", ["success", "bad input"])
def test_the_command_destroys_the_process_group_it_ran_in(tmp_path, data, outcome):
    """A gloo group left alive at exit can abort a finished process under torchrun (pytorch#190489)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        recipe = recipe_file(tmp_path, data)
        if outcome == "bad input":
            recipe.write_text(recipe.read_text() + "unknown_key: 1\n")
        expected = 0 if outcome == "success" else 2
        assert cli.main(["run", str(recipe), "--output-root", str(tmp_path), "--check"]) == expected
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
