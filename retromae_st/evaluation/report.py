"""``report.json`` (everything, machine-readable) and ``report.md`` (tables to paste into a model card).

The JSON report is the source; the markdown is rendered from it, so the two never disagree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    best = {
        c: max((r["metrics"].get(c) for r in rows if r["metrics"].get(c) is not None), default=None)
        for c in columns
    }
    table = []
    for r in rows:
        cells: list[Any] = [r["model"]]
        for c in columns:
            value = r["metrics"].get(c)
            # Bold the best model per column when several are compared.
            cells.append(
                f"**{value:.4f}**" if len(rows) > 1 and value is not None and value == best[c] else value
            )
        table.append(cells)
    return table


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
