"""Crash safety, atomic outputs, no silent overwrite, numerical faults and bad input, all through the CLI.

A crash is a real ``SIGKILL`` at an exact point of the code (tests/workers/crash_cli.py), then the same
command is run again, as a user would.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, make_texts
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from retromae_st import cli
from retromae_st.loss import LOSS_WEIGHTS_NAME, RetroMAELoss
from retromae_st.models import build_model

WORKER = Path(__file__).resolve().parent / "workers" / "crash_cli.py"
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer) -> Path:
    """A text corpus, a BEIR folder (queries are words of their document) and a tiny saved model."""
    root = tmp_path_factory.mktemp("reliability")
    documents = make_texts(64, seed=3)
    (root / "corpus.txt").write_text("\n".join(documents) + "\n")
    beir = root / "toy"
    (beir / "qrels").mkdir(parents=True)
    (beir / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n" for i, t in enumerate(documents))
    )
    (beir / "queries.jsonl").write_text(
        "".join(
            json.dumps({"_id": f"q{i}", "text": " ".join(t.split()[1:4])}) + "\n"
            for i, t in enumerate(documents)
        )
    )
    for split, ids in (("train", range(0, 48)), ("test", range(48, 64))):
        rows = ["query-id\tcorpus-id\tscore", *(f"q{i}\td{i}\t1" for i in ids)]
        (beir / "qrels" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    model = build_model(TINY, tokenizer, max_seq_length=32, save_dir=root / "init", seed=0)
    model.save(str(root / "model"))
    return root


def pretrain_args(data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "pretrain", "--model", "retromae-tiny", "--corpus", str(data / "corpus.txt"), "--output", str(output),
        "--vocab-size", "150", "--max-seq-length", "32", "--batch-size", "8", "--max-steps", "8",
        "--save-steps", "2", "--logging-steps", "1", "--lr", "1e-3", *extra,
    ]  # fmt: skip


def finetune_args(data: Path, output: Path, *extra: str) -> list[str]:
    return [
        "finetune", "--model", str(data / "model"), "--train", str(data / "toy"), "--output", str(output),
        "--batch-size", "8", "--max-steps", "6", "--save-steps", "2", "--logging-steps", "1", "--lr", "1e-3",
        *extra,
    ]  # fmt: skip


def kill_at(when: str, step: int, args: list[str], cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(WORKER), when, str(step), *args],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == -9, result.stderr[-3000:]


def assert_same_weights(a: Path, b: Path) -> None:
    left, right = load_file(str(a)), load_file(str(b))
    assert left.keys() == right.keys()
    for key in left:
        assert torch.equal(left[key], right[key]), key


def temporary_leftovers(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if ".tmp-" in path.name or ".old-" in path.name]


def resumed_from(output: Path) -> str:
    lines = [line for line in (output / "run.log").read_text().splitlines() if "Resuming from" in line]
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def straight_pretrain(data) -> Path:
    """The uninterrupted pretraining run every crashed run must reproduce exactly."""
    output = data / "straight-pretrain"
    assert cli.main(pretrain_args(data, output)) == 0
    return output


# -- crash and resume ------------------------------------------------------------------------------------


def test_completed_run_is_complete_and_leaves_no_temporary_files(straight_pretrain):
    assert (straight_pretrain / "final" / "model.safetensors").is_file()
    assert (straight_pretrain / "decoder" / LOSS_WEIGHTS_NAME).is_file()
    assert (straight_pretrain / "training_log.json").is_file()
    assert temporary_leftovers(straight_pretrain) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("when", "resume_from"),
    [
        ("after-save", "checkpoint-4"),  # checkpoint 4 complete: resume from it
        ("before-sidecar", "checkpoint-2"),  # checkpoint 4 lacks the decoder weights: skipped
        ("before-state", "checkpoint-2"),  # checkpoint 4 lacks trainer_state.json: skipped
    ],
)
def test_pretrain_killed_resumes_and_ends_with_the_uninterrupted_weights(
    data, straight_pretrain, tmp_path, when, resume_from
):
    output = tmp_path / "run"
    kill_at(when, 4, pretrain_args(data, output), tmp_path)
    assert not (output / "final").exists()
    checkpoint = output / "checkpoints" / "checkpoint-4"
    assert checkpoint.is_dir()
    if when == "before-sidecar":
        assert (checkpoint / "trainer_state.json").is_file() and not (checkpoint / LOSS_WEIGHTS_NAME).exists()
    if when == "before-state":
        assert not (checkpoint / "trainer_state.json").exists()

    assert cli.main(pretrain_args(data, output)) == 0
    assert resumed_from(output).endswith(resume_from)
    assert_same_weights(
        straight_pretrain / "final" / "model.safetensors", output / "final" / "model.safetensors"
    )
    assert_same_weights(
        straight_pretrain / "decoder" / LOSS_WEIGHTS_NAME, output / "decoder" / LOSS_WEIGHTS_NAME
    )
    state = json.loads((output / "checkpoints" / "checkpoint-8" / "trainer_state.json").read_text())
    assert state["global_step"] == 8


@pytest.mark.slow
def test_kill_while_writing_the_final_model_leaves_no_final_folder(data, straight_pretrain, tmp_path):
    output = tmp_path / "run"
    kill_at("in-final", 0, pretrain_args(data, output), tmp_path)
    # the model was written in full, but only to a temporary folder: the stage is not complete
    assert not (output / "final").exists()
    assert [p.name for p in output.iterdir() if p.name.startswith(".final.tmp-")]
    assert cli.main(pretrain_args(data, output)) == 0
    assert resumed_from(output).endswith("checkpoint-8")
    assert_same_weights(
        straight_pretrain / "final" / "model.safetensors", output / "final" / "model.safetensors"
    )


@pytest.fixture(scope="module")
def straight_finetune(data) -> Path:
    output = data / "straight-finetune"
    assert cli.main(finetune_args(data, output)) == 0
    return output


@pytest.mark.slow
@pytest.mark.parametrize(
    ("when", "resume_from"),
    [("after-save", "checkpoint-4"), ("before-state", "checkpoint-2")],
)
def test_finetune_killed_resumes_from_the_last_complete_checkpoint(
    data, straight_finetune, tmp_path, when, resume_from
):
    output = tmp_path / "run"
    kill_at(when, 4, finetune_args(data, output), tmp_path)
    assert not (output / "final").exists()
    assert (output / "checkpoints" / "checkpoint-4").is_dir()

    assert cli.main(finetune_args(data, output)) == 0
    assert resumed_from(output).rstrip(".").endswith(resume_from)
    log = json.loads((output / "final" / "training_log.json").read_text())
    assert log["global_step"] == 6
    assert_same_weights(
        straight_finetune / "final" / "model.safetensors", output / "final" / "model.safetensors"
    )
    assert temporary_leftovers(output / "final") == []


# -- no silent overwrite ---------------------------------------------------------------------------------


def _one_error(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("retromae-st: ")]
    assert len(errors) == 1, errors
    return errors[0]


def test_existing_outputs_are_never_overwritten_without_the_flag(data, straight_pretrain, capsys):
    final = straight_pretrain / "final" / "model.safetensors"
    stamp = final.stat().st_mtime_ns
    assert cli.main(pretrain_args(data, straight_pretrain)) == 2
    message = _one_error(capsys)
    assert "already exists" in message and str(straight_pretrain / "final") in message
    assert final.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_finetune_and_evaluate_refuse_an_existing_output_then_overwrite_works(
    data, tmp_path, capsys, command
):
    output = tmp_path / "out"
    if command == "finetune":
        args = finetune_args(data, output, "--max-steps", "2", "--save-steps", "10")
        marker = output / "final" / "model.safetensors"
    else:
        args = [
            "evaluate", "--model", str(data / "model"), "--beir", str(data / "toy"), "--output", str(output)
        ]  # fmt: skip
        marker = output / "report.json"
    assert cli.main(args) == 0
    stamp = marker.stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(args) == 2
    message = _one_error(capsys)
    assert "already exists" in message and "--overwrite" in message
    assert marker.stat().st_mtime_ns == stamp
    assert cli.main([*args, "--overwrite"]) == 0
    assert marker.stat().st_mtime_ns != stamp
    assert temporary_leftovers(output) == []


def test_pretrain_overwrite_replaces_the_finished_model(data, tmp_path):
    output = tmp_path / "run"
    short = ["--max-steps", "2", "--save-steps", "10"]
    assert cli.main(pretrain_args(data, output, *short)) == 0
    first = load_file(str(output / "final" / "model.safetensors"))
    assert cli.main(pretrain_args(data, output, *short, "--seed", "7", "--overwrite")) == 0
    second = load_file(str(output / "final" / "model.safetensors"))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert temporary_leftovers(output) == []


# -- numerical faults ------------------------------------------------------------------------------------


def _assert_intact_checkpoint(output: Path, step: int) -> None:
    checkpoint = output / "checkpoints" / f"checkpoint-{step}"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == step
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())  # the fault was never applied
    SentenceTransformer(str(checkpoint), model_kwargs={"use_safetensors": True})  # loadable
    assert not (output / "final").exists()


def test_absurd_learning_rate_stops_with_exit_3_naming_step_and_component(data, tmp_path, capsys):
    output = tmp_path / "run"
    assert cli.main(pretrain_args(data, output, "--lr", "1e4")) == 3
    message = _one_error(capsys)
    match = re.search(r"component '(encoder_mlm|decoder)' became (nan|inf|-inf) at step (\d+)", message)
    assert match, message
    assert message.startswith("retromae-st: training stopped:") and "learning rate" in message
    step = int(match.group(3))
    last = (step - 1) // 2 * 2  # the last checkpoint before the faulty step
    assert last >= 2
    _assert_intact_checkpoint(output, last)
    assert (output / "checkpoints" / f"checkpoint-{last}" / LOSS_WEIGHTS_NAME).is_file()


def test_forced_non_finite_loss_names_the_component(data, tmp_path, monkeypatch, capsys):
    original = RetroMAELoss._mlm_loss

    def poisoned(self, *args, **kwargs):
        value = original(self, *args, **kwargs)
        return value * float("inf") if self.current_step == 3 else value

    monkeypatch.setattr(RetroMAELoss, "_mlm_loss", poisoned)
    output = tmp_path / "run"
    assert cli.main(pretrain_args(data, output)) == 3
    assert "component 'encoder_mlm' became inf at step 3" in _one_error(capsys)
    _assert_intact_checkpoint(output, 2)


def test_finetune_non_finite_loss_stops_with_exit_3(data, tmp_path, monkeypatch, capsys):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    original = MultipleNegativesRankingLoss.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        value = original(self, *args, **kwargs)
        return value * float("nan") if len(calls) == 3 else value

    monkeypatch.setattr(MultipleNegativesRankingLoss, "forward", poisoned)
    output = tmp_path / "run"
    assert cli.main(finetune_args(data, output)) == 3
    message = _one_error(capsys)
    assert message.startswith("retromae-st: training stopped:")
    assert "MultipleNegativesRankingLoss" in message and "nan at step 3" in message
    _assert_intact_checkpoint(output, 2)
