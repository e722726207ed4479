"""The offline quickstart data: Python's own documentation as a corpus and as retrieval pairs."""

from __future__ import annotations

import pytest

from retromae_st.data.beir import load_beir
from retromae_st.data.python_docs import (
    MIN_DOC_WORDS,
    MIN_QUERY_WORDS,
    iter_docstrings,
    python_docs_corpus,
    python_docs_pairs,
    write_beir,
)
from retromae_st.errors import UserInputError


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return python_docs_corpus()


@pytest.fixture(scope="module")
def pairs() -> tuple[list[dict], list[dict]]:
    return python_docs_pairs()


def test_corpus_is_deterministic_clean_and_without_duplicates(corpus):
    assert len(corpus) > 500
    assert corpus == python_docs_corpus()
    assert len(set(corpus)) == len(corpus)
    assert all(len(doc.split()) >= MIN_DOC_WORDS for doc in corpus)
    assert all(doc == doc.strip() and "\n\n\n" not in doc and "  " not in doc for doc in corpus)
    # Both sources are present: a pydoc topic and a docstring.
    assert any(doc.startswith('The "assert" statement') for doc in corpus)
    assert any("shell-style wildcards" in doc.lower() for doc in corpus)  # fnmatch's module docstring


def test_corpus_holds_no_held_out_query_but_keeps_the_training_ones(corpus, pairs):
    """Stage 1 must not read a test query (a docstring's summary line) next to its answer."""
    train, test = pairs
    text = "\n".join(corpus).lower()
    assert test and not [p["query"] for p in test if p["query"].lower() in text]
    # Only held-out sentences go: nearly every training query is still in the corpus, as are the documents
    # the evaluation searches (a test pair's body, of which a long one is cut, so its first words).
    assert sum(p["query"].lower() in text for p in train) > 0.95 * len(train)
    assert sum(" ".join(p["text"].split()[:8]).lower() in text for p in test) > 0.7 * len(test)


def test_corpus_subset():
    corpus = python_docs_corpus(seed=1)  # the seed also picks the held-out queries left out of the corpus
    subset = python_docs_corpus(max_docs=50, seed=1)
    assert len(subset) == 50 and set(subset) <= set(corpus)
    assert subset == python_docs_corpus(max_docs=50, seed=1)
    assert subset != python_docs_corpus(max_docs=50, seed=2)
    positions = [corpus.index(doc) for doc in subset]
    assert positions == sorted(positions)  # the corpus order is kept
    with pytest.raises(UserInputError):
        python_docs_corpus(max_docs=0)


def test_docstring_walk_skips_side_effect_modules_and_reexports():
    names = [name for name, _ in iter_docstrings(["os", "this", "antigravity", "no_such_module_here"])]
    assert "os" in names and "os.makedirs" in names
    assert not any(name.startswith(("this", "antigravity")) for name in names)
    assert "os.path" not in names  # posixpath.* is documented under posixpath, not os


def test_pairs_are_deterministic_and_split_without_overlap(pairs):
    train, test = pairs
    assert len(train) > 300 and len(test) > 40
    assert 0.08 < len(test) / (len(train) + len(test)) < 0.25
    assert (train, test) == python_docs_pairs()
    everything = train + test
    assert len({p["id"] for p in everything}) == len(everything)
    assert len({p["query"].lower() for p in everything}) == len(everything)
    assert not {p["query"].lower() for p in test} & {p["query"].lower() for p in train}
    for pair in everything:
        assert len(pair["query"].split()) >= MIN_QUERY_WORDS
        assert pair["query"] not in pair["text"]  # the summary is not copied into the document
        assert pair["passage"] == f"{pair['title']} {pair['text']}"
    other_train, other_test = python_docs_pairs(seed=1)
    assert {p["id"] for p in other_test} != {p["id"] for p in test}
    assert len(other_train) + len(other_test) == len(everything)


def test_write_beir_is_readable_by_the_evaluation_reader(pairs, tmp_path):
    train, test = pairs
    folder = write_beir(tmp_path / "pydocs", test, distractors=train)
    data = load_beir(folder, "test")
    assert len(data.queries) == len(test)
    assert len(data.corpus) == len(test) + len(train)
    first = test[0]
    assert data.queries[f"q:{first['id']}"] == first["query"]
    assert data.qrels[f"q:{first['id']}"] == {f"d:{first['id']}": 1}
    assert data.document_text(f"d:{first['id']}") == first["passage"]
    with pytest.raises(UserInputError, match="already exists"):
        write_beir(folder, test)
    with pytest.raises(UserInputError):
        write_beir(tmp_path / "empty", [])
