"""Stage-1 diagnostics: h_gain and embedding_cosine, in the loss, the trainer's log, the plot and the report."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import _WORDS, TINY
from test_loss import REPETITIVE, features_of

from retromae_st.evaluation import plots
from retromae_st.evaluation.report import diagnostic_notes
from retromae_st.models import build_model, train_wordpiece_tokenizer
from retromae_st.pretraining.diagnostics import (
    derangement,
    h_gain_stalled,
    is_logging_step,
    mean_pairwise_cosine,
    stalled_message,
)
from retromae_st.pretraining.loss import RetroMAELoss
from retromae_st.pretraining.training import RetroMAETrainingCallback, pretrain


def test_derangement_moves_every_row():
    order = derangement(5)
    assert sorted(order.tolist()) == list(range(5)) and all(order[i] != i for i in range(5))
    with pytest.raises(ValueError):
        derangement(1)


def test_mean_pairwise_cosine():
    same = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])
    assert mean_pairwise_cosine(same).item() == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)).item() == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() == pytest.approx(-1.0)


def test_logging_steps_and_stall_rule():
    assert [s for s in range(1, 31) if is_logging_step(s, 10)] == [10, 20, 30]
    assert is_logging_step(1, 10, logging_first_step=True)
    assert not h_gain_stalled([0.0, 0.0], step=30, max_steps=100)  # before 40% of training
    assert h_gain_stalled([0.5, 0.01, 0.0, 0.02], step=40, max_steps=100)  # the last three stay near 0
    assert not h_gain_stalled([0.0, 0.0, 0.3], step=40, max_steps=100)
    # Rising through the floor (a from-scratch [CLS] starting to learn) is not a stall.
    assert not h_gain_stalled([0.0, 0.002, 0.016, 0.11], step=40, max_steps=100)
    assert not h_gain_stalled([0.0], step=30, max_steps=-1)  # unknown length: never


def test_diagnostics_only_when_requested_and_not_in_the_loss(tiny_model):
    loss = RetroMAELoss(tiny_model)
    loss.callback_attached = True
    features = features_of(tiny_model, REPETITIVE[:6])
    parts = loss([features])
    assert loss.last_diagnostics is None and set(parts) == {"encoder_mlm", "decoder"}
    loss.request_diagnostics()
    parts = loss([features])
    assert set(parts) == {"encoder_mlm", "decoder"}  # the loss (and its gradient) are unchanged
    assert set(loss.last_diagnostics) == {"h_gain", "embedding_cosine"}
    assert -1.0 <= loss.last_diagnostics["embedding_cosine"] <= 1.0
    assert not loss.diagnostics_due  # one request, one measurement


def test_measuring_changes_nothing_in_training(tokenizer, tmp_path):
    """The diagnostic pass forks the RNG and adds no gradient: the run is the same with or without it."""
    runs = []
    for measure in (False, True):
        model = build_model(TINY, tokenizer, max_seq_length=64, save_dir=tmp_path / str(measure), seed=0)
        torch.manual_seed(0)
        loss = RetroMAELoss(model)
        loss.callback_attached = True
        optimizer = torch.optim.AdamW(loss.parameters(), lr=1e-3)
        history = []
        for _ in range(3):
            if measure:
                loss.request_diagnostics()
            parts = loss([features_of(model, REPETITIVE[:8])])
            optimizer.zero_grad()
            torch.stack(list(parts.values())).sum().backward()
            optimizer.step()
            history.append([value.item() for value in parts.values()])
        runs.append(history)
    assert runs[0] == runs[1]


def only_h_helps_h_gains(
    pooling: str, gain, lr: float, steps: int, max_length_groups: int = 1
) -> list[float]:
    """h_gain at steps 1, 25, 50, ... of RetroMAE on random-word texts: no word predicts another, so the
    decoder can only rebuild a text from h."""
    words = _WORDS[:20]
    generator = torch.Generator().manual_seed(0)

    def random_texts(n: int) -> list[str]:
        return [
            " ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=generator).tolist())
            for _ in range(n)
        ]

    tokenizer = train_wordpiece_tokenizer(random_texts(200), vocab_size=200, min_frequency=1)
    torch.manual_seed(0)
    model = build_model(TINY, tokenizer, max_seq_length=64, pooling=pooling, seed=0, attention_init_gain=gain)
    loss = RetroMAELoss(model, max_length_groups=max_length_groups)
    loss.callback_attached = True
    optimizer = torch.optim.AdamW(loss.parameters(), lr=lr)
    gains = []
    for step in range(1, steps + 1):
        if step == 1 or step % 25 == 0:
            loss.request_diagnostics()
        parts = loss([features_of(model, random_texts(32))])
        optimizer.zero_grad()
        torch.stack(list(parts.values())).sum().backward()
        optimizer.step()
        if loss.last_diagnostics is not None:
            gains.append(loss.last_diagnostics["h_gain"])
            loss.last_diagnostics = None
    return gains


@pytest.mark.parametrize("max_length_groups", [1, 3])
def test_h_gain_is_zero_at_init_and_grows_when_only_h_helps(max_length_groups):
    # Mean pooling under BERT's init: the measurement itself (the split version checks one step only).
    steps = 200 if max_length_groups == 1 else 1
    gains = only_h_helps_h_gains("mean", None, 3e-3, steps, max_length_groups)
    assert abs(gains[0]) < 0.05  # a fresh decoder ignores h
    if steps > 1:
        assert sum(gains[-3:]) / 3 > 0.25, gains  # the trained one gains clearly from the true h


def test_cls_from_scratch_gets_h_gain_with_the_presets_init():
    """Issue #11 item 3 in miniature: from random init, [CLS] pooling, the decoder comes to read h under
    the presets' attention init; under BERT's init [CLS] is the same vector for every text, so far less."""
    default = only_h_helps_h_gains("cls", "default", 1e-3, 400)
    bert = only_h_helps_h_gains("cls", None, 1e-3, 400)
    assert abs(default[0]) < 0.05
    assert sum(default[-3:]) / 3 > 0.3, default
    assert sum(default[-3:]) / 3 > 2 * sum(bert[-3:]) / 3, (default, bert)


def test_pretrain_logs_diagnostics_and_the_plot_shows_them(tokenizer, tmp_path, monkeypatch):
    from conftest import make_texts
    from datasets import Dataset

    from retromae_st.data.tokenize import tokenize_corpus

    windows, _ = tokenize_corpus(
        Dataset.from_dict({"text": make_texts(32, seed=1)}), tokenizer, max_seq_length=64
    )
    model = build_model(TINY, tokenizer, max_seq_length=64, save_dir=tmp_path / "init", seed=0)
    pretrain(model, windows, tmp_path / "run", batch_size=8, max_steps=4, logging_steps=2, save_steps=10,
             learning_rate=1e-3)  # fmt: skip
    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    train_entries = [entry for entry in log if "loss" in entry]
    assert [e["step"] for e in train_entries] == [2, 4]
    assert all("h_gain" in e and "embedding_cosine" in e for e in train_entries)
    assert not any("h_gain" in e for e in log if "loss" not in e)  # only on the logging steps' entries

    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or path)
    plots.plot_training_logs({"stage1": log, "stage2": [{"step": 1, "loss": 1.0}]}, tmp_path / "curves.png")
    titles = [axis.get_title() for axis in figures[0].axes]
    assert any("h_gain" in t for t in titles) and any("embedding_cosine" in t for t in titles)
    assert not any("h_gain" in line.get_label() for axis in figures[0].axes[:1] for line in axis.lines)


def test_callback_logs_diagnostics_and_warns_once_when_h_is_ignored(tiny_model, caplog):
    loss = RetroMAELoss(tiny_model)
    callback = RetroMAETrainingCallback(loss)
    history = []
    state = SimpleNamespace(global_step=0, max_steps=100, log_history=history, logging_steps=10)
    args = SimpleNamespace(logging_strategy="steps", logging_steps=10, logging_first_step=False)
    with caplog.at_level(logging.WARNING, logger="retromae_st.pretraining.training"):
        for step in range(10, 101, 10):
            state.global_step = step - 1
            callback.on_step_begin(args, state, None)
            assert loss.diagnostics_due
            loss.diagnostics_due = False
            loss.last_diagnostics = {"h_gain": 0.01, "embedding_cosine": 0.97}  # what forward would store
            state.global_step = step
            logs = {"loss": 3.0}
            history.append({**logs, "step": step})
            callback.on_log(args, state, None, logs=logs)
            assert history[-1]["h_gain"] == 0.01 and logs["embedding_cosine"] == 0.97
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "decoder_mask_ratio" in warnings[0] and "collapsed" in warnings[0] and "step 40" in warnings[0]


def test_report_reads_the_diagnostics_out():
    notes = diagnostic_notes(
        {
            "stage1": {"final": {"loss": 3.0, "h_gain": 0.01, "embedding_cosine": 0.98}},
            "good": {"final": {"h_gain": 0.8, "embedding_cosine": 0.3}},
            "stage2": {"final": {"loss": 0.2}},
        }
    )
    assert len(notes) == 2
    assert "ignores the sentence embedding" in notes[0] and "collapsed" in notes[0]
    assert "relies on the sentence embedding" in notes[1] and "not collapsed" in notes[1]


def test_stall_advice_fits_the_pooling(tiny_model):
    """CLS gets the from-scratch remedies; a mean-pooled model is not told to pool by mean."""
    assert RetroMAELoss(tiny_model).pooling_mode() == "cls"
    cls = stalled_message(0.01, 0.5, 30, 100, pooling="cls")
    mean = stalled_message(0.01, 0.5, 30, 100, pooling="mean")
    assert "attention_init_gain" in cls and "model.pooling: mean" in cls
    assert "model.pooling: mean" not in mean and "attention_init_gain" not in mean
    assert "mean-pooled" in mean and "head_warmup_steps" in mean
