"""bf16 on a CPU-only machine runs under CPU autocast instead of stopping in the trainer (issue #10 item 3)."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import TINY, make_texts
from datasets import Dataset

from retromae_st import precision
from retromae_st.data.tokenize import tokenize_corpus
from retromae_st.models import build_model
from retromae_st.pretraining.training import launcher_args, pretrain, read_training_log

needs_cpu_only = pytest.mark.skipif(
    precision.accelerator_supports_bf16(), reason="a bf16 accelerator is present: the CPU path is not taken"
)


def test_cpu_bf16_support_reports_what_torch_detects():
    support = precision.cpu_bf16_support()
    assert support.capability == str(torch.backends.cpu.get_cpu_capability())
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert ("avx512_bf16" in support.features or "amx" in support.features) == expected
    assert support.native == bool(support.features)
    assert support.capability in support.describe()


@needs_cpu_only
def test_bf16_without_accelerator_asks_for_the_cpu():
    assert launcher_args(bf16=True) == {"use_cpu": True}
    assert launcher_args(bf16=False) == {}


@needs_cpu_only
def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_bf16_support", lambda: precision.CpuBf16Support(False, "AVX2", ()))
    with caplog.at_level(logging.WARNING, logger="retromae_st.precision"):
        assert precision.bf16_args(True) == {"use_cpu": True}
    assert "without native bfloat16" in caplog.text and "AVX2" in caplog.text


@needs_cpu_only
def test_tiny_bf16_pretrain_on_cpu_runs_with_a_finite_loss(tokenizer, tmp_path, caplog):
    windows, _ = tokenize_corpus(
        Dataset.from_dict({"text": make_texts(24, seed=7)}), tokenizer, max_seq_length=64
    )
    model = build_model(TINY, tokenizer, max_seq_length=64, save_dir=tmp_path / "init", seed=0)
    with caplog.at_level(logging.INFO):
        pretrain(
            model, windows, tmp_path / "run", batch_size=8, max_steps=2, save_steps=10, logging_steps=1,
            learning_rate=1e-3, bf16=True,
        )  # fmt: skip
    losses = [row["loss"] for row in read_training_log(tmp_path / "run") if "loss" in row]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert (tmp_path / "run" / "final" / "modules.json").is_file()
    assert "bf16 on" in caplog.text  # the native-or-emulated line says which CPU path ran
    assert "pools by cls" in caplog.text


@needs_cpu_only
def test_tiny_bf16_finetune_on_cpu_runs_with_a_finite_loss(tokenizer, tmp_path):
    from retromae_st.finetuning.train import finetune

    texts = make_texts(32, seed=4)
    pairs = Dataset.from_dict({"anchor": [" ".join(t.split()[:3]) for t in texts], "positive": texts})
    model = build_model(
        TINY, tokenizer, max_seq_length=32, pooling="mean", save_dir=tmp_path / "init", seed=0
    )
    finetune(model, pairs, tmp_path / "ft", batch_size=8, max_steps=2, logging_steps=1, bf16=True)
    log = json.loads((tmp_path / "ft" / "final" / "training_log.json").read_text())
    rows = log["log_history"] if isinstance(log, dict) else log
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses and all(math.isfinite(loss) for loss in losses)


def test_bf16_loss_is_within_tolerance_of_fp32_on_a_tiny_model(tokenizer, tmp_path):
    """The same step (same masks: same seed; no dropout: eval mode) under CPU bf16 autocast and in fp32."""
    from retromae_st.pretraining.loss import RetroMAELoss

    model = build_model(TINY, tokenizer, max_seq_length=32, save_dir=tmp_path / "init", seed=0)
    loss = RetroMAELoss(model)
    loss.callback_attached = True
    loss.eval()
    features = {
        key: value for key, value in model.preprocess(make_texts(8, seed=3)).items() if torch.is_tensor(value)
    }

    def step(bf16: bool) -> dict[str, float]:
        torch.manual_seed(11)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            parts = loss([features])
        return {name: value.item() for name, value in parts.items()}

    fp32, bf16 = step(False), step(True)
    assert fp32.keys() == bf16.keys() == {"encoder_mlm", "decoder"}
    for name in fp32:
        assert math.isfinite(bf16[name])
        assert abs(bf16[name] - fp32[name]) < 0.02 * fp32[name], (name, fp32[name], bf16[name])
