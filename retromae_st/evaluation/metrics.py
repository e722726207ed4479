"""IR metrics with pytrec_eval (the trec_eval bindings MTEB itself uses), never hand-written.

A *run* maps each query id to ``{doc id: score}`` for the documents retrieved. Every judged query
counts in the averages: a query that retrieved nothing scores 0 (pytrec_eval alone would skip it and
inflate the mean).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pytrec_eval

Qrels = Mapping[str, Mapping[str, int]]
Run = Mapping[str, Mapping[str, float]]

METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100", "recall@1000", "map@100")
CURVE_KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# Our metric name -> the trec_eval measure and its result key.
_MEASURES = {
    "ndcg@10": ("ndcg_cut.10", "ndcg_cut_10"),
    "recall@10": ("recall.10", "recall_10"),
    "recall@100": ("recall.100", "recall_100"),
    "recall@1000": ("recall.1000", "recall_1000"),
    "map@100": ("map_cut.100", "map_cut_100"),
}


def run_from_hits(
    query_ids: Sequence[str], doc_ids: Sequence[str], scores: np.ndarray, indices: np.ndarray
) -> dict[str, dict[str, float]]:
    """Turn FAISS ``(scores, indices)`` rows into a run; index -1 (no hit) is dropped."""
    run: dict[str, dict[str, float]] = {}
    for query_id, row_scores, row_ids in zip(query_ids, scores, indices):
        run[query_id] = {doc_ids[i]: float(s) for s, i in zip(row_scores, row_ids) if i >= 0}
    return run


def _truncate(run: Run, k: int) -> dict[str, dict[str, float]]:
    """The top ``k`` of each query, ordered the way trec_eval orders (score, then doc id, descending)."""
    return {
        query_id: dict(sorted(hits.items(), key=lambda item: (item[1], item[0]), reverse=True)[:k])
        for query_id, hits in run.items()
    }


def _evaluate(qrels: Qrels, run: Run, measures: set[str]) -> dict[str, dict[str, float]]:
    judged = {q: {d: int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    evaluator = pytrec_eval.RelevanceEvaluator(judged, measures)
    return evaluator.evaluate({q: dict(hits) for q, hits in run.items() if q in judged})


def _mean(per_query: Mapping[str, Mapping[str, float]], key: str, num_queries: int) -> float:
    # Divide by every judged query: queries missing from per_query (nothing retrieved) count as 0.
    return (
        float(sum(scores.get(key, 0.0) for scores in per_query.values()) / num_queries)
        if num_queries
        else 0.0
    )


def ir_metrics(qrels: Qrels, run: Run) -> dict[str, float]:
    """nDCG@10, MRR@10, Recall@{10,100,1000} and MAP@100 averaged over the judged queries.

    MRR@10 is trec_eval's ``recip_rank`` on the run cut to its top 10 (trec_eval has no cut-off for it).
    """
    num_queries = len(qrels)
    per_query = _evaluate(qrels, run, {measure for measure, _ in _MEASURES.values()})
    metrics = {name: _mean(per_query, key, num_queries) for name, (_, key) in _MEASURES.items()}
    metrics["mrr@10"] = _mean(_evaluate(qrels, _truncate(run, 10), {"recip_rank"}), "recip_rank", num_queries)
    return {name: metrics[name] for name in METRICS}


def recall_curve(qrels: Qrels, run: Run, ks: Sequence[int] = CURVE_KS) -> dict[int, float]:
    """Recall@k for each ``k`` in ``ks`` (for the Recall@k plot)."""
    per_query = _evaluate(qrels, run, {"recall." + ",".join(str(k) for k in ks)})
    return {k: _mean(per_query, f"recall_{k}", len(qrels)) for k in ks}
