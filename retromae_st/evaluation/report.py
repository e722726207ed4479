"""``report.json`` (everything, machine-readable) and ``report.md`` (tables to paste into a model card).

The JSON report is the source; the markdown is rendered from it, so the two never disagree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from retromae_st.evaluation.metrics import METRICS
from retromae_st.io import atomic_write_json, atomic_write_text

_HEADERS = {
    "ndcg@10": "nDCG@10",
    "mrr@10": "MRR@10",
    "recall@10": "R@10",
    "recall@100": "R@100",
    "recall@1000": "R@1000",
    "map@100": "MAP@100",
    "main_score": "main score",
}


class Comparison(NamedTuple):
    """Report ``model - reference`` per task, e.g. stage 2 after RetroMAE against the same stage 2 without it."""

    title: str
    model: str
    reference: str


# The metric a comparison's one-line summary quotes: nDCG@10 for retrieval, else MTEB's main score.
_HEADLINE = ("ndcg@10", "main_score")


def compare_results(results: Sequence[Mapping[str, Any]], comparisons: Sequence[Comparison]) -> list[dict]:
    """One entry per comparison and task both models were scored on: every shared metric's signed
    difference ``model - reference`` (positive: ``model`` is better), and the headline metric's values."""
    scores = {(r["model"], r["task"]): r["metrics"] for r in results}
    tasks = list(dict.fromkeys(r["task"] for r in results))
    entries = []
    for comparison in comparisons:
        for task in tasks:
            ours, theirs = scores.get((comparison.model, task)), scores.get((comparison.reference, task))
            if ours is None or theirs is None:
                continue
            shared = [m for m in ours if m in theirs and ours[m] is not None and theirs[m] is not None]
            differences = {m: ours[m] - theirs[m] for m in shared}
            headline = next((m for m in _HEADLINE if m in differences), None)
            entries.append(
                {
                    **comparison._asdict(),
                    "task": task,
                    "differences": differences,
                    "headline": None
                    if headline is None
                    else {
                        "metric": headline,
                        "model": ours[headline],
                        "reference": theirs[headline],
                        "difference": differences[headline],
                    },
                }
            )
    return entries


def _signed(value: float) -> str:
    # A difference that rounds to zero gets no sign: "+0.0000" would claim a direction it does not have.
    text = f"{value:+.4f}"
    return "±0.0000" if text in ("+0.0000", "-0.0000") else text


def comparison_line(entry: Mapping[str, Any]) -> str:
    """``RetroMAE stage 1 vs none: +0.0120 nDCG@10 on X (stage2-finetuned 0.3510 vs stage2-only 0.3390)``."""
    head = entry.get("headline")
    if not head:
        return f"{entry['title']}: no shared metric on {entry['task']}"
    return (
        f"{entry['title']}: {_signed(head['difference'])} {_HEADERS.get(head['metric'], head['metric'])} "
        f"on {entry['task']} ({entry['model']} {head['model']:.4f} vs {entry['reference']} {head['reference']:.4f})"
    )


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "–" if value is None else str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
    return lines


def _metric_rows(results: list[dict[str, Any]], task: str, columns: list[str]) -> list[list[Any]]:
    rows = [r for r in results if r["task"] == task]
    # Compared as printed (4 decimals): bold marks the best model of a column, so a column where every
    # model shows the same value (R@1000 on a corpus of about 1,000 documents) gets none.
    shown = {c: [round(r["metrics"][c], 4) for r in rows if r["metrics"].get(c) is not None] for c in columns}
    best = {c: max(values) if len(set(values)) > 1 else None for c, values in shown.items()}
    table = []
    for r in rows:
        cells: list[Any] = [r["model"]]
        for c in columns:
            value = r["metrics"].get(c)
            bold = value is not None and best[c] is not None and round(value, 4) == best[c]
            cells.append(f"**{value:.4f}**" if bold else value)
        table.append(cells)
    return table


# Thresholds of retromae_st.pretraining.diagnostics: below H_GAIN_FLOOR nats the decoder ignores h.
_H_GAIN_FLOOR = 0.05
_COLLAPSED_COSINE = 0.9


def diagnostic_notes(training: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One markdown bullet per run that logged stage-1 diagnostics: their last values, read out."""
    notes = []
    for label, summary in training.items():
        final = summary.get("final", {})
        gain, cosine = final.get("h_gain"), final.get("embedding_cosine")
        if gain is None and cosine is None:
            continue
        parts = []
        if gain is not None:
            verdict = (
                "the decoder ignores the sentence embedding, so RetroMAE did not train it"
                if gain < _H_GAIN_FLOOR
                else "the decoder relies on the sentence embedding"
            )
            parts.append(f"h_gain {gain:.3f} nats ({verdict})")
        if cosine is not None:
            verdict = (
                "collapsed: texts get nearly one vector" if cosine > _COLLAPSED_COSINE else "not collapsed"
            )
            parts.append(f"embedding_cosine {cosine:.3f} ({verdict})")
        notes.append(f"- {label}: " + "; ".join(parts))
    return notes


def render_markdown(report: Mapping[str, Any]) -> str:
    """The markdown view of a report dict built by :func:`retromae_st.evaluation.evaluate`."""
    lines = ["# Retrieval evaluation", ""]
    lines += [f"Created {report['created']} with retromae-st {report['versions'].get('retromae-st', '?')}."]
    lines += [f"Split: `{report['split']}`. Index: `{report['index']['name']}`.", ""]
    lines += ["## Models", ""]
    lines += _table(
        ["model", "source", "weights fingerprint", "dim", "max length"],
        [
            [m["label"], f"`{m['source']}`", f"`{m['fingerprint'][:12]}`", m["dim"], m["max_seq_length"]]
            for m in report["models"]
        ],
    )
    results = report["results"]
    tasks = list(dict.fromkeys(r["task"] for r in results))
    if tasks:
        lines += ["", "## Results", ""]
    for task in tasks:
        rows = [r for r in results if r["task"] == task]
        info = rows[0]
        columns = [c for c in (*METRICS, "main_score") if any(c in r["metrics"] for r in rows)]
        if "main_score" in columns and "ndcg@10" in columns:
            columns.remove("main_score")  # for retrieval tasks the main score is nDCG@10
        detail = (
            f"{info['num_queries']} queries, {info['num_documents']} documents"
            if info.get("num_queries")
            else ""
        )
        lines += [
            f"### {task}",
            "",
            f"Evaluated with {info['evaluator']}{'; ' + detail if detail else ''}.",
            "",
        ]
        lines += _table(
            ["model", *[_HEADERS.get(c, c) for c in columns]], _metric_rows(results, task, columns)
        )
        lines.append("")
    if report.get("comparisons"):
        entries = report["comparisons"]
        lines += ["## Comparisons", ""]
        lines += ["Differences on the same task and split; positive means the first model is better.", ""]
        lines += [f"- {comparison_line(entry)}" for entry in entries]
        columns = [c for c in (*METRICS, "main_score") if any(c in e["differences"] for e in entries)]
        lines += [""]
        lines += _table(
            ["comparison", "task", *[_HEADERS.get(c, c) for c in columns]],
            [
                [
                    f"{e['model']} vs {e['reference']}",
                    e["task"],
                    *[_signed(e["differences"][c]) if c in e["differences"] else None for c in columns],
                ]
                for e in entries
            ],
        )
        lines.append("")
    if report.get("approximate"):
        lines += ["## Approximate search", ""]
        lines += [
            "Recall@10 of the approximate index against exact search (`IndexFlatIP`) on the same vectors, "
            "and single-thread-batch queries per second of each.",
            "",
        ]
        lines += _table(
            [
                "model",
                "task",
                "index",
                "factory",
                "Recall@10 vs exact",
                "QPS approx",
                "QPS exact",
                "nDCG@10 approx",
                "nDCG@10 exact",
            ],
            [
                [
                    a["model"],
                    a["task"],
                    a["index"],
                    f"`{a['factory']}`",
                    a["recall@10_vs_exact"],
                    round(a["qps"]),
                    round(a["exact_qps"]),
                    a["ndcg@10"],
                    a["exact_ndcg@10"],
                ]
                for a in report["approximate"]
            ],
        )
        lines.append("")
    plots = report.get("plots", {})
    if plots:
        lines += ["## Plots", ""]
        titles = {"recall_curves": "Recall@k per model", "training_curves": "Training curves"}
        for key, file in plots.items():
            lines += [f"![{titles.get(key, key)}]({file})", ""]
    if report.get("training"):
        lines += ["## Training logs", ""]
        lines += _table(
            ["run", "steps logged", "last step", "final values"],
            [
                [
                    label,
                    t["entries"],
                    t["last_step"],
                    ", ".join(f"{k}={v:.4g}" for k, v in t["final"].items()),
                ]
                for label, t in report["training"].items()
            ],
        )
        lines.append("")
        notes = diagnostic_notes(report["training"])
        if notes:
            lines += ["Stage-1 diagnostics at the last logged step:", "", *notes, ""]
    lines += ["## Reproduce", ""]
    lines += [
        "```bash",
        report.get("command") or "# (called from Python: no command line recorded)",
        "```",
        "",
    ]
    lines += [
        "Configuration:",
        "",
        "```json",
        json.dumps(report.get("config") or {}, indent=2, default=str),
        "```",
        "",
    ]
    lines += ["Library versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]
    return "\n".join(lines)


def write_report(output_dir: str | os.PathLike, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``output_dir``, each atomically."""
    output_dir = Path(output_dir)
    json_path, md_path = output_dir / "report.json", output_dir / "report.md"
    atomic_write_json(json_path, report)
    atomic_write_text(md_path, render_markdown(report))
    return json_path, md_path
