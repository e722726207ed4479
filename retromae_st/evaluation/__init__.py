"""Retrieval evaluation: cached encoding, FAISS search, pytrec_eval metrics, MTEB tasks and reports.

The one entry point the CLI calls is :func:`evaluate`; the pieces are public for custom pipelines
(sharded encoding across machines, per-shard indexes merged into one, ...).
"""

from __future__ import annotations

from retromae_st.evaluation.encode import (
    ShardedEmbeddings,
    encode_cached,
    encode_texts,
    encode_to_shards,
    open_parts,
    part_range,
)
from retromae_st.evaluation.fingerprint import model_fingerprint, texts_fingerprint
from retromae_st.evaluation.index import (
    build_index,
    factory_string,
    fill_index,
    load_index,
    merge_indexes,
    recall_vs_exact,
    save_index,
    search,
    set_search_params,
    timed_search,
    train_template,
)
from retromae_st.evaluation.metrics import METRICS, ir_metrics, recall_curve, run_from_hits
from retromae_st.evaluation.mteb_tasks import LocalBeirRetrieval, beir_task, resolve_task, run_mteb
from retromae_st.evaluation.plots import load_log_history, plot_recall_curves, plot_training_logs
from retromae_st.evaluation.report import render_markdown, write_report
from retromae_st.evaluation.run import BeirResult, evaluate, evaluate_beir

__all__ = [
    "METRICS",
    "BeirResult",
    "LocalBeirRetrieval",
    "ShardedEmbeddings",
    "beir_task",
    "build_index",
    "encode_cached",
    "encode_texts",
    "encode_to_shards",
    "evaluate",
    "evaluate_beir",
    "factory_string",
    "fill_index",
    "ir_metrics",
    "load_index",
    "load_log_history",
    "merge_indexes",
    "model_fingerprint",
    "open_parts",
    "part_range",
    "plot_recall_curves",
    "plot_training_logs",
    "recall_curve",
    "recall_vs_exact",
    "render_markdown",
    "resolve_task",
    "run_from_hits",
    "run_mteb",
    "save_index",
    "search",
    "set_search_params",
    "texts_fingerprint",
    "timed_search",
    "train_template",
    "write_report",
]
