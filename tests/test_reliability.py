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
from conftest import TINY, make_texts, write_toy_data
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from retromae_st import cli
from retromae_st.models import build_model
from retromae_st.pretraining.loss import LOSS_WEIGHTS_NAME, RetroMAELoss

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
    splits = {"train": range(0, 48), "test": range(48, 64)}
    return write_toy_data(root, make_texts(64, seed=3), splits, tokenizer, TINY)


def pretrain_args(data: Path, output: Path, *extra: str, model: str | None = None) -> list[str]:
    # A saved model by default: a tokenizer trained on the corpus (presets) differs from process to process.
    return [
        "pretrain", "--model", model or str(data / "model"), "--corpus", str(data / "corpus.txt"),
        "--output", str(output),
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


@pytest.mark.slow
def test_preset_run_resumes_with_the_tokenizer_its_checkpoints_were_trained_with(data, tmp_path):
    output = tmp_path / "run"
    args = pretrain_args(data, output, model="retromae-tiny")
    kill_at("after-save", 4, args, tmp_path)
    trained_with = (output / "checkpoints" / "checkpoint-4" / "tokenizer.json").read_text()
    assert cli.main(args) == 0
    assert resumed_from(output).endswith("checkpoint-4")
    assert (output / "final" / "tokenizer.json").read_text() == trained_with


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
    # Either a loss component or, first, the gradient of a still finite loss (an overflow in backward).
    match = re.search(
        r"(component '(encoder_mlm|decoder)'|gradient) became (nan|inf|-inf) at step (\d+)", message
    )
    assert match, message
    assert message.startswith("retromae-st: training stopped:") and "learning rate" in message
    step = int(match.group(4))
    last = (step - 1) // 2 * 2  # the last checkpoint before the faulty step
    assert last >= 2
    assert f"checkpoint-{last}, is intact" in message  # the message names it
    _assert_intact_checkpoint(output, last)
    assert (output / "checkpoints" / f"checkpoint-{last}" / LOSS_WEIGHTS_NAME).is_file()


def test_forced_non_finite_loss_names_the_component(data, tmp_path, monkeypatch, capsys):
    original = RetroMAELoss._mlm_losses

    def poisoned(self, *args, **kwargs):
        values = original(self, *args, **kwargs)
        if self.current_step == 3:
            values["encoder_mlm"] = values["encoder_mlm"] * float("inf")
        return values

    monkeypatch.setattr(RetroMAELoss, "_mlm_losses", poisoned)
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


# -- bad input through the CLI ---------------------------------------------------------------------------
# (test_cli.py covers an empty corpus file, encoder mask ratio 1.0 and max_seq_length above a preset.)


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("retromae-st: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("blank.txt", b"   \n\n\t\n  \n", r"blank\.txt: no documents left \(\d+ read, all skipped"),
        ("latin1.txt", "good line\ncaf\xe9 au lait\n".encode("latin-1"), r"latin1\.txt: not UTF-8 at byte offset 13 \(line 2\)"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", r"image\.txt looks binary: NUL byte at byte offset 8"),
        ("docs.jsonl", b'{"body": "a document"}\n', r"docs\.jsonl has no column 'text'; available columns: body"),
    ],
)  # fmt: skip
def test_bad_corpus_files_exit_2_naming_the_file(data, tmp_path, capsys, name, content, expected):
    corpus = tmp_path / name
    corpus.write_bytes(content)
    args = pretrain_args(data, tmp_path / "out")
    args[args.index("--corpus") + 1] = str(corpus)
    assert cli.main(args) == 2
    assert re.search(expected, _error_line(capsys))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_million_character_document_is_windowed_not_refused(data, tmp_path, capsys):
    words = " ".join(make_texts(8000, seed=11))
    document = (words * (1_000_000 // len(words) + 1))[:1_000_000]
    corpus = tmp_path / "one.txt"
    corpus.write_text(document + "\n")
    output = tmp_path / "out"
    args = ["pretrain", "--model", str(data / "model"), "--corpus", str(corpus), "--output", str(output),
            "--max-seq-length", "128", "--batch-size", "4", "--max-steps", "1", "--save-steps", "10"]  # fmt: skip
    assert cli.main(args) == 0
    log = (output / "run.log").read_text()
    match = re.search(r"Windows: .*1 documents read, 0 skipped, (\d+) windows, (\d+) tokens", log)
    assert match, log[-2000:]
    windows, tokens = int(match.group(1)), int(match.group(2))
    assert (
        windows == -(-tokens // 126) and windows > 1000
    )  # every token kept, 126 per window plus [CLS] [SEP]
    assert (output / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--encoder-mask-ratio", "0"], "encoder_mask_ratio=0.0 must be a number strictly between 0 and 1"),
        (["--decoder-mask-ratio", "1"], "decoder_mask_ratio=1.0 must be a number strictly between 0 and 1"),
        (["--decoder-mask-ratio", "0"], "decoder_mask_ratio=0.0 must be a number strictly between 0 and 1"),
    ],
)
def test_mask_ratio_flags_out_of_range(data, tmp_path, capsys, flags, expected):
    assert cli.main(pretrain_args(data, tmp_path / "out", *flags)) == 2
    assert expected in _error_line(capsys)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_max_seq_length_above_the_positions_of_a_model_folder(data, tmp_path, capsys):
    for command in (pretrain_args, finetune_args):
        args = command(data, tmp_path / "out")
        args[args.index("--model") + 1] = str(data / "model")
        assert cli.main([*args, "--max-seq-length", "4096"]) == 2
        message = _error_line(capsys)
        assert "max_seq_length=4096 exceeds the 128 positions" in message and str(data / "model") in message


def test_tokenizer_without_a_mask_token(data, tokenizer, tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "no-mask"
    build_model(TINY, tokenizer, max_seq_length=32, save_dir=folder, seed=0)
    plain = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    plain.save_pretrained(str(folder))
    args = pretrain_args(data, tmp_path / "out")
    args[args.index("--model") + 1] = str(folder)
    assert cli.main(args) == 2
    assert "has no mask token" in _error_line(capsys)


@pytest.mark.parametrize("content", [None, "weights.txt"])
def test_model_folder_that_is_not_a_model(data, tmp_path, capsys, content):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    if content:
        (folder / content).write_text("hello")
    for args in (pretrain_args(data, tmp_path / "o"), finetune_args(data, tmp_path / "o")):
        args[args.index("--model") + 1] = str(folder)
        assert cli.main(args) == 2
        message = _error_line(capsys)
        assert str(folder) in message and "neither modules.json nor config.json" in message


@pytest.mark.parametrize(
    ("corpus", "qrels", "expected"),
    [
        (None, "q1\tnope\t1\n", r"qrels/test\.tsv.*document id 'nope'"),
        (None, "q99\td1\t1\n", r"qrels/test\.tsv.*query id 'q99'"),
        ('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n', "", r"corpus\.jsonl.*duplicate document id 'a'"),
    ],
)  # fmt: skip
def test_bad_beir_folders_through_evaluate(data, tmp_path, capsys, corpus, qrels, expected):
    import shutil

    folder = tmp_path / "beir"
    shutil.copytree(data / "toy", folder)
    if corpus is not None:
        (folder / "corpus.jsonl").write_text(corpus)
    with (folder / "qrels" / "test.tsv").open("a") as handle:
        handle.write(qrels)
    args = [
        "evaluate",
        "--model",
        str(data / "model"),
        "--beir",
        str(folder),
        "--output",
        str(tmp_path / "r"),
    ]
    assert cli.main(args) == 2
    message = _error_line(capsys)
    assert re.search(expected, message), message
    assert not (tmp_path / "r").exists()


def _recipe(tmp_path: Path, data: Path, **replace: str) -> Path:
    text = f"""\
name: tiny
output_dir: run
model:
  preset: retromae-tiny
  vocab_size: 150
  max_seq_length: 32
pretrain:
  corpus: {data / "corpus.txt"}
  batch_size: 8
  max_steps: 2
  save_steps: 10
finetune:
  train: {data / "toy"}
  batch_size: 8
  max_steps: 2
evaluation:
  beir: [{data / "toy"}]
"""
    for old, new in replace.items():
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("  max_steps: 2\n  save_steps", "  max_stepz: 2\n  save_steps", r"recipe\.yaml:10: unknown key 'pretrain\.max_stepz'"),
        ("  batch_size: 8\n  max_steps: 2\n  save", "  batch_size: eight\n  max_steps: 2\n  save", r"recipe\.yaml:9: pretrain\.batch_size"),
        ("  max_steps: 2\n  save_steps: 10\n", "  max_steps: 2\n  save_steps: 10\n  loss:\n    decoder_mask_ratio: 0\n",
         r"recipe\.yaml:13: pretrain\.loss\.decoder_mask_ratio"),
        ("  max_steps: 2\n  save_steps: 10\n", "  max_steps: 2\n  save_steps: 10\n  loss:\n    encoder_mask_ratio: 1\n",
         r"recipe\.yaml:13: pretrain\.loss\.encoder_mask_ratio"),
    ],
)  # fmt: skip
def test_bad_recipes_exit_2_naming_line_and_key(data, tmp_path, capsys, old, new, expected):
    recipe = _recipe(tmp_path, data, **{old: new})
    assert cli.main(["run", str(recipe), "--output-root", str(tmp_path)]) == 2
    assert re.search(expected, _error_line(capsys))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("section", ["pretrain", "finetune", "evaluation"])
def test_recipe_with_a_missing_input_file_fails_before_training(data, tmp_path, capsys, section):
    missing = tmp_path / "missing" / ("corpus.txt" if section == "pretrain" else "pairs.jsonl")
    source = {"pretrain": f"corpus: {data / 'corpus.txt'}", "finetune": f"train: {data / 'toy'}"}
    if section == "evaluation":
        missing = tmp_path / "missing-beir"
        recipe = _recipe(tmp_path, data, **{f"beir: [{data / 'toy'}]": f"beir: [{missing}]"})
    else:
        key = source[section].split(":")[0]
        recipe = _recipe(tmp_path, data, **{source[section]: f"{key}: {missing}"})
    assert cli.main(["run", str(recipe), "--output-root", str(tmp_path)]) == 2
    message = _error_line(capsys)
    assert str(missing) in message and "does not exist" in message
    assert not list((tmp_path / "run").glob("stage*/checkpoints"))  # nothing was trained
