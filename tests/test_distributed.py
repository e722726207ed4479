"""Scale-out on CPU: stage 2 under torchrun, and the CLI under accelerate launch, with two processes.

(RetroMAE pretraining under torchrun is tested in tests/test_training.py; sharded encoding and per-part
FAISS indexes merged into one in tests/test_evaluation_encode.py and tests/test_evaluation_index.py.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, free_port, launcher_env, make_texts
from safetensors.torch import load_file

from retromae_st.models import build_model

WORKERS = Path(__file__).resolve().parent / "workers"
BIN = Path(sys.executable).parent


def _env(tmp_path: Path) -> dict[str, str]:
    return launcher_env(tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.mark.slow
def test_finetune_under_torchrun_ends_identical_and_reports_the_effective_batch(tmp_path):
    result = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(WORKERS / "ddp_finetune.py"), str(tmp_path)],
        env=_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    init0 = load_file(str(tmp_path / "init0" / "model.safetensors"))
    init1 = load_file(str(tmp_path / "init1" / "model.safetensors"))
    assert any(not torch.equal(init0[k], init1[k]) for k in init0)  # the ranks did start apart
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    assert any(not torch.equal(init0[k], rank0["0.model." + k]) for k in init0)  # and training moved them
    assert "Effective batch size 16 (8 per device x 1 gradient accumulation x 2 processes)" in result.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_cli_pretrain_under_accelerate_launch_uses_two_processes(tmp_path, tokenizer):
    (tmp_path / "corpus.txt").write_text("\n".join(make_texts(64, seed=3)) + "\n")
    build_model(TINY, tokenizer, max_seq_length=32, save_dir=tmp_path / "init", seed=0).save(
        str(tmp_path / "model")
    )
    # accelerate 1.x: `--cpu --num_processes 2` starts a single process unless mpirun is set up; the
    # multi-process launcher (torch.distributed.run underneath) works on CPU because the trainer gets
    # use_cpu=True from retromae_st.pretraining.training.launcher_args() and picks gloo.
    result = subprocess.run(
        [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         "-m", "retromae_st.cli", "pretrain", "--model", str(tmp_path / "model"),
         "--corpus", str(tmp_path / "corpus.txt"), "--output", str(tmp_path / "run"), "--batch-size", "8",
         "--max-steps", "4", "--save-steps", "2", "--logging-steps", "1", "--lr", "1e-3"],
        env=_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch size 16 (8 per device x 1 accumulation x 2 processes)" in result.stderr
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_recipe_from_scratch_under_torchrun_shares_one_initial_model(tmp_path):
    """`run` with a preset under torchrun: one process builds init/ (tokenizer included), both train it."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(make_texts(80, seed=4)) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: ddp\noutput_dir: run\nmodel:\n  preset: retromae-tiny\n  vocab_size: 150\n  max_seq_length: 32\n"
        f"pretrain:\n  corpus: {corpus}\n  batch_size: 8\n  max_steps: 3\n  save_steps: 100\n"
    )
    result = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "retromae_st.cli", "run", str(recipe), "--output-root", str(tmp_path)],
        env=_env(tmp_path), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "init" / "tokenizer.json").is_file()
    assert (run / "stage1" / "final" / "modules.json").is_file()
    log = (run / "run.log").read_text()
    assert "x 2 processes" in log
    assert log.count("Training a 150-entry WordPiece tokenizer") == 1  # built once, not per process
    assert not list(run.glob(".*tmp-*"))
