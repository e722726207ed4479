"""Reading a BEIR folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``) with validation.

Every problem names the file and line or id: a missing file or split, invalid JSON, duplicate ids, an
empty corpus, qrels naming unknown queries or documents. Plain line-by-line reading (not
``datasets.load_dataset``) because errors must point at the exact line, and these files are small
enough to hold in memory; corpora for pretraining go through :mod:`retromae_st.data.sources` instead.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from retromae_st.errors import UserInputError


@dataclass
class BeirData:
    """One BEIR folder: documents, queries and relevance judgements of one split."""

    corpus: dict[str, dict[str, str]]  # doc id -> {"title": ..., "text": ...}
    queries: dict[str, str]  # query id -> text (only queries that have judgements when a split is read)
    qrels: dict[str, dict[str, int]]  # query id -> {doc id: relevance}
    name: str
    split: str | None

    def document_text(self, doc_id: str) -> str:
        """Title and text joined, the way BEIR evaluators feed documents to a model."""
        doc = self.corpus[doc_id]
        return f"{doc['title']} {doc['text']}".strip() if doc.get("title") else doc["text"]


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; an error names the file, line and column."""
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise UserInputError(
                        f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno}); "
                        "fix or remove the line."
                    ) from None
                if not isinstance(row, dict):
                    raise UserInputError(
                        f"{path}:{number}: expected a JSON object per line, found {type(row).__name__}."
                    )
                yield number, row
    except UnicodeDecodeError as error:
        raise UserInputError(
            f"{path}: not UTF-8 text (byte offset {error.start}); re-encode it as UTF-8."
        ) from None


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserInputError(f"{path} is missing: a BEIR folder needs {what}.")
    return path


def read_corpus(folder: str | os.PathLike) -> dict[str, dict[str, str]]:
    path = _require(Path(folder) / "corpus.jsonl", "corpus.jsonl with _id, title, text")
    corpus: dict[str, dict[str, str]] = {}
    for number, row in iter_jsonl(path):
        if "_id" not in row:
            raise UserInputError(f"{path}:{number}: the document has no '_id'.")
        doc_id = str(row["_id"])
        if doc_id in corpus:
            raise UserInputError(f"{path}:{number}: duplicate document id {doc_id!r}; ids must be unique.")
        corpus[doc_id] = {"title": str(row.get("title") or ""), "text": str(row.get("text") or "")}
    if not corpus:
        raise UserInputError(f"{path} is empty: the corpus needs at least one document.")
    return corpus


def read_queries(folder: str | os.PathLike) -> dict[str, str]:
    path = _require(Path(folder) / "queries.jsonl", "queries.jsonl with _id, text")
    queries: dict[str, str] = {}
    for number, row in iter_jsonl(path):
        if "_id" not in row:
            raise UserInputError(f"{path}:{number}: the query has no '_id'.")
        query_id = str(row["_id"])
        if query_id in queries:
            raise UserInputError(f"{path}:{number}: duplicate query id {query_id!r}; ids must be unique.")
        queries[query_id] = str(row.get("text") or "")
    return queries


def available_splits(folder: str | os.PathLike) -> list[str]:
    qrels_dir = Path(folder) / "qrels"
    return sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []


def read_qrels(folder: str | os.PathLike, split: str) -> dict[str, dict[str, int]]:
    path = Path(folder) / "qrels" / f"{split}.tsv"
    if not path.is_file():
        raise UserInputError(
            f"{path} is missing: split {split!r} does not exist; available splits: {available_splits(folder) or 'none'}."
        )
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for number, fields in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if not fields or not "".join(fields).strip():
                continue
            if number == 1 and not fields[-1].strip().lstrip("-").isdigit():
                continue  # header line
            if len(fields) < 3:
                raise UserInputError(f"{path}:{number}: expected 'query-id<TAB>corpus-id<TAB>score'.")
            query_id, doc_id, score = fields[0], fields[1], fields[-1]
            try:
                qrels.setdefault(query_id, {})[doc_id] = int(float(score))
            except ValueError:
                raise UserInputError(f"{path}:{number}: score {score!r} is not a number.") from None
    if not qrels:
        raise UserInputError(f"{path} has no judgements.")
    return qrels


def load_beir(folder: str | os.PathLike, split: str = "test") -> BeirData:
    """Read a BEIR folder and check that every judged query and document exists."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(
            f"{folder} is not a folder: pass a BEIR folder with corpus.jsonl, queries.jsonl, qrels/."
        )
    corpus = read_corpus(folder)
    queries = read_queries(folder)
    qrels = read_qrels(folder, split)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    for query_id, judged in qrels.items():
        if query_id not in queries:
            raise UserInputError(f"{qrels_path}: query id {query_id!r} is not in {folder / 'queries.jsonl'}.")
        for doc_id in judged:
            if doc_id not in corpus:
                raise UserInputError(
                    f"{qrels_path}: document id {doc_id!r} is not in {folder / 'corpus.jsonl'}."
                )
    judged_queries = {query_id: queries[query_id] for query_id in qrels}
    return BeirData(corpus=corpus, queries=judged_queries, qrels=qrels, name=folder.name, split=split)


def check_beir_folder(folder: str | os.PathLike, split: str) -> None:
    """The cheap part of :func:`load_beir`, for checking a run before it starts: the folder and its three
    files exist, the first record of ``corpus.jsonl`` and ``queries.jsonl`` is JSON with an ``_id``, and
    ``qrels/<split>.tsv`` exists. Reads a line of each, whatever the corpus size; ids are checked on load.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(
            f"{folder} is not a folder: pass a BEIR folder with corpus.jsonl, queries.jsonl, qrels/."
        )
    for name, what in (
        ("corpus.jsonl", "corpus.jsonl with _id, title, text"),
        ("queries.jsonl", "queries.jsonl with _id, text"),
    ):
        path = _require(folder / name, what)
        records = iter_jsonl(path)
        try:
            first = next(records, None)
        finally:
            records.close()
        if first is None and name == "corpus.jsonl":
            raise UserInputError(f"{path} is empty: the corpus needs at least one document.")
        if first is not None and "_id" not in first[1]:
            raise UserInputError(f"{path}:{first[0]}: the record has no '_id'.")
    if not (folder / "qrels" / f"{split}.tsv").is_file():
        raise UserInputError(
            f"{folder / 'qrels' / f'{split}.tsv'} is missing: split {split!r} does not exist; available splits: "
            f"{available_splits(folder) or 'none'}."
        )
