"""What a run prints: a short console (headlines, progress, results, where things are) while run.log in the
output folder keeps every library's INFO and Python's warnings."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from test_cli import data, recipe_file  # noqa: F401  (data is a fixture)

from retromae_st import cli
from retromae_st.pipeline import add_file_logging
from retromae_st.pretraining import training

# Lines the console showed before: faiss's loader (with a ModuleNotFoundError traceback), torch's
# pin_memory warning, the trainer's and Sentence-Transformers' INFO, our pooling and step diagnostics.
NOISE = (
    "faiss.loader",
    "ModuleNotFoundError",
    "pin_memory",
    "UserWarning",
    "No device provided",
    "Saving model checkpoint",
    "RetroMAE: the decoder reads",
    "nats, embedding_cosine",
    "INFO",
)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> tuple[Path, str]:  # noqa: F811
    """A tiny two-stage run in a fresh process (so faiss is imported, and logs, during the run)."""
    root = tmp_path_factory.mktemp("console")
    recipe = recipe_file(root, data)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "retromae_st.cli", "run", str(recipe), "--output-root", str(root),
         "--set", "model.pooling=mean", "--set", "evaluation.compare_untrained=true"],
        env=env, cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", result.stdout + result.stderr


def test_console_shows_headlines_and_results_without_library_noise(finished):
    run, console = finished
    for noise in NOISE:
        assert noise not in console, noise
    for headline in ("Running recipe 'tiny'", "Stage 1 data:", "Saved the pretrained model", "Stage 2 data:"):
        assert headline in console
    assert f"stage2: {run / 'stage2' / 'final'}" in console and "report.md" in console


def test_run_log_keeps_the_details(finished):
    run, _ = finished
    log = (run / "run.log").read_text(encoding="utf-8")
    for detail in ("INFO faiss.loader", "Saving model checkpoint", "nats, embedding_cosine", "pools by mean"):
        assert detail in log, detail
    assert "pin_memory" not in log  # not set without an accelerator, so torch has nothing to warn about


def test_printed_report_is_the_results_not_the_configuration(finished, data, tmp_path, capsys):  # noqa: F811
    run, _ = finished
    output = tmp_path / "eval"
    model = f"tuned={run / 'stage2' / 'final'}"
    assert cli.main(["evaluate", "--model", model, "--beir", str(data / "toy"), "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "## Results" in out and "| tuned |" in out
    assert "Configuration" not in out and '"beir_folders"' not in out
    assert '"beir_folders"' in (output / "report.md").read_text(encoding="utf-8")  # the file keeps it


def test_python_warnings_go_to_run_log_not_the_console(tmp_path, capsys):
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        cli.configure_logging()
        add_file_logging(tmp_path)
        warnings.warn("a library's note to developers", UserWarning, stacklevel=1)
        logging.getLogger("sentence_transformers.x").info("third-party info")
        logging.getLogger("retromae_st.pipeline").info("Stage 1 data: headline")
        logging.getLogger("retromae_st.pretraining.training").info("step 3: h_gain 0.1 nats")
        logging.getLogger("sentence_transformers.y").warning("a real problem")
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
        logging.captureWarnings(False)
    err = capsys.readouterr().err
    assert err.splitlines() == ["Stage 1 data: headline", "WARNING sentence_transformers.y: a real problem"]
    log = (tmp_path / "run.log").read_text(encoding="utf-8")
    for line in ("a library's note to developers", "third-party info", "step 3: h_gain", "a real problem"):
        assert line in log


def test_no_pinned_memory_without_an_accelerator(monkeypatch):
    monkeypatch.setattr(training.torch.accelerator, "is_available", lambda: False)
    assert training.pin_memory_args() == {"dataloader_pin_memory": False}
    monkeypatch.setattr(training.torch.accelerator, "is_available", lambda: True)
    assert training.pin_memory_args() == {}
