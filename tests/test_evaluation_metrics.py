"""IR metrics on a toy ranking whose values are worked out by hand below."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retromae_st.evaluation.metrics import ir_metrics, recall_curve, run_from_hits

QRELS = {
    "q1": {"d1": 1, "d3": 1},  # binary, found at ranks 2 and 4
    "q2": {"d2": 2, "d5": 1},  # graded, found at ranks 2 and 1
    "q3": {"d4": 1},  # nothing retrieved: must count as 0, not be skipped
    "q4": {"x": 1},  # relevant document at rank 11: outside every @10 cut-off
}
RUN = {
    "q1": {"d2": 0.9, "d1": 0.8, "d4": 0.7, "d3": 0.6},
    "q2": {"d5": 0.9, "d2": 0.5},
    "q4": {**{f"n{i}": 1.0 - i / 20 for i in range(10)}, "x": 0.01},
}


def test_metrics_equal_hand_computed_values():
    # nDCG (trec_eval): gain = relevance, discount log2(rank + 1).
    ndcg_q1 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    ndcg_q2 = (1 / math.log2(2) + 2 / math.log2(3)) / (2 / math.log2(2) + 1 / math.log2(3))
    expected = {
        "ndcg@10": (ndcg_q1 + ndcg_q2 + 0 + 0) / 4,
        "mrr@10": (1 / 2 + 1 / 1 + 0 + 0) / 4,
        "recall@10": (1 + 1 + 0 + 0) / 4,
        "recall@100": (1 + 1 + 0 + 1) / 4,
        "recall@1000": (1 + 1 + 0 + 1) / 4,
        # AP: mean precision at each relevant rank, over all relevant documents.
        "map@100": ((1 / 2 + 2 / 4) / 2 + (1 / 1 + 2 / 2) / 2 + 0 + (1 / 11)) / 4,
    }
    metrics = ir_metrics(QRELS, RUN)
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name


def test_recall_curve_grows_with_k():
    curve = recall_curve(QRELS, RUN, ks=(1, 2, 4, 10, 11))
    # q1: d1@2, d3@4; q2: d5@1, d2@2; q4: x@11.
    assert curve[1] == pytest.approx((0 + 0.5 + 0 + 0) / 4)
    assert curve[2] == pytest.approx((0.5 + 1 + 0 + 0) / 4)
    assert curve[4] == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert curve[11] == pytest.approx((1 + 1 + 0 + 1) / 4)


def test_run_from_hits_drops_missing_results():
    scores = np.array([[0.9, 0.5, -np.inf]], dtype=np.float32)
    ids = np.array([[2, 0, -1]])
    assert run_from_hits(["q"], ["a", "b", "c"], scores, ids) == {"q": {"c": pytest.approx(0.9), "a": 0.5}}
