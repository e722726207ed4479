"""The retromae-st command end to end on a tiny recipe: stages, skips, resume, reports, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_texts
from sentence_transformers import SentenceTransformer
from transformers import TrainerCallback

from retromae_st import cli
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
