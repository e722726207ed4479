"""FAISS indexes: exact search against brute force, save/load, approximate presets, merging parts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retromae_st.errors import UserInputError
from retromae_st.evaluation.index import (
    build_index,
    factory_string,
    fill_index,
    load_index,
    merge_indexes,
    recall_vs_exact,
    save_index,
    search,
    train_template,
)


def _unit(rows: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_exact_search_equals_brute_force_torch_topk():
    docs, queries = _unit(500), _unit(20, seed=1)
    scores, ids = search(build_index(docs, "flat"), queries, k=10)
    expected_scores, expected_ids = torch.topk(torch.from_numpy(queries) @ torch.from_numpy(docs).T, k=10)
    np.testing.assert_array_equal(ids, expected_ids.numpy())
    np.testing.assert_allclose(scores, expected_scores.numpy(), rtol=1e-5, atol=1e-6)


def test_save_load_round_trip_and_no_silent_overwrite(tmp_path):
    docs, queries = _unit(300), _unit(5, seed=1)
    index = build_index(docs, "hnsw")
    path = save_index(index, tmp_path / "docs.faiss")
    loaded = load_index(path)
    assert loaded.ntotal == 300
    np.testing.assert_array_equal(search(loaded, queries, 5)[1], search(index, queries, 5)[1])
    assert [p.name for p in tmp_path.iterdir()] == ["docs.faiss"]  # no temporary file left behind
    with pytest.raises(UserInputError, match="already exists"):
        save_index(index, path)
    save_index(build_index(docs[:10], "flat"), path, overwrite=True)
    assert load_index(path).ntotal == 10


def test_load_index_rejects_missing_and_garbage_files(tmp_path):
    with pytest.raises(UserInputError, match="missing"):
        load_index(tmp_path / "nope.faiss")
    (tmp_path / "bad.faiss").write_bytes(b"not an index")
    with pytest.raises(UserInputError, match="bad.faiss"):
        load_index(tmp_path / "bad.faiss")


def test_approximate_presets_find_most_exact_neighbours():
    docs, queries = _unit(2000, dim=32), _unit(50, dim=32, seed=1)
    exact_ids = search(build_index(docs, "flat"), queries, 10)[1]
    assert factory_string("ivfpq", 2000, 32).startswith("IVF")
    for name, minimum in (("hnsw", 0.9), ("IVF16,Flat", 0.5), ("ivfpq", 0.2)):
        ids = search(build_index(docs, name), queries, 10)[1]
        recall = recall_vs_exact(ids, exact_ids, 10)
        assert minimum <= recall <= 1.0, (name, recall)
    assert recall_vs_exact(exact_ids, exact_ids, 10) == 1.0


def test_bad_factory_string_is_a_user_error():
    with pytest.raises(UserInputError, match="NoSuchIndex"):
        build_index(_unit(10), "NoSuchIndex")
    with pytest.raises(UserInputError, match="empty"):
        build_index(np.zeros((0, 16), dtype=np.float32))


@pytest.mark.parametrize("kind", ["flat", "IVF8,Flat", "hnsw"])
def test_per_part_indexes_merge_into_the_single_index(kind):
    docs, queries = _unit(600), _unit(10, seed=1)
    template = train_template(docs, kind)  # one training shared by every part
    single = fill_index(template, docs)
    parts = [fill_index(template, docs[a:b]) for a, b in ((0, 250), (250, 400), (400, 600))]
    merged = merge_indexes(parts)
    assert merged.ntotal == 600
    single_ids = search(single, queries, 10)[1]
    merged_ids = search(merged, queries, 10)[1]
    if kind == "hnsw":
        # Shards search separate graphs, so only near-identical results are guaranteed.
        assert recall_vs_exact(merged_ids, search(build_index(docs), queries, 10)[1]) > 0.9
    else:
        np.testing.assert_array_equal(merged_ids, single_ids)


def test_merging_parts_of_different_models_fails():
    with pytest.raises(UserInputError, match="dimensions"):
        merge_indexes([build_index(_unit(10, dim=8)), build_index(_unit(10, dim=16))])
