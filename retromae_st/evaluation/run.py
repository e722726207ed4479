"""The entry point: evaluate several models on BEIR folders and MTEB tasks and write one report."""

from __future__ import annotations

import datetime
import importlib.metadata
import logging
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sentence_transformers import SentenceTransformer

from retromae_st.data.beir import BeirData, load_beir
from retromae_st.errors import UserInputError
from retromae_st.evaluation.encode import encode_cached, encode_texts
from retromae_st.evaluation.fingerprint import model_fingerprint
from retromae_st.evaluation.index import build_index, factory_string, recall_vs_exact, timed_search
from retromae_st.evaluation.metrics import ir_metrics, recall_curve, run_from_hits
from retromae_st.evaluation.mteb_tasks import label_scores, resolve_task, run_mteb
from retromae_st.evaluation.plots import (
    LogSource,
    load_log_history,
    plot_recall_curves,
    plot_training_logs,
    split_series,
)
from retromae_st.evaluation.report import Comparison, compare_results, write_report
from retromae_st.io import atomic_dir, ensure_can_write
from retromae_st.models import load_encoder

logger = logging.getLogger(__name__)

ModelSpec = str | os.PathLike | SentenceTransformer
TOP_K = 1000  # the deepest cut-off reported (Recall@1000); also MTEB's retrieval depth


@dataclass
class BeirResult:
    """One model on one BEIR split: metrics of the chosen index, Recall@k curve, and approximate-search numbers."""

    metrics: dict[str, float]
    recall_curve: dict[int, float]
    approximate: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _embed(
    model: SentenceTransformer,
    texts: list[str],
    kind: str,
    *,
    batch_size: int,
    cache_dir: str | os.PathLike | None,
    fingerprint: str | None,
    shard_size: int,
    pool: dict[str, Any] | None,
) -> np.ndarray:
    if cache_dir is None:
        return encode_texts(model, texts, kind=kind, batch_size=batch_size, pool=pool)
    return encode_cached(
        model,
        texts,
        cache_dir,
        kind=kind,
        batch_size=batch_size,
        shard_size=shard_size,
        pool=pool,
        fingerprint=fingerprint,
    ).to_array()


def evaluate_beir(
    model: SentenceTransformer,
    data: BeirData,
    *,
    index: str = "flat",
    search_params: str | None = None,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    fingerprint: str | None = None,
    shard_size: int = 100_000,
    pool: dict[str, Any] | None = None,
) -> BeirResult:
    """Encode a BEIR split, search it with FAISS (exact, plus ``index`` when approximate) and score it.

    Metrics are those of the search the user chose (``index``); with an approximate index the result
    also holds its Recall@10 against exact search and both searches' queries per second.
    """
    doc_ids = list(data.corpus)
    query_ids = list(data.queries)
    begin = time.perf_counter()
    kwargs = {
        "batch_size": batch_size,
        "cache_dir": cache_dir,
        "fingerprint": fingerprint,
        "shard_size": shard_size,
        "pool": pool,
    }
    docs = _embed(model, [data.document_text(d) for d in doc_ids], "document", **kwargs)
    queries = _embed(model, [data.queries[q] for q in query_ids], "query", **kwargs)
    timings = {"encode_s": time.perf_counter() - begin}

    exact = build_index(docs, "flat")
    exact_scores, exact_ids, exact_qps = timed_search(exact, queries, TOP_K)
    exact_run = run_from_hits(query_ids, doc_ids, exact_scores, exact_ids)
    exact_metrics = ir_metrics(data.qrels, exact_run)
    if factory_string(index, len(doc_ids), docs.shape[1]) == "Flat":
        return BeirResult(
            exact_metrics, recall_curve(data.qrels, exact_run), None, {**timings, "qps": exact_qps}
        )

    begin = time.perf_counter()
    approx = build_index(docs, index, search_params=search_params)
    timings["build_s"] = time.perf_counter() - begin
    scores, ids, qps = timed_search(approx, queries, TOP_K)
    run = run_from_hits(query_ids, doc_ids, scores, ids)
    metrics = ir_metrics(data.qrels, run)
    approximate = {
        "index": index,
        "factory": factory_string(index, len(doc_ids), docs.shape[1]),
        "search_params": search_params,
        "recall@10_vs_exact": recall_vs_exact(ids, exact_ids, 10),
        "qps": qps,
        "exact_qps": exact_qps,
        "ndcg@10": metrics["ndcg@10"],
        "exact_ndcg@10": exact_metrics["ndcg@10"],
        "build_s": timings["build_s"],
    }
    return BeirResult(metrics, recall_curve(data.qrels, run), approximate, {**timings, "qps": qps})


def default_labels(names: Sequence[str]) -> list[str]:
    """Short, distinct report labels for model folders or hub names, in order.

    A model is labelled by its last path component, or its parent's when that is ``final`` (what every
    stage writes): ``runs/pt/final`` -> ``pt``, ``stage1/final`` -> ``stage1``,
    ``sentence-transformers/all-MiniLM-L6-v2`` -> ``all-MiniLM-L6-v2``. Labels that clash are extended with
    more leading components until they differ (``a/pt/final``, ``b/pt/final`` -> ``a/pt``, ``b/pt``); the
    whole name is the last resort. The same name given twice keeps one label (and is refused later).
    """
    parts = []
    for name in names:
        components = [part for part in Path(name).parts if part not in (Path(name).anchor, ".")] or [name]
        if len(components) > 1 and components[-1] == "final":
            components = components[:-1]
        parts.append(components)
    depth = [1] * len(names)
    while True:
        labels = ["/".join(components[-d:]) for components, d in zip(parts, depth)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1]
        growable = [i for i in clashing if depth[i] < len(parts[i])]
        if not growable:
            break
        for i in growable:
            depth[i] += 1
    # Still clashing at full depth (``pt`` and ``pt/final``): the names as given tell them apart.
    return [str(names[i]) if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _resolve_models(
    models: Sequence[ModelSpec] | Mapping[str, ModelSpec] | ModelSpec,
) -> list[tuple[str, ModelSpec]]:
    """``(label, model or path)`` pairs; paths are labelled by :func:`default_labels`."""
    if isinstance(models, (str, os.PathLike, SentenceTransformer)):
        models = [models]
    if isinstance(models, Mapping):
        pairs = [(str(label), spec) for label, spec in models.items()]
    else:
        models = list(models)
        named = [str(spec) for spec in models if isinstance(spec, (str, os.PathLike))]
        derived = iter(default_labels(named))
        pairs = [
            (next(derived) if isinstance(spec, (str, os.PathLike)) else f"model-{number}", spec)
            for number, spec in enumerate(models, start=1)
        ]
    if not pairs:
        raise UserInputError("no model to evaluate: pass at least one model folder (--model PATH).")
    labels = [label for label, _ in pairs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise UserInputError(
            f"several models are labelled {duplicates}: give them distinct labels (--model LABEL=PATH, or pass "
            "a mapping label -> model)."
        )
    return pairs


def _load(spec: ModelSpec, allow_pickle: bool, trust_remote_code: bool) -> tuple[SentenceTransformer, str]:
    if isinstance(spec, SentenceTransformer):
        return spec, "(in-memory model)"
    if not isinstance(spec, (str, os.PathLike)):
        raise UserInputError(
            f"a model must be a folder path or a SentenceTransformer, not {type(spec).__name__}."
        )
    model = load_encoder(str(spec), allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return model, str(spec)


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in (
        "retromae-st",
        "sentence-transformers",
        "transformers",
        "torch",
        "faiss-cpu",
        "mteb",
        "numpy",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _training_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    losses, metrics = split_series(history)
    final = {key: points[-1][1] for key, points in {**losses, **metrics}.items()}
    steps = [row["step"] for row in history if isinstance(row.get("step"), (int, float))]
    return {"entries": len(history), "last_step": max(steps) if steps else None, "final": final}


def evaluate(
    models: Sequence[ModelSpec] | Mapping[str, ModelSpec] | ModelSpec,
    *,
    output_dir: str | os.PathLike,
    beir_folders: Sequence[str | os.PathLike] = (),
    mteb_tasks: Sequence[str | os.PathLike] = (),
    split: str = "test",
    index: str = "flat",
    search_params: str | None = None,
    batch_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    shard_size: int = 100_000,
    training_logs: Mapping[str, LogSource] | None = None,
    command: str | None = None,
    config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    comparisons: Sequence[Comparison | tuple[str, str, str]] = (),
) -> dict[str, Any]:
    """Evaluate models on local BEIR folders (FAISS) and MTEB tasks; write ``report.md``, ``report.json``, plots.

    Args:
        models: model folders, in-memory ``SentenceTransformer`` objects, or a mapping label -> either.
            Folders are loaded safely with :func:`retromae_st.models.load_encoder` and labelled by name.
        output_dir: the report folder; it appears complete or not at all. An existing one is only
            replaced with ``overwrite=True``.
        beir_folders: BEIR folders evaluated with our FAISS search and pytrec_eval metrics.
        mteb_tasks: MTEB task names (data from the hub) or BEIR folders run as custom MTEB tasks.
        split: the qrels split of the BEIR folders.
        index: ``"flat"`` (exact), ``"hnsw"``, ``"ivfpq"`` or a ``faiss.index_factory`` string.
            Approximate indexes also report Recall@10 against exact search and queries per second.
        search_params: faiss search parameters such as ``"nprobe=32"`` or ``"efSearch=256"``.
        batch_size: encoding batch size.
        cache_dir: where embeddings (keyed by model and corpus fingerprints) and MTEB scores are
            cached between runs; nothing is cached when None.
        shard_size: rows per ``.npy`` shard of cached embeddings.
        training_logs: label -> ``trainer_state.json`` path (or its folder, or a parsed ``log_history``
            list) plotted as training curves.
        command: the command line that produced the report (recorded for reproduction).
        config: the pipeline configuration (recorded as it is).
        overwrite: replace an existing ``output_dir``.
        allow_pickle, trust_remote_code: passed to :func:`load_encoder` (both off: safe loading).
        comparisons: ``(title, model label, reference label)`` triples; for each task both were scored on,
            the report gets ``model - reference`` for every metric (``report.json`` ``comparisons``) and a
            line such as ``title: +0.0120 nDCG@10 on task`` in ``report.md``.

    Returns:
        The report as a dict (the content of ``report.json``).
    """
    # Check every input before the slow work, so a typo fails in seconds rather than after encoding.
    ensure_can_write(output_dir, overwrite)
    if not beir_folders and not mteb_tasks:
        raise UserInputError(
            "nothing to evaluate: pass at least one BEIR folder (--beir) or MTEB task (--mteb)."
        )
    if batch_size < 1:
        raise UserInputError(f"batch_size={batch_size} must be at least 1.")
    pairs = _resolve_models(models)
    comparisons = [Comparison(*c) for c in comparisons]
    labels = {label for label, _ in pairs}
    for comparison in comparisons:
        missing = [label for label in (comparison.model, comparison.reference) if label not in labels]
        if missing:
            raise UserInputError(
                f"comparison {comparison.title!r} names {missing}, which are not among the models "
                f"{sorted(labels)}: compare two evaluated models."
            )
    datasets = [load_beir(folder, split) for folder in beir_folders]
    names = [data.name for data in datasets]
    if len(set(names)) != len(names):
        raise UserInputError(
            f"BEIR folders share a name {names}: rename one so the report can tell them apart."
        )
    tasks = [resolve_task(task, split) for task in mteb_tasks]
    logs = {str(label): load_log_history(source) for label, source in (training_logs or {}).items()}
    loaded = [(label, *_load(spec, allow_pickle, trust_remote_code)) for label, spec in pairs]

    report: dict[str, Any] = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "config": {
            "evaluate": {
                "models": {label: source for label, _, source in loaded},
                "beir_folders": [str(f) for f in beir_folders],
                "mteb_tasks": [str(t) for t in mteb_tasks],
                "split": split,
                "index": index,
                "search_params": search_params,
                "batch_size": batch_size,
                "top_k": TOP_K,
            },
            "pipeline": dict(config) if config else None,
        },
        "versions": _versions(),
        "split": split,
        "index": {"name": index, "search_params": search_params},
        "models": [],
        "results": [],
        "approximate": [],
        "comparisons": [],
        "plots": {},
        "training": {label: _training_summary(history) for label, history in logs.items()},
    }
    curves: dict[str, dict[str, dict[int, float]]] = {}
    with atomic_dir(output_dir, overwrite=overwrite) as tmp:
        results_root = Path(cache_dir) / "mteb-results" if cache_dir is not None else tmp / "mteb-results"
        for label, model, source in loaded:
            fingerprint = model_fingerprint(model)
            report["models"].append(
                {
                    "label": label,
                    "source": source,
                    "fingerprint": fingerprint,
                    "dim": model.get_embedding_dimension(),
                    "max_seq_length": model.max_seq_length,
                }
            )
            for data in datasets:
                logger.info("evaluating %s on %s (%s)", label, data.name, split)
                result = evaluate_beir(
                    model,
                    data,
                    index=index,
                    search_params=search_params,
                    batch_size=batch_size,
                    cache_dir=Path(cache_dir) / "embeddings" if cache_dir is not None else None,
                    fingerprint=fingerprint,
                    shard_size=shard_size,
                )
                report["results"].append(
                    {
                        "model": label,
                        "task": data.name,
                        "evaluator": f"FAISS ({index}) + pytrec_eval",
                        "num_queries": len(data.queries),
                        "num_documents": len(data.corpus),
                        "metrics": result.metrics,
                        "recall_curve": {str(k): v for k, v in result.recall_curve.items()},
                        "timings": result.timings,
                    }
                )
                curves.setdefault(data.name, {})[label] = result.recall_curve
                if result.approximate:
                    report["approximate"].append({"model": label, "task": data.name, **result.approximate})
            if tasks:
                scores = label_scores(
                    tasks,
                    run_mteb(
                        model,
                        tasks,
                        label=label,
                        fingerprint=fingerprint,
                        results_dir=results_root,
                        batch_size=batch_size,
                        split=split,
                    ),
                )
                for task_name, metrics in scores.items():
                    report["results"].append(
                        {"model": label, "task": task_name, "evaluator": "MTEB", "metrics": metrics}
                    )
        report["comparisons"] = compare_results(report["results"], comparisons)
        if curves:
            report["plots"]["recall_curves"] = plot_recall_curves(curves, tmp / "recall_at_k.png").name
        if logs:
            report["plots"]["training_curves"] = plot_training_logs(logs, tmp / "training_curves.png").name
        write_report(tmp, report)
    logger.info("wrote %s", Path(output_dir) / "report.md")
    return report
