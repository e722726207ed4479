"""PNG plots for reports (matplotlib, Agg backend: no display needed).

Training curves come from a Hugging Face trainer's ``trainer_state.json`` ``log_history``: a list of
dicts with ``step`` and the logged values (stage 1: ``loss``, ``encoder_mlm``, ``decoder``, ``bow``;
stage 2: ``loss`` and eval metrics such as ``eval_dev_cosine_ndcg@10``).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: reports are written on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402

from retromae_st.errors import UserInputError  # noqa: E402
from retromae_st.io import atomic_write_bytes  # noqa: E402

LogSource = str | os.PathLike | Sequence[Mapping[str, Any]] | Mapping[str, Any]
# Logged numbers that are bookkeeping, not curves worth plotting.
_IGNORED = {"step", "epoch", "learning_rate", "grad_norm", "total_flos", "train_loss", "train_runtime"}
_IGNORED_SUFFIXES = ("_runtime", "_samples_per_second", "_steps_per_second")


def load_log_history(source: LogSource) -> list[dict[str, Any]]:
    """A trainer ``log_history`` from a ``trainer_state.json`` path, a folder holding one, a parsed state or a list."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            path = _state_in_folder(path)
        if not path.is_file():
            raise UserInputError(f"{path} is missing: pass a trainer_state.json file.")
        try:
            source = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise UserInputError(f"{path}: invalid JSON ({error.msg}).") from None
        where = str(path)
    else:
        where = "the training log"
    if isinstance(source, Mapping):
        if "log_history" not in source:
            raise UserInputError(f"{where} has no 'log_history' list: is it a trainer_state.json?")
        source = source["log_history"]
    if not isinstance(source, Sequence) or not all(isinstance(row, Mapping) for row in source):
        raise UserInputError(f"{where}: log_history must be a list of objects.")
    return [dict(row) for row in source]


def _state_in_folder(folder: Path) -> Path:
    """``folder/trainer_state.json``, else the one in the latest ``checkpoint-<step>`` sub-folder."""
    if (folder / "trainer_state.json").is_file():
        return folder / "trainer_state.json"
    checkpoints = [
        p for p in folder.glob("checkpoint-*/trainer_state.json") if p.parent.name.split("-")[-1].isdigit()
    ]
    if not checkpoints:
        raise UserInputError(f"{folder} holds no trainer_state.json: pass the file or a checkpoint folder.")
    return max(checkpoints, key=lambda p: int(p.parent.name.split("-")[-1]))


def split_series(history: Sequence[Mapping[str, Any]]) -> tuple[dict[str, list], dict[str, list]]:
    """``(losses, eval_metrics)``: each a ``{key: [(step, value), ...]}`` of the plottable numbers."""
    losses: dict[str, list] = {}
    metrics: dict[str, list] = {}
    for number, row in enumerate(history):
        step = row.get("step", number)
        for key, value in row.items():
            if key in _IGNORED or key.endswith(_IGNORED_SUFFIXES) or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            target = metrics if key.startswith("eval_") and key != "eval_loss" else losses
            target.setdefault(key, []).append((step, float(value)))
    return losses, metrics


# Stage-1 diagnostics (retromae_st.pretraining.diagnostics) get a panel each, right of the others: their
# scales (nats of gain; a cosine) are not the losses', and each has a value that means trouble.
DIAGNOSTIC_PANELS = {
    "h_gain": "h_gain (nats; near 0: decoder ignores h)",
    "embedding_cosine": "embedding_cosine (near 1: collapse)",
}
DIAGNOSTIC_Y_LABELS = {"h_gain": "nats", "embedding_cosine": "mean cosine"}


def plot_training_logs(logs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> Path:
    """One row per run: loss components (left), eval metrics, then one panel per stage-1 diagnostic
    (``h_gain``, ``embedding_cosine``) when any run logged it, over steps."""
    rows = len(logs)
    shown = [key for key in DIAGNOSTIC_PANELS if any(key in split_series(h)[0] for h in logs.values())]
    # Only the panels a run has values for (stage 2 logs no h_gain; a run without a dev set no metrics),
    # left-aligned; the grid is as wide as the fullest row and the unused cells are removed.
    panels: list[list[tuple[dict[str, list], str, str]]] = []
    for history in logs.values():
        losses, metrics = split_series(history)
        diagnostics = [{key: losses.pop(key)} if key in losses else {} for key in shown]
        row_panels = [
            (losses, "losses", "loss"),
            (metrics, "eval metrics", "metric value"),
            *(
                (diagnostics[i], DIAGNOSTIC_PANELS[key], DIAGNOSTIC_Y_LABELS.get(key, key))
                for i, key in enumerate(shown)
            ),
        ]
        panels.append([panel for panel in row_panels if panel[0]] or row_panels[:1])
    columns = max((len(row) for row in panels), default=1)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.4 * rows), squeeze=False)
    for row, label in enumerate(logs):
        for column, (series, title, y_label) in enumerate(panels[row]):
            axis = axes[row][column]
            for key, points in sorted(series.items()):
                steps, values = zip(*points)
                axis.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
            axis.set_title(f"{label}: {title}")
            axis.set_xlabel("step")
            axis.set_ylabel(y_label)
            if series:
                axis.legend(fontsize="small")
            else:  # a run that logged nothing at all keeps one panel that says so
                axis.text(0.5, 0.5, "none logged", ha="center", va="center", transform=axis.transAxes)
            axis.grid(alpha=0.3)
        for column in range(len(panels[row]), columns):
            figure.delaxes(axes[row][column])
    figure.tight_layout()
    return _save(figure, path)


def plot_recall_curves(
    curves: Mapping[str, Mapping[str, Mapping[int, float]]], path: str | os.PathLike
) -> Path:
    """Recall@k against k (log scale), one panel per task, one line per model."""
    tasks = list(curves)
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for model, curve in curves[task].items():
            ks = sorted(int(k) for k in curve)
            axis.plot(ks, [curve[k] for k in ks], marker="o", markersize=3, label=model)
        axis.set_xscale("log")
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("k")
        axis.set_ylabel("Recall@k")
        axis.set_title(task)
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


def _save(figure: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return path
