"""Tokenising a text dataset once, cutting long documents into windows of ``max_seq_length`` tokens (never
truncating them), optional packing, and the on-disk cache of the tokenised corpus.

    windows, stats = tokenize_corpus(texts, tokenizer, 128, stats=stats, cache_dir="cache")
    # windows: columns "input_ids" (one window, special tokens included) and "length"
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
from transformers import PreTrainedTokenizerBase

from retromae_st.data.sources import CorpusStats
from retromae_st.errors import UserInputError
from retromae_st.io import atomic_dir, atomic_write_json

logger = logging.getLogger(__name__)

#: Documents longer than this many characters are tokenised in pieces of at most this size, cut at
#: whitespace, so that one huge document never makes the tokenizer slow or memory-hungry.
DEFAULT_CHUNK_CHARS = 20_000

# Bumped whenever the windowing changes, so that old caches are not mistaken for new ones.
_CACHE_VERSION = "2"  # 2: documents of unknown tokens only are dropped
_STATS_FILE = "corpus_stats.json"
#: The ``documents_skipped`` reason of a document whose tokens are all the tokenizer's unknown token.
ALL_UNKNOWN = "all unknown tokens"

# --------------------------------------------------------------------------------------------------
# Tokenising and windowing
# --------------------------------------------------------------------------------------------------


def tokenize_corpus(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    *,
    pack: bool = False,
    stats: CorpusStats | None = None,
    cache_dir: str | os.PathLike | None = None,
    num_proc: int | None = None,
    batch_size: int = 1000,
    chunk_chars: int = DEFAULT_CHUNK_CHARS,
) -> tuple[datasets.Dataset, CorpusStats]:
    """Tokenise a ``"text"`` dataset once and cut it into windows of at most ``max_seq_length`` tokens.

    Each document's tokens (without special tokens) are cut into pieces of ``max_seq_length - n``
    tokens, ``n`` being the number of special tokens the tokenizer adds, and each piece gets the
    special tokens back (``[CLS] ... [SEP]`` for BERT, ``<s> ... </s>`` for RoBERTa). No token is
    dropped: a long document becomes several windows. With ``pack=True`` consecutive documents are
    joined, separated by the tokenizer's separator token, and cut into full windows, so short documents
    share a window instead of filling most of it with padding.

    With ``cache_dir`` the windows are saved there (atomically) under a key made of the dataset's
    fingerprint, the tokenizer's full definition and these options; the next call with the same inputs
    loads them instead of tokenising (``stats.cached`` tells which happened).

    Returns:
        The windows, with columns ``"input_ids"`` (list of int32) and ``"length"``, and the stats
        (a copy of ``stats`` with ``windows``, ``tokens`` and any ``"no tokens"`` skips added).
    """
    if "text" not in dataset.column_names:
        raise UserInputError(
            f"the dataset has no 'text' column (columns: {dataset.column_names}); use load_texts()."
        )
    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: load one with use_fast=True."
        )
    prefix, suffix = special_token_frame(tokenizer)
    body = max_seq_length - len(prefix) - len(suffix)
    if body < 1:
        raise UserInputError(
            f"max_seq_length={max_seq_length} leaves no room for text next to {len(prefix) + len(suffix)} "
            f"special tokens: use max_seq_length >= {len(prefix) + len(suffix) + 1}."
        )
    if chunk_chars < 100:
        raise UserInputError(f"chunk_chars={chunk_chars} is too small: use at least 100.")
    separator = _separator_id(tokenizer) if pack else None
    # A fresh copy: the caller's stats stay as they were, and a repeated call does not count twice.
    stats = CorpusStats(**{**(stats or CorpusStats()).to_dict(), "windows": 0, "tokens": 0, "cached": False})
    stats.documents_skipped.pop("no tokens", None)
    stats.documents_skipped.pop(ALL_UNKNOWN, None)
    if not stats.documents_read:
        stats.documents_read = len(dataset)

    target = None
    if cache_dir is not None:
        # Packed windows restart at every map batch and process shard, so those settings shape them too.
        packing = (batch_size, num_proc or 1) if pack else None
        key = _cache_key(dataset, tokenizer, max_seq_length, packing, chunk_chars)
        target = Path(cache_dir) / f"windows-{key}"
        if (target / _STATS_FILE).is_file():
            return _load_cached(target, stats)

    with _scratch_dir(cache_dir) as scratch:

        def cache_file(name: str) -> dict[str, Any]:
            # Intermediate Arrow files on disk (not in memory) when there is a cache folder.
            return {"cache_file_name": str(scratch / f"{name}.arrow")} if scratch else {}

        documents = dataset.map(
            _tokenize_batch,
            batched=True,
            batch_size=batch_size,
            num_proc=num_proc,
            remove_columns=dataset.column_names,
            features=datasets.Features(
                {"ids": datasets.List(datasets.Value("int32")), "unknown": datasets.Value("bool")}
            ),
            fn_kwargs={
                "tokenizer": tokenizer,
                "chunk_chars": chunk_chars,
                "unknown_id": _unknown_id(tokenizer),
            },
            desc="Tokenising",
            **cache_file("documents"),
        )
        table = documents.with_format("arrow")
        lengths = pc.list_value_length(table["ids"])
        stats.tokens = int(pc.sum(lengths).as_py() or 0)
        unknown = int(pc.sum(table["unknown"]).as_py() or 0)
        # All-unknown documents were emptied (they teach nothing: every target would be [UNK]).
        stats.skip("no tokens", int(pc.sum(pc.equal(lengths, 0)).as_py() or 0) - unknown)
        stats.skip(ALL_UNKNOWN, unknown)
        _warn_all_unknown(unknown, stats, tokenizer)
        windows = documents.map(
            _window_batch,
            batched=True,
            batch_size=batch_size,
            num_proc=num_proc,
            remove_columns=["ids", "unknown"],
            features=datasets.Features(
                {"input_ids": datasets.List(datasets.Value("int32")), "length": datasets.Value("int32")}
            ),
            fn_kwargs={
                "body": body,
                "prefix": prefix,
                "suffix": suffix,
                "pack": pack,
                "separator": separator,
            },
            desc="Cutting windows",
            **cache_file("windows"),
        )
        stats.windows = len(windows)
        if stats.windows == 0:
            why = (
                f" ({unknown} were all unknown tokens: the tokenizer does not cover this text)"
                if unknown
                else ""
            )
            raise UserInputError(
                f"{stats.source or 'the corpus'}: no document produced a token{why}; check the tokenizer."
            )
        if target is not None:
            with atomic_dir(target, overwrite=True) as tmp:
                windows.save_to_disk(str(tmp))
                atomic_write_json(tmp / _STATS_FILE, stats.to_dict())
            windows = datasets.load_from_disk(str(target))
    logger.info("%s", stats.summary())
    return windows, stats


def special_token_frame(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text, e.g. ([CLS], [SEP]).

    Found by encoding a probe with and without special tokens, which works for any tokenizer whose
    post-processor wraps a single sequence (transformers 5 tokenizers have no
    ``build_inputs_with_special_tokens``).
    """
    for probe in ("a", "the", "0", "x y"):
        plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
        framed = tokenizer(probe)["input_ids"]
        if not plain:
            continue
        for start in range(len(framed) - len(plain) + 1):
            if framed[start : start + len(plain)] == plain:
                return framed[:start], framed[start + len(plain) :]
    raise UserInputError(f"cannot find where {type(tokenizer).__name__} puts its special tokens.")


def _separator_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    for token_id in (tokenizer.sep_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    logger.warning("the tokenizer has no sep or eos token: packed documents are joined without a separator")
    return None


def _split_text(text: str, chunk_chars: int) -> Iterator[str]:
    """Cut a long text into pieces of at most ``chunk_chars`` characters, each cut just before whitespace.

    Cutting before (not after) the whitespace keeps byte-level BPE tokens such as ``Ġword`` intact, so the
    pieces tokenise as the whole text would. Only a run of over ``chunk_chars / 2`` characters without
    whitespace is cut inside a word.
    """
    start = 0
    while len(text) - start > chunk_chars:
        end = start + chunk_chars
        cut = max(text.rfind(space, start + chunk_chars // 2, end) for space in (" ", "\n", "\t"))
        if cut <= start:
            cut = end
        yield text[start:cut]
        start = cut
    yield text[start:]


def _unknown_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The unknown token's id, or None when the tokenizer has none (byte-level BPE never needs one)."""
    return tokenizer.unk_token_id if tokenizer.unk_token is not None else None


def _warn_all_unknown(count: int, stats: CorpusStats, tokenizer: PreTrainedTokenizerBase) -> None:
    if count:
        logger.warning(
            "%s: %d documents are nothing but the unknown token %s after tokenising and were dropped: the "
            "tokenizer does not cover their script or vocabulary. Use a tokenizer made for this text (leave "
            "model.tokenizer unset with a preset to train one on the corpus, or pick a multilingual model).",
            stats.source or "the corpus",
            count,
            tokenizer.unk_token,
        )


def _tokenize_batch(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    chunk_chars: int,
    unknown_id: int | None = None,
) -> dict[str, list]:
    pieces, owners = [], []
    for index, text in enumerate(batch["text"]):
        for piece in _split_text(text, chunk_chars):
            pieces.append(piece)
            owners.append(index)
    # One call for the whole batch: the Rust tokenizer runs the pieces in parallel.
    encoded = tokenizer(
        pieces,
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    ids: list[list[int]] = [[] for _ in batch["text"]]
    for owner, piece_ids in zip(owners, encoded):
        ids[owner].extend(piece_ids)
    # Tokenised without special tokens, so a document that is all unknown ids holds nothing to learn from.
    unknown = [unknown_id is not None and bool(doc) and doc.count(unknown_id) == len(doc) for doc in ids]
    return {"ids": [[] if drop else doc for doc, drop in zip(ids, unknown)], "unknown": unknown}


def _window_batch(
    batch: dict[str, list], body: int, prefix: list[int], suffix: list[int], pack: bool, separator: int | None
) -> dict[str, list]:
    if pack:
        stream: list[int] = []
        for ids in batch["ids"]:
            if not ids:
                continue
            if stream and separator is not None:
                stream.append(separator)
            stream.extend(ids)
        pieces = [stream[i : i + body] for i in range(0, len(stream), body)]
    else:
        pieces = [ids[i : i + body] for ids in batch["ids"] for i in range(0, len(ids), body)]
    input_ids = [prefix + piece + suffix for piece in pieces]
    return {"input_ids": input_ids, "length": [len(window) for window in input_ids]}


def _cache_key(
    dataset: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    packing: tuple[int, int] | None,
    chunk_chars: int,
) -> str:
    # datasets has no public accessor for the fingerprint; it is stable for the same files and operations.
    fingerprint = getattr(dataset, "_fingerprint", None) or datasets.fingerprint.generate_fingerprint(dataset)
    parts = {
        "version": _CACHE_VERSION,
        "dataset": fingerprint,
        "tokenizer": hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest(),
        "tokenizer_class": type(tokenizer).__name__,
        "special_tokens": sorted(tokenizer.special_tokens_map.items(), key=str),
        "max_seq_length": max_seq_length,
        "packing": packing,
        "chunk_chars": chunk_chars,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]


def _load_cached(target: Path, stats: CorpusStats) -> tuple[datasets.Dataset, CorpusStats]:
    saved = json.loads((target / _STATS_FILE).read_text(encoding="utf-8"))
    stats.windows, stats.tokens, stats.cached = saved["windows"], saved["tokens"], True
    stats.skip("no tokens", saved.get("documents_skipped", {}).get("no tokens", 0))
    stats.skip(ALL_UNKNOWN, saved.get("documents_skipped", {}).get(ALL_UNKNOWN, 0))
    windows = datasets.load_from_disk(str(target))
    logger.info("loaded tokenised windows from %s; %s", target, stats.summary())
    return windows, stats


@contextlib.contextmanager
def _scratch_dir(cache_dir: str | os.PathLike | None) -> Iterator[Path | None]:
    """A temporary folder inside ``cache_dir`` (None without one), removed on exit."""
    if cache_dir is None:
        yield None
        return
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=".tokenising-", dir=cache_dir))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
