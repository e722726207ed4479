"""Encoding: shards on disk read with mmap, parts across processes, and the fingerprint-keyed cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_texts

from retromae_st.errors import UserInputError
from retromae_st.evaluation.encode import (
    ShardedEmbeddings,
    encode_cached,
    encode_texts,
    encode_to_shards,
    open_parts,
)
from retromae_st.evaluation.fingerprint import model_fingerprint, texts_fingerprint
from retromae_st.evaluation.index import build_index, fill_index, merge_indexes, search, train_template

TEXTS = make_texts(23, seed=3)


def test_encode_texts_matches_sentence_transformers(tiny_model):
    vectors = encode_texts(tiny_model, TEXTS, batch_size=4, chunk_size=5)
    expected = tiny_model.encode(TEXTS, batch_size=8, normalize_embeddings=True)
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_shards_stream_to_disk_and_load_with_mmap(tiny_model, tmp_path):
    embeddings = encode_to_shards(tiny_model, TEXTS, tmp_path / "emb", shard_size=10, batch_size=4)
    assert [s["rows"] for s in embeddings.manifest["shards"]] == [10, 10, 3]
    shards = list(embeddings.shards())
    assert all(isinstance(s, np.memmap) for s in shards)
    np.testing.assert_allclose(embeddings.to_array(), encode_texts(tiny_model, TEXTS), atol=1e-5)
    with pytest.raises(UserInputError, match="already exists"):
        encode_to_shards(tiny_model, TEXTS, tmp_path / "emb")


def test_parts_encoded_separately_fit_together_and_merge_into_one_index(tiny_model, tmp_path):
    folders = [tmp_path / f"part{p}" for p in range(3)]
    for part, folder in enumerate(folders):
        encode_to_shards(tiny_model, TEXTS, folder, part=part, num_parts=3, shard_size=4)
    parts = open_parts(list(reversed(folders)))  # any order: sorted by offset
    assert [p.offset for p in parts] == [0, 7, 15] and sum(len(p) for p in parts) == len(TEXTS)
    whole = np.concatenate([p.to_array() for p in parts])
    np.testing.assert_allclose(whole, encode_texts(tiny_model, TEXTS), atol=1e-5)
    # One index per part (each machine), merged: same hits as one index over everything.
    template = train_template(whole, "flat")
    merged = merge_indexes([fill_index(template, p) for p in parts])
    queries = whole[:5]
    np.testing.assert_array_equal(search(merged, queries, 5)[1], search(build_index(whole), queries, 5)[1])
    with pytest.raises(UserInputError, match="part is missing"):
        open_parts([folders[0], folders[2]])


def test_cache_reused_when_unchanged_and_invalidated_by_weights_or_corpus(tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = encode_cached(tiny_model, TEXTS, cache, batch_size=8)

    # Nothing changed: the stored vectors come back and the model is never called.
    calls = []
    original = tiny_model.encode_document
    monkeypatch.setattr(tiny_model, "encode_document", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = encode_cached(tiny_model, TEXTS, cache, batch_size=8)
    assert calls == [] and again.folder == first.folder
    np.testing.assert_array_equal(again.to_array(), first.to_array())

    # Changed corpus (one text): a new entry, freshly encoded.
    changed_texts = [*TEXTS[:-1], TEXTS[-1] + " extra"]
    other = encode_cached(tiny_model, changed_texts, cache)
    assert calls and other.folder != first.folder

    # Changed weights: a new fingerprint, a new entry, different vectors.
    before = model_fingerprint(tiny_model)
    with torch.no_grad():
        # Random noise (a constant shift of the embedding table would vanish in LayerNorm).
        first_weights = next(tiny_model.parameters())
        first_weights.add_(torch.randn(first_weights.shape, generator=torch.Generator().manual_seed(0)))
    assert model_fingerprint(tiny_model) != before
    retrained = encode_cached(tiny_model, TEXTS, cache)
    assert retrained.folder not in (first.folder, other.folder)
    assert not np.allclose(retrained.to_array(), first.to_array())
    assert len(list(cache.iterdir())) == 3


def test_corrupt_cache_entry_is_re_encoded(tiny_model, tmp_path):
    first = encode_cached(tiny_model, TEXTS, tmp_path)
    (first.folder / first.manifest["shards"][0]["file"]).unlink()
    with pytest.raises(UserInputError, match="missing"):
        ShardedEmbeddings.open(first.folder)
    again = encode_cached(tiny_model, TEXTS, tmp_path)
    assert len(again) == len(TEXTS)


def test_texts_fingerprint_depends_on_boundaries_and_order():
    assert texts_fingerprint(["ab", "c"]) != texts_fingerprint(["a", "bc"])
    assert texts_fingerprint(["a", "b"]) != texts_fingerprint(["b", "a"])
    assert texts_fingerprint(["a", "b"]) == texts_fingerprint(iter(["a", "b"]))
