"""Report details: training-curve panels (labelled axes, none empty) and bold only where models differ."""

from __future__ import annotations

from retromae_st.evaluation import plots
from retromae_st.evaluation.report import _metric_rows


def test_training_plot_labels_every_y_axis_and_draws_no_empty_panel(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or path)
    stage1 = [
        {
            "step": s,
            "loss": 9.0 - s,
            "encoder_mlm": 4.5,
            "decoder": 4.5,
            "h_gain": 0.1 * s,
            "embedding_cosine": 0.9,
        }
        for s in (1, 2, 3)
    ]
    stage2 = [{"step": s, "loss": 2.0 / s} for s in (1, 2, 3)]  # no dev set: no eval metrics, no diagnostics
    plots.plot_training_logs({"stage1": stage1, "stage2": stage2}, tmp_path / "curves.png")
    axes = figures[0].axes
    titles = [axis.get_title() for axis in axes]
    # stage 1: losses, h_gain, embedding_cosine (no eval metrics); stage 2: losses only.
    assert len(axes) == 4, titles
    assert not any("eval metrics" in title for title in titles)
    assert sum(title.startswith("stage2") for title in titles) == 1
    assert all(axis.lines for axis in axes)
    assert not any(text.get_text() == "none logged" for axis in axes for text in axis.texts)
    assert all(axis.get_ylabel() for axis in axes)
    labels = {axis.get_title(): axis.get_ylabel() for axis in axes}
    assert labels["stage1: losses"] == "loss" and labels["stage2: losses"] == "loss"


def test_a_run_that_logged_nothing_keeps_one_panel_saying_so(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or path)
    plots.plot_training_logs({"empty": [{"step": 1, "epoch": 1.0}]}, tmp_path / "curves.png")
    [axis] = figures[0].axes
    assert [text.get_text() for text in axis.texts] == ["none logged"]


def test_no_bold_in_a_column_where_every_model_ties():
    results = [
        {"task": "t", "model": "a", "metrics": {"ndcg@10": 0.31, "recall@1000": 1.0}},
        {"task": "t", "model": "b", "metrics": {"ndcg@10": 0.42, "recall@1000": 1.0}},
        {"task": "t", "model": "c", "metrics": {"ndcg@10": 0.42000001, "recall@1000": 0.99999999}},
    ]
    rows = _metric_rows(results, "t", ["ndcg@10", "recall@1000"])
    assert [row[2] for row in rows] == [1.0, 1.0, 0.99999999]  # all print as 1.0000: none is bold
    # b and c tie at the best printed value: both bold; a is not.
    assert [row[1] for row in rows] == [0.31, "**0.4200**", "**0.4200**"]
